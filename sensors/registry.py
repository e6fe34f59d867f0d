"""Finds sensor plugins through the ``mailpush.sensors`` entry point group."""

import logging
from dataclasses import dataclass
from importlib.metadata import entry_points

from mailpush.sensors.base import SensorPlugin

ENTRY_POINT_GROUP = "mailpush.sensors"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PluginEntry:
    """A registered plugin: its class, or why the class could not be loaded."""

    name: str
    plugin: type[SensorPlugin] | None
    error: str = ""


def discover() -> dict[str, PluginEntry]:
    """Load every registered plugin class, keyed by entry point name.

    A plugin whose module fails to import is kept with its error, so the
    agent can report it instead of crashing.
    """
    found: dict[str, PluginEntry] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugin = point.load()
        except Exception as exc:  # a third-party plugin may fail in any way
            log.warning("sensor plugin %s could not be loaded: %s", point.name, exc)
            found[point.name] = PluginEntry(point.name, None, f"failed to load: {exc}")
            continue
        if not (isinstance(plugin, type) and issubclass(plugin, SensorPlugin)):
            reason = f"{point.value} is not a SensorPlugin subclass"
            found[point.name] = PluginEntry(point.name, None, reason)
            continue
        found[point.name] = PluginEntry(point.name, plugin)
    return found
