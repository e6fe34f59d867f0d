"""Fusion of the latest sensor readings into one usage state with a confidence.

:func:`fuse` is a pure function: the readings, the config, the previous result
and the time go in, a :class:`Fused` comes out. Hysteresis lives in the
previous result, so a single stray input event does not make an idle terminal
``active``. All times are on :func:`mailpush.sensors.base.clock`, which counts
time spent in suspend on Linux, so time asleep is never read as activity.

The agent calls :func:`fuse` when a plugin wakes it, on a probe, on its
heartbeat, and at :attr:`Fused.recheck_at`, the time a pending decision
resolves without any new reading.
"""

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from mailpush.agent.readings import merge_readings
from mailpush.errors import ConfigError
from mailpush.protocol.messages import Evidence, Power, StateName
from mailpush.sensors.base import Reading

__all__ = ["FusionConfig", "Fused", "fuse", "merge_readings"]

# Confidence of each kind of evidence. A higher value means a stronger signal.
_CONFIDENCE_ACTIVE_MIN = 0.9
_CONFIDENCE_SKIN_CONTACT = 0.85
_CONFIDENCE_SKIN_BAND = 0.7
_CONFIDENCE_PRESENT = 0.75
_CONFIDENCE_QUIET = 0.7  # idle or away, judged by a working input sensor
_CONFIDENCE_PENDING = 0.6  # idle, with one input event awaiting confirmation
_CONFIDENCE_PRESENCE_ONLY = 0.5  # idle or away, judged by a presence sensor alone
_CONFIDENCE_NO_SENSOR = 0.3


@dataclass(frozen=True)
class FusionConfig:
    """Thresholds of the fusion, in seconds and degrees Celsius.

    Attributes:
        active_window_s: input within this many seconds means ``active``.
        away_after_s: no input and no presence for longer than this means ``away``.
        confirm_events: distinct input times needed to leave any other state for
            ``active``; 1 turns the hysteresis off.
        confirm_window_s: the span within which those input times must fall.
        presence_window_s: a presence detection this recent means ``present``.
            PIR sensors see motion, not stillness, so the window spans a person
            sitting still for a few minutes.
        skin_min_c: the low end of the skin-contact temperature band.
        skin_max_c: the high end of that band.
        skin_above_ambient_c: when the ambient temperature is known, a skin
            reading must exceed it by this much, so a warm room is not a hand.
        carry_hold_s: skin contact must hold this long before ``carried``.
    """

    active_window_s: float = 120.0
    away_after_s: float = 600.0
    confirm_events: int = 2
    confirm_window_s: float = 5.0
    presence_window_s: float = 300.0
    skin_min_c: float = 30.0
    skin_max_c: float = 37.0
    skin_above_ambient_c: float = 2.0
    carry_hold_s: float = 30.0

    def __post_init__(self) -> None:
        """Reject thresholds that no fusion can work with.

        Raises:
            ConfigError: naming the ``fusion.*`` key, its value and what is allowed.
        """
        positive = ("active_window_s", "away_after_s", "confirm_window_s", "presence_window_s")
        for key in positive:
            if getattr(self, key) <= 0:
                _reject(key, getattr(self, key), "use a number of seconds above 0")
        if self.confirm_events < 1:
            _reject("confirm_events", self.confirm_events, "use 1 or more (1 turns it off)")
        if self.carry_hold_s < 0:
            _reject("carry_hold_s", self.carry_hold_s, "use 0 or more seconds")
        if self.away_after_s < self.active_window_s:
            _reject("away_after_s", self.away_after_s, "use at least active_window_s")
        if self.skin_min_c >= self.skin_max_c:
            _reject("skin_min_c", self.skin_min_c, "use a value below skin_max_c")


def _reject(key: str, value: object, fix: str) -> None:
    msg = f"fusion.{key}: invalid value {value!r}; {fix}"
    raise ConfigError(msg)


@dataclass(frozen=True)
class _Memory:
    """Hysteresis memory carried from one :func:`fuse` call to the next.

    Attributes:
        started: the time of the first fusion since the start or a suspend.
        continuing: whether the previous state was ``active`` and input went on
            with no gap longer than the active window.
        pending: distinct unconfirmed input times, oldest first.
        counted_input: the latest input time that counted as use.
        contact_since: when the current spell of skin contact began.
    """

    started: float
    continuing: bool = False
    pending: tuple[float, ...] = ()
    counted_input: float | None = None
    contact_since: float | None = None

    @classmethod
    def update(
        cls, reading: Reading, config: FusionConfig, previous: "Fused | None", now: float
    ) -> "_Memory":
        """Carry the previous memory forward with what ``reading`` adds at ``now``."""
        if previous is None:
            # An input older than the active window at the start cannot be
            # confirmed or refuted, so it counts as the last known use.
            last_input = reading.last_input
            old = last_input is not None and now - last_input > config.active_window_s
            before = cls(started=now, counted_input=last_input if old else None)
        else:
            before = _continue_session(previous, reading.last_input, config)

        return dataclasses.replace(
            before,
            pending=_pending_inputs(reading.last_input, config, before.pending, now),
            contact_since=_contact_since(reading, config, before.contact_since, now),
        )


def _continue_session(previous: "Fused", last_input: float | None, config: FusionConfig) -> _Memory:
    """Count input that continues an active session with no gap longer than the active window.

    The input plugin wakes the agent only on the first input after a quiet
    spell, so an active session may show a much later input at the next fusion.
    """
    memory = dataclasses.replace(previous._memory, continuing=False)
    counted = memory.counted_input
    if previous.state != "active" or last_input is None or counted is None:
        return memory
    if last_input - counted > config.active_window_s:
        return memory
    return dataclasses.replace(memory, continuing=True, counted_input=max(counted, last_input))


@dataclass(frozen=True)
class Fused:
    """One fusion result, and the memory the next :func:`fuse` call needs.

    Attributes:
        state: the usage state, never ``off`` because the agent sets that itself.
        since: the :func:`clock` time this state began.
        confidence: how strong the evidence is, from 0 to 1.
        evidence: the readings behind the state, for the UsageState payload.
        power: the power facts, or ``None`` when no plugin senses them.
        recheck_at: the :func:`clock` time at which the state may change with
            no new reading (a window ends, a confirmation resolves), or ``None``.
    """

    state: StateName
    since: float
    confidence: float
    evidence: Evidence
    power: Power | None = None
    recheck_at: float | None = None
    _memory: _Memory = field(default_factory=lambda: _Memory(started=0.0), repr=False)


def fuse(
    reading: Reading,
    config: FusionConfig,
    previous: Fused | None,
    now: float,
    *,
    input_since: float | None = None,
) -> Fused:
    """Fuse a merged reading into the usage state at ``now``.

    The states, from most to least in use, are ``active``, ``carried``,
    ``present``, ``idle`` and ``away``. ``active`` needs confirmed input within
    the active window, and ``carried`` needs skin contact held for
    ``carry_hold_s``. ``present`` needs an unsuspected presence detection within
    the presence window. ``away`` means no counted input and no presence for
    longer than ``away_after_s``.

    Leaving any state for ``active`` needs ``confirm_events`` distinct input
    times within ``confirm_window_s``. A reading carries only the latest input
    time, so the agent must fuse again at ``recheck_at`` to see a second one.
    An input that is never confirmed is a stray: it does not make the terminal
    active and does not reset the away timer. Leaving ``active`` needs no
    confirmation: the state ends when the active window passes.

    A terminal with no input sensor and no presence sensor is ``idle`` with
    confidence 0.3, because nothing distinguishes idle from away. A working input
    sensor that has seen no input yet is recognized by ``input_since``.

    Args:
        reading: the merged reading (see :func:`merge_readings`).
        config: the thresholds.
        previous: the last result, or ``None`` at the start and after a suspend.
        now: the current :func:`clock` time.
        input_since: the :func:`clock` time since which a working input sensor
            has watched, or ``None`` when no input sensor runs.
    """
    memory = _Memory.update(reading, config, previous, now)
    state, confidence, began, recheck = _decide(reading, config, now, memory, input_since)
    if state == "active":
        memory = dataclasses.replace(memory, pending=(), counted_input=reading.last_input)

    return Fused(
        state=state,
        since=_since(state, began, previous, now),
        confidence=round(confidence, 3),
        evidence=_evidence(reading, now),
        power=_power(reading),
        recheck_at=recheck,
        _memory=memory,
    )


def _decide(
    reading: Reading, config: FusionConfig, now: float, memory: _Memory, input_since: float | None
) -> tuple[StateName, float, float, float | None]:
    """Return the state, its confidence, when it began and when to fuse again."""
    last_input = reading.last_input
    confirmed = (
        memory.continuing
        or config.confirm_events <= 1
        or len(memory.pending) >= config.confirm_events
    )
    if last_input is not None and now - last_input <= config.active_window_s and confirmed:
        age = max(now - last_input, 0.0)
        confidence = _CONFIDENCE_ACTIVE_MIN + 0.09 * (1 - age / config.active_window_s)
        began = memory.pending[0] if memory.pending else last_input
        return "active", confidence, began, last_input + config.active_window_s

    recheck = _pending_recheck(memory.pending, config, now)

    if memory.contact_since is not None:
        held_until = memory.contact_since + config.carry_hold_s
        if now >= held_until:
            strong = reading.skin_contact is True
            confidence = _CONFIDENCE_SKIN_CONTACT if strong else _CONFIDENCE_SKIN_BAND
            return "carried", confidence, memory.contact_since, recheck
        recheck = _earliest(recheck, held_until)

    presence_at = _presence_time(reading, now)
    if presence_at is not None and now - presence_at <= config.presence_window_s:
        presence_ends = presence_at + config.presence_window_s
        return "present", _CONFIDENCE_PRESENT, presence_at, _earliest(recheck, presence_ends)

    state, confidence, began, quiet_recheck = _quiet_state(
        config, now, memory, presence_at, input_since, has_input=last_input is not None
    )
    if memory.pending:
        confidence = min(confidence, _CONFIDENCE_PENDING)
    return state, confidence, began, _earliest(recheck, quiet_recheck)


def _quiet_state(
    config: FusionConfig,
    now: float,
    memory: _Memory,
    presence_at: float | None,
    input_since: float | None,
    *,
    has_input: bool,
) -> tuple[StateName, float, float, float | None]:
    """Return ``idle`` or ``away`` from the last sign of use, as :func:`_decide` does."""
    has_input_sensor = has_input or input_since is not None
    last_sign = _latest((memory.counted_input, presence_at))
    if last_sign is None and has_input_sensor:
        # Watched since then and saw no input that counted.
        last_sign = input_since if input_since is not None else memory.started

    if last_sign is None:
        return "idle", _CONFIDENCE_NO_SENSOR, now, None

    confidence = _CONFIDENCE_QUIET if has_input_sensor else _CONFIDENCE_PRESENCE_ONLY
    away_at = last_sign + config.away_after_s
    if now > away_at:
        return "away", confidence, away_at, None

    ends = [memory.counted_input, presence_at]
    windows = [config.active_window_s, config.presence_window_s]
    idle_at = _latest(t + w for t, w in zip(ends, windows, strict=True) if t is not None)
    return "idle", confidence, idle_at if idle_at is not None else now, away_at


def _pending_inputs(
    last_input: float | None, config: FusionConfig, seen: tuple[float, ...], now: float
) -> tuple[float, ...]:
    """Return the distinct input times that may still confirm ``active`` together."""
    # NOTE: a burst of inputs between two fusions shows as one input time, so
    # confirmation relies on the agent fusing again at recheck_at.
    if last_input is not None and now - last_input <= config.active_window_s:
        if last_input not in seen:
            seen = (*seen, last_input)
    if not seen:
        return ()

    # Once the window after the newest input has passed with no further input,
    # nothing seen later can join the group: the inputs were strays.
    newest = max(seen)
    if now - newest >= config.confirm_window_s:
        return ()
    return tuple(t for t in seen if newest - t <= config.confirm_window_s)


def _pending_recheck(pending: tuple[float, ...], config: FusionConfig, now: float) -> float | None:
    """Return when to look for the next input of a pending group, or ``None`` without one.

    The checks are spread so that ``confirm_events`` inputs can be seen within
    the confirm window, and the last one is the moment the group expires.
    """
    if not pending:
        return None
    step = config.confirm_window_s / max(config.confirm_events - 1, 1)
    return min(now + step, max(pending) + config.confirm_window_s)


def _contact_since(
    reading: Reading, config: FusionConfig, since: float | None, now: float
) -> float | None:
    """Return when the current spell of skin contact began, or ``None`` without contact."""
    if not _skin_contact(reading, config):
        return None
    return since if since is not None else now


def _skin_contact(reading: Reading, config: FusionConfig) -> bool:
    if reading.skin_contact is not None:
        return reading.skin_contact

    temperature = reading.temperature_c
    if temperature is None:
        return False
    if not config.skin_min_c <= temperature <= config.skin_max_c:
        return False
    ambient = reading.ambient_c
    return ambient is None or temperature - ambient >= config.skin_above_ambient_c


def _presence_time(reading: Reading, now: float) -> float | None:
    """Return the latest trusted presence time; a current detection means ``now``."""
    if reading.presence_suspect:
        return None
    if reading.presence:
        return now
    return reading.last_presence


def _since(state: StateName, began: float, previous: Fused | None, now: float) -> float:
    """Keep the previous ``since`` while the state holds; else clamp ``began`` into range."""
    if previous is None:
        return min(began, now)
    if previous.state == state:
        return previous.since
    return min(max(began, previous.since), now)


def _evidence(reading: Reading, now: float) -> Evidence:
    presence_known = not reading.presence_suspect
    return Evidence(
        input_idle_s=_age(reading.last_input, now),
        presence=reading.presence if presence_known else None,
        presence_age_s=_age(reading.last_presence, now) if presence_known else None,
        skin_contact=reading.skin_contact,
        temperature_c=(
            round(reading.temperature_c, 1) if reading.temperature_c is not None else None
        ),
    )


def _power(reading: Reading) -> Power | None:
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


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
