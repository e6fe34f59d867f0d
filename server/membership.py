"""The partition of users among push service instances.

Each instance announces itself with a retained message on
``{root}/_service/instances/{instance}`` while it is connected, and its last
will, an empty retained message on that topic, takes the announcement away
when it dies. Every instance subscribes to the announcements, so all of them
know the same set of live instances, and each computes the owner of a user the
same way: the live instance with the highest score for that user (rendezvous
hashing). When an instance joins or leaves, only the users it gains or loses
change hands.

Two instances can disagree for the moment one of them needs to hear of a
change. The outbox they share records each mail's routing in one transaction,
so in that moment a mail is still routed once.
"""

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

from mailpush.errors import PayloadError
from mailpush.protocol.link import Link
from mailpush.protocol.messages import ServiceInstance, decode, encode

log = logging.getLogger(__name__)

# How long a clean stop waits for the broker to take the announcement away.
WITHDRAW_TIMEOUT_S = 2.0


def score(instance: str, user: str) -> int:
    """Return the rendezvous score of ``instance`` for ``user``; equal on every machine."""
    digest = hashlib.blake2b(f"{instance}/{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(instances: Iterable[str], user: str) -> str:
    """Return the instance among ``instances`` (not empty) that routes ``user``."""
    return max(instances, key=lambda instance: (score(instance, user), instance))


class Membership:
    """The live instances as this instance hears them, and the users it owns.

    Announcements arrive on the MQTT network thread; the service's main thread
    reads :meth:`owned`. After a reconnect the set is rebuilt from the retained
    announcements, so :meth:`owned` waits ``settle_s`` for them.

    Args:
        me: this instance's id; it is always live to itself.
        users: every configured user.
        settle_s: how long after :meth:`reset` the set is not trusted.
        on_change: called (from the network thread) when the set changes.
        clock: a monotonic clock, replaceable in tests.
    """

    def __init__(
        self,
        me: str,
        users: Iterable[str],
        settle_s: float,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.me = me
        self._users = tuple(users)
        self._settle_s = settle_s
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._others: set[str] = set()
        self._trusted_from = float("-inf")
        self.started = round(time.time(), 3)
        """When this instance started, sent in its announcement to distinguish two processes with one id."""

    @property
    def live(self) -> frozenset[str]:
        """Every instance known to be live, this one included."""
        with self._lock:
            return frozenset(self._others | {self.me})

    def reset(self) -> None:
        """Forget the other instances; called on every connect, before the retained ones arrive."""
        with self._lock:
            self._others.clear()
            self._trusted_from = self._clock() + self._settle_s
        self._on_change()

    def trust_now(self) -> None:
        """End the wait after :meth:`reset`: the caller knows the retained ones have arrived."""
        with self._lock:
            self._trusted_from = self._clock()

    def announcement(self) -> bytes:
        """Return this instance's announcement payload."""
        now = round(time.time(), 3)
        return encode(ServiceInstance(instance=self.me, started=self.started, ts=now))

    def receive(self, instance: str, payload: bytes) -> str | None:
        """Take in an announcement of ``instance`` (empty: withdrawn); return why it was dropped."""
        if not payload:
            self.heard(instance, alive=False)
            return None
        try:
            announcement = decode(payload, ServiceInstance)
        except PayloadError as exc:
            return str(exc)
        if announcement.instance != instance:
            return "ServiceInstance: instance does not match the topic"
        if instance == self.me and announcement.started != self.started:
            # Both processes take the same MQTT client id, so the broker
            # disconnects one whenever the other connects.
            return (
                f"another service started at {announcement.started} uses the instance id "
                f"{instance!r}; give each instance its own service.instance"
            )
        self.heard(instance, alive=True)
        return None

    def heard(self, instance: str, alive: bool) -> None:
        """Record an announcement (``alive``) or its removal by a will or a clean stop."""
        if instance == self.me:
            return
        with self._lock:
            before = len(self._others)
            if alive:
                self._others.add(instance)
            else:
                self._others.discard(instance)
            changed = len(self._others) != before
        if changed:
            self._on_change()

    def owned(self) -> frozenset[str] | None:
        """Return the users this instance routes now, or None while the set is settling."""
        with self._lock:
            if self._clock() < self._trusted_from:
                return None
            live = self._others | {self.me}
        return frozenset(user for user in self._users if owner(live, user) == self.me)


def some(users: frozenset[str], limit: int = 5) -> str:
    """Return up to ``limit`` user ids for a log line, such as ``: alice, bob``."""
    if not users:
        return ""
    names = sorted(users)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ": " + ", ".join(names[:limit]) + more


def withdraw(link: Link, topic: str) -> None:
    """Take this instance's announcement away before a clean disconnect, which fires no will."""
    info = link.publish(topic, b"", retain=True)
    if info is None:
        return
    try:
        info.wait_for_publish(WITHDRAW_TIMEOUT_S)
    except (RuntimeError, ValueError):
        log.debug("announcement %s not withdrawn: the broker connection is gone", topic)
