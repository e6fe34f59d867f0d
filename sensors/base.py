"""The sensor plugin interface.

A plugin is a subclass of :class:`SensorPlugin` registered under the entry
point group ``mailpush.sensors``; the built-in plugins are registered the same
way, so a third-party sensor needs a pip package and no change here.

A plugin **must** set:

* ``name``: the entry point name, also the ``[sensors.NAME]`` config table.
* ``mode``: :attr:`Mode.EVENTS` when it learns of changes by callbacks
  (input, PIR) or :attr:`Mode.POLLED` when the agent has to call
  :meth:`SensorPlugin.read` on a schedule (temperature, power).
* ``read()``: the latest :class:`Reading`. For an event plugin this only
  copies what its callbacks stored and must not block; a polled plugin does
  its I/O here.

A plugin **may** override:

* ``Options``: a dataclass of its config keys with defaults; the agent
  validates the ``[sensors.NAME]`` table against it before anything starts.
* ``check_enabled(options)``: reject options that are valid but incomplete
  for an enabled plugin, such as a missing bus or pin.
* ``poll_interval_s``: how often a polled plugin is read (seconds).
* ``enabled_by_default``: whether the agent runs it without a
  ``[sensors.NAME]`` table; False suits hardware few terminals have.
* ``start(wake)`` / ``stop()``: open and close devices or threads. ``wake``
  asks the agent to fuse again now; call it on a change that matters (the
  first events after a quiet spell), not on every event.
* ``status()``: :class:`SensorStatus`; the default reports ``ok``.
* ``attributes()``: DeviceAttributes fields this plugin knows (``kind``,
  ``display``, ``capabilities``).

A plugin imports its hardware library inside ``start()`` or ``read()``, never
at module level, so a missing library makes it ``unavailable`` instead of
stopping the agent. ``start()`` must not raise for a missing library or
device: it records the status and returns.
"""

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, ClassVar

from mailpush.tables import parse_dataclass

if sys.platform.startswith("linux"):
    _CLOCK = time.CLOCK_BOOTTIME

    def clock() -> float:
        """Return the sensing clock: monotonic, and counting time spent in suspend."""
        return time.clock_gettime(_CLOCK)

else:  # pragma: no cover - exercised on macOS and Windows only
    # NOTE: time.monotonic() may stop during suspend here; the agent detects
    # that gap against the wall clock instead.
    clock = time.monotonic


class Mode(Enum):
    """The way a plugin delivers readings: by callbacks or when polled."""

    EVENTS = "events"
    POLLED = "polled"


class Health(StrEnum):
    """The state of a plugin, as ``mailpush-agent sensors`` shows it."""

    OK = "ok"
    DEGRADED = "degraded"
    UNAVAILABLE = "unavailable"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class SensorStatus:
    """A plugin's health and, unless it is ``ok``, a reason a person can act on."""

    health: Health
    reason: str = ""

    @classmethod
    def ok(cls, reason: str = "") -> "SensorStatus":
        """Return an ``ok`` status."""
        return cls(Health.OK, reason)


@dataclass(frozen=True, slots=True)
class Reading:
    """One plugin's latest facts. ``None`` means the plugin does not sense that fact.

    Times are on :func:`clock`, in seconds.
    """

    last_input: float | None = None
    presence: bool | None = None
    last_presence: float | None = None
    presence_suspect: bool | None = None
    skin_contact: bool | None = None
    temperature_c: float | None = None
    ambient_c: float | None = None
    on_battery: bool | None = None
    battery_percent: float | None = None
    plugged: bool | None = None
    details: Mapping[str, object] = field(default_factory=dict)
    """Plugin-specific facts shown by ``mailpush-agent status``; never published or fused."""


WakeCallback = Callable[[], None]


class SensorPlugin:
    """Base class of every sensor plugin; see the module docstring for the contract."""

    name: ClassVar[str]
    mode: ClassVar[Mode]
    poll_interval_s: ClassVar[float] = 30.0
    enabled_by_default: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Options:
        """Config keys of the plugin beyond ``enabled``; none by default."""

    def __init__(self, options: "SensorPlugin.Options | None" = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def parse_options(cls, table: Mapping[str, Any]) -> "SensorPlugin.Options":
        """Validate a ``[sensors.NAME]`` table (without ``enabled``) into ``Options``.

        Raises:
            ConfigError: naming the key, the value and what is allowed.
        """
        return parse_dataclass(cls.Options, table, f"sensors.{cls.name}")

    @classmethod
    def check_enabled(cls, options: "SensorPlugin.Options") -> None:
        """Check that validated options are complete for a plugin that is enabled.

        The agent validates every plugin's table, enabled or not, so keys that
        only an enabled plugin needs (an I2C bus, a GPIO pin) are checked here.

        Raises:
            ConfigError: naming the missing key and what to set.
        """

    def start(self, wake: WakeCallback) -> None:
        """Open devices and start callbacks. Never raises for missing hardware."""

    def stop(self) -> None:
        """Close what ``start`` opened. Safe to call twice or without ``start``."""

    def read(self) -> Reading:
        """Return the latest reading."""
        raise NotImplementedError

    def status(self) -> SensorStatus:
        """Return the plugin's health."""
        return SensorStatus.ok()

    def attributes(self) -> Mapping[str, object]:
        """Return the DeviceAttributes fields this plugin can fill in."""
        return {}
