"""What the fusion reads from sensor readings, and the payload parts it builds from them.

:func:`merge_readings` turns the latest reading of every plugin into one
:class:`Reading`. The other functions interpret a merged reading the same way
for every caller. They decide which presence time can be trusted and whether a
surface temperature is skin contact. They weigh each kind of evidence towards
a state's confidence and the user's proximity, and they build the evidence
and power facts a UsageState carries. They are pure functions of plain values,
while :mod:`mailpush.agent.fusion` holds the thresholds and decides the state.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from mailpush.protocol.messages import Evidence, Power
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


def presence_sensed(reading: Reading) -> bool:
    """Return whether a working, unsuspected presence sensor contributed to ``reading``.

    A presence sensor that is missing or unavailable leaves both presence
    fields ``None``, so it never counts as evidence that no one is there.
    """
    reporting = reading.presence is not None or reading.last_presence is not None
    return reporting and not reading.presence_suspect


def presence_time(reading: Reading, now: float) -> float | None:
    """Return the latest trusted presence time; a detection under way means ``now``.

    A suspect reading (a PIR line held high far longer than any sensor's
    hold time) is not trusted at all, so a stuck line cannot keep a terminal
    ``present``.
    """
    if reading.presence_suspect:
        return None
    if reading.presence:
        return now
    return reading.last_presence


# Confidence of each kind of evidence, 0..1; a higher value is a stronger signal.
_CONFIDENCE_ACTIVE_MIN = 0.9
_CONFIDENCE_SKIN_CONTACT = 0.85  # a plugin's verdict, or a skin-band surface above ambient
_CONFIDENCE_SKIN_BAND = 0.7  # a skin-band surface with no ambient temperature to compare
_CONFIDENCE_RELEASING = 0.6  # carried, but contact has been lost for a moment
_CONFIDENCE_CARRY_AGREEING = 0.05  # added to carried when recent input or presence agrees
_CONFIDENCE_PRESENT = 0.75  # a fresh presence detection; it fades by 0.1 over the window
_CONFIDENCE_AGREEING = 0.1  # added to present when recent input agrees
_CONFIDENCE_BOTH_QUIET = 0.8  # idle or away, judged by input and presence sensors together
_CONFIDENCE_QUIET = 0.7  # idle or away, judged by a working input sensor
_CONFIDENCE_PRESENCE_ONLY = 0.5  # idle or away, judged by a presence sensor alone
_CONFIDENCE_NO_SENSOR = 0.3  # idle, with nothing to tell idle from away

# A terminal held against the body: the user is at it, though perhaps not looking at it.
_PROXIMITY_CARRIED = 0.9


@dataclass(frozen=True, slots=True)
class SkinBand:
    """The surface temperatures that count as a hand or a body, in degrees Celsius.

    Attributes:
        low: the lowest skin temperature.
        high: the highest skin temperature.
        above_ambient: when the ambient temperature is known, the surface must
            be at least this much warmer, so a warm room is not a hand.
        release_margin: how far the band widens once contact is established,
            so a reading wobbling at an edge of the band does not end it.
    """

    low: float
    high: float
    above_ambient: float
    release_margin: float


def skin_contact(reading: Reading, band: SkinBand, *, holding: bool) -> bool:
    """Return whether ``reading`` shows skin contact.

    A plugin's own ``skin_contact`` verdict wins. Otherwise the surface
    temperature must lie in ``band``; while contact is already held
    (``holding``), the band and the ambient contrast are relaxed by
    ``band.release_margin``.
    """
    if reading.skin_contact is not None:
        return reading.skin_contact

    temperature = reading.temperature_c
    if temperature is None:
        return False
    margin = band.release_margin if holding else 0.0
    if not band.low - margin <= temperature <= band.high + margin:
        return False
    ambient = reading.ambient_c
    return ambient is None or temperature - ambient >= band.above_ambient - margin


def ambient_contrast(reading: Reading, band: SkinBand) -> bool:
    """Return whether the surface is measurably warmer than a known ambient temperature."""
    if reading.temperature_c is None or reading.ambient_c is None:
        return False
    return reading.temperature_c - reading.ambient_c >= band.above_ambient


def pending_inputs(
    last_input: float | None,
    seen: tuple[float, ...],
    now: float,
    *,
    active_window_s: float,
    confirm_window_s: float,
) -> tuple[float, ...]:
    """Return the distinct input times that may still confirm ``active`` together."""
    # NOTE: a burst of inputs between two fusions shows as one input time, so
    # confirmation relies on the agent fusing again at recheck_at.
    if last_input is not None and now - last_input <= active_window_s:
        if last_input not in seen:
            seen = (*seen, last_input)
    if not seen:
        return ()

    # Once the window after the newest input has passed with no further input,
    # nothing seen later can join the group: the inputs were strays.
    newest = max(seen)
    if now - newest >= confirm_window_s:
        return ()
    return tuple(t for t in seen if newest - t <= confirm_window_s)


def pending_recheck(
    pending: tuple[float, ...], now: float, *, confirm_events: int, window_s: float
) -> float | None:
    """Return when to look for the next input of a pending group, or ``None`` without one.

    The checks are spread so that ``confirm_events`` inputs can be seen within
    the confirm window ``window_s``, and the last one is the moment the group expires.
    """
    if not pending:
        return None
    step = window_s / max(confirm_events - 1, 1)
    return min(now + step, max(pending) + window_s)


def contact_spell(
    reading: Reading,
    band: SkinBand,
    spell: tuple[float | None, float | None],
    now: float,
    *,
    hold_s: float,
    release_s: float,
) -> tuple[float | None, float | None]:
    """Return when the current spell of skin contact began and since when it is lost.

    A spell starts when the surface enters the skin band. While it builds up
    to ``hold_s``, leaving the band (widened by the release margin) ends it at
    once. Once held, contact must stay lost for ``release_s`` before the spell
    ends, so one stray reading does not end ``carried``.

    Args:
        reading: the merged reading.
        band: the skin-contact band.
        spell: the previous ``(since, lost_since)``; ``(None, None)`` without contact.
        now: the current clock time.
        hold_s: how long contact must hold before it counts.
        release_s: how long held contact must be lost before it ends.
    """
    since, lost_since = spell
    if since is None:
        return (now, None) if skin_contact(reading, band, holding=False) else (None, None)
    if skin_contact(reading, band, holding=True):
        return since, None

    lost_since = lost_since if lost_since is not None else now
    if lost_since < since + hold_s:
        return None, None
    if now - lost_since >= release_s:
        return None, None
    return since, lost_since


def fade(age: float, fresh: float, window_fraction: float, window_s: float, gone_s: float) -> float:
    """Return the weight of a sign of use that is ``age`` seconds old.

    The weight falls linearly from ``fresh`` to ``fresh * window_fraction`` at
    ``window_s``, and on to 0 at ``gone_s``. A negative age (a reading stamped
    just after ``now``) counts as 0.
    """
    age = max(age, 0.0)
    if age <= window_s:
        return fresh * (1 - (1 - window_fraction) * age / window_s)
    rest = gone_s - window_s
    if rest <= 0:
        return 0.0
    return max(fresh * window_fraction * (1 - (age - window_s) / rest), 0.0)


def active_confidence(age: float, window_s: float) -> float:
    """Return the confidence of ``active``: 0.99 for input just now, 0.9 at the window's end."""
    return _CONFIDENCE_ACTIVE_MIN + 0.09 * (1 - max(age, 0.0) / window_s)


def carried_confidence(
    reading: Reading, band: SkinBand, *, releasing: bool, agreeing: bool
) -> float:
    """Return the confidence of ``carried``.

    A plugin's skin-contact verdict, or a skin-band surface measurably warmer
    than the known ambient, is strong evidence. A skin-band temperature alone
    is weaker, because a phone on a warm radiator reads the same. Recent input
    or presence agreeing adds a little, and contact lost for a moment takes away.
    """
    if releasing:
        return _CONFIDENCE_RELEASING
    strong = reading.skin_contact is True or ambient_contrast(reading, band)
    confidence = _CONFIDENCE_SKIN_CONTACT if strong else _CONFIDENCE_SKIN_BAND
    return confidence + (_CONFIDENCE_CARRY_AGREEING if agreeing else 0.0)


def present_confidence(age: float, window_s: float, *, input_agrees: bool) -> float:
    """Return the confidence of ``present``: moderate, fading with the detection's age.

    Recent input agreeing with the presence sensor raises it.
    """
    confidence = _CONFIDENCE_PRESENT - 0.1 * max(age, 0.0) / window_s
    return confidence + (_CONFIDENCE_AGREEING if input_agrees else 0.0)


def quiet_confidence(*, has_input: bool, has_presence: bool) -> float:
    """Return the confidence of ``idle`` or ``away`` from the sensors that saw nothing."""
    if has_input and has_presence:
        return _CONFIDENCE_BOTH_QUIET
    if has_input:
        return _CONFIDENCE_QUIET
    if has_presence:
        return _CONFIDENCE_PRESENCE_ONLY
    return _CONFIDENCE_NO_SENSOR


def proximity(
    input_age: float | None,
    presence_age: float | None,
    *,
    carried: bool,
    active_window_s: float,
    presence_window_s: float,
    away_after_s: float,
) -> float:
    """Return how close the user is to the terminal, 0..1 (1 = at it).

    Input means a hand on the device, so it starts at 1.0 and keeps 90 % over
    the active window. A PIR watches the room, not the person at the device, so
    presence starts at 0.6 and halves over the presence window. Both fade to
    0 at ``away_after_s``. A terminal held against the body is at 0.9 or more.
    """
    signals = [_PROXIMITY_CARRIED if carried else 0.0]
    if input_age is not None:
        signals.append(fade(input_age, 1.0, 0.9, active_window_s, away_after_s))
    if presence_age is not None:
        signals.append(fade(presence_age, 0.6, 0.5, presence_window_s, away_after_s))
    return round(max(signals), 2)


def evidence(reading: Reading, now: float, *, contact: bool | None) -> Evidence:
    """Return the UsageState evidence; suspect presence is left out.

    Args:
        reading: the merged reading.
        now: the current clock time.
        contact: the fusion's skin-contact verdict, used when no plugin gives one.
    """
    presence_known = not reading.presence_suspect
    skin = reading.skin_contact if reading.skin_contact is not None else contact
    return Evidence(
        input_idle_s=_age(reading.last_input, now),
        presence=reading.presence if presence_known else None,
        presence_age_s=_age(reading.last_presence, now) if presence_known else None,
        skin_contact=skin,
        temperature_c=(
            round(reading.temperature_c, 1) if reading.temperature_c is not None else None
        ),
    )


def power(reading: Reading) -> Power | None:
    """Return the UsageState power facts, or ``None`` when no plugin senses them."""
    if reading.on_battery is None and reading.battery_percent is None and reading.plugged is None:
        return None
    percent = reading.battery_percent
    if percent is not None:
        percent = round(min(max(percent, 0.0), 100.0), 1)
    return Power(on_battery=reading.on_battery, battery_percent=percent, plugged=reading.plugged)


def _age(moment: float | None, now: float) -> float | None:
    # A reading stamped a moment after `now` was taken is not from the future.
    return None if moment is None else round(max(now - moment, 0.0), 1)


def _latest(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _any_true(values: Iterable[bool | None]) -> bool | None:
    known = [v for v in values if v is not None]
    return any(known) if known else None


def _first(values: Iterable[float | bool | None]) -> float | bool | None:
    return next((v for v in values if v is not None), None)
