"""Driver for the Sensirion SHT3x-DIS humidity and temperature sensor.

The SHT3x has no register pointer: the host writes a 16-bit command and then
reads the result as a raw I2C read. SMBus register reads would send a
pointer byte first, so this driver uses plain I2C messages
(``smbus2.i2c_msg`` with ``SMBus.i2c_rdwr``).

A measurement frame is six bytes: temperature MSB, LSB, CRC, humidity MSB,
LSB, CRC (data sheet section 4.4). Each CRC covers the two bytes before it.
"""

import time
from collections.abc import Callable, Iterable
from typing import Any

from mailpush.errors import SensorError
from mailpush.sensors.temperature.chips import Measurement

# Single shot, high repeatability, clock stretching disabled (data sheet
# Table 9). Without clock stretching the bus is free while the sensor
# measures, and a read before the result is ready is NACKed, which the
# plugin retries.
MEASURE_HIGH_REPEATABILITY = (0x24, 0x00)
FRAME_LENGTH = 6

# NOTE: 20 ms is a margin over the high-repeatability measurement time as
# remembered from the data sheet's timing table, which was not checked here.
# A read that comes too early is NACKed and retried, so a short wait costs a retry.
MEASURE_WAIT_S = 0.020

CRC_POLYNOMIAL = 0x31  # x^8 + x^5 + x^4 + 1, data sheet Table 20
CRC_INIT = 0xFF


class CrcError(SensorError):
    """An SHT3x frame failed its CRC check; the frame is discarded."""


def crc8(data: Iterable[int]) -> int:
    """Return the SHT3x CRC-8 of ``data``: polynomial 0x31, init 0xFF, no reflection, no final XOR."""
    crc = CRC_INIT
    for byte in data:
        crc ^= byte
        for _ in range(8):
            if crc & 0x80:
                crc = ((crc << 1) ^ CRC_POLYNOMIAL) & 0xFF
            else:
                crc = (crc << 1) & 0xFF
    return crc


def decode_temperature(raw: int) -> float:
    """Convert a raw temperature word to °C: T = -45 + 175 * raw / (2^16 - 1) (section 4.13)."""
    return -45.0 + 175.0 * raw / 65535.0


def decode_humidity(raw: int) -> float:
    """Convert a raw humidity word to %RH: RH = 100 * raw / (2^16 - 1) (section 4.13)."""
    return 100.0 * raw / 65535.0


def decode_frame(frame: bytes) -> Measurement:
    """Check both CRCs of a six-byte measurement frame and decode it.

    Raises:
        CrcError: when either word's CRC does not match; the whole frame is
            discarded because a corrupted byte suggests a disturbed transfer.
        ValueError: when ``frame`` is not six bytes long.
    """
    if len(frame) != FRAME_LENGTH:
        msg = f"an SHT3x frame is {FRAME_LENGTH} bytes, not {len(frame)}"
        raise ValueError(msg)

    for start, name in ((0, "temperature"), (3, "humidity")):
        word, crc = frame[start : start + 2], frame[start + 2]
        expected = crc8(word)
        if crc != expected:
            msg = f"SHT3x {name} CRC mismatch (0x{crc:02X}, expected 0x{expected:02X}); frame discarded"
            raise CrcError(msg)

    temperature_raw = (frame[0] << 8) | frame[1]
    humidity_raw = (frame[3] << 8) | frame[4]
    return Measurement(decode_temperature(temperature_raw), decode_humidity(humidity_raw))


class Sht3x:
    """A Sensirion SHT30, SHT31 or SHT35 in single-shot mode.

    Args:
        bus: an open SMBus with ``i2c_rdwr``.
        address: 0x44 (ADDR low) or 0x45 (ADDR high).
        sleep: waits for the measurement; tests pass a function that does not block.
    """

    chip = "sht3x"

    def __init__(
        self, bus: Any, address: int, *, sleep: Callable[[float], None] | None = None
    ) -> None:
        self.bus = bus
        self.address = address
        self._sleep = sleep or time.sleep

    def setup(self) -> None:
        """Do nothing: each single-shot command starts from the sensor's idle state."""

    def measure(self) -> Measurement:
        """Start a measurement, wait for it, and read and check the frame.

        Raises:
            OSError: for a bus error or a NACK (errno 121 on most adapters).
            CrcError: for a corrupted frame.
        """
        from smbus2 import i2c_msg  # imported here so a missing smbus2 never stops the agent

        command = i2c_msg.write(self.address, MEASURE_HIGH_REPEATABILITY)
        self.bus.i2c_rdwr(command)

        self._sleep(MEASURE_WAIT_S)

        result = i2c_msg.read(self.address, FRAME_LENGTH)
        self.bus.i2c_rdwr(result)
        return decode_frame(bytes(result))
