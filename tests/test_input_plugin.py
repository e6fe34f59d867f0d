"""The input plugin's contract: options, registration, lazy imports, the wake rule."""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

import mailpush.sensors.input.plugin as plugin_module
from mailpush.agent.fusion import FusionConfig, fuse
from mailpush.errors import ConfigError
from mailpush.sensors.base import Health, Mode, Reading
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
        ({"wake_events": 0}, "sensors.input.wake_events: invalid value 0; expected a whole"),
        ({"wake_events": 1.5}, "sensors.input.wake_events: invalid value 1.5; expected an int"),
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


def test_touch_wakes_first_events_of_burst_only(monkeypatch):
    fake_clock = FakeClock()
    monkeypatch.setattr(plugin_module, "clock", fake_clock)
    wakes = []
    activity = ActivityClock(lambda: wakes.append(fake_clock.now), wake_after_s=1.0, wake_events=3)

    activity.touch()  # the first event ever
    for _ in range(1000):  # one second of a 1,000 events/s storm
        activity.read()  # an agent that fuses between any two events
        fake_clock.now += 0.001
        activity.touch()
    fake_clock.now += 1.5
    activity.touch()  # after a quiet spell
    activity.read()
    fake_clock.now += 0.001
    activity.touch()

    assert wakes == [
        100.0,
        pytest.approx(100.001),
        pytest.approx(100.002),
        pytest.approx(102.5),
        pytest.approx(102.501),
    ]
    assert activity.last_input == pytest.approx(102.501)


def test_second_event_after_away_wakes_agent(monkeypatch):
    fake_clock = FakeClock()
    monkeypatch.setattr(plugin_module, "clock", fake_clock)
    wakes = []
    activity = ActivityClock(lambda: wakes.append(fake_clock.now), wake_after_s=1.0)
    activity.touch()
    activity.read()
    fake_clock.now += 700.0  # long enough for the terminal to be away

    activity.touch()  # the first event of the burst
    first = activity.read()  # the agent fuses: one input time, not yet confirmed
    fake_clock.now += 0.01
    activity.touch()  # the second event, 10 ms later

    assert wakes == [100.0, 800.0, pytest.approx(800.01)]
    assert activity.read() > first


def test_touch_waits_for_read_before_next_wake(monkeypatch):
    fake_clock = FakeClock()
    monkeypatch.setattr(plugin_module, "clock", fake_clock)
    wakes = []
    activity = ActivityClock(lambda: wakes.append(fake_clock.now), wake_after_s=1.0, wake_events=3)

    activity.touch()
    for _ in range(100):  # the agent has not read since the first wake
        fake_clock.now += 0.001
        activity.touch()
    activity.read()
    fake_clock.now += 0.001
    activity.touch()

    assert wakes == [100.0, pytest.approx(100.101)]


def test_wake_events_one_wakes_once_per_burst(monkeypatch):
    fake_clock = FakeClock()
    monkeypatch.setattr(plugin_module, "clock", fake_clock)
    wakes = []
    activity = ActivityClock(lambda: wakes.append(fake_clock.now), wake_after_s=1.0, wake_events=1)

    for _ in range(10):
        activity.touch()
        activity.read()
        fake_clock.now += 0.1

    assert wakes == [100.0]


class FusingAgent:
    """The agent's loop reduced to its reaction: a fusion on each wake, no periodic one."""

    def __init__(self, fake_clock: FakeClock, config: FusionConfig) -> None:
        self.clock = fake_clock
        self.config = config
        self.woken = False
        self.activity = ActivityClock(self.wake, wake_after_s=1.0)
        self.fused = fuse(Reading(), config, None, fake_clock.now, input_since=0.0)

    def wake(self) -> None:
        self.woken = True

    def event(self) -> None:
        """Deliver one input event 10 ms after the last, and fuse if it woke the agent."""
        self.clock.now += 0.01
        self.activity.touch()
        if self.woken:
            self.woken = False
            reading = Reading(last_input=self.activity.read())
            self.fused = fuse(reading, self.config, self.fused, self.clock.now, input_since=0.0)


@pytest.mark.parametrize("confirm_events", [2, 3])
def test_away_turns_active_on_wakes_alone(monkeypatch, confirm_events):
    fake_clock = FakeClock()
    monkeypatch.setattr(plugin_module, "clock", fake_clock)
    agent = FusingAgent(fake_clock, FusionConfig(confirm_events=confirm_events))
    fake_clock.now += 700.0
    agent.fused = fuse(Reading(), agent.config, agent.fused, fake_clock.now, input_since=0.0)
    assert agent.fused.state == "away"

    for _ in range(confirm_events - 1):
        agent.event()
    assert agent.fused.state == "away"  # too few input times: possibly strays
    agent.event()

    assert agent.fused.state == "active"


def test_stray_event_keeps_terminal_away(monkeypatch):
    fake_clock = FakeClock()
    monkeypatch.setattr(plugin_module, "clock", fake_clock)
    agent = FusingAgent(fake_clock, FusionConfig(confirm_events=2))
    fake_clock.now += 700.0
    agent.fused = fuse(Reading(), agent.config, agent.fused, fake_clock.now, input_since=0.0)

    agent.event()
    fake_clock.now += 10.0  # past the confirm window, with no second event
    reading = Reading(last_input=agent.activity.read())
    agent.fused = fuse(reading, agent.config, agent.fused, fake_clock.now, input_since=0.0)

    assert agent.fused.state == "away"
