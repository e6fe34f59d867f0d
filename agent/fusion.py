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

from mailpush.agent.readings import (
    SkinBand,
    active_confidence,
    carried_confidence,
    contact_spell,
    evidence,
    merge_readings,
    pending_inputs,
    pending_recheck,
    power,
    presence_sensed,
    presence_time,
    present_confidence,
    proximity,
    quiet_confidence,
)
from mailpush.errors import ConfigError
from mailpush.protocol.messages import Evidence, Position, Power, StateName
from mailpush.sensors.base import Reading

__all__ = ["FusionConfig", "Fused", "fuse", "merge_readings"]

# Confidence while an input event awaits confirmation: the stray may be the
# first sign of use, so idle and away are less sure.
_CONFIDENCE_PENDING = 0.6


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
        skin_release_margin_c: once contact holds, the band and the ambient
            contrast widen by this much, so a reading wobbling at a band edge
            does not end it.
        carry_release_s: a ``carried`` terminal stays ``carried`` until contact
            has been lost for this long, so one stray reading does not end it.
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
    skin_release_margin_c: float = 0.5
    carry_release_s: float = 15.0

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
        for key in ("carry_hold_s", "carry_release_s"):
            if getattr(self, key) < 0:
                _reject(key, getattr(self, key), "use 0 or more seconds")
        if not 0 <= self.skin_release_margin_c <= 5:
            _reject("skin_release_margin_c", self.skin_release_margin_c, "use 0 to 5 degrees")
        if self.away_after_s < self.active_window_s:
            _reject("away_after_s", self.away_after_s, "use at least active_window_s")
        if self.skin_min_c >= self.skin_max_c:
            _reject("skin_min_c", self.skin_min_c, "use a value below skin_max_c")

    @property
    def skin_band(self) -> SkinBand:
        """The skin-contact band these thresholds describe."""
        return SkinBand(
            low=self.skin_min_c,
            high=self.skin_max_c,
            above_ambient=self.skin_above_ambient_c,
            release_margin=self.skin_release_margin_c,
        )


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
        contact_lost_since: when a held spell of contact was last seen lost,
            or ``None`` while contact holds.
    """

    started: float
    continuing: bool = False
    pending: tuple[float, ...] = ()
    counted_input: float | None = None
    contact_since: float | None = None
    contact_lost_since: float | None = None

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

        contact_since, lost_since = contact_spell(
            reading,
            config.skin_band,
            (before.contact_since, before.contact_lost_since),
            now,
            hold_s=config.carry_hold_s,
            release_s=config.carry_release_s,
        )
        return dataclasses.replace(
            before,
            pending=pending_inputs(
                reading.last_input,
                before.pending,
                now,
                active_window_s=config.active_window_s,
                confirm_window_s=config.confirm_window_s,
            ),
            contact_since=contact_since,
            contact_lost_since=lost_since,
        )


def _continue_session(previous: "Fused", last_input: float | None, config: FusionConfig) -> _Memory:
    """Count input that continues an active session with no gap longer than the active window.

    The input plugin wakes the agent only on the first few inputs after a quiet
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
        position: the zone and proximity for the UsageState payload, or
            ``None`` when no zone is configured and nothing senses proximity.
    """

    state: StateName
    since: float
    confidence: float
    evidence: Evidence
    power: Power | None = None
    recheck_at: float | None = None
    position: Position | None = None
    _memory: _Memory = field(default_factory=lambda: _Memory(started=0.0), repr=False)


def fuse(
    reading: Reading,
    config: FusionConfig,
    previous: Fused | None,
    now: float,
    *,
    input_since: float | None = None,
    zone: str | None = None,
) -> Fused:
    """Fuse a merged reading into the usage state at ``now``.

    The states, from most to least in use, are ``active``, ``carried``,
    ``present``, ``idle`` and ``away``. ``active`` needs confirmed input within
    the active window, and ``carried`` needs skin contact held for
    ``carry_hold_s``; it ends once contact has been lost for
    ``carry_release_s``. ``present`` needs an unsuspected presence detection
    within the presence window. ``away`` means no counted input and no
    presence for longer than ``away_after_s``.

    Leaving any state for ``active`` needs ``confirm_events`` distinct input
    times within ``confirm_window_s``. A reading carries only the latest input
    time, so the agent must fuse again at ``recheck_at`` to see a second one.
    An input that is never confirmed is a stray: it does not make the terminal
    active and does not reset the away timer. Leaving ``active`` needs no
    confirmation: the state ends when the active window passes.

    The confidence grows with the number of sensors that agree: presence with
    recent input is surer than presence alone, and idle judged by both an
    input and a presence sensor is surer than by either. A terminal with no
    input sensor and no presence sensor is ``idle`` with confidence 0.3,
    because nothing distinguishes idle from away. A working input sensor that
    has seen no input yet is recognized by ``input_since``; a presence sensor
    by its reading, and it counts as watching since the first fusion.

    Args:
        reading: the merged reading (see :func:`merge_readings`).
        config: the thresholds.
        previous: the last result, or ``None`` at the start and after a suspend.
        now: the current :func:`clock` time.
        input_since: the :func:`clock` time since which a working input sensor
            has watched, or ``None`` when no input sensor runs.
        zone: the name of the place the terminal is in, copied into ``position``.
    """
    memory = _Memory.update(reading, config, previous, now)
    state, confidence, began, recheck = _decide(reading, config, now, memory, input_since)
    if state == "active":
        memory = dataclasses.replace(memory, pending=(), counted_input=reading.last_input)

    contact = None
    if reading.temperature_c is not None:
        contact = memory.contact_since is not None and memory.contact_lost_since is None
    closeness = None
    if state == "carried" or _input_sensed(reading, input_since) or presence_sensed(reading):
        closeness = _proximity(state, reading, memory, config, now)

    return Fused(
        state=state,
        since=_since(state, began, previous, now),
        confidence=round(confidence, 3),
        evidence=evidence(reading, now, contact=contact),
        power=power(reading),
        recheck_at=recheck,
        position=_position(zone, closeness),
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
        confidence = active_confidence(now - last_input, config.active_window_s)
        began = memory.pending[0] if memory.pending else last_input
        return "active", confidence, began, last_input + config.active_window_s

    recheck = pending_recheck(
        memory.pending, now, confirm_events=config.confirm_events, window_s=config.confirm_window_s
    )
    presence_at = presence_time(reading, now)
    input_recent = _within(last_input, now, config.presence_window_s)

    contact_since = memory.contact_since
    if contact_since is not None:
        held_until = contact_since + config.carry_hold_s
        if now >= held_until:
            agreeing = input_recent or _within(presence_at, now, config.presence_window_s)
            return _carried(reading, config, memory, contact_since, recheck, agreeing=agreeing)
        recheck = _earliest(recheck, held_until)

    if presence_at is not None and now - presence_at <= config.presence_window_s:
        confidence = present_confidence(
            now - presence_at, config.presence_window_s, input_agrees=input_recent
        )
        presence_ends = presence_at + config.presence_window_s
        return "present", confidence, presence_at, _earliest(recheck, presence_ends)

    state, confidence, began, quiet_recheck = _quiet_state(
        config,
        now,
        memory,
        presence_at,
        has_input=_input_sensed(reading, input_since),
        has_presence=presence_sensed(reading),
        input_since=input_since,
    )
    if memory.pending:
        confidence = min(confidence, _CONFIDENCE_PENDING)
    return state, confidence, began, _earliest(recheck, quiet_recheck)


def _carried(
    reading: Reading,
    config: FusionConfig,
    memory: _Memory,
    since: float,
    recheck: float | None,
    *,
    agreeing: bool,
) -> tuple[StateName, float, float, float | None]:
    """Return ``carried`` as :func:`_decide` does; while contact is lost, recheck when it ends."""
    lost_since = memory.contact_lost_since
    confidence = carried_confidence(
        reading, config.skin_band, releasing=lost_since is not None, agreeing=agreeing
    )
    if lost_since is not None:
        recheck = _earliest(recheck, lost_since + config.carry_release_s)
    return "carried", confidence, since, recheck


def _quiet_state(
    config: FusionConfig,
    now: float,
    memory: _Memory,
    presence_at: float | None,
    *,
    has_input: bool,
    has_presence: bool,
    input_since: float | None,
) -> tuple[StateName, float, float, float | None]:
    """Return ``idle`` or ``away`` from the last sign of use, as :func:`_decide` does."""
    last_sign = _latest((memory.counted_input, presence_at))
    if last_sign is None and (has_input or has_presence):
        # Watched since then and saw no sign of use that counted.
        last_sign = input_since if input_since is not None else memory.started

    if last_sign is None:
        return "idle", quiet_confidence(has_input=False, has_presence=False), now, None

    confidence = quiet_confidence(has_input=has_input, has_presence=has_presence)
    away_at = last_sign + config.away_after_s
    if now > away_at:
        return "away", confidence, away_at, None

    ends = [memory.counted_input, presence_at]
    windows = [config.active_window_s, config.presence_window_s]
    idle_at = _latest(t + w for t, w in zip(ends, windows, strict=True) if t is not None)
    return "idle", confidence, idle_at if idle_at is not None else now, away_at


def _proximity(
    state: StateName, reading: Reading, memory: _Memory, config: FusionConfig, now: float
) -> float:
    """Return how close the user is, from counted input, trusted presence and carrying."""
    input_at = reading.last_input if state == "active" else memory.counted_input
    presence_at = presence_time(reading, now)
    return proximity(
        None if input_at is None else now - input_at,
        None if presence_at is None else now - presence_at,
        carried=state == "carried",
        active_window_s=config.active_window_s,
        presence_window_s=config.presence_window_s,
        away_after_s=config.away_after_s,
    )


def _position(zone: str | None, proximity: float | None) -> Position | None:
    if zone is None and proximity is None:
        return None
    return Position(zone=zone, proximity=proximity)


def _within(moment: float | None, now: float, window_s: float) -> bool:
    return moment is not None and now - moment <= window_s


def _input_sensed(reading: Reading, input_since: float | None) -> bool:
    return reading.last_input is not None or input_since is not None


def _since(state: StateName, began: float, previous: Fused | None, now: float) -> float:
    """Keep the previous ``since`` while the state holds; else clamp ``began`` into range."""
    if previous is None:
        return min(began, now)
    if previous.state == state:
        return previous.since
    return min(max(began, previous.since), now)


def _latest(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
