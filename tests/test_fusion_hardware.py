"""Tests of the fusion of presence (PIR) and surface temperature into present, carried and position."""

from typing import Any

import pytest

from mailpush.agent.fusion import Fused, FusionConfig, fuse, merge_readings
from mailpush.errors import ConfigError
from mailpush.protocol.messages import Position, UsageState, decode, encode
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


def held(fields: dict[str, Any], until: float = 30.0) -> list[Step]:
    """Return steps that hold the same reading from 0 to ``until`` (the default carry hold)."""
    return [(0.0, fields), (until, fields)]


# Carried: which evidence, and how sure

CARRIED_CONFIDENCE = [
    pytest.param({"skin_contact": True}, 0.85, id="plugin-verdict"),
    pytest.param({"temperature_c": 33.0, "ambient_c": 22.0}, 0.85, id="band-above-ambient"),
    pytest.param({"temperature_c": 33.0}, 0.7, id="band-alone"),
    pytest.param(
        {"temperature_c": 33.0, "presence": True, "last_presence": 30.0},
        0.75,
        id="band-with-presence",
    ),
    pytest.param({"skin_contact": True, "last_input": 29.0}, 0.9, id="contact-with-stray-input"),
]


@pytest.mark.parametrize(("fields", "confidence"), CARRIED_CONFIDENCE)
def test_carried_confidence(fields: dict[str, Any], confidence: float) -> None:
    result = run(held(fields))[-1]

    assert result.state == "carried"
    assert result.confidence == pytest.approx(confidence)


NOT_CARRIED = [
    pytest.param({"temperature_c": 29.9}, id="below-band"),
    pytest.param({"temperature_c": 37.1}, id="above-band"),
    pytest.param({"temperature_c": 33.0, "ambient_c": 31.5}, id="warm-room"),
    pytest.param({"skin_contact": False, "temperature_c": 33.0}, id="plugin-says-no"),
    pytest.param({"ambient_c": 22.0}, id="ambient-only"),
]


@pytest.mark.parametrize("fields", NOT_CARRIED)
def test_not_carried(fields: dict[str, Any]) -> None:
    result = run(held(fields, until=100.0))[-1]

    assert result.state != "carried"


def test_carried_band_from_config() -> None:
    config = FusionConfig(skin_min_c=25.0, skin_max_c=30.0, carry_hold_s=5.0)

    result = run([(0, {"temperature_c": 27.0}), (5, {"temperature_c": 27.0})], config)[-1]

    assert result.state == "carried"
    assert result.since == 0


# Carried: hysteresis on the way out

RELEASE_TIMELINES = [
    pytest.param(
        [(31, {"temperature_c": 29.7}), (32, {"temperature_c": 30.2})],
        ["carried", "carried"],
        id="wobble-below-band-within-margin",
    ),
    pytest.param(
        [(31, {"temperature_c": 37.4}), (32, {"temperature_c": 36.9})],
        ["carried", "carried"],
        id="wobble-above-band-within-margin",
    ),
    pytest.param(
        [(31, {"temperature_c": 28.0}), (40, {"temperature_c": 28.0})],
        ["carried", "carried"],
        id="lost-shorter-than-release",
    ),
    pytest.param(
        [(31, {"temperature_c": 28.0}), (46, {"temperature_c": 28.0})],
        ["carried", "idle"],
        id="lost-for-release-time",
    ),
    pytest.param(
        [(31, {"temperature_c": 28.0}), (40, {"temperature_c": 33.0}), (50, {"temperature_c": 28})],
        ["carried", "carried", "carried"],
        id="return-restarts-release",
    ),
    pytest.param(
        [(31, {"skin_contact": False}), (46, {"skin_contact": False})],
        ["carried", "idle"],
        id="plugin-verdict-released",
    ),
]


@pytest.mark.parametrize(("steps", "states"), RELEASE_TIMELINES)
def test_carried_release(steps: list[Step], states: list[str]) -> None:
    # Held at 33 degrees from 0; carried from 30 with the default 15 s release.
    results = run([*held({"temperature_c": 33.0}), *steps])[2:]

    assert [r.state for r in results] == states


def test_carried_release_lowers_confidence_and_rechecks() -> None:
    result = run([*held({"temperature_c": 33.0}), (31, {"temperature_c": 28.0})])[-1]

    assert result.state == "carried"
    assert result.confidence == pytest.approx(0.6)
    assert result.recheck_at == 46  # lost at 31, plus carry_release_s
    assert result.evidence.skin_contact is False


def test_carried_release_zero_is_immediate() -> None:
    config = FusionConfig(carry_release_s=0)

    result = run([*held({"temperature_c": 33.0}), (31, {"temperature_c": 28.0})], config)[-1]

    assert result.state == "idle"


def test_carried_without_margin_edge_releases() -> None:
    config = FusionConfig(skin_release_margin_c=0.0, carry_release_s=0)

    result = run([*held({"temperature_c": 33.0}), (31, {"temperature_c": 29.7})], config)[-1]

    assert result.state == "idle"


def test_carry_hold_restarts_on_loss() -> None:
    # Before the hold completes there is nothing to release: a loss restarts it.
    steps: list[Step] = [
        (0, {"temperature_c": 33.0}),
        (20, {"temperature_c": 25.0}),
        (21, {"temperature_c": 33.0}),
        (40, {"temperature_c": 33.0}),
        (51, {"temperature_c": 33.0}),
    ]

    results = run(steps)

    assert [r.state for r in results] == ["idle", "idle", "idle", "idle", "carried"]
    assert results[-1].since == 21


def test_carry_hold_tolerates_margin_wobble() -> None:
    steps: list[Step] = [(0, {"temperature_c": 30.5}), (10, {"temperature_c": 29.8})]

    result = run([*steps, (30, {"temperature_c": 30.1})])[-1]

    assert result.state == "carried"
    assert result.since == 0


def test_evidence_skin_contact_from_temperature() -> None:
    results = run([(0, {"temperature_c": 33.0}), (1, {"temperature_c": 22.0})])

    assert results[0].evidence.skin_contact is True
    assert results[1].evidence.skin_contact is False
    assert results[1].evidence.temperature_c == 22.0


def test_evidence_skin_contact_unknown_without_temperature() -> None:
    result = run([(0, {"last_presence": 0.0})])[-1]

    assert result.evidence.skin_contact is None


# Present: which evidence, and how sure

PRESENT_CONFIDENCE = [
    pytest.param({"presence": True, "last_presence": 100.0}, 0.75, id="detection-now"),
    pytest.param({"presence": False, "last_presence": 0.0}, 0.72, id="faded-a-third"),
    pytest.param({"presence": False, "last_presence": -200.0}, 0.65, id="window-end"),
    pytest.param(
        {"presence": True, "last_presence": 100.0, "last_input": -80.0},
        0.85,
        id="input-agrees",
    ),
]


@pytest.mark.parametrize(("fields", "confidence"), PRESENT_CONFIDENCE)
def test_present_confidence(fields: dict[str, Any], confidence: float) -> None:
    result = run([(100, fields)], input_since=-1000)[-1]

    assert result.state == "present"
    assert result.confidence == pytest.approx(confidence, abs=0.005)


def test_present_ends_with_window() -> None:
    steps: list[Step] = [(0, {"presence": True, "last_presence": 0.0})]
    later = [(300, {"presence": False, "last_presence": 0.0})]

    results = run([*steps, *later, (300.1, {"presence": False, "last_presence": 0.0})])

    assert [r.state for r in results] == ["present", "present", "idle"]
    assert results[-1].since == 300


def test_suspect_presence_never_keeps_present() -> None:
    stuck = {"presence": True, "last_presence": 0.0, "presence_suspect": True}
    steps: list[Step] = [(0, {"presence": True, "last_presence": 0.0}), (601, stuck)]

    results = run([*steps, (5000, stuck)])

    assert [r.state for r in results] == ["present", "idle", "idle"]
    assert results[-1].evidence.presence is None
    assert results[-1].position is None


def test_suspect_pir_beside_working_pir() -> None:
    stuck = Reading(presence=True, last_presence=0.0, presence_suspect=True)
    calm = Reading(presence=False, last_presence=None, presence_suspect=False)

    merged = merge_readings([stuck, calm])
    result = fuse(merged, CONFIG, None, 10.0)

    assert merged.presence is False
    assert result.state == "idle"
    assert result.confidence == pytest.approx(0.5)


# Idle and away: how many sensors agree that no one is there

QUIET_CONFIDENCE = [
    pytest.param({"presence": False}, 0, "idle", 0.8, id="input-and-presence"),
    pytest.param({}, 0, "idle", 0.7, id="input-only"),
    pytest.param({"presence": False}, None, "idle", 0.5, id="presence-only"),
    pytest.param({}, None, "idle", 0.3, id="no-sensor"),
]


@pytest.mark.parametrize(("fields", "input_since", "state", "confidence"), QUIET_CONFIDENCE)
def test_quiet_confidence(
    fields: dict[str, Any], input_since: float | None, state: str, confidence: float
) -> None:
    result = run([(10, fields)], input_since=input_since)[-1]

    assert result.state == state
    assert result.confidence == pytest.approx(confidence)


def test_pir_alone_watching_goes_away() -> None:
    # A working PIR that never fires counts as watching from the first fusion.
    results = run(
        [(0, {"presence": False}), (600, {"presence": False}), (601, {"presence": False})]
    )

    assert [r.state for r in results] == ["idle", "idle", "away"]
    assert results[-1].since == 600
    assert results[0].recheck_at == 600


def test_unavailable_pir_is_not_absence() -> None:
    # An unavailable PIR reads Reading(): it must never make a terminal away.
    results = run([(0, {}), (100_000, {})])

    assert [r.state for r in results] == ["idle", "idle"]
    assert results[-1].confidence == pytest.approx(0.3)


def test_walk_in_sit_still_leave() -> None:
    config = FusionConfig(active_window_s=10, presence_window_s=60, away_after_s=120)
    steps: list[Step] = [
        (0, {"presence": False}),
        (5, {"presence": True, "last_presence": 5.0}),
        (8, {"presence": False, "last_presence": 7.0}),
        (9, {"presence": True, "last_presence": 9.0}),
        (12, {"presence": False, "last_presence": 11.0}),
        (71, {"presence": False, "last_presence": 11.0}),
        (72, {"presence": False, "last_presence": 11.0}),
        (132, {"presence": False, "last_presence": 11.0}),
    ]

    results = run(steps, config)

    states = [r.state for r in results]
    assert states == ["idle", "present", "present", "present", "present", "present", "idle", "away"]
    assert results[1].since == 5
    assert results[-2].since == 71
    assert results[-1].since == 131


# Position: proximity and zone

PROXIMITY = [
    pytest.param(
        [(100, {"last_input": 100}), (102, {"last_input": 102})], 0, 1.0, id="fresh-input"
    ),
    pytest.param(
        [(100, {"last_input": 100}), (102, {"last_input": 102}), (222, {"last_input": 102})],
        0,
        0.9,
        id="input-at-active-window-end",
    ),
    pytest.param(
        [(100, {"last_input": 100}), (102, {"last_input": 102}), (702, {"last_input": 102})],
        0,
        0.0,
        id="input-at-away",
    ),
    pytest.param([(100, {"presence": True, "last_presence": 100.0})], None, 0.6, id="presence-now"),
    pytest.param(
        [(100, {"presence": False, "last_presence": -200.0})], None, 0.3, id="presence-old"
    ),
    pytest.param([(100, {"presence": False})], None, 0.0, id="pir-sees-no-one"),
    pytest.param(held({"skin_contact": True}), None, 0.9, id="carried"),
    pytest.param([(100, {"last_input": 100})], 0, 0.0, id="stray-input-does-not-count"),
]


@pytest.mark.parametrize(("steps", "input_since", "proximity"), PROXIMITY)
def test_proximity(steps: list[Step], input_since: float | None, proximity: float) -> None:
    result = run(steps, input_since=input_since)[-1]

    assert result.position is not None
    assert result.position.proximity == pytest.approx(proximity, abs=0.01)


def test_proximity_unknown_without_sensors() -> None:
    result = run([(100, {"temperature_c": 21.0, "on_battery": False})])[-1]

    assert result.position is None


def test_zone_without_proximity() -> None:
    result = run([(100, {})], zone="study")[-1]

    assert result.position == Position(zone="study", proximity=None)


def test_zone_with_presence() -> None:
    result = run([(100, {"presence": True, "last_presence": 100.0})], zone="study")[-1]

    assert result.position == Position(zone="study", proximity=0.6)


def test_position_encodes_in_usage_state() -> None:
    fused = run([(100, {"presence": True, "last_presence": 100.0})], zone="study")[-1]
    state = UsageState(
        user="ann",
        terminal="pi",
        state=fused.state,
        since=fused.since,
        ts=1_700_000_000.0,
        seq=1,
        confidence=fused.confidence,
        evidence=fused.evidence,
        position=fused.position,
    )

    decoded = decode(encode(state), UsageState)

    assert decoded.state == "present"
    assert decoded.position == Position(zone="study", proximity=0.6)


# Config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"carry_release_s": -1}, "fusion.carry_release_s: invalid value -1"),
        ({"skin_release_margin_c": -0.1}, "fusion.skin_release_margin_c: invalid value -0.1"),
        ({"skin_release_margin_c": 6.0}, "fusion.skin_release_margin_c: invalid value 6.0"),
    ],
)
def test_fusion_config_rejects_release(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FusionConfig(**fields)


def test_fusion_config_release_defaults() -> None:
    assert CONFIG.skin_release_margin_c == 0.5
    assert CONFIG.carry_release_s == 15.0
    assert CONFIG.skin_min_c == 30.0
    assert CONFIG.skin_max_c == 37.0
