"""The ``temperature`` sensor: skin-contact temperature from an I2C chip.

A chip held against the skin (in a wristband, a phone case, a handle) reads
30-37 °C while worn. The plugin only reports temperatures. The agent's fusion
decides skin contact from ``temperature_c``, the optional room temperature
``ambient_c`` from a second chip, and its configured band.

Failure policy: a transfer that fails with a bus error (errno 121, 6, 5 or
110) or an SHT3x CRC mismatch is retried at once with a short backoff, up to
``retries`` times. A read whose retries all fail keeps the last good value
and marks the status ``degraded``. After ``max_failures`` failed reads in a
row the reading turns null and the status ``error``, with the reason. The
plugin never raises out of :meth:`TemperatureSensor.read` for these, so the
agent keeps polling at the normal interval and notices recovery at once.
"""

import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

from mailpush.errors import ConfigError, SensorError
from mailpush.sensors.base import (
    Health,
    Mode,
    Reading,
    SensorPlugin,
    SensorStatus,
    WakeCallback,
    clock,
)
from mailpush.sensors.temperature.chips import (
    CHIPS,
    BusFactory,
    Driver,
    Measurement,
    bus_open_problem,
    is_transient,
    make_driver,
    resolve_bus_factory,
)
from mailpush.sensors.temperature.options import (
    CHIP_CHOICES,
    SECTION,
    TemperatureOptions,
    parse_options,
)
from mailpush.sensors.temperature.sht3x import CrcError

log = logging.getLogger(__name__)

RETRY_DELAY_S = 0.01  # first backoff within a read; doubles per retry

NOT_CONFIGURED = (
    f"{SECTION}: bus and chip are not set; set bus = 1 for /dev/i2c-1 and chip to "
    "'tmp102', 'lm75', 'mcp9808' or 'sht3x'"
)


class TemperatureSensor(SensorPlugin):
    """Reads the skin temperature, and optionally the room's, from I2C chips.

    Args:
        options: validated ``[sensors.temperature]`` keys.
        bus_factory: opens ``/dev/i2c-N`` given N; ``None`` uses the installed
            factory, by default ``smbus2.SMBus``. Tests pass a fake here.
        sleep: the backoff and SHT3x wait; tests pass a function that does not block.
        now: the clock for reading ages; :func:`mailpush.sensors.base.clock` by default.
    """

    name: ClassVar[str] = "temperature"
    mode: ClassVar[Mode] = Mode.POLLED
    poll_interval_s: ClassVar[float] = 3.0
    enabled_by_default: ClassVar[bool] = False  # few terminals have an I2C sensor
    Options = TemperatureOptions  # type: ignore[assignment]

    def __init__(
        self,
        options: TemperatureOptions | None = None,
        *,
        bus_factory: BusFactory | None = None,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] = clock,
    ) -> None:
        super().__init__(options)
        self.options: TemperatureOptions
        self._bus_factory = bus_factory
        self._sleep = sleep
        self._now = now
        self._buses: dict[int, Any] = {}
        self._skin: _Channel | None = None
        self._ambient: _Channel | None = None
        self._unavailable = SensorStatus(Health.UNAVAILABLE, f"{SECTION}: not started")

    @classmethod
    def parse_options(cls, table: Any) -> TemperatureOptions:
        """Validate a ``[sensors.temperature]`` table; see :func:`parse_options`."""
        return parse_options(table)

    @classmethod
    def check_enabled(cls, options: Any) -> None:
        """Require ``bus`` and ``chip`` once the sensor is enabled: it never guesses either."""
        if options.bus is None:
            msg = f"{SECTION}.bus: missing; set bus = 1 for /dev/i2c-1 (ls /dev/i2c-* lists the buses)"
            raise ConfigError(msg)
        if options.chip is None:
            msg = f"{SECTION}.chip: missing; set chip to one of {CHIP_CHOICES}"
            raise ConfigError(msg)

    def start(self, wake: WakeCallback) -> None:
        """Open the configured bus or buses; a failure becomes the status, never an exception."""
        self.stop()
        if self.options.bus is None or self.options.chip is None:
            self._unavailable = SensorStatus(Health.UNAVAILABLE, NOT_CONFIGURED)
            log.warning("%s", NOT_CONFIGURED)
            return

        if self._open():
            assert self._skin is not None
            log.info("%s: reading the %s", SECTION, self._skin.label)
        else:
            log.warning("%s", self._unavailable.reason)

    def stop(self) -> None:
        """Close every bus this plugin opened. Safe to call twice or without ``start``."""
        for number, bus in self._buses.items():
            try:
                bus.close()
            except OSError as exc:
                log.debug("%s: closing /dev/i2c-%d failed: %s", SECTION, number, exc)
        self._buses.clear()
        self._skin = None
        self._ambient = None

    def read(self) -> Reading:
        """Return the skin and room temperatures; ``None`` where a chip keeps failing."""
        if self._skin is None:
            if self.options.bus is None or self.options.chip is None or not self._open():
                log.debug("%s still unavailable: %s", SECTION, self._unavailable.reason)
                return Reading(details=self._details())

        assert self._skin is not None
        now = self._now()
        skin = self._skin.measure(now)
        ambient = self._ambient.measure(now) if self._ambient is not None else None
        return Reading(temperature_c=skin, ambient_c=ambient, details=self._details())

    def status(self) -> SensorStatus:
        """Return ``error`` when the skin chip keeps failing, ``degraded`` for a passing failure."""
        if self._skin is None:
            return self._unavailable
        if self._skin.failing:
            return SensorStatus(Health.ERROR, self._skin.reason())
        problems = [c.reason() for c in (self._skin, self._ambient) if c is not None and c.failures]
        if problems:
            return SensorStatus(Health.DEGRADED, "; ".join(problems))
        return SensorStatus.ok()

    def _open(self) -> bool:
        """Open the buses and build the drivers; record why not and return False on failure."""
        options = self.options
        assert options.bus is not None and options.chip is not None
        try:
            factory = resolve_bus_factory(self._bus_factory)
        except ImportError:
            reason = f"{SECTION}: smbus2 is not installed; install it with `pip install smbus2`"
            self._unavailable = SensorStatus(Health.UNAVAILABLE, reason)
            return False

        numbers = [options.bus]
        ambient_bus = options.ambient_bus()
        if ambient_bus is not None and ambient_bus not in numbers:
            numbers.append(ambient_bus)
        for number in numbers:
            try:
                self._buses[number] = factory(number)
            except OSError as exc:
                self.stop()
                self._unavailable = SensorStatus(Health.UNAVAILABLE, bus_open_problem(number, exc))
                return False

        self._skin = self._channel(
            "skin", options.bus, options.chip, options.skin_address(), options
        )
        ambient = options.ambient
        if ambient is not None and ambient.chip is not None and ambient_bus is not None:
            self._ambient = self._channel(
                "ambient", ambient_bus, ambient.chip, ambient.address, ambient
            )
        return True

    def _channel(
        self, role: str, bus: int, chip: str, address: int | None, keys: Any
    ) -> "_Channel":
        """Build the channel of one chip; ``keys`` carries its resolution_bits and extended."""
        driver = make_driver(
            chip,
            self._buses[bus],
            address if address is not None else CHIPS[chip].default_address,
            resolution_bits=keys.resolution_bits,
            extended=keys.extended,
            sleep=self._sleep,
        )
        options = self.options
        return _Channel(role, bus, driver, options.retries, options.max_failures, self._sleep)

    def _details(self) -> dict[str, object]:
        options = self.options
        details: dict[str, object] = {"chip": options.chip, "bus": options.bus}
        address = options.skin_address()
        details["address"] = f"0x{address:02X}" if address is not None else None
        if self._skin is not None:
            details.update(self._skin.details(self._now(), prefix=""))
        if self._ambient is not None:
            details.update(self._ambient.details(self._now(), prefix="ambient_"))
        return details


class _Channel:
    """One chip's reads, retries and run of failures.

    Args:
        role: ``"skin"`` or ``"ambient"``, for messages.
        bus: the bus number, for messages.
        driver: the chip driver on an open bus.
        retries: immediate retries of a transient failure within one read.
        max_failures: failed reads in a row before the value turns null.
        sleep: the backoff between retries.
    """

    def __init__(
        self,
        role: str,
        bus: int,
        driver: Driver,
        retries: int,
        max_failures: int,
        sleep: Callable[[float], None],
    ) -> None:
        self.role = role
        self.bus = bus
        self.driver = driver
        self.label = f"{role} sensor {driver.chip} at 0x{driver.address:02X} on /dev/i2c-{bus}"
        self._retries = retries
        self._max_failures = max_failures
        self._sleep = sleep
        self._set_up = False
        self.failures = 0
        self.last_error = ""
        self.last_good: Measurement | None = None
        self.last_good_at: float | None = None

    @property
    def failing(self) -> bool:
        """Whether ``max_failures`` reads in a row have failed."""
        return self.failures >= self._max_failures

    def measure(self, now: float) -> float | None:
        """Return the temperature, the last good one during a short run of failures, or None."""
        try:
            measurement = self._measure_with_retries()
        except (OSError, SensorError) as exc:
            return self._failed(exc)

        if self.failing:
            log.info("%s: %s recovered", SECTION, self.label)
        self.failures = 0
        self.last_error = ""
        self.last_good = measurement
        self.last_good_at = now
        return measurement.temperature_c

    def reason(self) -> str:
        """Return the status reason for the current run of failures."""
        return (
            f"{SECTION}: {self.label}: {self.failures} read(s) in a row failed: "
            f"{self.last_error}; check the wiring, chip and address (i2cdetect -y {self.bus})"
        )

    def details(self, now: float, prefix: str) -> dict[str, object]:
        """Return the age of the last good reading and, for the SHT3x, its humidity."""
        details: dict[str, object] = {}
        if prefix:
            details[f"{prefix}chip"] = self.driver.chip
            details[f"{prefix}address"] = f"0x{self.driver.address:02X}"
            details[f"{prefix}bus"] = self.bus
        age = None if self.last_good_at is None else round(now - self.last_good_at, 1)
        details[f"{prefix}last_good_age_s"] = age
        if self.last_good is not None and self.last_good.humidity_percent is not None:
            details[f"{prefix}humidity_percent"] = round(self.last_good.humidity_percent, 1)
        return details

    def _measure_with_retries(self) -> Measurement:
        delay = RETRY_DELAY_S
        for attempt in range(self._retries + 1):
            try:
                if not self._set_up:
                    self.driver.setup()
                    self._set_up = True
                return self.driver.measure()
            except (OSError, CrcError) as exc:
                if attempt == self._retries or not (isinstance(exc, CrcError) or is_transient(exc)):
                    raise
                log.debug("%s: %s: %s; retrying in %.0f ms", SECTION, self.label, exc, delay * 1000)
            self._sleep(delay)
            delay *= 2
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _failed(self, exc: BaseException) -> float | None:
        self.failures += 1
        self.last_error = str(exc)
        if self.failures == 1:
            log.warning("%s: reading the %s failed: %s", SECTION, self.label, exc)
        elif self.failures == self._max_failures:
            log.warning("%s", self.reason())
        else:
            log.debug("%s: %s still failing: %s", SECTION, self.label, exc)

        if self.failing:
            return None
        return self.last_good.temperature_c if self.last_good is not None else None
