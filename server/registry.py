"""The service's view of every terminal: latest state and attributes.

States arrive retained and live on ``{root}/+/terminals/+/state``. The newest
by ``ts`` wins, so a late or replayed message never overwrites a newer one.
The one exception is the last will: the broker sends it with the ``ts`` of the
connect, older than the states of that connection, so an ``off`` with reason
``connection-lost`` whose ``session`` matches the state held is accepted.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailpush.protocol.messages import DeviceAttributes, UsageState
from mailpush.protocol.policy import TerminalView
from mailpush.protocol.views import terminal_view


@dataclass(slots=True)
class TerminalRecord:
    """A terminal's latest state and attributes."""

    state: UsageState | None = None
    attributes: DeviceAttributes | None = None


class Registry:
    """Thread-safe store of terminal states; routing threads wait on it for fresh states."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._users: dict[str, dict[str, TerminalRecord]] = {}
        self._changed = threading.Condition()

    def update_state(self, state: UsageState) -> bool:
        """Store a state unless an equal or newer one is held; return whether it was stored."""
        with self._changed:
            record = self._record(state.user, state.terminal)
            if not _supersedes(state, record.state):
                return False
            record.state = state
            self._changed.notify_all()
            return True

    def update_attributes(self, user: str, terminal: str, attributes: DeviceAttributes) -> None:
        """Store a terminal's attributes."""
        with self._changed:
            self._record(user, terminal).attributes = attributes

    def forget(self, user: str, terminal: str) -> None:
        """Remove a terminal (its retained state was cleared)."""
        with self._changed:
            self._users.get(user, {}).pop(terminal, None)

    def terminals(self, user: str) -> dict[str, TerminalRecord]:
        """Return a copy of one user's records, by terminal id."""
        with self._changed:
            records = self._users.get(user, {})
            return {name: TerminalRecord(r.state, r.attributes) for name, r in records.items()}

    def views(self, user: str, stale_after_s: float) -> list[TerminalView]:
        """Return what the policy needs of each terminal; stale states count as unknown.

        An ``off`` state stays ``off`` however old it is: it is the terminal's
        last word, retained by the broker.
        """
        now = self._clock()
        views = []
        for terminal, record in sorted(self.terminals(user).items()):
            views.append(
                terminal_view(terminal, record.state, record.attributes, now, stale_after_s)
            )
        return views

    def wait_for_states(
        self, user: str, waiting: dict[str, float | None], timeout: float
    ) -> set[str]:
        """Wait until each terminal in ``waiting`` has a state newer than the one given.

        Args:
            user: whose terminals.
            waiting: terminal id to the ``ts`` of the state held when the probe
                went out (None when none was held). The comparison uses the
                agent's own timestamps only, so clock skew between the
                service and a terminal does not matter.
            timeout: seconds to wait at most.

        Returns:
            The terminals still without a newer state when the wait ended.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                records = self._users.get(user, {})
                missing = {
                    name for name, held in waiting.items() if not _newer(records.get(name), held)
                }
                remaining = deadline - time.monotonic()
                if not missing or remaining <= 0:
                    return missing
                self._changed.wait(remaining)

    def count(self) -> int:
        """Return how many terminals the registry holds, across all users."""
        with self._changed:
            return sum(len(terminals) for terminals in self._users.values())

    def _record(self, user: str, terminal: str) -> TerminalRecord:
        return self._users.setdefault(user, {}).setdefault(terminal, TerminalRecord())


def _supersedes(new: UsageState, held: UsageState | None) -> bool:
    if held is None:
        return True
    if new.state == "off" and new.reason == "connection-lost" and new.session is not None:
        if new.session == held.session and held.state != "off":
            return True
    return new.ts > held.ts


def _newer(record: TerminalRecord | None, held_ts: float | None) -> bool:
    if record is None or record.state is None:
        return False
    return held_ts is None or record.state.ts > held_ts
