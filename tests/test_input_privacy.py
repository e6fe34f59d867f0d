"""The input sensor keeps the time of the last event and nothing else.

After real X input (a distinctive string typed and a distinctive pointer
position) and scripted evdev input (a distinctive key code and axis value),
the whole object graph reachable from the plugin is searched for those
values. The walk follows instance state, containers, bound methods and
closure cells. It does not enter modules, classes or a function's globals,
because those belong to the program, not to the plugin instance.
"""

import gc
import inspect
import os
import subprocess
import time
import types
from collections.abc import Callable, Iterator

import pytest

from mailpush.sensors.input.evdev_backend import EV_ABS, EV_KEY
from mailpush.sensors.input.plugin import ActivityClock, InputOptions, InputSensor
from mailpush.sensors.input.x11 import event_callback
from tests.test_input_evdev import KEYBOARD_CAPS, TOUCH_CAPS, FakeInputDir

TYPED = "Zq8Vyx3Kw"
# Pointer coordinates are picked in this range (inside the 1280x1024 Xvfb
# screen), skipping every integer already in the graph. Xlib's copy of the X
# server's connection setup contains hundreds of visual ids.
POINTER_RANGE = range(301, 1000)
KEY_CODE = 0x2F1  # KEY_NUMERIC_11: a code no other state here would contain
AXIS_VALUE = 48_611

SKIPPED_TYPES = (types.ModuleType, type, types.CodeType, types.FrameType)


def reachable(root: object) -> Iterator[object]:
    """Yield every object reachable from ``root`` as instance state."""
    seen = {id(root)}
    stack = [root]
    while stack:
        obj = stack.pop()
        yield obj
        for child in _children(obj):
            if id(child) not in seen and not isinstance(child, SKIPPED_TYPES):
                seen.add(id(child))
                stack.append(child)


def _children(obj: object) -> list[object]:
    if isinstance(obj, types.FunctionType):
        return [*(obj.__closure__ or ()), *(obj.__defaults__ or ()), obj.__kwdefaults__]
    if isinstance(obj, types.CellType):
        try:
            return [obj.cell_contents]
        except ValueError:  # an empty cell
            return []
    return gc.get_referents(obj)


def leaked_input(root: object, ints: set[int], text: str) -> list[str]:
    found = []
    for obj in reachable(root):
        if type(obj) is int and obj in ints:
            found.append(f"int {obj}")
        elif isinstance(obj, str) and text in obj:
            found.append(f"str {obj!r}")
        elif isinstance(obj, bytes | bytearray) and text.encode() in obj:
            found.append(f"bytes containing {text!r}")
        elif type(obj).__name__ in ("KeyCode", "Key", "InputEvent", "KeyEvent"):
            found.append(f"{type(obj).__name__} {obj!r}")
    return found


@pytest.fixture()
def input_dir() -> Iterator[FakeInputDir]:
    fake = FakeInputDir()
    yield fake
    fake.close()


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


@pytest.mark.integration
def test_x_input_leaves_no_trace(x_session):
    sensor = InputSensor(InputOptions(backend="pynput"))
    sensor.start(lambda: None)
    try:
        existing = {obj for obj in reachable(sensor) if type(obj) is int}
        free = [value for value in POINTER_RANGE if value not in existing]
        assert len(free) >= 2, "no free integer left to use as a pointer coordinate"
        x, y = free[-1], free[len(free) // 2]

        env = {**os.environ, "DISPLAY": x_session}
        xdotool = ["xdotool", "mousemove", str(x), str(y), "type", TYPED]
        subprocess.run(xdotool, env=env, check=True, timeout=30)
        wait_for(lambda: sensor.read().last_input is not None)
        time.sleep(0.5)

        leaks = leaked_input(sensor, {x, y}, TYPED)
        reading = sensor.read()
    finally:
        sensor.stop()

    assert leaks == []
    assert TYPED not in repr(reading)
    assert str(x) not in repr(reading)


def test_evdev_input_leaves_no_trace(input_dir):
    keyboard = input_dir.add("AT Translated Set 2 keyboard", KEYBOARD_CAPS)
    touch = input_dir.add("ELAN Touchscreen", TOUCH_CAPS)
    sensor = InputSensor(InputOptions(backend="evdev"), node_access=input_dir.access)
    sensor.start(lambda: None)
    try:
        keyboard.emit(EV_KEY, KEY_CODE, 1)
        touch.emit(EV_ABS, 0x35, AXIS_VALUE)
        wait_for(lambda: sensor.read().last_input is not None)
        time.sleep(0.3)

        leaks = leaked_input(sensor, {KEY_CODE, AXIS_VALUE}, "no text")
        reading = sensor.read()
    finally:
        sensor.stop()

    assert leaks == []
    assert str(AXIS_VALUE) not in repr(reading)


def test_pynput_callback_keeps_nothing():
    clock = ActivityClock(lambda: None, 1.0)
    callback = event_callback(clock.touch)

    callback(1117, 877, "Button.left", True, False)

    parameters = list(inspect.signature(callback).parameters.values())
    assert [p.kind for p in parameters] == [inspect.Parameter.VAR_POSITIONAL]
    cells = [cell.cell_contents for cell in callback.__closure__]
    assert cells == [clock.touch]
    assert not hasattr(clock, "__dict__")
    assert isinstance(clock.last_input, float)
    assert leaked_input(callback, {1117, 877}, "Button.left") == []


def test_activity_touch_takes_no_event_data():
    parameters = inspect.signature(ActivityClock.touch).parameters

    assert list(parameters) == ["self"]
    assert ActivityClock.__slots__ == (
        "last_input",
        "_wake",
        "_wake_after_s",
        "_wake_events",
        "_wakes_left",
        "_read_since_wake",
    )


def test_activity_wake_state_is_a_count_and_flag():
    clock = ActivityClock(lambda: None, 1.0, 3)

    for _ in range(5):
        clock.touch()
        clock.read()

    assert type(clock._wakes_left) is int
    assert 0 <= clock._wakes_left <= 3
    assert type(clock._read_since_wake) is bool
