"""The pynput backend: keyboard and pointer activity on X11, Windows and macOS.

On X11 (Linux and the BSDs) the backend reads the X RECORD extension through
:class:`~mailpush.sensors.input.xrecord.RecordListener`, which neither decodes
events nor records during the ``hold_s`` after each one, because pynput's
own X11 listeners decode every event in Python. On Windows and macOS the
backend uses pynput's keyboard and mouse listeners, imported only there.
"""

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from mailpush.errors import SensorError
from mailpush.sensors.base import Health, SensorStatus
from mailpush.sensors.input.xrecord import RecordListener, connect_x

log = logging.getLogger(__name__)

_NO_DISPLAY = "DISPLAY is not set, so no X display is reachable"

# How long the X11 listener stops recording after each event of a burst past
# its first few. The last-event time is therefore up to this much early, well
# inside the sensor's promise of about 1 s. It must stay below the input
# sensor's wake_after_s (1 s by default), or every hold would look like a
# quiet spell that starts a new burst.
HOLD_S = 0.5
# Events of a burst that pass before the pauses begin: the fusion needs
# confirm_events (2 by default) distinct input times to leave away or idle.
FREE_EVENTS = 3
# How long start() waits for pynput's listener threads to report ready.
_READY_TIMEOUT_S = 5.0
# How long stop() waits for each listener thread to end.
_STOP_TIMEOUT_S = 2.0


class PynputBackend:
    """Calls ``on_input`` from the X11 RECORD listener, or from pynput's listener threads.

    Args:
        on_input: called with no arguments for input events. It must be
            cheap and must not block, because on Windows 7 and later a
            low-level hook that exceeds the LowLevelHooksTimeout registry value
            is removed silently (Microsoft, LowLevelKeyboardProc reference).
        hold_s: on X11, seconds without recording after each event, so that
            ``on_input`` runs about once per ``hold_s`` during a burst. With 0
            it runs for every RECORD reply, which may carry several events.
            Windows and macOS call it for every event.
        free_events: on X11, events of a burst passed on before the pauses begin.
        quiet_s: on X11, a gap longer than this starts a new burst.
    """

    name = "pynput"

    def __init__(
        self,
        on_input: Callable[[], None],
        hold_s: float = HOLD_S,
        free_events: int = FREE_EVENTS,
        quiet_s: float = 1.0,
    ) -> None:
        self._on_input = on_input
        self._hold_s = hold_s
        self._free_events = free_events
        self._quiet_s = quiet_s
        self._listeners: list[Any] = []

    def start(self) -> None:
        """Start the X11 RECORD listener, or pynput's mouse and keyboard listeners.

        Raises:
            SensorError: pynput or python-xlib is missing, no display is
                reachable, or a listener failed to start. The message is the
                reason to show.
        """
        if _uses_x11(sys.platform):
            self._start_x11()
        else:
            self._start_pynput()

    def _start_x11(self) -> None:
        display = os.environ.get("DISPLAY", "")
        if not display:
            raise SensorError(f"pynput cannot be used: {_NO_DISPLAY}")

        listener = RecordListener(
            self._on_input,
            display,
            self._hold_s,
            "mailpush-input-x11",
            free_replies=self._free_events,
            quiet_s=self._quiet_s,
        )
        try:
            listener.start()
        except SensorError as exc:
            raise SensorError(f"pynput cannot be used: {exc}") from None
        self._listeners = [listener]

    def _start_pynput(self) -> None:
        keyboard, mouse = _import_pynput()
        callback = event_callback(self._on_input)
        self._listeners = [
            mouse.Listener(on_move=callback, on_click=callback, on_scroll=callback),
            keyboard.Listener(on_press=callback, on_release=callback),
        ]

        for listener, role in zip(self._listeners, ("mouse", "keyboard"), strict=True):
            listener.name = f"mailpush-input-pynput-{role}"
            listener.start()

        ready: list[Any] = []
        for listener in self._listeners:
            if not _wait_ready(listener):
                # A listener that never became ready cannot be stopped: pynput's
                # stop() would wait for readiness forever.
                self._listeners = ready
                self.stop()
                raise SensorError(f"{listener.name} did not start within {_READY_TIMEOUT_S:.0f} s")
            ready.append(listener)

    def stop(self) -> None:
        """Stop the listener threads. Safe to call twice or without ``start``."""
        for listener in self._listeners:
            if isinstance(listener, RecordListener):
                listener.stop(_STOP_TIMEOUT_S)
                continue
            listener.stop()
            if listener.is_alive() and listener is not threading.current_thread():
                listener.join(timeout=_STOP_TIMEOUT_S)
        self._listeners = []

    def status(self) -> SensorStatus:
        """Return ``ok`` while every listener runs, else ``unavailable`` naming the stopped one."""
        if not self._listeners:
            return SensorStatus(Health.UNAVAILABLE, "pynput backend is not started")

        for listener in self._listeners:
            if not listener.is_alive():
                reason = f"{listener.name} stopped (the display connection was probably lost)"
                return SensorStatus(Health.UNAVAILABLE, reason)

            # pynput sets IS_TRUSTED on macOS only: False means the process
            # lacks the Accessibility permission and receives no events.
            if getattr(listener, "IS_TRUSTED", True) is False:
                reason = (
                    "macOS sends no input events to this program: allow it under System "
                    "Settings > Privacy & Security > Accessibility, then restart the agent"
                )
                return SensorStatus(Health.UNAVAILABLE, reason)

        return SensorStatus.ok()

    def details(self) -> dict[str, object]:
        """Return the backend name and the number of running listeners."""
        running = sum(1 for listener in self._listeners if listener.is_alive())
        return {"backend": self.name, "listeners": running}


def event_callback(on_input: Callable[[], None]) -> Callable[..., None]:
    """Wrap ``on_input`` as a pynput callback that drops every event argument.

    pynput passes the key, the pointer position or the scroll delta; the
    wrapper never reads or keeps them, so they cannot leave the callback.
    """

    def on_event(*_event: object) -> None:
        on_input()

    return on_event


def x_display_problem(env: Mapping[str, str]) -> str | None:
    """Return why no X display can be used, or ``None`` when one is reachable.

    Only meaningful on Linux and the BSDs, where the backend needs an X server;
    on Windows and macOS pynput needs no display.
    """
    display = env.get("DISPLAY", "")
    if not display:
        return _NO_DISPLAY

    try:
        import Xlib.error
    except ImportError:
        return "python-xlib is not installed (pip install python-xlib)"

    try:
        connect_x(display).close()
    except (Xlib.error.DisplayError, Xlib.error.ConnectionClosedError, OSError) as exc:
        return f"cannot connect to X display {display!r}: {exc}"

    return None


def _uses_x11(platform: str) -> bool:
    """Return whether pynput would use X11 here: everywhere but Windows and macOS."""
    return platform not in ("win32", "darwin")


def _import_pynput() -> tuple[Any, Any]:
    try:
        from pynput import keyboard, mouse
    except ModuleNotFoundError as exc:
        if exc.name != "pynput":
            raise SensorError(f"pynput cannot load {exc.name}: {exc}") from None
        raise SensorError("pynput is not installed: pip install pynput") from None
    except ImportError as exc:
        # pynput names the platform library it lacks in the first line.
        first_line = str(exc).splitlines()[0]
        raise SensorError(f"pynput cannot be imported: {first_line}") from None
    return keyboard, mouse


def _wait_ready(listener: Any) -> bool:
    # pynput's Listener.wait() blocks forever when the listener thread dies
    # before it is ready, so wait for it in a helper thread with a deadline.
    waiter = threading.Thread(target=listener.wait, name=f"{listener.name}-wait", daemon=True)
    waiter.start()
    waiter.join(_READY_TIMEOUT_S)

    # NOTE: on a timeout the helper thread stays blocked in wait() for the life of the process.
    return not waiter.is_alive()
