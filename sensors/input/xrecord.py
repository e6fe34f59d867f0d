"""Keyboard and pointer activity on X11 from the RECORD extension, without decoding events.

The X server's RECORD extension sends a copy of every device event (key
press and release, button press and release, pointer motion) to a recording
client. pynput decodes each of those events in Python, which cost 5 to 6 %
of one core under 1,000 pointer events a second (bench/input_storm.py). The sensor needs only the
time of the last event, so :class:`RecordListener` never decodes them:

* any data reply means "input happened", and its bytes are dropped unread;
* after the first ``free_replies`` replies of a burst it disables the
  recording for ``hold_s`` after each reply, so during a burst the X server
  sends about one event per hold instead of every one. The first replies
  pass freely because the fusion needs more than one input time to turn a
  terminal ``active``.

While recording is enabled, which is the case after every quiet spell, the
first event reaches ``on_input`` as soon as the X server delivers it.

This uses python-xlib's low-level connection (``Xlib.protocol.display``),
which loads no extension modules and keeps no keymap. python-xlib is the
library pynput itself uses on X11.
"""

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from mailpush.errors import SensorError

log = logging.getLogger(__name__)

# Core event codes from the X11 protocol: KeyPress = 2 up to MotionNotify = 6
# covers key press and release, button press and release, and pointer motion.
_FIRST_DEVICE_EVENT = 2
_LAST_DEVICE_EVENT = 6
# How long start() waits for the X server to confirm that recording began.
_READY_TIMEOUT_S = 5.0
# How often stop() repeats RecordDisableContext while the thread still runs.
_STOP_RETRY_S = 0.1
# Connection attempts, and the pause between them, when the server resets a
# connection during setup (see connect_x).
_CONNECT_ATTEMPTS = 3
_CONNECT_RETRY_S = 0.05


class RecordListener:
    """A RECORD listener: ``on_input`` for the first replies of a burst, then once per ``hold_s``.

    The last-event time that ``on_input`` produces is at most ``hold_s``
    (plus the round trip that enables recording again) earlier than the
    real last event of a burst.

    Args:
        on_input: called with no arguments from the listener thread. It must
            be cheap and must not block.
        display_name: the X display, such as ``":0"``.
        hold_s: seconds to stop recording after each event. 0 never stops.
        name: the listener thread's name.
        free_replies: replies of a burst passed on before the holds begin.
        quiet_s: a gap between replies longer than this starts a new burst.
    """

    def __init__(
        self,
        on_input: Callable[[], None],
        display_name: str,
        hold_s: float,
        name: str,
        free_replies: int = 1,
        quiet_s: float = 1.0,
    ) -> None:
        self.name = name
        self._on_input = on_input
        self._display_name = display_name
        self._hold_s = hold_s
        self._free_replies = free_replies
        self._quiet_s = quiet_s
        self._last_reply = float("-inf")
        self._burst_replies = 0
        self._stopping = threading.Event()
        # Set when the X server confirms recording (StartOfData) or the thread ends.
        self._ready = threading.Event()
        self._failure = ""
        self._paused = False
        self._record: Any = None  # the connection blocked in RecordEnableContext
        self._control: Any = None  # the connection that sends RecordDisableContext
        self._context: int | None = None
        self._opcode = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, timeout: float = _READY_TIMEOUT_S) -> None:
        """Open two X connections, create the recording context and start the thread.

        Returns once the X server has confirmed that recording began.

        Raises:
            SensorError: python-xlib is missing, the display is unreachable,
                it lacks RECORD, or recording did not begin within ``timeout``.
        """
        try:
            self._open()
        except SensorError:
            self._close_connections()
            raise

        self._thread.start()
        if self._ready.wait(timeout) and self._thread.is_alive():
            return

        self.stop()
        if self._failure:
            msg = f"{self.name} stopped before recording began: {self._failure}"
        else:
            msg = f"{self.name}: the X server did not start recording within {timeout:.0f} s"
        raise SensorError(msg)

    def stop(self, timeout: float = 2.0) -> None:
        """Disable recording, wait up to ``timeout`` for the thread, and close both connections."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            deadline = time.monotonic() + timeout
            # Repeated because a disable that reaches the server just before
            # the thread's next RecordEnableContext is ignored.
            while self._thread.is_alive() and time.monotonic() < deadline:
                self._disable()
                self._thread.join(_STOP_RETRY_S)
            if self._thread.is_alive():
                # NOTE: the thread is a daemon and ends with the process. Its
                # connections stay open, so that they are not closed under it.
                log.debug("%s did not end within %.1f s", self.name, timeout)
                return
        self._close_connections()

    def is_alive(self) -> bool:
        """Return whether the listener thread runs."""
        return self._thread.is_alive()

    def _open(self) -> None:
        try:
            import Xlib.error
            from Xlib.ext import record
        except ImportError:
            raise SensorError("python-xlib is not installed (pip install python-xlib)") from None

        errors = (Xlib.error.DisplayError, Xlib.error.ConnectionClosedError, OSError)
        try:
            self._record = connect_x(self._display_name)
            self._control = connect_x(self._display_name)
        except errors as exc:
            msg = f"cannot connect to X display {self._display_name!r}: {exc}"
            raise SensorError(msg) from None
        for connection in (self._record, self._control):
            connection.set_error_handler(self._log_x_error)

        extension = query_extension(self._record, record.extname)
        if not extension.present:
            msg = (
                f"X display {self._display_name!r} lacks the RECORD extension; "
                'enable it in the X server or set backend = "evdev"'
            )
            raise SensorError(msg)

        self._opcode = extension.major_opcode
        self._context = self._record.allocate_resource_id()
        record.CreateContext(
            display=self._record,
            opcode=self._opcode,
            context=self._context,
            element_header=0,
            clients=[record.AllClients],
            ranges=[_device_events_range()],
        )
        self._record.flush()

    def _run(self) -> None:
        from Xlib.ext import record

        try:
            while not self._stopping.is_set():
                self._paused = False
                # Blocks until a RecordDisableContext from _on_reply or stop().
                record.EnableContext(
                    callback=self._on_reply,
                    display=self._record,
                    opcode=self._opcode,
                    context=self._context,
                )
                self._stopping.wait(self._hold_s)
        except Exception as exc:  # Xlib raises several unrelated types on a lost connection
            self._failure = str(exc) or type(exc).__name__
            if not self._stopping.is_set():
                log.debug("%s stopped: %s", self.name, self._failure)
        finally:
            self._ready.set()

    def _on_reply(self, reply: Any) -> None:
        """Handle one RECORD reply. Its ``data`` contains raw events and is never read."""
        from Xlib.ext import record

        if reply.category == record.StartOfData:
            self._ready.set()
            return
        if reply.category != record.FromServer or self._paused:
            return

        now = time.monotonic()
        if now - self._last_reply > self._quiet_s:
            self._burst_replies = 0
        self._last_reply = now
        self._burst_replies += 1
        self._on_input()
        if self._hold_s > 0 and self._burst_replies >= self._free_replies:
            self._paused = True
            self._disable()

    def _disable(self) -> None:
        from Xlib.ext import record

        try:
            record.DisableContext(display=self._control, opcode=self._opcode, context=self._context)
            self._control.flush()
        except Exception as exc:  # Xlib raises several unrelated types on a closed connection
            log.debug("%s: disabling the recording failed: %s", self.name, exc)

    def _close_connections(self) -> None:
        # The X server frees the recording context with the connection that created it.
        for connection in (self._record, self._control):
            if connection is None:
                continue
            try:
                connection.close()
            except Exception as exc:  # the server may have closed it already
                log.debug("%s: closing an X connection failed: %s", self.name, exc)
        self._record = self._control = None

    def _log_x_error(self, error: Any, request: Any) -> None:
        log.debug("%s: X protocol error %s", self.name, error)


def connect_x(display_name: str) -> Any:
    """Open a low-level python-xlib connection to ``display_name``.

    Raises:
        ImportError: python-xlib is not installed.
        Xlib.error.DisplayError: the display name is invalid or unreachable.
        Xlib.error.ConnectionClosedError: the server closed the connection
            during setup, on every attempt.
        OSError: the connection failed.
    """
    import Xlib.error
    import Xlib.protocol.display

    class Connection(Xlib.protocol.display.Display):
        def __init__(self, name: str) -> None:
            # Read while the connection setup is parsed. Empty, so resource
            # ids stay plain ints; Xlib.display.Display fills it with its
            # window and colormap classes.
            self.resource_classes: dict[str, type] = {}
            super().__init__(name)

    # NOTE: Xvfb 21.1.7 resets about one connection in ten that a process
    # opens within a millisecond of closing another, so such a reset is retried.
    for _ in range(_CONNECT_ATTEMPTS - 1):
        try:
            return Connection(display_name)
        except Xlib.error.ConnectionClosedError:
            time.sleep(_CONNECT_RETRY_S)
    return Connection(display_name)


def query_extension(connection: Any, name: str) -> Any:
    """Send the core QueryExtension request and return its reply.

    The reply has ``present`` and ``major_opcode``. Defined here from the X11
    protocol encoding (QueryExtension, opcode 98) because python-xlib's own
    definition sits in ``Xlib.protocol.request``, whose 120 request classes
    cost about 0.5 MiB RSS (CPython 3.11, x86_64).
    """
    from Xlib.protocol import rq

    class QueryExtension(rq.ReplyRequest):
        _request = rq.Struct(
            rq.Opcode(98),
            rq.Pad(1),
            rq.RequestLength(),
            rq.LengthOf("name", 2),
            rq.Pad(2),
            rq.String8("name"),
        )
        _reply = rq.Struct(
            rq.ReplyCode(),
            rq.Pad(1),
            rq.Card16("sequence_number"),
            rq.ReplyLength(),
            rq.Bool("present"),
            rq.Card8("major_opcode"),
            rq.Card8("first_event"),
            rq.Card8("first_error"),
            rq.Pad(20),
        )

    # A ReplyRequest sends itself and waits for the reply in its constructor.
    return QueryExtension(display=connection, name=name)


def _device_events_range() -> dict[str, Any]:
    """Return the RECORD range that selects core device events and nothing else."""
    return {
        "core_requests": (0, 0),
        "core_replies": (0, 0),
        "ext_requests": (0, 0, 0, 0),
        "ext_replies": (0, 0, 0, 0),
        "delivered_events": (0, 0),
        "device_events": (_FIRST_DEVICE_EVENT, _LAST_DEVICE_EVENT),
        "errors": (0, 0),
        "client_started": False,
        "client_died": False,
    }
