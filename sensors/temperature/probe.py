"""A read-only scan of one I2C bus for the temperature chips this plugin supports.

The probe never writes to the bus beyond the register pointer that every
SMBus register read sends. It calls ``read_word_data`` and ``read_byte``
only, never a write method, so it cannot change a chip's configuration.

What reads alone can tell:

* MCP9808 (0x18-0x1F): identified by its manufacturer ID register (0x06,
  0x0054) and device ID register (0x07, upper byte 0x04).
* TMP102 (0x48-0x4B) and LM75 (0x48-0x4F): both respond to a temperature
  register read at pointer 0x00, and no read-only register distinguishes them,
  nor from other chips at those addresses (an ADS1115 ADC, for one).
* SHT3x (0x44-0x45): it has no readable register without a command write, so
  the probe only reports that a device acknowledged a one-byte read. An idle
  SHT3x NACKs a read when no measurement is pending, so it usually stays
  unseen; enable the plugin with ``chip = "sht3x"`` to check one.

A register read can still have side effects on an unrelated chip that clears
a status register when it is read.
"""

import logging
from dataclasses import dataclass
from typing import Any

from mailpush.errors import SensorError
from mailpush.sensors.temperature.chips import (
    CHIPS,
    MCP9808_DEVICE,
    MCP9808_DEVICE_ID,
    MCP9808_MANUFACTURER,
    MCP9808_MANUFACTURER_ID,
    BusFactory,
    bus_open_problem,
    decode_lm75,
    decode_tmp102,
    read_register,
    resolve_bus_factory,
)

log = logging.getLogger(__name__)

MCP9808_ADDRESSES = CHIPS["mcp9808"].addresses
SHT3X_ADDRESSES = CHIPS["sht3x"].addresses
LM75_ADDRESSES = CHIPS["lm75"].addresses
TMP102_ADDRESSES = CHIPS["tmp102"].addresses
PROBED_ADDRESSES = MCP9808_ADDRESSES + SHT3X_ADDRESSES + LM75_ADDRESSES


@dataclass(frozen=True, slots=True)
class Found:
    """A device that responded at one of the supported chips' addresses.

    Attributes:
        address: its 7-bit address.
        chip: the chip name when reads identified it, else ``None``.
        candidates: the supported chips it may be when it was not identified.
        note: what was read and what it means, in one sentence.
    """

    address: int
    chip: str | None
    candidates: tuple[str, ...]
    note: str


def describe_probe(bus: int) -> str:
    """Return the line to print before the probe touches the bus."""
    ranges = "0x18-0x1F (MCP9808), 0x44-0x45 (SHT3x), 0x48-0x4F (TMP102, LM75)"
    return f"reading (never writing) addresses {ranges} on /dev/i2c-{bus}"


def probe_bus(bus: int, bus_factory: BusFactory | None = None) -> list[Found]:
    """List the devices that respond at the supported chips' addresses, in address order.

    Args:
        bus: the number N of ``/dev/i2c-N``.
        bus_factory: opens the bus; ``None`` uses the installed factory,
            by default ``smbus2.SMBus``.

    Raises:
        SensorError: when smbus2 is missing or the bus cannot be opened, with the fix.
    """
    try:
        factory = resolve_bus_factory(bus_factory)
    except ImportError as exc:
        msg = "sensors.temperature: smbus2 is not installed; install it with `pip install smbus2`"
        raise SensorError(msg) from exc

    try:
        smbus = factory(bus)
    except OSError as exc:
        raise SensorError(bus_open_problem(bus, exc)) from exc

    try:
        found = [_probe_mcp9808(smbus, address) for address in MCP9808_ADDRESSES]
        found += [_probe_sht3x(smbus, address) for address in SHT3X_ADDRESSES]
        found += [_probe_lm75_family(smbus, address) for address in LM75_ADDRESSES]
    finally:
        smbus.close()
    return [item for item in found if item is not None]


def _probe_mcp9808(smbus: Any, address: int) -> Found | None:
    try:
        manufacturer = read_register(smbus, address, MCP9808_MANUFACTURER_ID)
    except OSError as exc:
        log.debug("no response at 0x%02X: %s", address, exc)
        return None

    if manufacturer != MCP9808_MANUFACTURER:
        note = (
            f"a device responded, but its register 0x06 reads 0x{manufacturer:04X}, "
            "not the MCP9808 manufacturer ID 0x0054"
        )
        return Found(address, None, (), note)

    try:
        device_word = read_register(smbus, address, MCP9808_DEVICE_ID)
    except OSError as exc:
        note = f"manufacturer ID 0x0054 (Microchip), but reading the device ID failed: {exc}"
        return Found(address, None, ("mcp9808",), note)

    device, revision = device_word >> 8, device_word & 0xFF
    if device != MCP9808_DEVICE:
        note = f"a Microchip device with device ID 0x{device:02X}, not an MCP9808 (0x04)"
        return Found(address, None, (), note)
    note = f"MCP9808: manufacturer ID 0x0054, device ID 0x04, revision 0x{revision:02X}"
    return Found(address, "mcp9808", (), note)


def _probe_sht3x(smbus: Any, address: int) -> Found | None:
    try:
        smbus.read_byte(address)
    except OSError as exc:
        log.debug("no response at 0x%02X: %s", address, exc)
        return None
    note = "a device acknowledged a read; an SHT3x cannot be identified without writing a command"
    return Found(address, None, ("sht3x",), note)


def _probe_lm75_family(smbus: Any, address: int) -> Found | None:
    try:
        raw = read_register(smbus, address, 0x00)
    except OSError as exc:
        log.debug("no response at 0x%02X: %s", address, exc)
        return None

    if address in TMP102_ADDRESSES:
        candidates: tuple[str, ...] = ("tmp102", "lm75")
        readings = f"{decode_tmp102(raw):.4g} °C as a TMP102, {decode_lm75(raw):.4g} °C as an LM75"
        which = "TMP102 and LM75 cannot be told apart by reads"
    else:
        candidates = ("lm75",)
        readings = f"{decode_lm75(raw):.4g} °C as an LM75"
        which = "reads cannot confirm it is an LM75"
    note = f"register 0x00 reads 0x{raw:04X} ({readings}); {which}"
    return Found(address, None, candidates, note)
