"""Merging of the latest reading of each sensor plugin into one :class:`Reading`."""

from collections.abc import Iterable

from mailpush.sensors.base import Reading


def merge_readings(readings: Iterable[Reading]) -> Reading:
    """Merge the latest reading of each plugin into one.

    The latest ``last_input`` and ``last_presence`` win. Presence and skin
    contact are true when any plugin senses them. A presence reading flagged
    ``presence_suspect`` is ignored unless every presence reading is suspect,
    and then the merged reading is suspect too. Temperatures and power facts
    come from the first plugin that senses them, in the order given.
    """
    readings = list(readings)
    reporting = [r for r in readings if r.presence is not None or r.last_presence is not None]
    unsuspected = [r for r in reporting if not r.presence_suspect]
    presence_source = unsuspected or reporting

    return Reading(
        last_input=_latest(r.last_input for r in readings),
        presence=_any_true(r.presence for r in presence_source),
        last_presence=_latest(r.last_presence for r in presence_source),
        presence_suspect=(not unsuspected) if reporting else None,
        skin_contact=_any_true(r.skin_contact for r in readings),
        temperature_c=_first(r.temperature_c for r in readings),
        ambient_c=_first(r.ambient_c for r in readings),
        on_battery=_first(r.on_battery for r in readings),
        battery_percent=_first(r.battery_percent for r in readings),
        plugged=_first(r.plugged for r in readings),
    )


def _latest(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _any_true(values: Iterable[bool | None]) -> bool | None:
    known = [v for v in values if v is not None]
    return any(known) if known else None


def _first(values: Iterable[float | bool | None]) -> float | bool | None:
    return next((v for v in values if v is not None), None)
