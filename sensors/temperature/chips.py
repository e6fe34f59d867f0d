"""Drivers for the register-based I2C temperature chips: TMP102, LM75 and MCP9808.

Each chip sends its 16-bit registers most significant byte first. SMBus
``read_word_data`` assembles the first byte received as the *low* byte, so
every word read here is byte-swapped before it is decoded
(:func:`read_register`). The SHT3x is command-based rather than
register-based and lives in :mod:`mailpush.sensors.temperature.sht3x`.

The bus is opened through a bus factory: ``smbus2.SMBus`` unless a test
installs another with :func:`install_bus_factory`, the way gpiozero's
``MockFactory`` replaces its pin factory.
"""

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from mailpush.errors import SensorError

ChipName = Literal["tmp102", "lm75", "mcp9808", "sht3x"]
BusFactory = Callable[[int], Any]

# Errors a read may recover from by trying again. Linux I2C adapter drivers
# report a NACK as EREMOTEIO (121) or ENXIO (6), depending on the driver, and
# EIO and ETIMEDOUT come from bus glitches.
TRANSIENT_ERRNOS = frozenset({errno.EREMOTEIO, errno.ENXIO, errno.EIO, errno.ETIMEDOUT})

_installed_factory: BusFactory | None = None


@dataclass(frozen=True, slots=True)
class ChipInfo:
    """The facts the plugin and the probe use about one supported chip.

    Attributes:
        name: the config name, like ``"tmp102"``.
        addresses: the 7-bit addresses its address pins can select.
        default_address: the address with every address pin tied to GND.
        address_pins: how the address pins select the address, for docs and messages.
    """

    name: str
    addresses: tuple[int, ...]
    default_address: int
    address_pins: str


CHIPS: dict[str, ChipInfo] = {
    # TMP102 data sheet (SBOS397), address pin table: ADD0 to GND, V+, SDA, SCL.
    "tmp102": ChipInfo("tmp102", (0x48, 0x49, 0x4A, 0x4B), 0x48, "ADD0 to GND, V+, SDA or SCL"),
    # LM75 family: address 1001 A2 A1 A0.
    "lm75": ChipInfo("lm75", tuple(range(0x48, 0x50)), 0x48, "A2 A1 A0 as the low three bits"),
    # MCP9808 data sheet (DS25095), section 4.5: address 0011 A2 A1 A0.
    "mcp9808": ChipInfo(
        "mcp9808", tuple(range(0x18, 0x20)), 0x18, "A2 A1 A0 as the low three bits"
    ),
    # SHT3x-DIS data sheet: ADDR pin low 0x44, high 0x45.
    "sht3x": ChipInfo("sht3x", (0x44, 0x45), 0x44, "ADDR to GND or VDD"),
}

TMP102_TEMPERATURE = 0x00
TMP102_CONFIG = 0x01
TMP102_CONFIG_EM = 0x0010  # extended mode, bit 4 of the configuration register's second byte
LM75_TEMPERATURE = 0x00
MCP9808_AMBIENT = 0x05
MCP9808_MANUFACTURER_ID = 0x06
MCP9808_DEVICE_ID = 0x07
MCP9808_MANUFACTURER = 0x0054
MCP9808_DEVICE = 0x04


class SMBusLike(Protocol):
    """The part of ``smbus2.SMBus`` the drivers call."""

    def read_word_data(self, i2c_addr: int, register: int) -> int: ...  # noqa: D102

    def write_word_data(self, i2c_addr: int, register: int, value: int) -> None: ...  # noqa: D102

    def close(self) -> None: ...  # noqa: D102


@dataclass(frozen=True, slots=True)
class Measurement:
    """One conversion result; ``humidity_percent`` is set by chips that measure it."""

    temperature_c: float
    humidity_percent: float | None = None


class Driver(Protocol):
    """A chip driver: ``setup`` once per bus open, then ``measure`` per read."""

    chip: str
    address: int

    def setup(self) -> None:
        """Check the chip's identity and write the configuration it needs."""

    def measure(self) -> Measurement:
        """Return the latest conversion result."""


def install_bus_factory(factory: BusFactory | None) -> None:
    """Make :func:`resolve_bus_factory` return ``factory``; ``None`` restores ``smbus2.SMBus``."""
    global _installed_factory
    _installed_factory = factory


def resolve_bus_factory(factory: BusFactory | None = None) -> BusFactory:
    """Return ``factory``, else the installed one, else ``smbus2.SMBus``.

    Raises:
        ImportError: when smbus2 is needed but not installed.
    """
    if factory is not None:
        return factory
    if _installed_factory is not None:
        return _installed_factory

    from smbus2 import SMBus  # imported here so a missing smbus2 never stops the agent

    return SMBus


def bus_open_problem(bus: int, exc: OSError) -> str:
    """Return the one-line reason and fix for a failure to open ``/dev/i2c-<bus>``."""
    path = f"/dev/i2c-{bus}"
    if isinstance(exc, FileNotFoundError):
        return (
            f"sensors.temperature: {path} not found; enable I2C "
            "(raspi-config → Interface Options → I2C) or use a bus that exists "
            "(ls /dev/i2c-* lists them)"
        )
    if isinstance(exc, PermissionError):
        return (
            f"sensors.temperature: permission denied on {path}; add the agent's user to the "
            "i2c group (sudo usermod -aG i2c $USER) and log in again"
        )
    return f"sensors.temperature: opening {path} failed: {exc}"


def is_transient(exc: BaseException) -> bool:
    """Tell whether a failed transfer is worth retrying at once."""
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def read_register(bus: SMBusLike, address: int, register: int) -> int:
    """Read a 16-bit register that the chip sends most significant byte first."""
    word = bus.read_word_data(address, register)
    return swap_bytes(word)


def write_register(bus: SMBusLike, address: int, register: int, value: int) -> None:
    """Write a 16-bit register most significant byte first."""
    bus.write_word_data(address, register, swap_bytes(value))


def swap_bytes(word: int) -> int:
    """Swap the two bytes of a 16-bit SMBus word."""
    return ((word & 0xFF) << 8) | (word >> 8)


def decode_tmp102(raw: int) -> float:
    """Decode a TMP102 temperature register value into °C.

    Bit D0 distinguishes the formats (TMP102 data sheet, "Temperature Register"):
    0 is the 12-bit normal mode (D15..D4, Table 5), 1 the 13-bit extended mode
    (D15..D3, Table 6). Both are two's complement with 0.0625 °C per count.
    """
    if raw & 0x0001:
        return _signed(raw >> 3, 13) * 0.0625
    return _signed(raw >> 4, 12) * 0.0625


def decode_lm75(raw: int, bits: int = 9) -> float:
    """Decode an LM75-family temperature register value into °C.

    The register contains a left-aligned two's complement value with ``bits``
    significant bits: 9 bits in 0.5 °C steps on the original LM75, 11 bits in
    0.125 °C steps on NXP's LM75A and LM75B. The low bits beyond ``bits`` are
    ignored, as the data sheets say to do.
    """
    if not 9 <= bits <= 11:
        msg = f"LM75 resolution must be 9 to 11 bits, not {bits}"
        raise ValueError(msg)
    counts = _signed(raw >> (16 - bits), bits)
    return counts / (1 << (bits - 8))


def decode_mcp9808(raw: int) -> float:
    """Decode an MCP9808 ambient temperature register (TA) value into °C.

    MCP9808 data sheet, Register 5-4: bits 15-13 are the TCRIT, TUPPER and
    TLOWER alert flags and are masked off. Bits 12-0 are a 13-bit two's
    complement value with 0.0625 °C per count, bit 12 being the sign.
    """
    return _signed(raw & 0x1FFF, 13) * 0.0625


def make_driver(
    chip: str,
    bus: Any,
    address: int,
    *,
    resolution_bits: int | None = None,
    extended: bool = False,
    sleep: Callable[[float], None] | None = None,
) -> Driver:
    """Return the driver for ``chip`` at ``address`` on an open bus."""
    if chip == "tmp102":
        return Tmp102(bus, address, extended=extended)
    if chip == "lm75":
        return Lm75(bus, address, bits=resolution_bits or 9)
    if chip == "mcp9808":
        return Mcp9808(bus, address)
    if chip == "sht3x":
        from mailpush.sensors.temperature.sht3x import Sht3x

        return Sht3x(bus, address, sleep=sleep)
    msg = f"unknown chip {chip!r}; expected one of {', '.join(CHIPS)}"
    raise ValueError(msg)


class Tmp102:
    """A TI TMP102 (data sheet SBOS397).

    Args:
        bus: an open SMBus.
        address: the chip's 7-bit address.
        extended: switch the chip to 13-bit extended mode (up to 150 °C) in
            :meth:`setup`. Decoding follows bit D0 of each value either way,
            so a chip left in extended mode still reads correctly.
    """

    chip = "tmp102"

    def __init__(self, bus: SMBusLike, address: int, *, extended: bool = False) -> None:
        self.bus = bus
        self.address = address
        self.extended = extended

    def setup(self) -> None:
        """Set the EM bit of the configuration register when extended mode is requested."""
        if not self.extended:
            return
        config = read_register(self.bus, self.address, TMP102_CONFIG)
        if not config & TMP102_CONFIG_EM:
            write_register(self.bus, self.address, TMP102_CONFIG, config | TMP102_CONFIG_EM)

    def measure(self) -> Measurement:
        """Read the temperature register."""
        raw = read_register(self.bus, self.address, TMP102_TEMPERATURE)
        return Measurement(decode_tmp102(raw))


class Lm75:
    """An LM75-family sensor (TI/National LM75, NXP LM75A/LM75B and compatibles).

    Args:
        bus: an open SMBus.
        address: the chip's 7-bit address.
        bits: the chip's temperature resolution, 9 to 11 bits.
    """

    chip = "lm75"

    def __init__(self, bus: SMBusLike, address: int, *, bits: int = 9) -> None:
        self.bus = bus
        self.address = address
        self.bits = bits

    def setup(self) -> None:
        """Do nothing: the LM75 powers up converting continuously."""

    def measure(self) -> Measurement:
        """Read the temperature register."""
        raw = read_register(self.bus, self.address, LM75_TEMPERATURE)
        return Measurement(decode_lm75(raw, self.bits))


class Mcp9808:
    """A Microchip MCP9808 (data sheet DS25095)."""

    chip = "mcp9808"

    def __init__(self, bus: SMBusLike, address: int) -> None:
        self.bus = bus
        self.address = address

    def setup(self) -> None:
        """Check the manufacturer and device ID registers.

        Raises:
            SensorError: when another chip responds at this address.
        """
        manufacturer = read_register(self.bus, self.address, MCP9808_MANUFACTURER_ID)
        device = read_register(self.bus, self.address, MCP9808_DEVICE_ID) >> 8
        if manufacturer != MCP9808_MANUFACTURER or device != MCP9808_DEVICE:
            msg = (
                f"the device at 0x{self.address:02X} is not an MCP9808 (manufacturer ID "
                f"0x{manufacturer:04X}, device ID 0x{device:02X}; expected 0x0054 and 0x04); "
                "check chip and address"
            )
            raise SensorError(msg)

    def measure(self) -> Measurement:
        """Read the ambient temperature register."""
        raw = read_register(self.bus, self.address, MCP9808_AMBIENT)
        return Measurement(decode_mcp9808(raw))


def _signed(value: int, bits: int) -> int:
    """Interpret the low ``bits`` bits of ``value`` as two's complement."""
    value &= (1 << bits) - 1
    if value & (1 << (bits - 1)):
        value -= 1 << bits
    return value
