"""The pynput backend: keyboard and pointer activity on X11, Windows and macOS.

pynput is imported in :meth:`PynputBackend.start`, because on Linux importing it
already connects to the X display and raises ``ImportError`` without one.
"""

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from mailpush.errors import SensorError
from mailpush.sensors.base import Health, SensorStatus

log = logging.getLogger(__name__)

# How long start() waits for pynput's listener threads to report ready.
_READY_TIMEOUT_S = 5.0
# How long stop() waits for each listener thread to end.
_STOP_TIMEOUT_S = 2.0


class PynputBackend:
    """Calls ``on_input`` from pynput's keyboard and mouse listener threads.

    Args:
        on_input: called with no arguments for every input event. It must be
            cheap and must not block, because on Windows 7 and later a
            low-level hook that exceeds the LowLevelHooksTimeout registry value
            is removed silently (Microsoft, LowLevelKeyboardProc reference).
    """

    name = "pynput"

    def __init__(self, on_input: Callable[[], None]) -> None:
        self._on_input = on_input
        self._listeners: list[Any] = []

    def start(self) -> None:
        """Import pynput and start one mouse and one keyboard listener.

        Raises:
            SensorError: pynput is missing, no display is reachable, or a
                listener failed to start; the message is the reason to show.
        """
        if sys.platform.startswith("linux"):
            # Checked first because pynput, once imported, fails in its thread
            # instead of at import when the display disappears.
            problem = x_display_problem(os.environ)
            if problem is not None:
                raise SensorError(f"pynput cannot be used: {problem}")

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
                raise SensorError(_not_ready_reason(listener))
            ready.append(listener)

    def stop(self) -> None:
        """Stop the listener threads. Safe to call twice or without ``start``."""
        for listener in self._listeners:
            listener.stop()
            _end_x_recording(listener)
        for listener in self._listeners:
            if listener.is_alive() and listener is not threading.current_thread():
                listener.join(timeout=_STOP_TIMEOUT_S)
        self._listeners = []

    def status(self) -> SensorStatus:
        """Return ``ok`` while both listeners run, else ``unavailable`` naming the stopped one."""
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

    Only meaningful on Linux and the BSDs, where pynput needs an X server;
    on Windows and macOS pynput needs no display.
    """
    display = env.get("DISPLAY", "")
    if not display:
        return "DISPLAY is not set, so no X display is reachable"

    try:
        import Xlib.display
        import Xlib.error
    except ImportError:
        return "python-xlib is not installed (pip install python-xlib)"

    try:
        Xlib.display.Display(display).close()
    except (Xlib.error.DisplayError, Xlib.error.ConnectionClosedError, OSError) as exc:
        return f"cannot connect to X display {display!r}: {exc}"

    return None


def _import_pynput() -> tuple[Any, Any]:
    try:
        from pynput import keyboard, mouse
    except ModuleNotFoundError as exc:
        if exc.name != "pynput":
            raise SensorError(f"pynput cannot load {exc.name}: {exc}") from None
        raise SensorError("pynput is not installed: pip install pynput") from None
    except ImportError as exc:
        # On Linux pynput raises ImportError when it cannot open the display.
        first_line = str(exc).splitlines()[0]
        display = os.environ.get("DISPLAY", "")
        msg = (
            f"pynput cannot use the display {display!r}: {first_line}; "
            'set DISPLAY to a running X server or set backend = "evdev"'
        )
        raise SensorError(msg) from None
    return keyboard, mouse


def _wait_ready(listener: Any) -> bool:
    # pynput's Listener.wait() blocks forever when the listener thread dies
    # before it is ready (for example when the X server lacks the RECORD
    # extension), so wait for it in a helper thread with a deadline.
    waiter = threading.Thread(target=listener.wait, name=f"{listener.name}-wait", daemon=True)
    waiter.start()
    waiter.join(_READY_TIMEOUT_S)

    # NOTE: on a timeout the helper thread stays blocked in wait() for the life of the process.
    return not waiter.is_alive()


def _end_x_recording(listener: Any) -> None:
    """Make an Xlib listener thread return now instead of at the next input event.

    pynput 1.8 queues RecordDisableContext on the connection whose thread is
    blocked reading, so the request leaves only after one more event
    (pynput pull request 583). Sending it on the listener's second connection
    ends the recording at once.
    """
    # NOTE: this uses pynput's private _display_stop and _context attributes.
    # Where they are missing (other platforms or versions), stop() waits up to
    # _STOP_TIMEOUT_S per listener and the daemon thread ends later.
    display = getattr(listener, "_display_stop", None)
    context = getattr(listener, "_context", None)
    if display is None or context is None:
        return
    try:
        display.record_disable_context(context)
        display.flush()
    except Exception as exc:  # Xlib raises several unrelated types on a closed connection
        log.debug("ending the X recording of %s failed: %s", listener.name, exc)


def _not_ready_reason(listener: Any) -> str:
    reason = f"{listener.name} did not start within {_READY_TIMEOUT_S:.0f} s"
    if sys.platform.startswith("linux"):
        reason += "; check that the X server has the RECORD extension (xdpyinfo | grep RECORD)"
    return reason
