"""Chip decoders against the data sheets' tables, and the drivers through the fake SMBus."""

import pytest

from mailpush.errors import SensorError
from mailpush.sensors.temperature.chips import (
    Lm75,
    Mcp9808,
    Tmp102,
    decode_lm75,
    decode_mcp9808,
    decode_tmp102,
    read_register,
)
from mailpush.sensors.temperature.sht3x import (
    CrcError,
    Sht3x,
    crc8,
    decode_frame,
    decode_humidity,
    decode_temperature,
)
from tests.fixtures.smbus import (
    FakeLM75,
    FakeMCP9808,
    FakeSHT3x,
    FakeSMBus,
    FakeTMP102,
    sensirion_crc8,
)

# TMP102 data sheet (SBOS397), Table 5 "12-Bit Temperature Data Format":
# the 12-bit value sits in D15..D4. 128 °C is listed as 7FF: it saturates.
TMP102_12_BIT = [
    (0x7FF, 127.9375),
    (0x640, 100.0),
    (0x500, 80.0),
    (0x4B0, 75.0),
    (0x320, 50.0),
    (0x190, 25.0),
    (0x004, 0.25),
    (0x001, 0.0625),
    (0x000, 0.0),
    (0xFFC, -0.25),
    (0xE70, -25.0),
    (0xC90, -55.0),
]

# Table 6 "13-Bit Temperature Data Format" (extended mode): D15..D3, D0 = 1.
TMP102_13_BIT = [
    (0x0960, 150.0),
    (0x0800, 128.0),
    (0x07FF, 127.9375),
    (0x0640, 100.0),
    (0x0004, 0.25),
    (0x0000, 0.0),
    (0x1FFC, -0.25),
    (0x1E70, -25.0),
    (0x1C90, -55.0),
]

# LM75 9-bit format (the table shared by LM75 data sheets, e.g. ST STLM75
# Table 3): the value sits in D15..D7, 0.5 °C per count.
LM75_9_BIT = [
    (0x0FA, 125.0),
    (0x032, 25.0),
    (0x001, 0.5),
    (0x000, 0.0),
    (0x1FF, -0.5),
    (0x1CE, -25.0),
    (0x1B0, -40.0),
    (0x192, -55.0),
]

# NXP LM75A/LM75B 11-bit format: D15..D5, D10 of the value is the sign,
# 0.125 °C per count (section 7.4.3); rows computed from that rule.
LM75_11_BIT = [
    (0x3F8, 127.0),
    (0x3E8, 125.0),
    (0x0C8, 25.0),
    (0x001, 0.125),
    (0x000, 0.0),
    (0x7FF, -0.125),
    (0x738, -25.0),
    (0x648, -55.0),
]

# MCP9808 Register 5-4 (TA): bits 15-13 alert flags, bit 12 sign, 0.0625 °C per count.
MCP9808_TA = [
    (0x07D0, 125.0),
    (0x0190, 25.0),
    (0x0001, 0.0625),
    (0x0000, 0.0),
    (0x1FFF, -0.0625),
    (0x1E70, -25.0),
    (0x1D80, -40.0),
]


@pytest.mark.parametrize(("value", "expected"), TMP102_12_BIT)
def test_tmp102_12_bit_table(value: int, expected: float) -> None:
    assert decode_tmp102(value << 4) == expected


@pytest.mark.parametrize(("value", "expected"), TMP102_13_BIT)
def test_tmp102_13_bit_table(value: int, expected: float) -> None:
    assert decode_tmp102((value << 3) | 0x0001) == expected


def test_tmp102_register_words_from_brief() -> None:
    assert decode_tmp102(0x7FF0) == 127.9375
    assert decode_tmp102(0x0010) == 0.0625
    assert decode_tmp102(0xFFC0) == -0.25
    assert decode_tmp102(0xC900) == -55.0


@pytest.mark.parametrize(("value", "expected"), LM75_9_BIT)
def test_lm75_9_bit_table(value: int, expected: float) -> None:
    assert decode_lm75(value << 7, 9) == expected


@pytest.mark.parametrize(("value", "expected"), LM75_11_BIT)
def test_lm75_11_bit_table(value: int, expected: float) -> None:
    assert decode_lm75(value << 5, 11) == expected


def test_lm75_ignores_bits_below_resolution() -> None:
    assert decode_lm75(0x7D7F, 9) == 125.0
    assert decode_lm75(0x7D1F, 11) == 125.0
    assert decode_lm75(0x7D60, 11) == 125.375


def test_lm75_10_bit_steps() -> None:
    assert decode_lm75(0x0040, 10) == 0.25
    assert decode_lm75(0xFFC0, 10) == -0.25


def test_lm75_rejects_unknown_resolution() -> None:
    with pytest.raises(ValueError, match="9 to 11 bits"):
        decode_lm75(0, 12)


@pytest.mark.parametrize(("value", "expected"), MCP9808_TA)
def test_mcp9808_table(value: int, expected: float) -> None:
    assert decode_mcp9808(value) == expected


@pytest.mark.parametrize("flags", [0b001, 0b010, 0b100, 0b111])
def test_mcp9808_masks_alert_flags(flags: int) -> None:
    assert decode_mcp9808(flags << 13 | 0x07D0) == 125.0
    assert decode_mcp9808(flags << 13 | 0x1D80) == -40.0


def test_sht3x_crc_datasheet_example() -> None:
    assert crc8(b"\xbe\xef") == 0x92
    assert sensirion_crc8(b"\xbe\xef") == 0x92


@pytest.mark.parametrize("word", [b"\x00\x00", b"\xff\xff", b"\x66\x66", b"\x12\x34", b"\x80\x01"])
def test_sht3x_crc_matches_independent_fake(word: bytes) -> None:
    assert crc8(word) == sensirion_crc8(word)


def test_sht3x_conversion_ends() -> None:
    assert decode_temperature(0x0000) == -45.0
    assert decode_temperature(0xFFFF) == 130.0
    assert decode_humidity(0x0000) == 0.0
    assert decode_humidity(0xFFFF) == 100.0


def test_sht3x_frame_decodes() -> None:
    temperature, humidity = b"\x66\x66", b"\x80\x00"
    frame = temperature + bytes([crc8(temperature)]) + humidity + bytes([crc8(humidity)])
    measurement = decode_frame(frame)
    assert measurement.temperature_c == pytest.approx(-45 + 175 * 0x6666 / 65535)
    assert measurement.humidity_percent == pytest.approx(100 * 0x8000 / 65535)


@pytest.mark.parametrize("spoiled", [2, 5])
def test_sht3x_frame_crc_mismatch(spoiled: int) -> None:
    temperature, humidity = b"\x66\x66", b"\x80\x00"
    frame = bytearray(temperature + bytes([crc8(temperature)]) + humidity + bytes([crc8(humidity)]))
    frame[spoiled] ^= 0x01
    with pytest.raises(CrcError, match="CRC mismatch"):
        decode_frame(bytes(frame))


def test_sht3x_frame_wrong_length() -> None:
    with pytest.raises(ValueError, match="6 bytes"):
        decode_frame(b"\x00\x00\x81")


def test_word_byte_order_through_fake() -> None:
    bus = FakeSMBus(1)
    bus.closed = False
    bus.attach(0x48, FakeTMP102(25.0))

    # The chip sends 0x19 then 0x00; SMBus makes the first byte the low byte.
    assert bus.read_word_data(0x48, 0x00) == 0x0019
    assert bus.read_i2c_block_data(0x48, 0x00, 2) == [0x19, 0x00]
    assert read_register(bus, 0x48, 0x00) == 0x1900


@pytest.mark.parametrize(
    ("temp_c", "expected"),
    [(-55.0, -55.0), (-0.03, -0.0625), (25.3, 25.25), (127.9375, 127.9375), (128.0, 127.9375)],
)
def test_tmp102_driver_normal_mode(temp_c: float, expected: float) -> None:
    bus = _open_bus()
    bus.attach(0x48, FakeTMP102(temp_c))
    driver = Tmp102(bus, 0x48)
    driver.setup()

    assert driver.measure().temperature_c == expected
    assert bus.write_calls() == []


@pytest.mark.parametrize(("temp_c", "expected"), [(150.0, 150.0), (128.0, 128.0), (-55.0, -55.0)])
def test_tmp102_driver_sets_extended_mode(temp_c: float, expected: float) -> None:
    bus = _open_bus()
    chip = bus.attach(0x48, FakeTMP102(temp_c))
    driver = Tmp102(bus, 0x48, extended=True)
    driver.setup()

    assert isinstance(chip, FakeTMP102)
    assert chip.extended
    assert chip.registers[0x01] == b"\x60\xb0"
    assert driver.measure().temperature_c == expected


def test_tmp102_driver_reads_chip_left_in_extended_mode() -> None:
    bus = _open_bus()
    bus.attach(0x48, FakeTMP102(140.0, extended=True))
    driver = Tmp102(bus, 0x48)
    driver.setup()

    assert driver.measure().temperature_c == 140.0


@pytest.mark.parametrize(
    ("bits", "temp_c", "expected"),
    [
        (9, 125.0, 125.0),
        (9, -55.0, -55.0),
        (9, 33.7, 33.5),
        (9, -0.2, -0.5),
        (10, 33.7, 33.5),
        (11, 33.7, 33.625),
        (11, -54.875, -54.875),
    ],
)
def test_lm75_driver(bits: int, temp_c: float, expected: float) -> None:
    bus = _open_bus()
    bus.attach(0x4C, FakeLM75(temp_c, bits=bits))
    driver = Lm75(bus, 0x4C, bits=bits)

    assert driver.measure().temperature_c == expected


@pytest.mark.parametrize(
    ("temp_c", "expected"), [(-40.0, -40.0), (125.0, 125.0), (0.0625, 0.0625), (-0.01, -0.0625)]
)
def test_mcp9808_driver_with_alert_flags(temp_c: float, expected: float) -> None:
    bus = _open_bus()
    bus.attach(0x18, FakeMCP9808(temp_c, alert_bits=0b111))
    driver = Mcp9808(bus, 0x18)
    driver.setup()

    assert driver.measure().temperature_c == expected


def test_mcp9808_driver_rejects_other_chip() -> None:
    bus = _open_bus()
    bus.attach(0x18, FakeLM75(25.0))
    driver = Mcp9808(bus, 0x18)

    with pytest.raises(SensorError, match="not an MCP9808"):
        driver.setup()


@pytest.mark.parametrize(("temp_c", "humidity"), [(-40.0, 0.0), (33.0, 45.0), (125.0, 100.0)])
def test_sht3x_driver(temp_c: float, humidity: float) -> None:
    bus = _open_bus()
    chip = bus.attach(0x44, FakeSHT3x(temp_c, humidity))
    waits: list[float] = []
    driver = Sht3x(bus, 0x44, sleep=waits.append)

    measurement = driver.measure()

    # One raw count is 175 / 65535 °C and 100 / 65535 %RH.
    assert measurement.temperature_c == pytest.approx(temp_c, abs=175 / 65535)
    assert measurement.humidity_percent == pytest.approx(humidity, abs=100 / 65535)
    assert isinstance(chip, FakeSHT3x)
    assert chip.commands == [0x2400]
    assert len(waits) == 1


def test_sht3x_driver_bad_crc() -> None:
    bus = _open_bus()
    bus.attach(0x44, FakeSHT3x(33.0, 45.0, corrupt_crc=True))
    driver = Sht3x(bus, 0x44, sleep=lambda _: None)

    with pytest.raises(CrcError):
        driver.measure()


def test_sht3x_read_without_command_is_nacked() -> None:
    bus = _open_bus()
    bus.attach(0x44, FakeSHT3x(33.0))

    with pytest.raises(OSError) as caught:
        bus.read_byte(0x44)
    assert caught.value.errno == 121


def _open_bus() -> FakeSMBus:
    bus = FakeSMBus(1)
    bus.closed = False
    return bus
