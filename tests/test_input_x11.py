"""The pynput backend against a real X server (Xvfb) driven by xdotool."""

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mailpush.sensors.base import Health
from mailpush.sensors.input.evdev_backend import NodeAccess
from mailpush.sensors.input.plugin import InputOptions, InputSensor

pytestmark = pytest.mark.integration


def xdotool(display: str, *args: str) -> None:
    subprocess.run(
        ["xdotool", *args], env={**os.environ, "DISPLAY": display}, check=True, timeout=30
    )


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


def empty_input_dir() -> NodeAccess:
    """A /dev/input with no nodes, so the automatic choice has to fall back to X."""

    def open_device(path: str):
        raise FileNotFoundError(path)

    return NodeAccess(list_nodes=list, open_device=open_device)


@pytest.fixture()
def started() -> Iterator[Callable[..., tuple[InputSensor, list[float]]]]:
    sensors: list[InputSensor] = []

    def start(options: InputOptions, **kwargs: object) -> tuple[InputSensor, list[float]]:
        sensor = InputSensor(options, **kwargs)
        wakes: list[float] = []
        sensor.start(lambda: wakes.append(time.monotonic()))
        sensors.append(sensor)
        return sensor, wakes

    yield start
    for sensor in sensors:
        sensor.stop()


def test_pointer_motion_advances_last_input(x_session, started):
    sensor, wakes = started(InputOptions(backend="pynput"))
    assert sensor.status().health is Health.OK
    assert sensor.read().last_input is None

    xdotool(x_session, "mousemove", "100", "120")

    wait_for(lambda: sensor.read().last_input is not None)
    assert len(wakes) == 1
    assert sensor.read().details == {"backend": "pynput", "listeners": 2}


def test_key_press_advances_last_input(x_session, started):
    sensor, wakes = started(InputOptions(backend="pynput", wake_after_s=0.2))
    xdotool(x_session, "mousemove", "10", "10")
    wait_for(lambda: sensor.read().last_input is not None)
    before = sensor.read().last_input
    time.sleep(0.5)

    xdotool(x_session, "key", "a")

    wait_for(lambda: sensor.read().last_input > before)
    assert len(wakes) == 2


def test_motion_burst_wakes_once(x_session, started):
    sensor, wakes = started(InputOptions(backend="pynput", wake_after_s=30.0))
    moves = []
    for step in range(200):
        moves += ["mousemove", str(200 + step), "300"]

    xdotool(x_session, *moves)

    wait_for(lambda: sensor.read().last_input is not None)
    time.sleep(0.3)
    assert len(wakes) == 1


def test_auto_falls_back_to_x_with_one_warning(x_session, started, caplog):
    caplog.set_level(logging.INFO, logger="mailpush.sensors.input")

    sensor, _ = started(InputOptions(), node_access=empty_input_dir())

    assert sensor.read().details["backend"] == "pynput"
    assert sensor.status().health is Health.OK
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "evdev not used (no keyboard, pointer or touch device found" in warnings[0]
    assert f"falling back to pynput on X display '{x_session}'" in warnings[0]


def test_wayland_session_does_not_use_x(x_session, started, monkeypatch):
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")

    sensor, _ = started(InputOptions(), node_access=empty_input_dir())

    assert sensor.read().details["backend"] == "evdev"
    assert sensor.status().health is Health.UNAVAILABLE


def test_no_display_is_unavailable(started, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("MAILPUSH_INPUT_BACKEND", raising=False)

    sensor, _ = started(InputOptions(backend="pynput"))

    assert sensor.status().health is Health.UNAVAILABLE
    assert sensor.status().reason == (
        "pynput cannot be used: DISPLAY is not set, so no X display is reachable"
    )
    assert sensor.read().details == {"backend": "none"}


def test_unreachable_display_is_unavailable(started, monkeypatch, tmp_path):
    monkeypatch.setenv("DISPLAY", ":987")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)

    sensor, _ = started(InputOptions(backend="pynput"))

    assert sensor.status().health is Health.UNAVAILABLE
    assert sensor.status().reason.startswith(
        "pynput cannot be used: cannot connect to X display ':987'"
    )


def test_stop_ends_listener_threads(x_session, started):
    sensor, _ = started(InputOptions(backend="pynput"))
    names = {"mailpush-input-pynput-mouse", "mailpush-input-pynput-keyboard"}
    assert names <= {t.name for t in threading.enumerate()}

    started_at = time.monotonic()
    sensor.stop()

    assert time.monotonic() - started_at < 2.0
    assert not names & {t.name for t in threading.enumerate() if t.is_alive()}
