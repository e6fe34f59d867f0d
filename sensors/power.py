"""The ``power`` sensor: battery and mains facts from psutil, and the device's own facts.

Besides the polled power reading, this plugin supplies the DeviceAttributes
fields every terminal has: its ``kind`` (guessed, or set in the config), its
``name``, its ``display`` and the ``capabilities`` that follow from it.
"""

import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from mailpush.errors import SensorError
from mailpush.sensors.base import Health, Mode, Reading, SensorPlugin, SensorStatus
from mailpush.sensors.display import DisplayFacts, query_x11_display

log = logging.getLogger(__name__)

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
POWER_SUPPLY_DIR = Path("/sys/class/power_supply")

KindOption = Literal["auto", "laptop", "desktop", "phone", "tablet", "pi", "other"]
Capability = Literal["images", "attachments", "html", "sound", "color"]

BatteryQuery = Callable[[], Any]
DisplayQuery = Callable[[str], DisplayFacts | None]


class PowerSensor(SensorPlugin):
    """Reads the battery through ``psutil.sensors_battery()`` and reports device facts.

    A desktop has no battery, so its readings keep every power fact ``None``.
    The keyword arguments are test seams: a scripted battery function, and the
    paths and display query that :meth:`attributes` uses.
    """

    name: ClassVar[str] = "power"
    mode: ClassVar[Mode] = Mode.POLLED
    poll_interval_s: ClassVar[float] = 60.0
    enabled_by_default: ClassVar[bool] = True  # every terminal has power and device facts

    @dataclass(frozen=True)
    class Options:
        """Config keys of ``[sensors.power]``.

        Attributes:
            kind: the device kind to publish. ``auto`` guesses it: a Raspberry Pi
                from its device tree, a laptop from its battery, else a desktop.
            name: a free-text device name. Empty uses the host name.
            x_display: the X display to measure, like ``":0"``. Empty uses ``$DISPLAY``.
            capabilities: the capabilities to publish in place of the inferred ones.
        """

        kind: KindOption = "auto"
        name: str = ""
        x_display: str = ""
        capabilities: list[Capability] | None = None

    def __init__(
        self,
        options: "PowerSensor.Options | None" = None,
        *,
        sensors_battery: BatteryQuery | None = None,
        device_tree_model: Path = DEVICE_TREE_MODEL,
        power_supply_dir: Path = POWER_SUPPLY_DIR,
        query_display: DisplayQuery = query_x11_display,
    ) -> None:
        super().__init__(options)
        self._sensors_battery = sensors_battery
        self._device_tree_model = device_tree_model
        self._power_supply_dir = power_supply_dir
        self._query_display = query_display
        self._psutil: Any = None
        self._status = SensorStatus.ok()

    def start(self, wake: Callable[[], None]) -> None:
        """Import psutil. A missing psutil makes the plugin ``unavailable``."""
        self._load_psutil()

    def status(self) -> SensorStatus:
        """Return ``unavailable`` without psutil, ``error`` after a failed read, else ``ok``."""
        return self._status

    def read(self) -> Reading:
        """Return the battery facts, all ``None`` on a device without a system battery.

        Raises:
            SensorError: when the operating system fails to report the battery.
        """
        query = self._battery_query()
        if query is None:
            return Reading()  # psutil is missing or cannot read batteries here

        battery = self._query_battery(query)
        if battery is None:
            return Reading(details={"battery": "none"})

        plugged = battery.power_plugged
        return Reading(
            on_battery=None if plugged is None else not plugged,
            battery_percent=round(min(max(float(battery.percent), 0.0), 100.0), 1),
            plugged=plugged,
            details={"battery": "present", "secsleft": self._seconds_left(battery.secsleft)},
        )

    def attributes(self) -> Mapping[str, object]:
        """Return ``kind``, ``name``, ``display`` and ``capabilities`` for DeviceAttributes."""
        options: PowerSensor.Options = self.options  # type: ignore[assignment]
        display = self._query_display(options.x_display)

        capabilities = options.capabilities
        if capabilities is None:
            capabilities = infer_capabilities(display)

        return {
            "kind": options.kind if options.kind != "auto" else self._guess_kind(),
            "name": options.name or socket.gethostname(),
            "display": dict(display) if display is not None else None,
            "capabilities": list(capabilities),
        }

    def _load_psutil(self) -> Any:
        if self._psutil is not None:
            return self._psutil
        try:
            import psutil
        except ImportError:
            reason = "psutil is not installed; install it with `pip install psutil`"
            self._status = SensorStatus(Health.UNAVAILABLE, reason)
            return None

        if self._sensors_battery is None and not hasattr(psutil, "sensors_battery"):
            reason = "psutil has no battery support on this platform; power facts stay unknown"
            self._status = SensorStatus(Health.DEGRADED, reason)
        self._psutil = psutil
        return psutil

    def _battery_query(self) -> BatteryQuery | None:
        psutil = self._load_psutil()
        if psutil is None:
            return None
        return self._sensors_battery or getattr(psutil, "sensors_battery", None)

    def _query_battery(self, query: BatteryQuery) -> Any:
        """Return psutil's battery tuple, or ``None`` when no battery powers this device."""
        try:
            battery = query()
        except OSError as exc:
            msg = f"sensors.power: reading the battery failed: {exc}; check {POWER_SUPPLY_DIR}"
            self._status = SensorStatus(Health.ERROR, msg)
            raise SensorError(msg) from exc

        if self._status.health is Health.ERROR:
            self._status = SensorStatus.ok()
        if battery is not None and not self._has_system_battery():
            log.debug("ignoring the battery psutil reported: only peripherals have one")
            return None
        return battery

    def _seconds_left(self, secsleft: int) -> int | None:
        # psutil reports "plugged in" and "cannot tell" as negative sentinels,
        # never as a number of seconds.
        sentinels = (self._psutil.POWER_TIME_UNKNOWN, self._psutil.POWER_TIME_UNLIMITED)
        if secsleft in sentinels or secsleft < 0:
            return None
        return int(secsleft)

    def _has_system_battery(self) -> bool:
        """Tell a battery that powers this device from a wireless mouse's or keyboard's.

        psutil 7.2 on Linux reads the first ``power_supply`` entry named ``BAT*``
        or containing "battery", which includes peripherals such as a Logitech
        mouse's ``hidpp_battery_0``. The kernel marks those with ``scope`` = ``Device``.
        """
        if not self._power_supply_dir.is_dir():
            return True  # not Linux sysfs: trust psutil

        for entry in self._power_supply_dir.iterdir():
            kind = _read_text(entry / "type")
            scope = _read_text(entry / "scope")
            if kind == "Battery" and scope != "Device":
                return True
        # NOTE: with both a system battery and a peripheral one, psutil may still
        # pick the peripheral when its name sorts first.
        return False

    def _guess_kind(self) -> str:
        model = _read_text(self._device_tree_model)
        if "Raspberry Pi" in model:
            return "pi"
        query = self._battery_query()
        try:
            battery = self._query_battery(query) if query is not None else None
        except SensorError:
            battery = None  # the next read() reports the failure
        return "laptop" if battery is not None else "desktop"


def infer_capabilities(display: DisplayFacts | None) -> list[Capability]:
    """Return the capabilities a screen brings: images and HTML, and color on a color screen."""
    if display is None:
        return []
    capabilities: list[Capability] = ["images", "html"]
    if display["color"]:
        capabilities.append("color")
    return capabilities


def _read_text(path: Path) -> str:
    """Return a sysfs or device-tree file's text without its trailing NUL or newline."""
    try:
        return path.read_bytes().decode("utf-8", "replace").strip("\x00\n ")
    except OSError:
        return ""
