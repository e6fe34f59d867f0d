"""The ``pir`` sensor: presence from a passive infrared motion sensor on a GPIO pin.

A PIR module (HC-SR501, AM312) drives its output high while it detects motion
and for a hold time after it; gpiozero's :class:`~gpiozero.MotionSensor`
samples that line and calls back on each edge. The callbacks only store
:func:`clock` times; :meth:`PirSensor.read` turns them into presence.

Edges closer together than ``episode_gap_s`` form one presence episode, and
the agent is woken only on the first edge of an episode. A line held high for
longer than ``max_high_s`` is flagged suspect (a stuck sensor or a wiring
fault), so it cannot keep a terminal ``present`` forever.

The pin factory is gpiozero's: lgpio on a Raspberry Pi 5 and on kernels 6.6
and later, where RPi.GPIO's sysfs-based edge detection fails. gpiozero is imported
inside :meth:`PirSensor.start`, so a machine without it, or without GPIO,
shows the sensor as ``unavailable`` and the agent runs on. An unavailable PIR
reads as "not sensed", never as "no one there".
"""

import logging
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Literal

from mailpush.errors import ConfigError
from mailpush.sensors.base import (
    Health,
    Mode,
    Reading,
    SensorPlugin,
    SensorStatus,
    WakeCallback,
    clock,
)

log = logging.getLogger(__name__)

PinFactoryName = Literal["auto", "lgpio", "rpigpio", "pigpio", "native", "mock"]

# BCM numbers of the GPIOs on the 40-pin header of every Raspberry Pi since the B+.
HEADER_PINS = range(28)
# GPIO2 and GPIO3 carry I2C1 (the temperature sensors) and have fixed 1.8 kOhm
# pull-ups to 3.3 V on the board, so a PIR there would read high when idle.
I2C_PINS = (2, 3)

# gpiozero's MotionSensor polls the line in a background thread, so at 10 Hz
# an edge is seen within 0.1 s and a shorter pulse may be missed. Vendor data
# gives the HC-SR501's shortest hold time as 0.3 s or more, so every pulse
# spans at least two samples.
SAMPLE_RATE_HZ = 10


@dataclass(frozen=True)
class PirOptions(SensorPlugin.Options):
    """Config keys of ``[sensors.pir]``.

    Attributes:
        pin: the BCM GPIO number the sensor's OUT is wired to (GPIO17 is
            header pin 11). Required once the table exists.
        pin_factory: gpiozero's GPIO library. ``auto`` lets gpiozero choose
            (``GPIOZERO_PIN_FACTORY``, then lgpio, RPi.GPIO, pigpio, native);
            ``mock`` uses simulated pins that no real sensor drives.
        chip: the ``/dev/gpiochipN`` the lgpio factory opens; ``None`` lets
            gpiozero pick. gpiozero 2.0.1 from pip opens chip 4 on a Pi 5,
            which kernels 6.6.45 and later renamed to 0, so set 0 there.
        episode_gap_s: edges closer together than this are one presence
            episode; the agent is woken on the first edge of each episode.
        max_high_s: a line high for longer than this is flagged suspect and
            its presence is ignored until the line goes low.
        zone: the name of the place the sensor watches, such as ``study``.
    """

    pin: int | None = None
    pin_factory: PinFactoryName = "auto"
    chip: int | None = None
    episode_gap_s: float = 30.0
    max_high_s: float = 600.0
    zone: str | None = None

    def __post_init__(self) -> None:
        if self.pin is not None and self.pin not in HEADER_PINS:
            _reject("pin", self.pin, "use a BCM GPIO number from 0 to 27, such as 17")
        if self.pin in I2C_PINS:
            _reject(
                "pin",
                self.pin,
                "GPIO2 and GPIO3 are the I2C bus with fixed pull-ups; use another pin, such as 17",
            )
        if self.chip is not None:
            if self.pin_factory != "lgpio":
                _reject("chip", self.chip, 'it applies only with pin_factory = "lgpio"')
            if self.chip < 0:
                _reject("chip", self.chip, "use the N of /dev/gpiochipN, 0 or more")
        if not 0 <= self.episode_gap_s <= 3600:
            _reject("episode_gap_s", self.episode_gap_s, "use a number of seconds from 0 to 3600")
        if not 1 <= self.max_high_s <= 86400:
            _reject("max_high_s", self.max_high_s, "use a number of seconds from 1 to 86400")
        if self.zone is not None and not 1 <= len(self.zone.strip()) <= 64:
            _reject("zone", self.zone, "use a name of 1 to 64 characters, such as study")


def _reject(key: str, value: object, fix: str) -> None:
    msg = f"sensors.pir.{key}: invalid value {value!r}; {fix}"
    raise ConfigError(msg)


class PirLine:
    """Edge times of the PIR output, written by gpiozero's sampling thread.

    :meth:`rise` and :meth:`fall` run as gpiozero callbacks: they store
    :func:`clock` times under a lock and call ``wake`` on the first edge of an
    episode, and they do no logging and no I/O.

    Args:
        wake: requests a new fusion from the agent.
        episode_gap_s: an edge this close to the previous one continues its episode.
    """

    def __init__(self, wake: WakeCallback, episode_gap_s: float) -> None:
        self._wake = wake
        self._gap_s = episode_gap_s
        self._lock = threading.Lock()
        self.high_since: float | None = None
        self.last_rise: float | None = None
        self.last_fall: float | None = None
        self.episodes = 0
        self.rises = 0

    def rise(self) -> None:
        """Record a rising edge: the sensor starts reporting motion."""
        now = clock()
        with self._lock:
            previous = _latest(self.last_rise, self.last_fall)
            starts_episode = previous is None or now - previous > self._gap_s
            self.high_since = now
            self.last_rise = now
            self.rises += 1
            if starts_episode:
                self.episodes += 1
        if starts_episode:
            self._wake()

    def fall(self) -> None:
        """Record a falling edge: the sensor's hold time after the last motion ended."""
        now = clock()
        with self._lock:
            self.high_since = None
            self.last_fall = now

    def snapshot(self) -> tuple[float | None, float | None, float | None, int, int]:
        """Return ``(high_since, last_rise, last_fall, episodes, rises)`` as one consistent view."""
        with self._lock:
            return self.high_since, self.last_rise, self.last_fall, self.episodes, self.rises


class PirSensor(SensorPlugin):
    """Senses presence from a PIR motion sensor's output on one GPIO pin."""

    name = "pir"
    mode = Mode.EVENTS
    enabled_by_default = False
    Options = PirOptions

    def __init__(self, options: PirOptions | None = None) -> None:
        super().__init__(options)
        self.options: PirOptions
        self._device: Any = None
        self._factory: Any = None  # closed in stop() only when this plugin created it
        self._factory_name = ""
        self._line: PirLine | None = None
        self._status = SensorStatus(Health.UNAVAILABLE, "not started")

    @classmethod
    def check_enabled(cls, options: SensorPlugin.Options) -> None:
        """Require the pin once the sensor is enabled.

        Raises:
            ConfigError: when ``pin`` is not set.
        """
        if getattr(options, "pin", None) is None:
            msg = (
                "sensors.pir.pin: missing; set the BCM GPIO number the sensor's OUT "
                "is wired to, such as pin = 17"
            )
            raise ConfigError(msg)

    def start(self, wake: WakeCallback) -> None:
        """Open the GPIO pin and watch it; a missing library or GPIO chip leaves it unavailable."""
        pin = self.options.pin
        if pin is None:
            reason = "sensors.pir.pin is not set; set the BCM GPIO number, such as pin = 17"
            self._status = SensorStatus(Health.UNAVAILABLE, reason)
            return
        try:
            from gpiozero import MotionSensor
            from gpiozero.exc import PinWarning
        except ImportError as exc:
            reason = f"gpiozero cannot be imported ({exc}); install it with pip install gpiozero"
            self._status = SensorStatus(Health.UNAVAILABLE, reason)
            return

        failure: Exception | None = None
        with warnings.catch_warnings(record=True) as caught:
            # gpiozero warns once per pin factory it falls back from; keep the
            # reasons for the status line instead of printing them to stderr.
            warnings.simplefilter("always", PinWarning)
            try:
                self._factory = _open_factory(self.options.pin_factory, self.options.chip)
                # NOTE: MotionSensor enables the pin's pull-down, so an unplugged
                # sensor reads as no motion, which looks like an empty room.
                device = MotionSensor(
                    pin, queue_len=1, sample_rate=SAMPLE_RATE_HZ, pin_factory=self._factory
                )
            except Exception as exc:  # lgpio.error derives from Exception only
                failure = exc
        fallbacks = [str(w.message) for w in caught if issubclass(w.category, PinWarning)]

        if failure is not None:
            self._close_factory()
            reason = _failure_reason(failure, self.options, fallbacks)
            self._status = SensorStatus(Health.UNAVAILABLE, reason)
            return
        self._attach(device, wake)
        if fallbacks:
            joined = "; ".join(fallbacks)
            log.warning("sensor pir: gpiozero fell back to %s: %s", self._factory_name, joined)

    def _attach(self, device: Any, wake: WakeCallback) -> None:
        line = PirLine(wake, self.options.episode_gap_s)
        device.when_motion = line.rise
        device.when_no_motion = line.fall
        # gpiozero fires no callback for the level it finds at start, so a
        # line already high counts as a motion under way. This blocks for one sample.
        if device.motion_detected and line.snapshot()[0] is None:
            line.rise()

        self._device = device
        self._line = line
        self._factory_name = type(device.pin_factory).__name__
        detail = f"GPIO{self.options.pin} via {self._factory_name}"
        if self.options.pin_factory == "mock":
            self._status = SensorStatus(
                Health.DEGRADED, f"{detail}: simulated pins, no real sensor"
            )
        else:
            self._status = SensorStatus.ok(detail)

    def stop(self) -> None:
        """Close the pin, and the pin factory when this plugin opened it."""
        device, self._device = self._device, None
        if device is not None:
            device.close()
        self._close_factory()
        self._line = None
        if self._status.health is not Health.UNAVAILABLE:
            self._status = SensorStatus(Health.UNAVAILABLE, "stopped")

    def read(self) -> Reading:
        """Return presence from the stored edge times; ``Reading()`` when the PIR is unavailable."""
        line = self._line
        if line is None:
            return Reading()

        now = clock()
        high_since, last_rise, last_fall, episodes, rises = line.snapshot()
        max_high_s = self.options.max_high_s
        suspect = high_since is not None and now - high_since > max_high_s
        if high_since is not None:
            # A high line means motion now, unless the line is stuck. Then the
            # rising edge is the last motion to trust.
            last_presence = high_since if suspect else now
        elif last_rise is not None and last_fall is not None and last_fall - last_rise > max_high_s:
            last_presence = last_rise  # the line fell after being stuck high
        else:
            last_presence = last_fall

        details: dict[str, object] = {
            "pin": self.options.pin,
            "line": "high" if high_since is not None else "low",
            "episodes": episodes,
            "rising_edges": rises,
            "suspect": suspect,
        }
        if high_since is not None:
            details["high_for_s"] = round(now - high_since, 1)
        if self.options.zone is not None:
            details["zone"] = self.options.zone
        return Reading(
            presence=high_since is not None,
            last_presence=last_presence,
            presence_suspect=suspect,
            details=details,
        )

    def status(self) -> SensorStatus:
        """Return the result of ``start``, or ``degraded`` while the line is stuck high."""
        line = self._line
        if line is None or self._status.health is Health.UNAVAILABLE:
            return self._status
        high_since = line.snapshot()[0]
        high_for = clock() - high_since if high_since is not None else 0.0
        if high_for > self.options.max_high_s:
            reason = (
                f"GPIO{self.options.pin} has been high for {high_for:.0f} s, longer than "
                f"max_high_s = {self.options.max_high_s:g}; its presence is ignored until it "
                "goes low. Check the wiring and the sensor's delay setting"
            )
            return SensorStatus(Health.DEGRADED, reason)
        return self._status

    def _close_factory(self) -> None:
        factory, self._factory = self._factory, None
        if factory is not None:
            factory.close()


def _open_factory(name: PinFactoryName, chip: int | None) -> Any:
    """Return a new pin factory, or ``None`` for gpiozero's default (``auto``)."""
    if name == "auto":
        return None
    if name == "lgpio":
        from gpiozero.pins.lgpio import LGPIOFactory

        return LGPIOFactory(chip=chip)
    # The names gpiozero registers for GPIOZERO_PIN_FACTORY.
    for point in entry_points(group="gpiozero_pin_factories"):
        if point.name == name:
            return point.load()()
    msg = f"gpiozero has no pin factory named {name!r}"
    raise LookupError(msg)


def _failure_reason(exc: Exception, options: PirOptions, fallbacks: list[str]) -> str:
    """Return why the pin could not be opened, and what to do about it."""
    kind = type(exc).__name__
    module = type(exc).__module__
    pin = f"GPIO{options.pin}"
    if ".lgd-nfy" in str(exc):
        # lgpio creates its notification pipes in the current directory when imported.
        return (
            f"lgpio cannot create its notification pipe in the working directory ({exc}); "
            "start the agent from a writable directory (WorkingDirectory= in a systemd unit)"
        )
    if module == "lgpio" or "gpiochip" in str(exc):
        chip = "a /dev/gpiochip device" if options.chip is None else f"/dev/gpiochip{options.chip}"
        return (
            f"cannot open {chip} for {pin} ({exc}); check that the user is in the gpio group, "
            'and on a Raspberry Pi 5 with gpiozero 2.0.1 set pin_factory = "lgpio" and chip = 0'
        )
    if kind == "BadPinFactory":
        tried = "; ".join(fallbacks) or str(exc)
        return (
            f"no GPIO pin factory works here ({tried}); on a Raspberry Pi install lgpio "
            "(pip install lgpio, or apt install python3-lgpio)"
        )
    if isinstance(exc, ImportError):
        return (
            f"the {options.pin_factory} pin factory cannot be loaded ({exc}); install its library "
            'or set pin_factory = "auto"'
        )
    if kind == "GPIOPinInUse":
        return f"{pin} is in use by another device ({exc}); stop the other program or choose another pin"
    return f"cannot open {pin}: {kind}: {exc}"


def _latest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)
