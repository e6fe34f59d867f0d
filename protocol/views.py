"""The router's view of one terminal, built from its latest state and attributes.

The service's registry and the agent's ``policy explain`` command both build
their views here, so both route with the same input for the same messages.
"""

from mailpush.protocol.decision import TerminalView
from mailpush.protocol.messages import DeviceAttributes, UsageState


def terminal_view(
    terminal: str,
    state: UsageState | None,
    attributes: DeviceAttributes | None,
    now: float,
    stale_after_s: float,
) -> TerminalView:
    """Build what the policy reads of one terminal at ``now``.

    A state older than ``stale_after_s`` reads as unknown (``state`` and
    ``input_idle_s`` None) unless it is ``off``. An ``off`` state stays
    ``off`` however old it is, because it is the terminal's last word,
    retained by the broker. The ``input_idle_s`` of a known state grows by
    the time since it was sensed.

    Args:
        terminal: The terminal id.
        state: The terminal's latest UsageState, or None if none arrived.
        attributes: The terminal's DeviceAttributes, or None if none arrived.
        now: The current time, in Unix seconds.
        stale_after_s: Seconds after which a state that is not ``off`` counts as unknown.
    """
    known = state is not None and (state.state == "off" or now - state.ts <= stale_after_s)

    capabilities: frozenset[str] = frozenset()
    kind = None
    if attributes is not None:
        capabilities = frozenset(attributes.capabilities)
        kind = attributes.kind

    position = state.position if state is not None else None
    evidence = state.evidence if state is not None else None
    return TerminalView(
        terminal=terminal,
        state=state.state if known and state is not None else None,
        kind=kind,
        capabilities=capabilities,
        proximity=position.proximity if position is not None else None,
        zone=position.zone if position is not None else None,
        input_idle_s=_idle_now(evidence.input_idle_s, state.ts, now)
        if evidence is not None and state is not None and known
        else None,
        ts=state.ts if state is not None else None,
    )


def _idle_now(idle_at_ts: float | None, ts: float, now: float) -> float | None:
    # The evidence was sensed at ts; the terminal has been idle since then too.
    if idle_at_ts is None:
        return None
    return idle_at_ts + max(0.0, now - ts)
