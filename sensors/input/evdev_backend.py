"""The evdev backend: input activity read from Linux ``/dev/input/event*`` nodes.

It works wherever the kernel's input devices are readable: under Wayland, on
the text console and on a headless machine. One daemon thread waits on every
open device with a selector, drops a device whose read fails (it was
unplugged) and looks for new or returning devices every ``rescan_interval_s``.

The module name avoids shadowing the ``evdev`` library, which is imported in
:func:`default_node_access` only.
"""

import errno
import getpass
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from mailpush.errors import SensorError
from mailpush.sensors.base import Health, SensorStatus

log = logging.getLogger(__name__)

INPUT_DIR = "/dev/input"

# Event types and codes from linux/input-event-codes.h (kernel ABI, stable).
EV_KEY, EV_REL, EV_ABS = 0x01, 0x02, 0x03
KEY_A, KEY_SPACE = 30, 57
BTN_LEFT, BTN_TOOL_PEN, BTN_TOUCH = 0x110, 0x140, 0x14A
REL_X, REL_Y = 0x00, 0x01
ABS_X, ABS_MT_POSITION_X = 0x00, 0x35

# Only these types are a person's input. EV_SYN, EV_MSC, EV_LED, EV_SW and the
# others also arrive without any user action (an LED set by another program,
# a lid switch).
_INPUT_EVENT_TYPES = frozenset({EV_KEY, EV_REL, EV_ABS})


class InputDeviceLike(Protocol):
    """The part of ``evdev.InputDevice`` the backend uses, which test doubles also provide."""

    path: str | bytes
    name: str

    def fileno(self) -> int:
        """Return the device's file descriptor."""

    def capabilities(
        self, verbose: Literal[False] = False, absinfo: bool = True
    ) -> dict[int, list[Any]]:
        """Return the supported event codes, keyed by event type."""

    def read(self) -> Iterator[Any]:
        """Yield the pending events; raise ``BlockingIOError`` when there are none."""

    def close(self) -> None:
        """Close the file descriptor."""


@dataclass(frozen=True)
class NodeAccess:
    """The functions that list and open event nodes, replaced by test doubles.

    Attributes:
        list_nodes: returns the event node paths; raises ``FileNotFoundError``
            when the input directory does not exist.
        open_device: opens one node; raises ``PermissionError`` when the user
            may not read it and ``OSError`` when it vanished meanwhile.
    """

    list_nodes: Callable[[], list[str]]
    open_device: Callable[[str], InputDeviceLike]


def default_node_access() -> NodeAccess:
    """Import python-evdev and return access to the real ``/dev/input``.

    Raises:
        SensorError: python-evdev is not installed.
    """
    try:
        import evdev
    except ImportError:
        raise SensorError("python-evdev is not installed: pip install evdev") from None

    def open_device(path: str) -> InputDeviceLike:
        return evdev.InputDevice(path)

    return NodeAccess(list_nodes=list_event_nodes, open_device=open_device)


def list_event_nodes(directory: str = INPUT_DIR) -> list[str]:
    """Return the ``event*`` nodes of ``directory``, sorted by name."""
    names = [name for name in os.listdir(directory) if name.startswith("event")]
    return sorted(os.path.join(directory, name) for name in names)


def is_user_input(capabilities: dict[int, list[Any]]) -> bool:
    """Tell whether a device with these capabilities is a keyboard, pointer or touch device.

    Power buttons, lid switches, accelerometers and remote controls without
    letter keys are left out; name them in the allowlist to use them anyway.
    """
    keys = set(capabilities.get(EV_KEY, ()))
    rel = set(capabilities.get(EV_REL, ()))
    # With absinfo=True evdev lists (code, AbsInfo) pairs instead of bare codes.
    abs_entries = capabilities.get(EV_ABS, ())
    abs_codes = {entry[0] if isinstance(entry, tuple) else entry for entry in abs_entries}

    keyboard = {KEY_A, KEY_SPACE} <= keys
    mouse = {REL_X, REL_Y} <= rel
    tablet = ABS_X in abs_codes and bool(keys & {BTN_LEFT, BTN_TOOL_PEN, BTN_TOUCH})
    touch = ABS_MT_POSITION_X in abs_codes
    return keyboard or mouse or tablet or touch


def permission_reason(path: str, others: int = 0) -> str:
    """Return the one-line fix for an event node the user may not read."""
    user = _user_name()
    where = path if not others else f"{path} and {others} other event node(s)"
    return (
        f"permission denied on {where}: add the user to the input group "
        f"(sudo usermod -aG input {user}) and log in again"
    )


class EvdevBackend:
    """Calls ``on_input`` when an allowed evdev device reports input.

    Args:
        on_input: called with no arguments, at most once per read of a device.
        allowlist: device names (as ``evdev`` reports them) or node paths such
            as ``/dev/input/by-id/...`` to use; empty means every keyboard,
            pointer and touch device.
        rescan_interval_s: how often the input directory is listed again.
        access: lists and opens nodes; ``None`` uses python-evdev on ``/dev/input``.
    """

    name = "evdev"

    def __init__(
        self,
        on_input: Callable[[], None],
        allowlist: Sequence[str] = (),
        rescan_interval_s: float = 5.0,
        access: NodeAccess | None = None,
    ) -> None:
        self._on_input = on_input
        self._allowlist = tuple(allowlist)
        self._rescan_interval_s = rescan_interval_s
        self._access = access
        self._selector: selectors.BaseSelector | None = None
        self._open: dict[str, InputDeviceLike] = {}
        self._skipped: set[str] = set()
        self._seen_names: set[str] = set()
        self._denied: list[str] = []
        self._stopping = threading.Event()
        self._wakeup_r = self._wakeup_w = -1
        self._thread: threading.Thread | None = None
        self._status = SensorStatus(Health.UNAVAILABLE, "evdev backend is not started")

    def start(self) -> None:
        """Open the allowed devices and start the reader thread.

        A device the user may not read does not raise: it makes the status
        ``unavailable`` with the fix, and the thread keeps looking.

        Raises:
            SensorError: python-evdev is missing or the input directory does
                not exist; the message is the reason to show.
        """
        if self._access is None:
            self._access = default_node_access()

        self._selector = selectors.DefaultSelector()
        self._wakeup_r, self._wakeup_w = os.pipe()
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, None)
        try:
            self._scan()
        except SensorError:
            self.stop()
            raise

        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="mailpush-input-evdev", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close every device. Safe to call twice or without ``start``."""
        self._stopping.set()
        if self._wakeup_w >= 0:
            os.write(self._wakeup_w, b"\0")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._thread = None

        for path in list(self._open):
            self._drop(path)
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for fd in (self._wakeup_r, self._wakeup_w):
            if fd >= 0:
                os.close(fd)
        self._wakeup_r = self._wakeup_w = -1

    def status(self) -> SensorStatus:
        """Return the health computed at the last scan or device loss."""
        return self._status

    def details(self) -> dict[str, object]:
        """Return the backend name and the number of open devices."""
        return {"backend": self.name, "devices": len(self._open)}

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # the thread must not die silently with an ok status
            log.exception("evdev reader thread failed")
            self._status = SensorStatus(Health.ERROR, f"evdev reader thread failed: {exc}")

    def _loop(self) -> None:
        next_scan = time.monotonic() + self._rescan_interval_s
        while not self._stopping.is_set():
            timeout = max(0.0, next_scan - time.monotonic())
            assert self._selector is not None
            for key, _mask in self._selector.select(timeout):
                if key.data is not None:
                    self._service(key.data)

            if time.monotonic() >= next_scan and not self._stopping.is_set():
                self._rescan_quietly()
                next_scan = time.monotonic() + self._rescan_interval_s

    def _service(self, path: str) -> None:
        device = self._open.get(path)
        if device is None:
            return

        outcome = _read_input(device)
        if outcome is None:
            log.info(
                "input device %s (%s) was removed; waiting for it to return", path, device.name
            )
            self._drop(path)
            self._status = self._compute_status()
        elif outcome:
            self._on_input()

    def _rescan_quietly(self) -> None:
        try:
            self._scan()
        except SensorError as exc:
            # The directory itself vanished (a container lost its mount):
            # keep the thread and try again at the next rescan.
            log.debug("evdev rescan failed: %s", exc)
            self._status = SensorStatus(Health.UNAVAILABLE, str(exc))

    def _scan(self) -> None:
        assert self._access is not None
        try:
            paths = self._access.list_nodes()
        except FileNotFoundError:
            msg = (
                f"{INPUT_DIR} not found: this system exposes no input devices "
                "(in a container, pass /dev/input in with --device)"
            )
            raise SensorError(msg) from None

        self._skipped &= set(paths)
        denied = []
        for path in paths:
            if path in self._open or path in self._skipped:
                continue
            if self._try_open(path) == "denied":
                denied.append(path)

        self._denied = denied
        self._status = self._compute_status()

    def _try_open(self, path: str) -> str:
        assert self._access is not None and self._selector is not None
        try:
            device = self._access.open_device(path)
        except PermissionError:
            return "denied"
        except OSError as exc:
            # The node vanished between listing and opening (an unplug race).
            log.debug("cannot open %s: %s", path, exc)
            return "failed"

        if not self._is_allowed(device):
            device.close()
            self._skipped.add(path)
            return "skipped"

        self._open[path] = device
        self._selector.register(device.fileno(), selectors.EVENT_READ, path)
        if device.name in self._seen_names:
            log.info("input device %s (%s) is back", path, device.name)
        else:
            log.info("reading input activity from %s (%s)", path, device.name)
        self._seen_names.add(device.name)
        return "opened"

    def _is_allowed(self, device: InputDeviceLike) -> bool:
        if self._allowlist:
            return any(_matches(entry, device) for entry in self._allowlist)
        return is_user_input(device.capabilities(absinfo=False))

    def _drop(self, path: str) -> None:
        device = self._open.pop(path)
        if self._selector is not None:
            try:
                self._selector.unregister(device.fileno())
            except (KeyError, ValueError):
                pass
        try:
            device.close()
        except OSError as exc:
            log.debug("closing %s failed: %s", path, exc)

    def _compute_status(self) -> SensorStatus:
        open_names = {device.name for device in self._open.values()}
        missing = sorted(_missing_entries(self._allowlist, self._open.values()))
        # NOTE: without an allowlist, a device removed for good keeps the status
        # degraded until the agent restarts, because it may still come back.
        removed = sorted(self._seen_names - open_names)
        absent = missing if self._allowlist else removed

        # A denied node may be an allowed device; without an allowlist it may
        # be any keyboard or pointer, because its name cannot be read.
        denied = self._denied
        if denied and (missing or not self._allowlist):
            health = Health.DEGRADED if self._open else Health.UNAVAILABLE
            return SensorStatus(health, permission_reason(denied[0], len(denied) - 1))

        if self._open:
            if not absent:
                return SensorStatus.ok()
            return SensorStatus(Health.DEGRADED, _absent_reason(absent, self._allowlist))

        if absent:
            return SensorStatus(Health.UNAVAILABLE, _absent_reason(absent, self._allowlist))
        return SensorStatus(
            Health.UNAVAILABLE,
            f"no keyboard, pointer or touch device found in {INPUT_DIR}; "
            f"looking again every {self._rescan_interval_s:g} s",
        )


def _read_input(device: InputDeviceLike) -> bool | None:
    """Drain pending events: ``True`` if any was input, ``None`` if the device was removed.

    The events are inspected for their type only and dropped when this
    function returns, so no key code or position outlives it.
    """
    count = 0
    found = False
    try:
        for event in device.read():
            count += 1
            found = found or event.type in _INPUT_EVENT_TYPES
    except BlockingIOError:
        return found
    except OSError as exc:
        # The kernel returns ENODEV once the device is unplugged (evdev_read()
        # in drivers/input/evdev.c). Any other error also makes it unusable.
        if exc.errno != errno.ENODEV:
            log.debug("reading %s failed: %s", device.path, exc)
        return None

    # The selector reported "readable" but the read returned nothing. That is
    # end of file, which a real evdev node never reports, so treat it as
    # unplugged rather than spin.
    return found if count else None


def _matches(entry: str, device: InputDeviceLike) -> bool:
    if entry == device.name:
        return True
    device_path = os.fsdecode(device.path)
    return entry.startswith("/") and os.path.realpath(entry) == os.path.realpath(device_path)


def _missing_entries(allowlist: Iterable[str], devices: Iterable[InputDeviceLike]) -> set[str]:
    present = list(devices)
    return {entry for entry in allowlist if not any(_matches(entry, d) for d in present)}


def _absent_reason(absent: list[str], allowlist: Sequence[str]) -> str:
    names = ", ".join(repr(name) for name in absent)
    if allowlist:
        return f"allowed input device(s) not found: {names}; they are used again when they return"
    return f"input device(s) removed: {names}; they are used again when they return"


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "$USER"
