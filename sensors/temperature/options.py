"""The ``[sensors.temperature]`` config keys and their validation.

LM75 variants are distinguished by ``resolution_bits`` rather than by chip
names, because the same part number means different resolutions from
different makers (TI's LM75B has 9 bits, NXP's LM75B has 11).
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mailpush.errors import ConfigError
from mailpush.sensors.temperature.chips import CHIPS, ChipName
from mailpush.tables import parse_dataclass, parse_table

SECTION = "sensors.temperature"
CHIP_CHOICES = ", ".join(repr(name) for name in CHIPS)


@dataclass(frozen=True)
class AmbientOptions:
    """The ``[sensors.temperature.ambient]`` table: a second sensor that reads the room.

    Attributes:
        chip: the ambient sensor's chip.
        bus: its I2C bus number; unset uses the skin sensor's bus.
        address: its 7-bit address; unset uses the chip's default address.
        resolution_bits: LM75 only, as for the skin sensor.
        extended: TMP102 only, as for the skin sensor.
    """

    chip: ChipName | None = None
    bus: int | None = None
    address: int | None = None
    resolution_bits: int | None = None
    extended: bool = False

    def __post_init__(self) -> None:
        section = f"{SECTION}.ambient"
        if self.chip is None:
            msg = f"{section}.chip: missing; set chip to one of {CHIP_CHOICES}"
            raise ConfigError(msg)
        _check_bus(section, self.bus)
        _check_chip_keys(section, self.chip, self.address, self.resolution_bits, self.extended)


@dataclass(frozen=True)
class TemperatureOptions:
    """Config keys of ``[sensors.temperature]``.

    Attributes:
        bus: the I2C bus number N of ``/dev/i2c-N`` (1 on a Raspberry Pi).
            Required when the sensor is enabled: the plugin never guesses a bus.
        chip: the skin sensor's chip. Required when the sensor is enabled.
        address: the chip's 7-bit address; unset uses the chip's default
            (0x48 for TMP102 and LM75, 0x18 for MCP9808, 0x44 for SHT3x).
        resolution_bits: LM75 only: 9 (LM75, TI LM75B/C, the default) to 11
            (NXP LM75A/LM75B).
        extended: TMP102 only: switch to 13-bit extended mode (up to 150 °C).
        ambient: an optional second sensor that reads the room, so that the
            fusion can compare skin and room temperature.
        retries: immediate retries of a failed transfer within one read.
        max_failures: reads in a row that may fail before the reading turns
            null and the status ``error``.
    """

    bus: int | None = None
    chip: ChipName | None = None
    address: int | None = None
    resolution_bits: int | None = None
    extended: bool = False
    ambient: AmbientOptions | None = None
    retries: int = 2
    max_failures: int = 3

    def __post_init__(self) -> None:
        _check_bus(SECTION, self.bus)
        if self.chip is not None:
            _check_chip_keys(SECTION, self.chip, self.address, self.resolution_bits, self.extended)
        if not 0 <= self.retries <= 10:
            msg = f"{SECTION}.retries: invalid value {self.retries!r}; expected 0 to 10"
            raise ConfigError(msg)
        if not 1 <= self.max_failures <= 100:
            msg = f"{SECTION}.max_failures: invalid value {self.max_failures!r}; expected 1 to 100"
            raise ConfigError(msg)
        self._check_ambient_address()

    def skin_address(self) -> int | None:
        """Return the skin sensor's address, the chip default when unset."""
        return _address_or_default(self.chip, self.address)

    def ambient_bus(self) -> int | None:
        """Return the ambient sensor's bus, the skin sensor's when unset."""
        if self.ambient is None:
            return None
        return self.ambient.bus if self.ambient.bus is not None else self.bus

    def _check_ambient_address(self) -> None:
        if self.ambient is None or self.chip is None:
            return
        ambient_address = _address_or_default(self.ambient.chip, self.ambient.address)
        if self.ambient_bus() == self.bus and ambient_address == self.skin_address():
            msg = (
                f"{SECTION}.ambient.address: 0x{ambient_address:02X} on bus {self.bus} is the "
                "skin sensor's address; give the ambient sensor its own address or bus"
            )
            raise ConfigError(msg)


def parse_options(table: Mapping[str, Any]) -> TemperatureOptions:
    """Validate a ``[sensors.temperature]`` table (without ``enabled``).

    An empty table is valid, because the agent validates the options of
    disabled plugins too; :meth:`TemperatureSensor.start` then reports the
    missing ``bus`` and ``chip``. A table with any key must name both.

    Raises:
        ConfigError: one line naming the key, the value and the fix.
    """
    table = dict(table)
    ambient_table = table.pop("ambient", None)
    options: TemperatureOptions = parse_dataclass(TemperatureOptions, table, SECTION)

    if ambient_table is not None:
        ambient = parse_table(AmbientOptions, ambient_table, f"{SECTION}.ambient")
        options = dataclasses.replace(options, ambient=ambient)

    if table or ambient_table is not None:
        if options.bus is None:
            msg = f"{SECTION}.bus: missing; set bus = 1 for /dev/i2c-1 (ls /dev/i2c-* lists the buses)"
            raise ConfigError(msg)
        if options.chip is None:
            msg = f"{SECTION}.chip: missing; set chip to one of {CHIP_CHOICES}"
            raise ConfigError(msg)
    return options


def _check_bus(section: str, bus: int | None) -> None:
    if bus is not None and bus < 0:
        msg = (
            f"{section}.bus: invalid value {bus!r}; expected the number N of /dev/i2c-N, 0 or more"
        )
        raise ConfigError(msg)


def _check_chip_keys(
    section: str, chip: str, address: int | None, resolution_bits: int | None, extended: bool
) -> None:
    # 0x00-0x07 and 0x78-0x7F are reserved by the I2C specification.
    if address is not None and not 0x08 <= address <= 0x77:
        msg = (
            f"{section}.address: invalid value {address!r}; expected a 7-bit I2C address "
            f"from 0x08 to 0x77, such as 0x{CHIPS[chip].default_address:02X}"
        )
        raise ConfigError(msg)
    if resolution_bits is not None:
        if chip != "lm75":
            msg = (
                f"{section}.resolution_bits: applies to chip = 'lm75' only; remove it for {chip!r}"
            )
            raise ConfigError(msg)
        if not 9 <= resolution_bits <= 11:
            msg = (
                f"{section}.resolution_bits: invalid value {resolution_bits!r}; expected 9 "
                "(LM75, TI LM75B) to 11 (NXP LM75A, LM75B)"
            )
            raise ConfigError(msg)
    if extended and chip != "tmp102":
        msg = f"{section}.extended: applies to chip = 'tmp102' only; remove it for {chip!r}"
        raise ConfigError(msg)


def _address_or_default(chip: str | None, address: int | None) -> int | None:
    if address is not None:
        return address
    return CHIPS[chip].default_address if chip is not None else None
