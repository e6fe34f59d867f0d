"""The temperature plugin on the fake SMBus: readings, retries, failures, status, options."""

import errno
import sys

import pytest

from mailpush.errors import ConfigError
from mailpush.sensors.base import Health, Mode
from mailpush.sensors.registry import discover
from mailpush.sensors.temperature.options import AmbientOptions, TemperatureOptions
from mailpush.sensors.temperature.plugin import TemperatureSensor
from tests.fixtures.smbus import FakeI2C, FakeLM75, FakeMCP9808, FakeSHT3x, FakeTMP102


class Waits:
    """Records the plugin's sleeps instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def make_plugin(options: TemperatureOptions, waits: Waits | None = None) -> TemperatureSensor:
    plugin = TemperatureSensor(options, sleep=waits or Waits())
    plugin.start(lambda: None)
    return plugin


def test_plugin_contract() -> None:
    assert TemperatureSensor.name == "temperature"
    assert TemperatureSensor.mode is Mode.POLLED
    assert 2.0 <= TemperatureSensor.poll_interval_s <= 5.0
    assert TemperatureSensor.enabled_by_default is False


def test_entry_point_loads_plugin() -> None:
    entry = discover()["temperature"]
    assert entry.plugin is TemperatureSensor


def test_reads_skin_temperature(fake_smbus: FakeI2C) -> None:
    bus = fake_smbus.add_bus(1)
    bus.attach(0x48, FakeTMP102(33.5))
    plugin = make_plugin(TemperatureOptions(bus=1, chip="tmp102"))

    reading = plugin.read()

    assert reading.temperature_c == 33.5
    assert reading.ambient_c is None
    assert reading.details["chip"] == "tmp102"
    assert reading.details["address"] == "0x48"
    assert reading.details["bus"] == 1
    assert reading.details["last_good_age_s"] == 0.0
    assert plugin.status().health is Health.OK


def test_reads_skin_and_ambient(fake_smbus: FakeI2C) -> None:
    bus = fake_smbus.add_bus(1)
    bus.attach(0x44, FakeSHT3x(33.0, humidity=55.0))
    bus.attach(0x49, FakeLM75(21.3, bits=11))
    ambient = AmbientOptions(chip="lm75", address=0x49, resolution_bits=11)
    plugin = make_plugin(TemperatureOptions(bus=1, chip="sht3x", ambient=ambient))

    reading = plugin.read()

    assert reading.temperature_c == pytest.approx(33.0, abs=0.01)
    assert reading.ambient_c == 21.25
    assert reading.details["humidity_percent"] == 55.0
    assert reading.details["ambient_chip"] == "lm75"
    assert reading.details["ambient_address"] == "0x49"


def test_ambient_on_second_bus(fake_smbus: FakeI2C) -> None:
    fake_smbus.add_bus(1).attach(0x18, FakeMCP9808(34.0))
    fake_smbus.add_bus(3).attach(0x18, FakeMCP9808(22.0))
    ambient = AmbientOptions(chip="mcp9808", bus=3)
    plugin = make_plugin(TemperatureOptions(bus=1, chip="mcp9808", ambient=ambient))

    reading = plugin.read()

    assert reading.temperature_c == 34.0
    assert reading.ambient_c == 22.0


def test_bus_factory_argument_wins() -> None:
    fake = FakeI2C()
    fake.add_bus(2).attach(0x4A, FakeTMP102(-12.5))
    plugin = TemperatureSensor(
        TemperatureOptions(bus=2, chip="tmp102", address=0x4A), bus_factory=fake
    )
    plugin.start(lambda: None)

    assert plugin.read().temperature_c == -12.5


def test_missing_bus_is_unavailable(fake_smbus: FakeI2C) -> None:
    plugin = make_plugin(TemperatureOptions(bus=1, chip="tmp102"))

    status = plugin.status()

    assert status.health is Health.UNAVAILABLE
    assert status.reason == (
        "sensors.temperature: /dev/i2c-1 not found; enable I2C "
        "(raspi-config → Interface Options → I2C) or use a bus that exists "
        "(ls /dev/i2c-* lists them)"
    )
    assert plugin.read().temperature_c is None


def test_bus_appearing_later_is_used(fake_smbus: FakeI2C) -> None:
    plugin = make_plugin(TemperatureOptions(bus=1, chip="tmp102"))
    assert plugin.status().health is Health.UNAVAILABLE

    fake_smbus.add_bus(1).attach(0x48, FakeTMP102(31.0))

    assert plugin.read().temperature_c == 31.0
    assert plugin.status().health is Health.OK


def test_permission_denied_names_i2c_group(fake_smbus: FakeI2C) -> None:
    fake_smbus.add_bus(1)
    fake_smbus.deny(1)
    plugin = make_plugin(TemperatureOptions(bus=1, chip="tmp102"))

    status = plugin.status()

    assert status.health is Health.UNAVAILABLE
    assert "permission denied on /dev/i2c-1" in status.reason
    assert "i2c group" in status.reason


def test_missing_smbus2_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "smbus2", None)
    plugin = make_plugin(TemperatureOptions(bus=1, chip="tmp102"))

    status = plugin.status()

    assert status.health is Health.UNAVAILABLE
    assert "smbus2 is not installed" in status.reason


def test_unconfigured_plugin_is_unavailable(fake_smbus: FakeI2C) -> None:
    fake_smbus.add_bus(1).attach(0x48, FakeTMP102(30.0))
    plugin = make_plugin(TemperatureOptions())

    status = plugin.status()

    assert status.health is Health.UNAVAILABLE
    assert "bus and chip are not set" in status.reason
    assert fake_smbus.buses[1].opened == 0
    assert plugin.read().temperature_c is None


def test_remote_io_error_retried_then_recovered(fake_smbus: FakeI2C) -> None:
    chip = fake_smbus.add_bus(1).attach(0x48, FakeTMP102(32.0))
    chip.fail_next(2)
    waits = Waits()
    plugin = make_plugin(TemperatureOptions(bus=1, chip="tmp102", retries=2), waits)

    reading = plugin.read()

    assert reading.temperature_c == 32.0
    assert waits.delays == [0.01, 0.02]
    assert plugin.status().health is Health.OK


@pytest.mark.parametrize("error", [errno.EIO, errno.ETIMEDOUT, errno.ENXIO])
def test_other_bus_errors_retried(fake_smbus: FakeI2C, error: int) -> None:
    chip = fake_smbus.add_bus(1).attach(0x48, FakeLM75(30.5))
    chip.fail_next(1, error)
    plugin = make_plugin(TemperatureOptions(bus=1, chip="lm75"))

    assert plugin.read().temperature_c == 30.5


def test_persistent_error_not_retried(fake_smbus: FakeI2C) -> None:
    chip = fake_smbus.add_bus(1).attach(0x48, FakeTMP102(32.0))
    chip.fail_next(1, errno.ENODEV)
    waits = Waits()
    plugin = make_plugin(TemperatureOptions(bus=1, chip="tmp102"), waits)

    reading = plugin.read()

    assert reading.temperature_c is None
    assert waits.delays == []
    assert plugin.status().health is Health.DEGRADED


def test_failures_in_a_row_turn_reading_null(fake_smbus: FakeI2C) -> None:
    chip = fake_smbus.add_bus(1).attach(0x48, FakeTMP102(33.0))
    options = TemperatureOptions(bus=1, chip="tmp102", retries=1, max_failures=3)
    plugin = make_plugin(options)
    assert plugin.read().temperature_c == 33.0

    chip.fail_next(100)
    first, second = plugin.read(), plugin.read()
    assert first.temperature_c == 33.0  # the last good value holds for a short run
    assert second.temperature_c == 33.0
    assert plugin.status().health is Health.DEGRADED

    third = plugin.read()
    status = plugin.status()
    assert third.temperature_c is None
    assert status.health is Health.ERROR
    assert "tmp102 at 0x48 on /dev/i2c-1" in status.reason
    assert "3 read(s) in a row failed" in status.reason
    assert "Remote I/O error" in status.reason
    assert "\n" not in status.reason


def test_recovers_after_error(fake_smbus: FakeI2C) -> None:
    chip = fake_smbus.add_bus(1).attach(0x48, FakeTMP102(33.0))
    plugin = make_plugin(TemperatureOptions(bus=1, chip="tmp102", retries=0, max_failures=1))
    chip.fail_next(1)
    assert plugin.read().temperature_c is None
    assert plugin.status().health is Health.ERROR

    reading = plugin.read()

    assert reading.temperature_c == 33.0
    assert plugin.status().health is Health.OK


def test_reading_age_counts_from_last_good(fake_smbus: FakeI2C) -> None:
    chip = fake_smbus.add_bus(1).attach(0x48, FakeTMP102(33.0))
    now = [100.0]
    options = TemperatureOptions(bus=1, chip="tmp102", retries=0, max_failures=5)
    plugin = TemperatureSensor(options, sleep=Waits(), now=lambda: now[0])
    plugin.start(lambda: None)
    plugin.read()

    chip.fail_next(1)
    now[0] = 103.0
    reading = plugin.read()

    assert reading.details["last_good_age_s"] == 3.0


def test_crc_failure_discards_only_that_frame(fake_smbus: FakeI2C) -> None:
    chip = fake_smbus.add_bus(1).attach(0x44, FakeSHT3x(34.0, 40.0))
    assert isinstance(chip, FakeSHT3x)
    chip.corrupt_next_crc()
    plugin = make_plugin(TemperatureOptions(bus=1, chip="sht3x"))

    reading = plugin.read()

    assert reading.temperature_c == pytest.approx(34.0, abs=0.01)
    assert chip.commands == [0x2400, 0x2400]
    assert plugin.status().health is Health.OK


def test_crc_always_bad_ends_in_error(fake_smbus: FakeI2C) -> None:
    fake_smbus.add_bus(1).attach(0x44, FakeSHT3x(34.0, 40.0, corrupt_crc=True))
    plugin = make_plugin(TemperatureOptions(bus=1, chip="sht3x", max_failures=2))

    readings = [plugin.read(), plugin.read()]

    assert [r.temperature_c for r in readings] == [None, None]
    assert plugin.status().health is Health.ERROR
    assert "CRC mismatch" in plugin.status().reason


def test_wrong_chip_at_address_is_error(fake_smbus: FakeI2C) -> None:
    fake_smbus.add_bus(1).attach(0x18, FakeLM75(25.0))
    plugin = make_plugin(TemperatureOptions(bus=1, chip="mcp9808", max_failures=1))

    assert plugin.read().temperature_c is None
    assert "not an MCP9808" in plugin.status().reason


def test_failing_ambient_degrades_only(fake_smbus: FakeI2C) -> None:
    bus = fake_smbus.add_bus(1)
    bus.attach(0x48, FakeTMP102(33.0))
    ambient = AmbientOptions(chip="lm75", address=0x4F)  # nothing there
    plugin = make_plugin(TemperatureOptions(bus=1, chip="tmp102", ambient=ambient, max_failures=1))

    reading = plugin.read()
    status = plugin.status()

    assert reading.temperature_c == 33.0
    assert reading.ambient_c is None
    assert status.health is Health.DEGRADED
    assert "ambient sensor lm75 at 0x4F" in status.reason


def test_stop_closes_bus(fake_smbus: FakeI2C) -> None:
    bus = fake_smbus.add_bus(1)
    bus.attach(0x48, FakeTMP102(33.0))
    plugin = make_plugin(TemperatureOptions(bus=1, chip="tmp102"))
    assert not bus.closed

    plugin.stop()
    plugin.stop()

    assert bus.closed


def test_extended_option_sets_em_bit(fake_smbus: FakeI2C) -> None:
    chip = fake_smbus.add_bus(1).attach(0x48, FakeTMP102(140.0))
    plugin = make_plugin(TemperatureOptions(bus=1, chip="tmp102", extended=True))

    assert plugin.read().temperature_c == 140.0
    assert isinstance(chip, FakeTMP102)
    assert chip.extended


def test_parse_options_full_table() -> None:
    table = {
        "bus": 1,
        "chip": "lm75",
        "address": 0x4C,
        "resolution_bits": 11,
        "retries": 3,
        "max_failures": 5,
        "ambient": {"chip": "tmp102", "address": 0x49, "extended": True},
    }

    options = TemperatureSensor.parse_options(table)

    assert options == TemperatureOptions(
        bus=1,
        chip="lm75",
        address=0x4C,
        resolution_bits=11,
        retries=3,
        max_failures=5,
        ambient=AmbientOptions(chip="tmp102", address=0x49, extended=True),
    )


def test_parse_options_empty_table() -> None:
    assert TemperatureSensor.parse_options({}) == TemperatureOptions()


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"chip": "tmp102"}, "sensors.temperature.bus: missing"),
        ({"bus": 1}, "sensors.temperature.chip: missing"),
        ({"bus": -1, "chip": "tmp102"}, "sensors.temperature.bus: invalid value -1"),
        ({"bus": 1, "chip": "ds18b20"}, "sensors.temperature.chip: invalid value 'ds18b20'"),
        (
            {"bus": 1, "chip": "tmp102", "address": 0x80},
            "sensors.temperature.address: invalid value 128",
        ),
        (
            {"bus": 1, "chip": "tmp102", "address": "0x48"},
            "sensors.temperature.address: invalid value",
        ),
        (
            {"bus": 1, "chip": "tmp102", "resolution_bits": 11},
            "sensors.temperature.resolution_bits: applies",
        ),
        (
            {"bus": 1, "chip": "lm75", "resolution_bits": 12},
            "sensors.temperature.resolution_bits: invalid value 12",
        ),
        ({"bus": 1, "chip": "lm75", "extended": True}, "sensors.temperature.extended: applies"),
        (
            {"bus": 1, "chip": "lm75", "retries": 11},
            "sensors.temperature.retries: invalid value 11",
        ),
        (
            {"bus": 1, "chip": "lm75", "max_failures": 0},
            "sensors.temperature.max_failures: invalid value 0",
        ),
        ({"bus": 1, "chip": "lm75", "port": 1}, "sensors.temperature.port: unknown key"),
        ({"bus": 1, "chip": "lm75", "ambient": {}}, "sensors.temperature.ambient.chip: missing"),
        ({"bus": 1, "chip": "lm75", "ambient": 5}, "sensors.temperature.ambient: expected a table"),
        (
            {"bus": 1, "chip": "lm75", "ambient": {"chip": "tmp102"}},
            "sensors.temperature.ambient.address: 0x48 on bus 1 is the skin sensor's address",
        ),
        (
            {"bus": 1, "chip": "lm75", "ambient": {"chip": "lm75", "address": 3}},
            "sensors.temperature.ambient.address: invalid value 3",
        ),
    ],
)
def test_parse_options_rejects(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TemperatureSensor.parse_options(table)

    message = str(caught.value)
    assert message.startswith(key)
    assert "\n" not in message
