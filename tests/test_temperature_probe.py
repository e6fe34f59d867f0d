"""The read-only bus probe on a fake bus with several chips."""

import pytest

from mailpush.errors import SensorError
from mailpush.sensors.temperature.probe import describe_probe, probe_bus
from tests.fixtures.smbus import (
    FakeI2C,
    FakeLM75,
    FakeMCP9808,
    FakeRegisterChip,
    FakeSHT3x,
    FakeSMBus,
    FakeTMP102,
)


@pytest.fixture
def crowded_bus(fake_smbus: FakeI2C) -> FakeSMBus:
    bus = fake_smbus.add_bus(1)
    bus.attach(0x18, FakeMCP9808(24.0))
    bus.attach(0x1A, FakeMCP9808(-5.0, alert_bits=0))
    # Another chip at an MCP9808 address, whose register 0x06 contains something else.
    bus.attach(0x19, FakeRegisterChip({0x06: b"\x00\x33", 0x07: b"\x11\x00"}))
    bus.attach(0x44, FakeSHT3x(30.0))  # idle: NACKs reads
    bus.attach(0x45, FakeRegisterChip({0x00: b"\x00"}))  # acknowledges a plain read
    bus.attach(0x48, FakeTMP102(33.0))
    bus.attach(0x4C, FakeLM75(-10.5))
    return bus


def test_describe_probe_line() -> None:
    assert describe_probe(1) == (
        "reading (never writing) addresses 0x18-0x1F (MCP9808), 0x44-0x45 (SHT3x), "
        "0x48-0x4F (TMP102, LM75) on /dev/i2c-1"
    )


def test_probe_lists_devices_in_address_order(crowded_bus: FakeSMBus) -> None:
    found = probe_bus(1)

    assert [item.address for item in found] == [0x18, 0x19, 0x1A, 0x45, 0x48, 0x4C]


def test_probe_identifies_mcp9808(crowded_bus: FakeSMBus) -> None:
    found = {item.address: item for item in probe_bus(1)}

    assert found[0x18].chip == "mcp9808"
    assert found[0x1A].chip == "mcp9808"
    assert "revision 0x00" in found[0x18].note


def test_probe_rejects_other_chip_at_mcp9808_address(crowded_bus: FakeSMBus) -> None:
    found = {item.address: item for item in probe_bus(1)}

    assert found[0x19].chip is None
    assert found[0x19].candidates == ()
    assert "0x0033" in found[0x19].note


def test_probe_cannot_tell_tmp102_from_lm75(crowded_bus: FakeSMBus) -> None:
    found = {item.address: item for item in probe_bus(1)}

    assert found[0x48].chip is None
    assert found[0x48].candidates == ("tmp102", "lm75")
    assert "33 °C as a TMP102" in found[0x48].note
    assert "cannot be told apart" in found[0x48].note
    assert found[0x4C].candidates == ("lm75",)
    assert "-10.5 °C as an LM75" in found[0x4C].note


def test_probe_sht3x_addresses(crowded_bus: FakeSMBus) -> None:
    found = {item.address: item for item in probe_bus(1)}

    # An idle SHT3x NACKs a read without a pending command, so it stays unseen.
    assert 0x44 not in found
    assert found[0x45].candidates == ("sht3x",)
    assert "cannot be identified without writing" in found[0x45].note


def test_probe_never_writes(crowded_bus: FakeSMBus) -> None:
    probe_bus(1)

    assert crowded_bus.write_calls() == []
    assert {name for name, _, _ in crowded_bus.calls} == {"read_word_data", "read_byte"}
    sht3x = crowded_bus.devices[0x44]
    assert isinstance(sht3x, FakeSHT3x)
    assert sht3x.commands == []


def test_probe_touches_only_listed_addresses(crowded_bus: FakeSMBus) -> None:
    probe_bus(1)

    touched = {address for _, address, _ in crowded_bus.calls}
    assert touched == set(range(0x18, 0x20)) | {0x44, 0x45} | set(range(0x48, 0x50))


def test_probe_closes_bus(crowded_bus: FakeSMBus) -> None:
    probe_bus(1)

    assert crowded_bus.closed
    assert crowded_bus.opened == 1


def test_probe_empty_bus(fake_smbus: FakeI2C) -> None:
    fake_smbus.add_bus(3)

    assert probe_bus(3) == []


def test_probe_missing_bus(fake_smbus: FakeI2C) -> None:
    with pytest.raises(SensorError) as caught:
        probe_bus(7)

    assert str(caught.value) == (
        "sensors.temperature: /dev/i2c-7 not found; enable I2C "
        "(raspi-config → Interface Options → I2C) or use a bus that exists "
        "(ls /dev/i2c-* lists them)"
    )


def test_probe_uses_given_factory() -> None:
    fake = FakeI2C()
    fake.add_bus(1).attach(0x1F, FakeMCP9808(20.0))

    found = probe_bus(1, bus_factory=fake)

    assert [(item.address, item.chip) for item in found] == [(0x1F, "mcp9808")]


def test_probe_command_lists_chips(fake_smbus: FakeI2C) -> None:
    from click.testing import CliRunner

    from mailpush.agent.cli import cli

    bus = fake_smbus.add_bus(1)
    bus.attach(0x18, FakeMCP9808(24.0))
    bus.attach(0x48, FakeTMP102(33.0))

    result = CliRunner().invoke(cli, ["sensors", "probe", "--bus", "1"])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("reading (never writing) addresses")
    assert "0x18  mcp9808" in result.output
    assert "0x48  tmp102 or lm75" in result.output
    assert bus.write_calls() == []
