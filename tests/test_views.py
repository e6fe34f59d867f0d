"""The router's view of one terminal, shared by the service's registry and `policy explain`."""

import pytest

from mailpush.agent.policy_inputs import terminal_views
from mailpush.protocol.messages import DeviceAttributes, Evidence, Position, UsageState, encode
from mailpush.protocol.topics import Topics
from mailpush.protocol.views import terminal_view
from mailpush.server.registry import Registry

STALE_AFTER_S = 180.0


def state(name="active", ts=1000.0, terminal="desk", idle=5.0, position=None, reason=None):
    return UsageState(
        user="alice",
        terminal=terminal,
        state=name,
        since=ts,
        ts=ts,
        seq=1,
        confidence=0.8,
        evidence=Evidence(input_idle_s=idle),
        position=position,
        reason=reason,
    )


LAPTOP = DeviceAttributes(kind="laptop", capabilities=["images", "sound"])


def test_fresh_state_is_known():
    view = terminal_view("desk", state(ts=1000.0, idle=5.0), LAPTOP, 1010.0, STALE_AFTER_S)

    assert view.terminal == "desk"
    assert view.state == "active"
    assert view.ts == 1000.0
    assert view.kind == "laptop"
    assert view.capabilities == frozenset({"images", "sound"})


def test_input_idle_grows_by_state_age():
    view = terminal_view("desk", state(ts=1000.0, idle=5.0), None, 1010.0, STALE_AFTER_S)

    assert view.input_idle_s == 15.0  # 5 s idle when sensed, sensed 10 s ago


def test_input_idle_never_shrinks_on_clock_skew():
    # The service's clock is behind the terminal's, so the state seems to come from the future.
    view = terminal_view("desk", state(ts=1000.0, idle=5.0), None, 990.0, STALE_AFTER_S)

    assert view.input_idle_s == 5.0


def test_input_idle_absent_stays_absent():
    view = terminal_view("desk", state(idle=None), None, 1010.0, STALE_AFTER_S)

    assert view.state == "active"
    assert view.input_idle_s is None


def test_stale_state_reads_as_unknown():
    view = terminal_view("desk", state(ts=1000.0, idle=5.0), LAPTOP, 1181.0, STALE_AFTER_S)

    assert view.state is None
    assert view.input_idle_s is None
    assert view.ts == 1000.0
    assert view.kind == "laptop"


def test_state_at_stale_limit_is_known():
    view = terminal_view("desk", state(ts=1000.0), None, 1000.0 + STALE_AFTER_S, STALE_AFTER_S)

    assert view.state == "active"


@pytest.mark.parametrize("age_s", [0.0, 181.0, 30 * 24 * 3600.0])
def test_off_stays_off_however_old(age_s):
    off = state("off", ts=1000.0, idle=None, reason="stopped")

    view = terminal_view("desk", off, None, 1000.0 + age_s, STALE_AFTER_S)

    assert view.state == "off"


def test_no_state_only_attributes():
    view = terminal_view("desk", None, LAPTOP, 1000.0, STALE_AFTER_S)

    assert view.state is None
    assert view.ts is None
    assert view.input_idle_s is None
    assert view.kind == "laptop"
    assert view.capabilities == frozenset({"images", "sound"})


def test_no_attributes_leaves_kind_unknown():
    view = terminal_view("desk", state(), None, 1000.0, STALE_AFTER_S)

    assert view.kind is None
    assert view.capabilities == frozenset()


def test_position_carried_even_when_stale():
    placed = state(ts=1000.0, position=Position(zone="study", proximity=0.9))

    fresh = terminal_view("desk", placed, None, 1000.0, STALE_AFTER_S)
    stale = terminal_view("desk", placed, None, 2000.0, STALE_AFTER_S)

    assert (fresh.proximity, fresh.zone) == (0.9, "study")
    assert (stale.proximity, stale.zone) == (0.9, "study")


def test_registry_and_policy_command_agree():
    now = 1100.0
    states = [
        state("active", ts=1090.0, terminal="fresh", idle=3.0),
        state("idle", ts=800.0, terminal="stale", idle=40.0),
        state("off", ts=100.0, terminal="gone", idle=None, reason="stopped"),
    ]
    topics = Topics("mailpush/v1")
    registry = Registry(clock=lambda: now)
    retained = {}
    for usage in states:
        registry.update_state(usage)
        retained[topics.state("alice", usage.terminal)] = encode(usage)
    registry.update_attributes("alice", "fresh", LAPTOP)
    retained[topics.attributes("alice", "fresh")] = encode(LAPTOP)

    from_registry = registry.views("alice", STALE_AFTER_S)
    from_command, dropped = terminal_views(topics, "alice", retained, now, STALE_AFTER_S)

    assert dropped == []
    assert from_command == from_registry
    assert [view.state for view in from_registry] == ["active", "off", None]
