"""The pynput backend against a real X server (Xvfb) driven by xdotool."""

import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mailpush.errors import SensorError
from mailpush.sensors.base import Health, clock
from mailpush.sensors.input import x11
from mailpush.sensors.input.evdev_backend import NodeAccess
from mailpush.sensors.input.plugin import InputOptions, InputSensor
from mailpush.sensors.input.x11 import FREE_EVENTS, HOLD_S, PynputBackend
from mailpush.sensors.input.xrecord import connect_x

pytestmark = pytest.mark.integration

# The input sensor promises the time of the last event to about 1 s.
PRECISION_S = 1.0


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
    assert sensor.read().details == {"backend": "pynput", "listeners": 1}


def test_key_press_advances_last_input(x_session, started):
    sensor, wakes = started(InputOptions(backend="pynput", wake_after_s=0.2, wake_events=1))
    xdotool(x_session, "mousemove", "10", "10")
    wait_for(lambda: sensor.read().last_input is not None)
    before = sensor.read().last_input
    # Past the hold that the pointer event started.
    time.sleep(HOLD_S + 0.5)

    xdotool(x_session, "key", "a")

    wait_for(lambda: sensor.read().last_input > before)
    assert len(wakes) == 2


def test_motion_burst_wakes_at_most_wake_events(x_session, started):
    sensor, wakes = started(InputOptions(backend="pynput", wake_after_s=30.0, wake_events=3))
    moves = []
    for step in range(200):
        moves += ["mousemove", str(200 + step), "300"]

    xdotool(x_session, *moves)

    wait_for(lambda: sensor.read().last_input is not None)
    time.sleep(0.3)
    assert 1 <= len(wakes) <= 3


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
    assert "mailpush-input-x11" in {t.name for t in threading.enumerate()}

    started_at = time.monotonic()
    sensor.stop()

    assert time.monotonic() - started_at < 2.0
    assert "mailpush-input-x11" not in {t.name for t in threading.enumerate() if t.is_alive()}


def test_stop_during_hold(x_session):
    calls: list[float] = []
    backend = PynputBackend(lambda: calls.append(clock()), hold_s=30.0)
    backend.start()
    xdotool(x_session, "mousemove", "30", "40")
    wait_for(lambda: len(calls) == 1)

    started_at = time.monotonic()
    backend.stop()

    assert time.monotonic() - started_at < 2.0
    assert backend.status().health is Health.UNAVAILABLE
    assert "mailpush-input-x11" not in {t.name for t in threading.enumerate() if t.is_alive()}


def pointer_storm(display: str, seconds: float, interval_s: float = 0.005) -> tuple[float, float]:
    """Move the pointer every ``interval_s`` for about ``seconds``, and return the clock at start and end."""
    moves: list[str] = []
    for step in range(int(seconds / interval_s)):
        moves += ["mousemove", str(500 + step % 2), "500", "sleep", str(interval_s)]
    start = clock()
    xdotool(display, *moves)
    return start, clock()


def test_burst_calls_once_per_hold(x_session):
    calls: list[float] = []
    backend = PynputBackend(lambda: calls.append(clock()), hold_s=HOLD_S)
    backend.start()
    try:
        start, end = pointer_storm(x_session, seconds=2.0)
        time.sleep(HOLD_S + 0.3)
    finally:
        backend.stop()

    # About 400 moves: the first FREE_EVENTS at once, then one call per hold.
    burst = [t for t in calls if t <= end]
    assert FREE_EVENTS + 1 <= len(burst) <= FREE_EVENTS + (end - start) / HOLD_S
    paused = burst[FREE_EVENTS - 1 :]
    gaps = [later - earlier for earlier, later in zip(paused, paused[1:], strict=False)]
    # The tolerance covers threading.Event.wait and clock() using different clocks.
    assert min(gaps) >= HOLD_S - 0.01


def test_first_events_of_burst_pass_at_once(x_session):
    calls: list[float] = []
    backend = PynputBackend(lambda: calls.append(clock()), hold_s=30.0, free_events=3)
    backend.start()
    try:
        for step in range(3):
            xdotool(x_session, "mousemove", str(60 + step), "70")
            wait_for(lambda step=step: len(calls) == step + 1)
        xdotool(x_session, "mousemove", "90", "70")
        time.sleep(0.3)
    finally:
        backend.stop()

    # The fourth move falls into the 30 s hold that the third one started.
    assert len(calls) == 3


def test_events_after_hold_are_seen(x_session):
    calls: list[float] = []
    backend = PynputBackend(lambda: calls.append(clock()), hold_s=HOLD_S)
    backend.start()
    try:
        pointer_storm(x_session, seconds=0.3)
        wait_for(lambda: len(calls) >= 1)
        time.sleep(HOLD_S + 0.3)
        seen = len(calls)

        xdotool(x_session, "key", "shift")

        wait_for(lambda: len(calls) > seen)
    finally:
        backend.stop()


def test_last_input_within_precision(x_session, started):
    sensor, _ = started(InputOptions(backend="pynput"))

    _, end = pointer_storm(x_session, seconds=2.5)
    time.sleep(HOLD_S + 0.3)

    last_input = sensor.read().last_input
    assert last_input is not None
    assert last_input >= end - PRECISION_S


def test_zero_hold_calls_for_each_reply(x_session):
    calls: list[float] = []
    backend = PynputBackend(lambda: calls.append(clock()), hold_s=0)
    backend.start()
    try:
        pointer_storm(x_session, seconds=1.0)
        time.sleep(0.3)
    finally:
        backend.stop()

    # 200 moves 5 ms apart. The X server may put several into one RECORD
    # reply, so fewer calls than moves can arrive, but far more than one per hold.
    assert len(calls) >= 50


def test_connect_right_after_close(x_session):
    # Xvfb 21.1.7 resets some connections opened just after another closed.
    for _ in range(40):
        connect_x(x_session).close()


def test_display_without_record_is_unavailable(monkeypatch):
    with xvfb_without_record() as display:
        monkeypatch.setenv("DISPLAY", display)
        backend = PynputBackend(lambda: None)

        with pytest.raises(SensorError) as raised:
            backend.start()

    assert str(raised.value) == (
        f"pynput cannot be used: X display {display!r} lacks the RECORD extension; "
        'enable it in the X server or set backend = "evdev"'
    )
    assert backend.status().health is Health.UNAVAILABLE


def test_pynput_listeners_still_work(x_session, monkeypatch):
    """Run the Windows and macOS code path here, through pynput's own X11 listeners."""
    monkeypatch.setattr(x11, "_uses_x11", lambda platform: False)
    calls: list[float] = []
    backend = PynputBackend(lambda: calls.append(clock()))
    backend.start()
    try:
        assert backend.details() == {"backend": "pynput", "listeners": 2}
        assert backend.status().health is Health.OK

        xdotool(x_session, "mousemove", "60", "70")
        wait_for(lambda: len(calls) >= 1)
    finally:
        stop_pynput(x_session, backend)

    names = {"mailpush-input-pynput-mouse", "mailpush-input-pynput-keyboard"}
    assert not names & {t.name for t in threading.enumerate() if t.is_alive()}


def stop_pynput(display: str, backend: PynputBackend) -> None:
    # pynput 1.8's X11 listeners end only when one more event arrives after
    # stop(), so keep sending pointer and key events until stop() returns.
    stopper = threading.Thread(target=backend.stop, name="test-stop-pynput")
    stopper.start()
    deadline = time.monotonic() + 15.0
    while stopper.is_alive() and time.monotonic() < deadline:
        xdotool(display, "mousemove_relative", "1", "0", "key", "shift")
        stopper.join(0.2)
    assert not stopper.is_alive()


@contextlib.contextmanager
def xvfb_without_record() -> Iterator[str]:
    """Run an Xvfb with the RECORD extension disabled, yield its display, and stop it by its pid."""
    binary = shutil.which("Xvfb")
    if binary is None:
        pytest.skip("Xvfb not installed (Debian package xvfb)")

    read_fd, write_fd = os.pipe()
    command = [binary, "-displayfd", str(write_fd), "-nolisten", "tcp", "-extension", "RECORD"]
    process = subprocess.Popen(
        command, pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as pipe:
            number = pipe.readline().strip()
        assert number, "Xvfb reported no display number"
        yield f":{number}"
    finally:
        process.terminate()
        process.wait(timeout=10)
