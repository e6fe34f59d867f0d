"""The service's terminal registry: ordering, the last will, staleness, waiting."""

import threading
import time

from mailpush.protocol.messages import DeviceAttributes, Evidence, UsageState
from mailpush.server.registry import Registry


def state(name="idle", ts=100.0, terminal="desk", session="s1", reason=None, idle=None, seq=1):
    return UsageState(
        user="alice",
        terminal=terminal,
        state=name,
        since=ts,
        ts=ts,
        seq=seq,
        confidence=0.7,
        evidence=Evidence(input_idle_s=idle),
        session=session,
        reason=reason,
    )


def test_newer_state_replaces_older():
    registry = Registry()

    assert registry.update_state(state("idle", ts=100))
    assert registry.update_state(state("active", ts=101))
    assert registry.terminals("alice")["desk"].state.state == "active"


def test_older_state_never_overwrites():
    registry = Registry()
    registry.update_state(state("active", ts=200))

    assert not registry.update_state(state("idle", ts=150))
    assert not registry.update_state(state("idle", ts=200))
    assert registry.terminals("alice")["desk"].state.state == "active"


def test_will_of_same_session_accepted():
    registry = Registry()
    registry.update_state(state("active", ts=200, session="abc"))
    will = state("off", ts=150, session="abc", reason="connection-lost")

    assert registry.update_state(will)
    assert registry.terminals("alice")["desk"].state.state == "off"


def test_will_of_old_session_ignored():
    registry = Registry()
    registry.update_state(state("active", ts=200, session="new"))
    stale_will = state("off", ts=150, session="old", reason="connection-lost")

    assert not registry.update_state(stale_will)
    assert registry.terminals("alice")["desk"].state.state == "active"


def test_stale_state_reads_as_unknown():
    now = [1000.0]
    registry = Registry(clock=lambda: now[0])
    registry.update_state(state("active", ts=990, terminal="fresh", idle=5))
    registry.update_state(state("active", ts=700, terminal="stale", idle=5))
    registry.update_state(state("off", ts=100, terminal="gone", reason="stopped"))

    views = {view.terminal: view for view in registry.views("alice", stale_after_s=180)}

    assert views["fresh"].state == "active"
    assert views["stale"].state is None
    assert views["gone"].state == "off"
    assert views["fresh"].input_idle_s == 15  # 5 s idle when sensed, 10 s ago


def test_views_carry_attributes():
    registry = Registry(clock=lambda: 100.0)
    registry.update_state(state("idle", ts=100))
    registry.update_attributes(
        "alice", "desk", DeviceAttributes(kind="laptop", capabilities=["images", "color"])
    )

    (view,) = registry.views("alice", stale_after_s=180)

    assert view.kind == "laptop"
    assert view.capabilities == frozenset({"images", "color"})


def test_forget_removes_terminal():
    registry = Registry()
    registry.update_state(state())
    registry.forget("alice", "desk")

    assert registry.terminals("alice") == {}


def test_wait_for_states_returns_when_fresh():
    registry = Registry()
    registry.update_state(state("idle", ts=100, terminal="a"))
    registry.update_state(state("idle", ts=100, terminal="b"))

    def answer():
        time.sleep(0.1)
        registry.update_state(state("active", ts=101, terminal="a"))

    threading.Thread(target=answer).start()
    started = time.monotonic()
    missing = registry.wait_for_states("alice", {"a": 100.0, "b": 100.0}, timeout=0.5)
    elapsed = time.monotonic() - started

    assert missing == {"b"}
    assert elapsed >= 0.45


def test_wait_for_states_ends_early_when_all_answer():
    registry = Registry()
    registry.update_state(state("idle", ts=100, terminal="a"))

    def answer():
        time.sleep(0.05)
        registry.update_state(state("active", ts=101, terminal="a"))

    threading.Thread(target=answer).start()
    started = time.monotonic()
    missing = registry.wait_for_states("alice", {"a": 100.0}, timeout=5)

    assert missing == set()
    assert time.monotonic() - started < 2
