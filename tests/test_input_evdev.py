"""The evdev backend against scripted event nodes.

This machine has neither /dev/input nor /dev/uinput, so the kernel side is
faked at the lowest layer the backend touches: each opened device is a pipe
that receives raw ``struct input_event`` bytes, read back by python-evdev's
own C reader (``EventIO.read``). Unplugging closes the pipe (so poll reports
POLLHUP, as for a removed evdev node) and makes reads fail with ENODEV, as
drivers/input/evdev.c does once the device is gone.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from evdev.eventio import EventIO

from mailpush.sensors.base import Health
from mailpush.sensors.input.evdev_backend import (
    ABS_MT_POSITION_X,
    ABS_X,
    BTN_LEFT,
    BTN_TOUCH,
    EV_ABS,
    EV_KEY,
    EV_REL,
    KEY_A,
    KEY_SPACE,
    REL_X,
    REL_Y,
    NodeAccess,
    is_user_input,
)
from mailpush.sensors.input.plugin import InputOptions, InputSensor

EV_SYN, EV_MSC, EV_LED = 0x00, 0x04, 0x11
KEY_POWER, MSC_SCAN, LED_CAPSL, ABS_Y, ABS_Z = 116, 4, 1, 1, 2

KEYBOARD_CAPS = {EV_KEY: [KEY_A, KEY_SPACE, 28, 42], EV_MSC: [MSC_SCAN], EV_LED: [LED_CAPSL]}
MOUSE_CAPS = {EV_KEY: [BTN_LEFT, BTN_LEFT + 1], EV_REL: [REL_X, REL_Y, 8]}
TOUCH_CAPS = {EV_KEY: [BTN_TOUCH], EV_ABS: [ABS_X, ABS_Y, ABS_MT_POSITION_X]}
POWER_BUTTON_CAPS = {EV_KEY: [KEY_POWER]}
ACCELEROMETER_CAPS = {EV_ABS: [ABS_X, ABS_Y, ABS_Z]}

# struct input_event from linux/input.h: struct timeval, __u16 type, __u16 code, __s32 value.
INPUT_EVENT = struct.Struct("llHHi")


class FakeNode:
    """One /dev/input/eventN node: what the kernel would deliver to each reader."""

    def __init__(self, path: str, name: str, capabilities: dict[int, list[int]]) -> None:
        self.path = path
        self.name = name
        self.capabilities = capabilities
        self.present = True
        self.denied = False
        self.devices: list[FakeInputDevice] = []

    def emit(self, etype: int, code: int, value: int) -> None:
        now = time.time()
        raw = INPUT_EVENT.pack(int(now), int(now % 1 * 1e6), etype, code, value)
        for device in self.devices:
            if device.write_fd >= 0:
                os.write(device.write_fd, raw)

    def hang_up(self) -> None:
        for device in self.devices:
            device.close_writer()

    def unplug(self) -> None:
        self.present = False
        for device in self.devices:
            device.unplugged = True
        self.hang_up()

    def plug(self) -> None:
        self.present = True


class FakeInputDevice(EventIO):
    """Behaves like evdev.InputDevice on an open node, over a non-blocking pipe."""

    def __init__(self, node: FakeNode) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        node.devices.append(self)
        self.fd = read_fd
        self.write_fd = write_fd
        self.path = node.path
        self.name = node.name
        self.unplugged = False
        self._capabilities = node.capabilities

    def capabilities(self, verbose: bool = False, absinfo: bool = True) -> dict[int, list[int]]:
        return {etype: list(codes) for etype, codes in self._capabilities.items()}

    def read(self) -> Iterator:
        if self.unplugged:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return super().read()

    def close(self) -> None:
        self.close_writer()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close_writer(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1


class FakeInputDir:
    """A scripted /dev/input: nodes to list, open, deny, unplug and plug again."""

    def __init__(self) -> None:
        self.nodes: dict[str, FakeNode] = {}
        self.opened: list[FakeInputDevice] = []

    def add(self, name: str, capabilities: dict[int, list[int]]) -> FakeNode:
        path = f"/dev/input/event{len(self.nodes)}"
        self.nodes[path] = FakeNode(path, name, capabilities)
        return self.nodes[path]

    def list_nodes(self) -> list[str]:
        return sorted(path for path, node in self.nodes.items() if node.present)

    def open_device(self, path: str) -> FakeInputDevice:
        node = self.nodes.get(path)
        if node is None or not node.present:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if node.denied:
            # What os.open() raises for a node of mode 0660 root:input
            # opened by a user outside the input group.
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        device = FakeInputDevice(node)
        self.opened.append(device)
        return device

    @property
    def access(self) -> NodeAccess:
        return NodeAccess(list_nodes=self.list_nodes, open_device=self.open_device)

    def close(self) -> None:
        for device in self.opened:
            device.close()


@pytest.fixture()
def input_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeInputDir]:
    monkeypatch.delenv("MAILPUSH_INPUT_BACKEND", raising=False)
    fake = FakeInputDir()
    yield fake
    fake.close()


@pytest.fixture()
def make_sensor(
    input_dir: FakeInputDir,
) -> Iterator[Callable[..., tuple[InputSensor, list[float]]]]:
    sensors: list[InputSensor] = []

    def make(**options: object) -> tuple[InputSensor, list[float]]:
        settings = {"backend": "evdev", "rescan_interval_s": 0.2, **options}
        sensor = InputSensor(InputOptions(**settings), node_access=input_dir.access)
        wakes: list[float] = []
        sensor.start(lambda: wakes.append(time.monotonic()))
        sensors.append(sensor)
        return sensor, wakes

    yield make
    for sensor in sensors:
        sensor.stop()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


def emit_key(node: FakeNode, code: int = KEY_A) -> None:
    node.emit(EV_MSC, MSC_SCAN, 0x70004)
    node.emit(EV_KEY, code, 1)
    node.emit(EV_SYN, 0, 0)


def emit_motion(node: FakeNode, dx: int = 3, dy: int = -2) -> None:
    node.emit(EV_REL, REL_X, dx)
    node.emit(EV_REL, REL_Y, dy)
    node.emit(EV_SYN, 0, 0)


def evdev_thread() -> threading.Thread:
    threads = [t for t in threading.enumerate() if t.name == "mailpush-input-evdev"]
    assert len(threads) == 1, [t.name for t in threading.enumerate()]
    return threads[0]


def thread_cpu_s(thread: threading.Thread) -> float:
    # utime and stime are fields 14 and 15 of /proc/PID/task/TID/stat (proc(5)).
    with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def test_key_event_advances_last_input(input_dir, make_sensor):
    keyboard = input_dir.add("AT Translated Set 2 keyboard", KEYBOARD_CAPS)
    sensor, wakes = make_sensor()
    assert sensor.status().health is Health.OK
    assert sensor.read().last_input is None

    emit_key(keyboard)
    wait_for(lambda: sensor.read().last_input is not None)
    first = sensor.read().last_input
    assert len(wakes) == 1

    time.sleep(0.05)
    emit_key(keyboard)
    wait_for(lambda: sensor.read().last_input > first)


def test_event_burst_wakes_at_most_wake_events(input_dir, make_sensor):
    mouse = input_dir.add("Logitech USB Optical Mouse", MOUSE_CAPS)
    sensor, wakes = make_sensor(wake_after_s=5.0, wake_events=3)

    for _ in range(300):
        emit_motion(mouse)
    wait_for(lambda: sensor.read().last_input is not None)
    time.sleep(0.3)

    assert 1 <= len(wakes) <= 3


def test_second_event_of_burst_wakes_agent(input_dir, make_sensor):
    mouse = input_dir.add("Logitech USB Optical Mouse", MOUSE_CAPS)
    sensor, wakes = make_sensor(wake_after_s=1.0)
    emit_motion(mouse)
    wait_for(lambda: len(wakes) == 1)
    first = sensor.read().last_input  # the agent fuses after the first wake

    time.sleep(0.05)
    emit_motion(mouse)

    wait_for(lambda: len(wakes) == 2, timeout=2.0)
    assert sensor.read().last_input > first


def test_wake_again_after_quiet_spell(input_dir, make_sensor):
    mouse = input_dir.add("Logitech USB Optical Mouse", MOUSE_CAPS)
    sensor, wakes = make_sensor(wake_after_s=0.2)

    emit_motion(mouse)
    wait_for(lambda: len(wakes) == 1)
    time.sleep(0.5)
    emit_motion(mouse)

    wait_for(lambda: len(wakes) == 2)


def test_led_and_sync_events_are_not_input(input_dir, make_sensor):
    keyboard = input_dir.add("AT Translated Set 2 keyboard", KEYBOARD_CAPS)
    sensor, wakes = make_sensor()

    keyboard.emit(EV_LED, LED_CAPSL, 1)
    keyboard.emit(EV_SYN, 0, 0)
    keyboard.emit(EV_MSC, MSC_SCAN, 0x70039)
    keyboard.emit(EV_SYN, 0, 0)
    wait_for(lambda: _pipes_drained(keyboard))
    time.sleep(0.2)

    assert sensor.read().last_input is None
    assert wakes == []


def _pipes_drained(node: FakeNode) -> bool:
    return all(_pending(device.fd) == 0 for device in node.devices if device.fd >= 0)


def _pending(fd: int) -> int:
    import fcntl
    import termios

    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(raw, "little")


def test_only_user_input_devices_are_opened(input_dir, make_sensor):
    input_dir.add("Power Button", POWER_BUTTON_CAPS)
    input_dir.add("ST LIS3LV02DL Accelerometer", ACCELEROMETER_CAPS)
    input_dir.add("AT Translated Set 2 keyboard", KEYBOARD_CAPS)
    input_dir.add("ELAN Touchscreen", TOUCH_CAPS)
    sensor, _ = make_sensor()

    assert sensor.read().details == {"backend": "evdev", "devices": 2}
    open_names = sorted(d.name for d in input_dir.opened if d.fd >= 0)
    assert open_names == ["AT Translated Set 2 keyboard", "ELAN Touchscreen"]


def test_classifier_table():
    assert is_user_input(KEYBOARD_CAPS)
    assert is_user_input(MOUSE_CAPS)
    assert is_user_input(TOUCH_CAPS)
    assert not is_user_input(POWER_BUTTON_CAPS)
    assert not is_user_input(ACCELEROMETER_CAPS)
    assert not is_user_input({EV_KEY: [KEY_A]})  # a remote with a few letter keys


def test_allowlist_ignores_phantom_keyboard(input_dir, make_sensor):
    keyboard = input_dir.add("AT Translated Set 2 keyboard", KEYBOARD_CAPS)
    phantom = input_dir.add("vc4-hdmi-0 CEC remote", KEYBOARD_CAPS)
    sensor, wakes = make_sensor(devices=["AT Translated Set 2 keyboard"])
    assert sensor.read().details["devices"] == 1

    for _ in range(20):
        emit_key(phantom)
    time.sleep(0.3)
    assert sensor.read().last_input is None
    assert wakes == []

    emit_key(keyboard)
    wait_for(lambda: sensor.read().last_input is not None)


def test_allowlist_accepts_node_path(input_dir, make_sensor):
    input_dir.add("AT Translated Set 2 keyboard", KEYBOARD_CAPS)
    remote = input_dir.add("gpio_ir_recv", {EV_KEY: [KEY_POWER]})
    sensor, _ = make_sensor(devices=[remote.path])

    emit_key(remote, KEY_POWER)

    wait_for(lambda: sensor.read().last_input is not None)
    assert sensor.read().details["devices"] == 1


def test_missing_allowed_device_degrades(input_dir, make_sensor):
    input_dir.add("AT Translated Set 2 keyboard", KEYBOARD_CAPS)
    sensor, _ = make_sensor(devices=["AT Translated Set 2 keyboard", "Wacom Intuos S Pen"])

    status = sensor.status()

    assert status.health is Health.DEGRADED
    assert "'Wacom Intuos S Pen'" in status.reason


def test_unplug_drops_device_without_spinning(input_dir, make_sensor):
    keyboard = input_dir.add("AT Translated Set 2 keyboard", KEYBOARD_CAPS)
    mouse = input_dir.add("Logitech USB Optical Mouse", MOUSE_CAPS)
    sensor, _ = make_sensor(rescan_interval_s=0.2)
    assert sensor.read().details["devices"] == 2

    # Unplug mid-stream: events are still queued when reads start failing.
    for _ in range(50):
        emit_motion(mouse)
    mouse.unplug()
    wait_for(lambda: sensor.status().health is Health.DEGRADED)
    assert "'Logitech USB Optical Mouse'" in sensor.status().reason
    assert sensor.read().details["devices"] == 1

    thread = evdev_thread()
    cpu_before = thread_cpu_s(thread)
    time.sleep(2.0)
    cpu_used = thread_cpu_s(thread) - cpu_before
    assert cpu_used < 0.2, f"evdev thread used {cpu_used:.2f} s of CPU in 2 s"

    # The keyboard still works while the mouse is away.
    emit_key(keyboard)
    wait_for(lambda: sensor.read().last_input is not None)

    mouse.plug()
    wait_for(lambda: sensor.status().health is Health.OK)
    assert sensor.read().details["devices"] == 2
    before = sensor.read().last_input
    time.sleep(0.05)
    emit_motion(mouse)
    wait_for(lambda: sensor.read().last_input > before)


def test_end_of_file_is_treated_as_unplug(input_dir, make_sensor):
    input_dir.add("AT Translated Set 2 keyboard", KEYBOARD_CAPS)
    mouse = input_dir.add("Logitech USB Optical Mouse", MOUSE_CAPS)
    sensor, _ = make_sensor(rescan_interval_s=60)

    # Close the writer without the ENODEV mark: reads now return end of file.
    mouse.hang_up()

    wait_for(lambda: sensor.read().details["devices"] == 1)
    assert sensor.status().health is Health.DEGRADED


def test_every_device_gone_is_unavailable(input_dir, make_sensor):
    mouse = input_dir.add("Logitech USB Optical Mouse", MOUSE_CAPS)
    sensor, _ = make_sensor()

    mouse.unplug()

    wait_for(lambda: sensor.status().health is Health.UNAVAILABLE)
    assert "'Logitech USB Optical Mouse'" in sensor.status().reason


def test_permission_denied_status(input_dir, make_sensor, monkeypatch):
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("LOGNAME", "alice")
    keyboard = input_dir.add("AT Translated Set 2 keyboard", KEYBOARD_CAPS)
    keyboard.denied = True
    sensor, _ = make_sensor()

    status = sensor.status()

    assert status.health is Health.UNAVAILABLE
    assert status.reason == (
        "permission denied on /dev/input/event0: add the user to the input group "
        "(sudo usermod -aG input alice) and log in again"
    )


def test_permission_denied_counts_other_nodes(input_dir, make_sensor, monkeypatch):
    monkeypatch.setenv("LOGNAME", "alice")
    for name in ("AT Translated Set 2 keyboard", "Logitech USB Optical Mouse", "Power Button"):
        input_dir.add(name, KEYBOARD_CAPS).denied = True
    sensor, _ = make_sensor()

    reason = sensor.status().reason

    assert reason.startswith("permission denied on /dev/input/event0 and 2 other event node(s):")


def test_readable_after_permission_fixed(input_dir, make_sensor):
    keyboard = input_dir.add("AT Translated Set 2 keyboard", KEYBOARD_CAPS)
    keyboard.denied = True
    sensor, _ = make_sensor(rescan_interval_s=0.2)
    assert sensor.status().health is Health.UNAVAILABLE

    keyboard.denied = False

    wait_for(lambda: sensor.status().health is Health.OK)


def test_no_devices_yet_then_plugged(input_dir, make_sensor):
    sensor, _ = make_sensor(rescan_interval_s=0.2)
    assert sensor.status().health is Health.UNAVAILABLE
    assert "no keyboard, pointer or touch device" in sensor.status().reason

    keyboard = input_dir.add("USB Keyboard", KEYBOARD_CAPS)
    wait_for(lambda: sensor.status().health is Health.OK)
    emit_key(keyboard)

    wait_for(lambda: sensor.read().last_input is not None)


def test_stop_closes_devices_and_thread(input_dir, make_sensor):
    input_dir.add("AT Translated Set 2 keyboard", KEYBOARD_CAPS)
    input_dir.add("Logitech USB Optical Mouse", MOUSE_CAPS)
    sensor, _ = make_sensor()
    thread = evdev_thread()

    sensor.stop()
    sensor.stop()

    assert not thread.is_alive()
    assert all(device.fd == -1 for device in input_dir.opened)
    assert sensor.read().details == {"backend": "none"}
