"""The input plugin's contract: options, registration, lazy imports, the wake rule."""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

import mailpush.sensors.input.plugin as plugin_module
from mailpush.errors import ConfigError
from mailpush.sensors.base import Health, Mode
from mailpush.sensors.input.plugin import ActivityClock, InputOptions, InputSensor


def test_entry_point_loads_plugin():
    (point,) = [p for p in entry_points(group="mailpush.sensors") if p.name == "input"]

    assert point.load() is InputSensor
    assert InputSensor.name == "input"
    assert InputSensor.mode is Mode.EVENTS


def test_parse_options_defaults():
    options = InputSensor.parse_options({})

    assert options == InputOptions(backend="auto", devices=[], rescan_interval_s=5.0)


def test_parse_options_values():
    table = {
        "backend": "evdev",
        "devices": ["AT Translated Set 2 keyboard"],
        "rescan_interval_s": 2,
    }

    options = InputSensor.parse_options(table)

    assert options.backend == "evdev"
    assert options.devices == ["AT Translated Set 2 keyboard"]
    assert options.rescan_interval_s == 2.0


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"backend": "x11"}, "sensors.input.backend: invalid value 'x11'; expected one of 'auto'"),
        (
            {"devices": "keyboard"},
            "sensors.input.devices: invalid value 'keyboard'; expected a list",
        ),
        ({"devices": [""]}, "sensors.input.devices: empty device name"),
        ({"rescan_interval_s": 0}, "sensors.input.rescan_interval_s: invalid value 0.0"),
        ({"wake_after_s": -1}, "sensors.input.wake_after_s: invalid value -1.0"),
        ({"grab": True}, "sensors.input.grab: unknown key; allowed keys: backend, devices"),
    ],
)
def test_parse_options_rejects(table, message):
    with pytest.raises(ConfigError) as raised:
        InputSensor.parse_options(table)

    assert str(raised.value).startswith(message)


def test_import_loads_no_input_library():
    code = (
        "import sys, mailpush.sensors.input.plugin; "
        "print(sorted(m for m in ('pynput', 'evdev', 'Xlib') if m in sys.modules))"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"


def test_headless_start_is_unavailable(monkeypatch):
    # This machine has no /dev/input; without DISPLAY nothing can sense input.
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("MAILPUSH_INPUT_BACKEND", raising=False)
    sensor = InputSensor()

    sensor.start(lambda: None)
    try:
        status = sensor.status()
        reading = sensor.read()
    finally:
        sensor.stop()

    assert status.health is Health.UNAVAILABLE
    assert "pynput cannot be used: DISPLAY is not set" in status.reason
    assert reading.last_input is None
    assert reading.details == {"backend": "none"}


def test_invalid_env_backend_is_unavailable(monkeypatch):
    monkeypatch.setenv("MAILPUSH_INPUT_BACKEND", "libinput")
    sensor = InputSensor()

    sensor.start(lambda: None)

    assert sensor.status().health is Health.UNAVAILABLE
    assert sensor.status().reason.startswith("MAILPUSH_INPUT_BACKEND='libinput' is invalid")


def test_status_before_start():
    sensor = InputSensor()

    assert sensor.status().health is Health.UNAVAILABLE
    assert sensor.read().last_input is None
    sensor.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_touch_wakes_after_quiet_spell_only(monkeypatch):
    fake_clock = FakeClock()
    monkeypatch.setattr(plugin_module, "clock", fake_clock)
    wakes = []
    activity = ActivityClock(lambda: wakes.append(fake_clock.now), wake_after_s=1.0)

    activity.touch()  # the first event ever
    for _ in range(1000):  # one second of a 1,000 events/s storm
        fake_clock.now += 0.001
        activity.touch()
    fake_clock.now += 1.5
    activity.touch()  # after a quiet spell

    assert wakes == [100.0, pytest.approx(102.5)]
    assert activity.last_input == pytest.approx(102.5)
