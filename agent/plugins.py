"""Runs the enabled sensor plugins: start, scheduled reads, failures, stop.

A plugin that fails (an I2C read error, a device unplugged, a bug) is reported
once at WARNING, retried with capped exponential backoff, and left out of the
fusion meanwhile; the rest of the agent carries on.
"""

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mailpush.sensors.base import Health, Mode, Reading, SensorPlugin, SensorStatus, clock
from mailpush.sensors.registry import PluginEntry

log = logging.getLogger(__name__)

RETRY_MIN_S = 2.0
RETRY_MAX_S = 300.0


@dataclass
class _Running:
    plugin: SensorPlugin
    reading: Reading | None = None
    next_read: float = 0.0
    failures: int = 0
    error: str = ""


class PluginHost:
    """The enabled plugins of one agent.

    Args:
        settings: ``[sensors.NAME]`` settings by plugin name (``enabled``, ``options``).
        entries: the installed plugins, as :func:`mailpush.sensors.registry.discover` returns.
        wake: called by event plugins to make the agent fuse again now.
    """

    def __init__(
        self,
        settings: Mapping[str, object],
        entries: Mapping[str, PluginEntry],
        wake: Callable[[], None],
    ) -> None:
        self._wake = wake
        self._running: dict[str, _Running] = {}
        self._broken: dict[str, str] = {}
        self.input_since: float | None = None

        for name, entry in sorted(entries.items()):
            setting = settings.get(name)
            if setting is None or not setting.enabled:  # type: ignore[attr-defined]
                continue
            if entry.plugin is None:
                self._broken[name] = entry.error
                continue
            self._running[name] = _Running(entry.plugin(setting.options))  # type: ignore[attr-defined]

    def start(self) -> None:
        """Start every plugin; one that raises is recorded as ``error`` and skipped."""
        for name, running in self._running.items():
            try:
                running.plugin.start(self._wake)
            except Exception as exc:  # a third-party plugin may fail in any way
                running.error = f"failed to start: {exc}"
                log.warning("sensor %s %s", name, running.error)
                continue
            status = running.plugin.status()
            if status.health in (Health.OK, Health.DEGRADED):
                log.info("sensor %s started (%s)", name, status.reason or status.health.value)
            else:
                log.warning("sensor %s is %s: %s", name, status.health.value, status.reason)
        if "input" in self._running and self._is_working("input"):
            self.input_since = clock()

    def read_all(self, now: float) -> list[Reading]:
        """Return the latest reading of every working plugin, reading polled ones when due."""
        readings = []
        for name, running in self._running.items():
            if running.error and now < running.next_read:
                continue
            due = running.plugin.mode is Mode.EVENTS or now >= running.next_read
            if due:
                self._read(name, running, now)
            if running.reading is not None and not running.error:
                readings.append(running.reading)
        return readings

    def next_poll(self) -> float:
        """Return the clock time at which the next polled read or retry is due."""
        times = [
            running.next_read
            for running in self._running.values()
            if running.plugin.mode is Mode.POLLED or running.error
        ]
        return min(times, default=float("inf"))

    def attributes(self) -> dict[str, object]:
        """Merge the DeviceAttributes fields the plugins know, in name order."""
        facts: dict[str, object] = {}
        for name, running in self._running.items():
            try:
                facts.update(running.plugin.attributes())
            except Exception as exc:  # a third-party plugin may fail in any way
                log.warning("sensor %s: attributes failed: %s", name, exc)
        return facts

    def describe(self) -> dict[str, dict[str, object]]:
        """Return each plugin's health, reason and latest details, for ``status``."""
        described: dict[str, dict[str, object]] = {}
        for name, reason in self._broken.items():
            described[name] = {"health": Health.ERROR.value, "reason": reason}
        for name, running in self._running.items():
            status = self._status(running)
            described[name] = {"health": status.health.value, "reason": status.reason}
            if running.reading is not None:
                described[name]["details"] = dict(running.reading.details)
        return described

    def stop(self) -> None:
        """Stop every plugin; errors are logged, never raised."""
        for name, running in self._running.items():
            try:
                running.plugin.stop()
            except Exception as exc:  # a third-party plugin may fail in any way
                log.warning("sensor %s failed to stop: %s", name, exc)

    def _read(self, name: str, running: _Running, now: float) -> None:
        plugin = running.plugin
        try:
            running.reading = plugin.read()
        except Exception as exc:  # any read failure leaves this plugin out for a while
            running.failures += 1
            delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (running.failures - 1))
            running.next_read = now + delay
            if running.failures == 1:
                log.warning("sensor %s: read failed: %s; retrying with backoff", name, exc)
            else:
                log.debug("sensor %s still failing: %s; next try in %.0f s", name, exc, delay)
            running.error = f"read failed: {exc}"
            return

        if running.error:
            log.info("sensor %s recovered", name)
        running.failures = 0
        running.error = ""
        if plugin.mode is Mode.POLLED:
            running.next_read = now + plugin.poll_interval_s

    def _status(self, running: _Running) -> SensorStatus:
        if running.error:
            return SensorStatus(Health.ERROR, running.error)
        try:
            return running.plugin.status()
        except Exception as exc:  # a third-party plugin may fail in any way
            return SensorStatus(Health.ERROR, f"status failed: {exc}")

    def _is_working(self, name: str) -> bool:
        return self._status(self._running[name]).health in (Health.OK, Health.DEGRADED)
