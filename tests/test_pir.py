"""Tests of the ``pir`` sensor on gpiozero's MockFactory pins.

gpiozero's MotionSensor samples the pin at 10 Hz in its own thread, so an
edge driven on a mock pin reaches the plugin within 0.1 s. Every timed check
polls with a deadline and allows 1 s for that, so it stays reliable on a
loaded machine. No check depends on a sleep being long enough.
"""

import logging
import sys
import threading
import time
import types
from collections.abc import Callable

import pytest
from gpiozero import Device, MotionSensor
from gpiozero.pins.mock import MockFactory, MockPin

from mailpush.agent.config import build_config
from mailpush.errors import ConfigError
from mailpush.sensors.base import Health, Mode, Reading, clock
from mailpush.sensors.pir import PirOptions, PirSensor
from mailpush.sensors.registry import discover

PIN = 17
EDGE_TOLERANCE_S = 1.0  # 0.1 s sampling period, plus scheduling on a busy machine


class DrivenPin(MockPin):
    """A mock pin driven by a push-pull output, as a PIR's OUT is.

    MockPin moves its level to the pull resistor's whenever the pull is set.
    A real PIR output overrides the Pi's weak internal pull, so this pin
    keeps the level it was driven to.
    """

    def _set_pull(self, value: str) -> None:
        self._pull = value


class WakeCounter:
    """Counts wake() calls, as the agent's wake event would see them."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.count += 1


def wait_until(predicate: Callable[[], bool], timeout: float = EDGE_TOLERANCE_S + 2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


def started(options: PirOptions, wake: Callable[[], None] | None = None) -> PirSensor:
    sensor = PirSensor(options)
    sensor.start(wake or (lambda: None))
    return sensor


# Options and config errors


def test_pir_plugin_contract() -> None:
    entry = discover()["pir"]

    assert entry.plugin is PirSensor
    assert PirSensor.name == "pir"
    assert PirSensor.mode is Mode.EVENTS
    assert PirSensor.enabled_by_default is False


def test_pir_options_defaults() -> None:
    options = PirSensor.parse_options({"pin": 17})

    assert options == PirOptions(pin=17)
    assert options.pin_factory == "auto"
    assert options.episode_gap_s == 30.0
    assert options.max_high_s == 600.0
    assert options.zone is None


def test_pir_options_empty_table_allowed() -> None:
    # build_config parses the options of every installed plugin, enabled or not.
    assert PirSensor.parse_options({}) == PirOptions()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"pin": 28}, r"^sensors\.pir\.pin: invalid value 28; use a BCM GPIO number from 0 to 27"),
        ({"pin": -1}, r"^sensors\.pir\.pin: invalid value -1"),
        ({"pin": 2}, r"^sensors\.pir\.pin: invalid value 2; GPIO2 and GPIO3 are the I2C bus"),
        ({"pin": "17"}, r"^sensors\.pir\.pin: invalid value '17'; expected an integer"),
        ({"pin": 17, "pin_factory": "rpi"}, r"^sensors\.pir\.pin_factory: invalid value 'rpi'"),
        ({"pin": 17, "chip": 0}, r"^sensors\.pir\.chip: invalid value 0; it applies only with"),
        (
            {"pin": 17, "pin_factory": "lgpio", "chip": -1},
            r"^sensors\.pir\.chip: invalid value -1",
        ),
        ({"pin": 17, "episode_gap_s": -1}, r"^sensors\.pir\.episode_gap_s: invalid value -1"),
        ({"pin": 17, "max_high_s": 0.5}, r"^sensors\.pir\.max_high_s: invalid value 0\.5"),
        ({"pin": 17, "zone": " "}, r"^sensors\.pir\.zone: invalid value ' '"),
        ({"pin": 17, "gpio": 4}, r"^sensors\.pir\.gpio: unknown key; allowed keys: chip"),
    ],
)
def test_pir_options_reject(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        PirSensor.parse_options(table)

    assert "\n" not in str(caught.value)


def test_pir_enabled_needs_pin() -> None:
    options = PirSensor.parse_options({"zone": "study"})

    with pytest.raises(ConfigError, match=r"^sensors\.pir\.pin: missing; set the BCM GPIO"):
        PirSensor.check_enabled(options)
    PirSensor.check_enabled(PirOptions(pin=17))


def test_pir_config_without_pin() -> None:
    plugins = discover()
    data = {"user": "ann", "terminal": "pi", "sensors": {"pir": {"zone": "study"}}}

    with pytest.raises(ConfigError, match=r"^sensors\.pir\.pin: missing"):
        build_config(data, plugins)
    disabled = {**data, "sensors": {"pir": {"enabled": False, "zone": "study"}}}
    assert build_config(disabled, plugins).sensors["pir"].enabled is False


def test_pir_options_accept_chip_with_lgpio() -> None:
    options = PirSensor.parse_options({"pin": 17, "pin_factory": "lgpio", "chip": 0})

    assert options.chip == 0


# Unavailable: the agent runs on and the PIR is "not sensed"


def test_pir_without_pin_unavailable() -> None:
    sensor = started(PirOptions())

    assert sensor.status().health is Health.UNAVAILABLE
    assert "sensors.pir.pin is not set" in sensor.status().reason
    assert sensor.read() == Reading()
    sensor.stop()


def test_pir_missing_lgpio_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lgpio", None)  # import lgpio raises ImportError
    monkeypatch.delitem(sys.modules, "gpiozero.pins.lgpio", raising=False)

    sensor = started(PirOptions(pin=PIN, pin_factory="lgpio"))

    status = sensor.status()
    assert status.health is Health.UNAVAILABLE
    assert "the lgpio pin factory cannot be loaded" in status.reason
    assert sensor.read() == Reading()
    assert sensor.read().presence is None
    sensor.stop()


def fake_lgpio(message: str) -> types.ModuleType:
    """Return an ``lgpio`` module whose gpiochip_open fails as the C library does."""
    module = types.ModuleType("lgpio")
    error = type("error", (Exception,), {"__module__": "lgpio"})

    def gpiochip_open(chip: int) -> int:
        raise error(message)

    module.error = error  # type: ignore[attr-defined]
    module.gpiochip_open = gpiochip_open  # type: ignore[attr-defined]
    # Constants gpiozero's lgpio module reads when it is imported.
    for name in ("SET_PULL_NONE", "SET_PULL_UP", "SET_PULL_DOWN"):
        setattr(module, name, 0)
    for name in ("BOTH_EDGES", "RISING_EDGE", "FALLING_EDGE"):
        setattr(module, name, 0)
    return module


def test_pir_no_gpio_chip_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # What lgpio raises on a Pi 5 whose kernel renamed gpiochip4 to gpiochip0.
    monkeypatch.setitem(sys.modules, "lgpio", fake_lgpio("'can not open gpiochip'"))
    monkeypatch.delitem(sys.modules, "gpiozero.pins.lgpio", raising=False)

    sensor = started(PirOptions(pin=PIN, pin_factory="lgpio", chip=4))

    status = sensor.status()
    assert status.health is Health.UNAVAILABLE
    assert "cannot open /dev/gpiochip4 for GPIO17" in status.reason
    assert "gpio group" in status.reason
    assert "chip = 0" in status.reason
    assert sensor.read() == Reading()
    sensor.stop()


def test_pir_unwritable_working_directory_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # lgpio's import fails like this when the current directory is read-only.
    def fail_lgpio_import(name: str, *args, **kwargs):
        if name == "lgpio":
            raise FileNotFoundError(2, "No such file or directory", ".lgd-nfy-3")
        return real_import(name, *args, **kwargs)

    real_import = __import__
    monkeypatch.delitem(sys.modules, "lgpio", raising=False)
    monkeypatch.delitem(sys.modules, "gpiozero.pins.lgpio", raising=False)
    monkeypatch.setattr("builtins.__import__", fail_lgpio_import)

    sensor = started(PirOptions(pin=PIN, pin_factory="lgpio"))

    status = sensor.status()
    assert status.health is Health.UNAVAILABLE
    assert "lgpio cannot create its notification pipe" in status.reason
    assert "WorkingDirectory=" in status.reason
    sensor.stop()


def test_pir_bad_pin_factory_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Device, "pin_factory", None)
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "no-such-factory")

    sensor = started(PirOptions(pin=PIN))

    status = sensor.status()
    assert status.health is Health.UNAVAILABLE
    assert status.reason.startswith("no GPIO pin factory works here")
    assert "no-such-factory" in status.reason
    assert sensor.read().presence is None
    sensor.stop()


def test_pir_pin_in_use_unavailable(mock_pins: MockFactory) -> None:
    other = MotionSensor(PIN)
    try:
        sensor = started(PirOptions(pin=PIN))

        assert sensor.status().health is Health.UNAVAILABLE
        assert "GPIO17 is in use by another device" in sensor.status().reason
        sensor.stop()
    finally:
        other.close()


# Edges on mock pins


def test_pir_quiet_line_reads_no_presence(mock_pins: MockFactory) -> None:
    sensor = started(PirOptions(pin=PIN))
    try:
        reading = sensor.read()

        assert sensor.status().health is Health.OK
        assert "GPIO17 via MockFactory" in sensor.status().reason
        assert reading.presence is False
        assert reading.last_presence is None
        assert reading.presence_suspect is False
        assert reading.details["episodes"] == 0
    finally:
        sensor.stop()


def test_pir_rising_edge_presence_and_wake(mock_pins: MockFactory) -> None:
    wake = WakeCounter()
    sensor = started(PirOptions(pin=PIN), wake)
    try:
        driven = clock()
        mock_pins.pin(PIN).drive_high()
        wait_until(lambda: sensor.read().presence is True)

        reading = sensor.read()
        assert wake.count == 1
        assert reading.details["line"] == "high"
        assert reading.last_presence is not None
        assert driven <= reading.last_presence <= clock()
        assert reading.details["episodes"] == 1
    finally:
        sensor.stop()


def test_pir_falling_edge_keeps_last_motion(mock_pins: MockFactory) -> None:
    sensor = started(PirOptions(pin=PIN))
    pin = mock_pins.pin(PIN)
    try:
        pin.drive_high()
        wait_until(lambda: sensor.read().presence is True)
        released = clock()
        pin.drive_low()
        wait_until(lambda: sensor.read().presence is False)

        reading = sensor.read()
        assert reading.last_presence is not None
        assert released <= reading.last_presence <= released + EDGE_TOLERANCE_S
        assert reading.presence_suspect is False
        assert reading.details["line"] == "low"
    finally:
        sensor.stop()


def test_pir_burst_is_one_episode(mock_pins: MockFactory) -> None:
    wake = WakeCounter()
    sensor = started(PirOptions(pin=PIN, episode_gap_s=5.0), wake)
    pin = mock_pins.pin(PIN)
    try:
        for _ in range(3):
            pin.drive_high()
            wait_until(lambda: sensor.read().presence is True)
            pin.drive_low()
            wait_until(lambda: sensor.read().presence is False)

        details = sensor.read().details
        assert details["rising_edges"] == 3
        assert details["episodes"] == 1
        assert wake.count == 1
    finally:
        sensor.stop()


def test_pir_gap_starts_new_episode(mock_pins: MockFactory) -> None:
    wake = WakeCounter()
    sensor = started(PirOptions(pin=PIN, episode_gap_s=0.3), wake)
    pin = mock_pins.pin(PIN)
    try:
        pin.drive_high()
        wait_until(lambda: sensor.read().presence is True)
        pin.drive_low()
        wait_until(lambda: sensor.read().presence is False)
        fell = sensor.read().last_presence
        assert fell is not None
        wait_until(lambda: clock() - fell > 0.5)  # longer than episode_gap_s
        pin.drive_high()
        wait_until(lambda: sensor.read().details["rising_edges"] == 2)

        assert sensor.read().details["episodes"] == 2
        assert wake.count == 2
    finally:
        sensor.stop()


def test_pir_line_high_at_start(mock_pins: MockFactory) -> None:
    mock_pins.pin(PIN, pin_class=DrivenPin).drive_high()
    wake = WakeCounter()

    sensor = started(PirOptions(pin=PIN), wake)
    try:
        reading = sensor.read()

        assert reading.presence is True
        assert reading.details["episodes"] == 1
        assert wake.count == 1
    finally:
        sensor.stop()


def test_pir_stuck_line_flagged_suspect(mock_pins: MockFactory) -> None:
    sensor = started(PirOptions(pin=PIN, max_high_s=1.0))
    pin = mock_pins.pin(PIN)
    try:
        pin.drive_high()
        wait_until(lambda: sensor.read().presence is True)
        rose = sensor.read().details["high_for_s"]
        assert rose < 1.0
        assert sensor.read().presence_suspect is False

        wait_until(lambda: sensor.read().presence_suspect is True, timeout=5)
        reading = sensor.read()
        status = sensor.status()

        assert reading.presence is True
        assert reading.details["suspect"] is True
        assert reading.last_presence is not None
        assert clock() - reading.last_presence > 1.0  # the rising edge, not now
        assert status.health is Health.DEGRADED
        assert "GPIO17 has been high for" in status.reason
        assert "max_high_s = 1" in status.reason
    finally:
        sensor.stop()


def test_pir_stuck_line_fall_is_not_motion(mock_pins: MockFactory) -> None:
    sensor = started(PirOptions(pin=PIN, max_high_s=1.0))
    pin = mock_pins.pin(PIN)
    try:
        pin.drive_high()
        wait_until(lambda: sensor.read().presence is True)
        rose = clock()
        wait_until(lambda: sensor.read().presence_suspect is True, timeout=5)
        pin.drive_low()
        wait_until(lambda: sensor.read().presence is False)

        reading = sensor.read()
        assert reading.presence_suspect is False
        assert sensor.status().health is Health.OK
        assert reading.last_presence is not None
        # The release of a stuck line is no sign of motion: the last one
        # trusted stays the rising edge.
        assert reading.last_presence <= rose
    finally:
        sensor.stop()


def test_pir_details_and_zone(mock_pins: MockFactory) -> None:
    sensor = started(PirOptions(pin=PIN, zone="study"))
    try:
        details = sensor.read().details

        assert details["pin"] == PIN
        assert details["zone"] == "study"
        assert details["suspect"] is False
    finally:
        sensor.stop()


def test_pir_callbacks_do_not_log(mock_pins: MockFactory, caplog: pytest.LogCaptureFixture) -> None:
    sensor = started(PirOptions(pin=PIN, episode_gap_s=0.0))
    pin = mock_pins.pin(PIN)
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                pin.drive_high()
                wait_until(lambda: sensor.read().presence is True)
                pin.drive_low()
                wait_until(lambda: sensor.read().presence is False)

        assert sensor.read().details["rising_edges"] == 3
        assert caplog.records == []
    finally:
        sensor.stop()


def test_pir_stop_releases_pin(mock_pins: MockFactory) -> None:
    sensor = started(PirOptions(pin=PIN))

    sensor.stop()
    sensor.stop()  # safe twice

    assert sensor.read() == Reading()
    again = MotionSensor(PIN)  # raises GPIOPinInUse if the plugin kept the pin
    again.close()


def test_pir_explicit_mock_factory_degraded() -> None:
    sensor = started(PirOptions(pin=PIN, pin_factory="mock"))
    try:
        status = sensor.status()

        assert status.health is Health.DEGRADED
        assert "simulated pins" in status.reason
        assert sensor.read().presence is False
    finally:
        sensor.stop()
