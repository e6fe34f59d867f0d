"""Facts about the terminal's screen, read from an X11 server with python-xlib.

python-xlib is installed with pynput on Linux and is imported inside
:func:`query_x11_display`, so a system without it reports no display instead of
failing at import time.
"""

import logging
import os
from typing import Any, TypedDict

log = logging.getLogger(__name__)

# Visual classes from the X11 core protocol (Xlib.X.StaticGray, Xlib.X.GrayScale):
# a root visual of either class shows no color, whatever its depth.
_GRAY_VISUAL_CLASSES = frozenset({0, 1})


class DisplayFacts(TypedDict):
    """The ``display`` object of DeviceAttributes: size in pixels and whether it shows color."""

    width: int
    height: int
    color: bool


def query_x11_display(name: str = "") -> DisplayFacts | None:
    """Connect to an X11 server and return the size and color of its default screen.

    Args:
        name: the X display, like ``":0"``; empty uses ``$DISPLAY``.

    Returns:
        The facts, or ``None`` when no X display is set or reachable (a headless
        terminal) or python-xlib is not installed.
    """
    display_name = name or os.environ.get("DISPLAY", "")
    if not display_name:
        # NOTE: a pure Wayland session without XWayland has no DISPLAY, so it is
        # reported as headless.
        log.debug("no X display set; reporting a headless terminal")
        return None

    try:
        import Xlib.error

        from mailpush.sensors.input.xrecord import connect_x
    except ImportError:
        log.debug("python-xlib is not installed; reporting no display")
        return None

    connection_errors = (
        Xlib.error.DisplayError,
        Xlib.error.ConnectionClosedError,
        Xlib.error.XauthError,
        OSError,
    )
    try:
        # The low-level connection: Xlib.display.Display would also load
        # every extension module, about 1.2 MiB more (CPython 3.11, x86_64).
        connection = connect_x(display_name)
    except connection_errors as exc:
        log.warning(
            "cannot connect to X display %r (%s); reporting no display. "
            "Check DISPLAY and XAUTHORITY, or set [sensors.power] x_display",
            display_name,
            exc,
        )
        return None

    try:
        return describe_screen(connection.info.roots[connection.default_screen])
    finally:
        connection.close()


def describe_screen(screen: Any) -> DisplayFacts:
    """Convert an X11 screen (a root of the connection setup) into :class:`DisplayFacts`.

    The screen shows color unless its root visual is a gray class or its depth
    is one bit (a monochrome frame buffer).
    """
    visual_class = _root_visual_class(screen)
    color = screen.root_depth > 1 and visual_class not in _GRAY_VISUAL_CLASSES
    return DisplayFacts(
        width=int(screen.width_in_pixels),
        height=int(screen.height_in_pixels),
        color=bool(color),
    )


def _root_visual_class(screen: Any) -> int | None:
    for depth in screen.allowed_depths:
        for visual in depth.visuals:
            if visual.visual_id == screen.root_visual:
                return int(visual.visual_class)
    return None
