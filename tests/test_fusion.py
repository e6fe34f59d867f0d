"""Tests of the fusion of readings into a usage state, and of suspend detection."""

import dataclasses
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailpush.agent.fusion import Fused, FusionConfig, fuse, merge_readings
from mailpush.agent.suspend import MIN_SUSPEND_S, detect_suspend, discount_suspend
from mailpush.errors import ConfigError
from mailpush.protocol.messages import UsageState, decode, encode
from mailpush.sensors.base import Reading

CONFIG = FusionConfig()

# One step of a timeline: (clock time of the fusion, Reading fields at that time).
Step = tuple[float, dict[str, Any]]


def run(steps: list[Step], config: FusionConfig = CONFIG, **kwargs: Any) -> list[Fused]:
    """Fuse each step in order, feeding each result into the next call."""
    results: list[Fused] = []
    previous = None
    for now, fields in steps:
        previous = fuse(Reading(**fields), config, previous, now, **kwargs)
        results.append(previous)
    return results


# Timelines with the state and confidence range expected after the last step.
TIMELINES = [
    pytest.param([(100, {"last_input": 100})], "idle", 0.55, 0.65, id="first-input-pending"),
    pytest.param(
        [(100, {"last_input": 100}), (102, {"last_input": 102})],
        "active",
        0.9,
        1.0,
        id="second-input-within-window-confirms",
    ),
    pytest.param(
        [(100, {"last_input": 100}), (105, {"last_input": 100}), (110, {"last_input": 100})],
        "idle",
        0.65,
        0.75,
        id="single-stray-stays-idle",
    ),
    pytest.param(
        [(100, {"last_input": 100}), (110, {"last_input": 110}), (116, {"last_input": 110})],
        "idle",
        0.65,
        0.75,
        id="two-inputs-farther-than-window-stay-idle",
    ),
    pytest.param(
        [(100, {"last_input": 100}), (107, {"last_input": 103})],
        "active",
        0.9,
        1.0,
        id="late-fusion-still-sees-burst",
    ),
    pytest.param(
        [(100, {"last_input": 100}), (102, {"last_input": 102}), (150, {"last_input": 140})],
        "active",
        0.9,
        1.0,
        id="session-continues-without-wake",
    ),
    pytest.param([(0, {}), (10_000, {})], "idle", 0.25, 0.35, id="no-sensors-idle-low"),
    pytest.param(
        [(0, {"last_presence": 0}), (100, {"last_presence": 90})],
        "present",
        0.7,
        0.8,
        id="recent-presence",
    ),
    pytest.param(
        [(0, {}), (100, {"presence": True, "last_presence": 100, "presence_suspect": True})],
        "idle",
        0.25,
        0.35,
        id="suspect-presence-ignored",
    ),
    pytest.param(
        [(0, {"last_presence": 0}), (700, {"last_presence": 0})],
        "away",
        0.45,
        0.55,
        id="presence-sensor-alone-away",
    ),
    pytest.param(
        [(0, {"skin_contact": True}), (29, {"skin_contact": True})],
        "idle",
        0.25,
        0.35,
        id="skin-contact-not-held-yet",
    ),
    pytest.param(
        [(0, {"skin_contact": True}), (30, {"skin_contact": True})],
        "carried",
        0.8,
        0.9,
        id="skin-contact-held",
    ),
    pytest.param(
        [(0, {"temperature_c": 33.0}), (40, {"temperature_c": 32.5})],
        "carried",
        0.65,
        0.75,
        id="skin-band-held",
    ),
    pytest.param(
        [(0, {"temperature_c": 33.0, "ambient_c": 32.0}), (40, {"temperature_c": 33.0})],
        "idle",
        0.25,
        0.35,
        id="skin-band-in-warm-room-breaks-hold",
    ),
    pytest.param(
        [(0, {"temperature_c": 38.5}), (40, {"temperature_c": 38.5})],
        "idle",
        0.25,
        0.35,
        id="above-skin-band",
    ),
    pytest.param(
        [(0, {"skin_contact": True}), (20, {"skin_contact": False}), (40, {"skin_contact": True})],
        "idle",
        0.25,
        0.35,
        id="contact-lost-restarts-hold",
    ),
    pytest.param(
        [
            (0, {"skin_contact": True, "last_input": 0}),
            (2, {"skin_contact": True, "last_input": 2}),
            (40, {"skin_contact": True, "last_input": 39}),
        ],
        "active",
        0.9,
        1.0,
        id="active-outranks-carried",
    ),
    pytest.param(
        [
            (0, {"skin_contact": True}),
            (30, {"skin_contact": True}),
            (31, {"skin_contact": True, "last_input": 31}),
        ],
        "carried",
        0.8,
        0.9,
        id="stray-touch-while-carried",
    ),
]


@pytest.mark.parametrize(("steps", "state", "low", "high"), TIMELINES)
def test_fuse_timeline(steps: list[Step], state: str, low: float, high: float) -> None:
    result = run(steps)[-1]

    assert result.state == state
    assert low <= result.confidence <= high


@pytest.mark.parametrize(
    ("now", "state"),
    [(222.0, "active"), (222.1, "idle"), (702.0, "idle"), (702.1, "away")],
    ids=["active-window-end", "just-past-active-window", "away-threshold", "just-past-away"],
)
def test_fuse_window_boundaries(now: float, state: str) -> None:
    # Input confirmed at 100 and 102, so the last counted input is at 102.
    steps: list[Step] = [(100, {"last_input": 100}), (102, {"last_input": 102})]

    result = run([*steps, (now, {"last_input": 102})])[-1]

    assert result.state == state


def test_fuse_stray_does_not_wake_away() -> None:
    steps: list[Step] = [(0, {}), (700, {}), (700, {"last_input": 700}), (706, {"last_input": 700})]

    results = run(steps, input_since=0)

    assert [r.state for r in results] == ["idle", "away", "away", "away"]
    assert results[2].confidence < results[3].confidence  # unsure while pending
    assert results[3].since == 600  # the stray did not restart the away timer


def test_fuse_burst_wakes_away() -> None:
    steps: list[Step] = [(0, {}), (700, {}), (700, {"last_input": 700}), (703, {"last_input": 703})]

    results = run(steps, input_since=0)

    assert results[-1].state == "active"
    assert results[-1].since == 700


def test_fuse_active_needs_three_events_when_configured() -> None:
    config = FusionConfig(confirm_events=3)
    steps: list[Step] = [(100, {"last_input": 100}), (102, {"last_input": 102})]

    results = run([*steps, (104, {"last_input": 104})], config)

    assert results[1].state == "idle"
    assert results[2].state == "active"


def test_fuse_one_event_enough_without_hysteresis() -> None:
    result = run([(100, {"last_input": 70})], FusionConfig(confirm_events=1))[-1]

    assert result.state == "active"


def test_fuse_gap_in_session_needs_confirmation() -> None:
    steps: list[Step] = [(100, {"last_input": 100}), (102, {"last_input": 102})]

    # The next input comes 288 s after the last counted one: a new session.
    result = run([*steps, (400, {"last_input": 390})])[-1]

    assert result.state == "idle"


def test_fuse_since_marks_transitions() -> None:
    steps: list[Step] = [
        (100, {"last_input": 100}),
        (102, {"last_input": 102}),
        (150, {"last_input": 102}),
        (300, {"last_input": 102}),
        (800, {"last_input": 102}),
    ]

    results = run(steps)

    assert [r.state for r in results] == ["idle", "active", "active", "idle", "away"]
    assert results[1].since == 100  # the first input of the confirming burst
    assert results[2].since == 100
    assert results[3].since == 222  # the end of the active window
    assert results[4].since == 702  # the away threshold


@pytest.mark.parametrize(
    ("steps", "input_since", "recheck_at"),
    [
        ([(100, {"last_input": 100})], None, 105),
        ([(100, {"last_input": 100}), (102, {"last_input": 102})], None, 222),
        ([(0, {}), (10, {})], 0, 600),
        ([(0, {"skin_contact": True})], None, 30),
        ([(0, {"last_presence": 0}), (10, {"last_presence": 5})], None, 305),
        ([(0, {})], None, None),
    ],
    ids=["pending", "active", "idle", "carry-hold", "present", "no-sensors"],
)
def test_fuse_recheck_at(
    steps: list[Step], input_since: float | None, recheck_at: float | None
) -> None:
    result = run(steps, input_since=input_since)[-1]

    assert result.recheck_at == recheck_at


def test_fuse_input_sensor_without_input() -> None:
    results = run([(0, {}), (600, {}), (601, {})], input_since=0)

    assert [r.state for r in results] == ["idle", "idle", "away"]
    assert results[0].confidence == pytest.approx(0.7)


def test_fuse_old_input_at_start_counts() -> None:
    result = run([(1000, {"last_input": 200})])[-1]

    assert result.state == "away"
    assert result.since == 800
    assert result.evidence.input_idle_s == 800


def test_fuse_evidence_and_power() -> None:
    fields = {
        "last_input": 99.96,
        "last_presence": 90.0,
        "presence": False,
        "temperature_c": 24.06,
        "on_battery": True,
        "battery_percent": 101.3,
        "plugged": False,
    }

    result = run([(100, fields)])[-1]

    assert result.evidence.input_idle_s == 0.0
    assert result.evidence.presence is False
    assert result.evidence.presence_age_s == 10.0
    assert result.evidence.temperature_c == 24.1
    assert result.power is not None
    assert result.power.on_battery is True
    assert result.power.battery_percent == 100.0
    assert result.power.plugged is False


def test_fuse_evidence_clamps_future_input() -> None:
    result = run([(100, {"last_input": 100.5})])[-1]

    assert result.evidence.input_idle_s == 0.0


def test_fuse_evidence_hides_suspect_presence() -> None:
    fields = {"presence": True, "last_presence": 95.0, "presence_suspect": True}

    result = run([(100, fields)])[-1]

    assert result.evidence.presence is None
    assert result.evidence.presence_age_s is None


def test_fuse_without_power_facts() -> None:
    result = run([(100, {"last_input": 50})])[-1]

    assert result.power is None


def test_fuse_result_encodes_as_usage_state() -> None:
    fused = run([(100, {"last_input": 100, "battery_percent": 50.0})])[-1]
    state = UsageState(
        user="ann",
        terminal="laptop",
        state=fused.state,
        since=fused.since,
        ts=1_700_000_000.0,
        seq=1,
        confidence=fused.confidence,
        evidence=fused.evidence,
        power=fused.power,
    )

    decoded = decode(encode(state), UsageState)

    assert decoded.state == "idle"
    assert decoded.evidence.input_idle_s == 0.0
    assert decoded.power == fused.power


reading_fields = st.fixed_dictionaries(
    {},
    optional={
        "last_input": st.floats(0, 2000),
        "presence": st.booleans(),
        "last_presence": st.floats(0, 2000),
        "presence_suspect": st.booleans(),
        "skin_contact": st.booleans(),
        "temperature_c": st.floats(-20, 60),
    },
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 50), reading_fields), min_size=1, max_size=12))
def test_fuse_invariants(steps: list[tuple[float, dict[str, Any]]]) -> None:
    now = 0.0
    previous = None
    for delta, fields in steps:
        now += delta
        previous_since = previous.since if previous is not None else None
        result = fuse(Reading(**fields), CONFIG, previous, now)

        assert result.state != "off"
        assert 0.0 <= result.confidence <= 1.0
        assert result.since <= now
        assert result.recheck_at is None or result.recheck_at > now
        if previous is not None and previous.state == result.state:
            assert result.since == previous_since
        msgspec.json.encode(result.evidence)
        previous = result


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"active_window_s": 0}, "fusion.active_window_s: invalid value 0"),
        ({"confirm_events": 0}, "fusion.confirm_events: invalid value 0"),
        ({"away_after_s": 60}, "fusion.away_after_s: invalid value 60"),
        ({"skin_min_c": 37.0}, "fusion.skin_min_c: invalid value 37.0"),
        ({"carry_hold_s": -1}, "fusion.carry_hold_s: invalid value -1"),
    ],
)
def test_fusion_config_rejects(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FusionConfig(**fields)


def test_merge_latest_input_wins() -> None:
    merged = merge_readings([Reading(last_input=10.0), Reading(last_input=30.0), Reading()])

    assert merged.last_input == 30.0


def test_merge_empty() -> None:
    merged = merge_readings([])

    assert merged == Reading()


def test_merge_suspect_presence_ignored() -> None:
    suspect = Reading(presence=True, last_presence=50.0, presence_suspect=True)
    calm = Reading(presence=False, last_presence=20.0, presence_suspect=False)

    merged = merge_readings([suspect, calm])

    assert merged.presence is False
    assert merged.last_presence == 20.0
    assert merged.presence_suspect is False


def test_merge_only_suspect_presence() -> None:
    suspect = Reading(presence=True, last_presence=50.0, presence_suspect=True)

    merged = merge_readings([suspect, Reading(last_input=3.0)])

    assert merged.presence is True
    assert merged.presence_suspect is True


def test_merge_any_presence_true() -> None:
    merged = merge_readings([Reading(presence=False), Reading(presence=True, last_presence=9.0)])

    assert merged.presence is True
    assert merged.last_presence == 9.0
    assert merged.presence_suspect is False


def test_merge_first_temperature_and_power() -> None:
    readings = [
        Reading(last_input=1.0),
        Reading(temperature_c=31.0, ambient_c=22.0, skin_contact=False),
        Reading(temperature_c=25.0, skin_contact=True),
        Reading(on_battery=False, battery_percent=80.0, plugged=True),
    ]

    merged = merge_readings(readings)

    assert merged.temperature_c == 31.0
    assert merged.ambient_c == 22.0
    assert merged.skin_contact is True
    assert merged.on_battery is False
    assert merged.battery_percent == 80.0
    assert merged.plugged is True


@pytest.mark.parametrize(
    ("prev_wall", "prev_mono", "wall", "mono", "poll_s", "slept"),
    [
        (1000.0, 50.0, 1030.0, 80.0, 30.0, 0.0),
        (1000.0, 50.0, 1032.0, 80.0, 30.0, 0.0),
        (1000.0, 50.0, 1029.9 + MIN_SUSPEND_S, 80.0, 1.0, 0.0),
        (1000.0, 50.0, 1030.0 + MIN_SUSPEND_S, 80.0, 1.0, MIN_SUSPEND_S),
        (1000.0, 50.0, 1630.0, 80.0, 30.0, 600.0),
        (1000.0, 50.0, 1059.0, 80.0, 30.0, 0.0),
        (1000.0, 50.0, 1060.0, 80.0, 30.0, 30.0),
        (1000.0, 50.0, 900.0, 80.0, 30.0, 0.0),
    ],
    ids=[
        "in-step",
        "ntp-step",
        "below-minimum",
        "at-minimum",
        "ten-minute-sleep",
        "below-poll-interval",
        "at-poll-interval",
        "wall-clock-set-back",
    ],
)
def test_detect_suspend(
    prev_wall: float, prev_mono: float, wall: float, mono: float, poll_s: float, slept: float
) -> None:
    assert detect_suspend(prev_wall, prev_mono, wall, mono, poll_s) == pytest.approx(slept)


def test_discount_suspend_ages_old_input() -> None:
    reading = Reading(last_input=100.0, last_presence=110.0, temperature_c=30.0)

    shifted = discount_suspend(reading, resumed_at=110.0, slept_s=3600.0)

    assert shifted.last_input == -3500.0
    assert shifted.last_presence == 110.0
    assert shifted.temperature_c == 30.0


def test_fuse_after_discounted_suspend_not_active() -> None:
    # On a clock that stops in suspend, input 10 s before sleeping looks
    # 10 s old on waking; discounted, it is an hour old.
    before = run([(100, {"last_input": 100}), (102, {"last_input": 102})])[-1]
    assert before.state == "active"
    reading = discount_suspend(Reading(last_input=102.0), resumed_at=112.0, slept_s=3600.0)

    after = fuse(reading, CONFIG, None, 112.0)

    assert after.state == "away"


def test_fused_is_frozen() -> None:
    result = run([(0, {})])[-1]

    with pytest.raises(dataclasses.FrozenInstanceError):
        result.state = "active"  # type: ignore[misc]
