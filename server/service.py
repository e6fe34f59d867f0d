"""The push service: mailbox watchers, terminal registry, policy, router and outbox.

One :class:`PushService` serves the configured users it owns: alone, all of
them; beside other instances on the same broker and state folder, its share
(see :mod:`mailpush.server.membership`). Each owned mailbox has a watcher
thread, and MQTT messages (states, attributes, acks, policies, read states,
other instances' announcements) arrive on the link's network thread. The main
thread starts and stops watchers as users change hands, resends
unacknowledged pushes and expires old ones.
"""

import gc
import logging
import threading
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from mailpush.errors import MailpushError, PayloadError
from mailpush.protocol.broker_url import BrokerAddress
from mailpush.protocol.droplog import DropLog
from mailpush.protocol.ids import service_client_id
from mailpush.protocol.link import Link, LinkOptions, Will
from mailpush.protocol.messages import (
    Ack,
    DeviceAttributes,
    MailStatus,
    UsageState,
    decode,
    encode,
)
from mailpush.protocol.topics import TopicKind, TopicRef, Topics
from mailpush.server.broker import EmbeddedBroker
from mailpush.server.config import ServerConfig, UserSettings
from mailpush.server.mailbox.base import NewMail, RetryLater
from mailpush.server.mailbox.state import StateStore
from mailpush.server.membership import Membership, some, withdraw
from mailpush.server.outbox import Outbox
from mailpush.server.policies import PolicyStore
from mailpush.server.read_state import ReadStateRelay
from mailpush.server.registry import Registry, TerminalRecord
from mailpush.server.router import Router
from mailpush.server.summary import summarize
from mailpush.server.watchers import WatcherPool

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0
EXPIRE_EVERY_S = 60.0
TICK_S = 1.0
RETAINED_GRACE_S = 0.3
BROKER_WAIT_S = 10.0
# How long after a broker connect a mail waits for terminals whose will reported
# "connection-lost" to publish a state again. Agents reconnect with backoff from 0.5 s.
RECONNECT_GRACE_S = 10.0
# Retained messages arrive right after a connect; a policy not among them by
# then was lost by the broker.
POLICY_RESTORE_AFTER_S = 2.0
# After a reconnect, how long the set of live instances is rebuilt from the
# retained announcements before users change hands on it.
MEMBERSHIP_SETTLE_S = 1.0


class PushService:
    """Runs the whole push service until :meth:`stop`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.topics = Topics(config.broker.topic_root)
        self.registry = Registry()
        self._users = {user.id: user for user in config.users}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._drops = DropLog(log)
        self._held: set[str] = set()
        self._connected_at = float("-inf")
        self._policies_heard: set[str] = set()
        self._policies_checked = True
        self._router: Router | None = None
        self._watchers: WatcherPool | None = None
        self._owned: frozenset[str] = frozenset()
        self.membership = Membership(
            config.service.instance, self._users, MEMBERSHIP_SETTLE_S, on_change=self._wake.set
        )
        self._read_states: ReadStateRelay | None = None
        self.policies = PolicyStore(config.state_dir / "policies")
        self.outbox: Outbox | None = None
        self.link: Link | None = None
        self.broker: EmbeddedBroker | None = None
        self.ready = threading.Event()

    def stop(self) -> None:
        """Ask the service to stop; safe from a signal handler."""
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        """Start everything, serve until :meth:`stop`, then shut down in reverse order.

        Raises:
            MailpushError: the broker cannot be started or reached, the login
                was rejected, or every mailbox watcher failed.
        """
        with ExitStack() as stack:
            state_dir = self.config.state_dir
            state_dir.mkdir(parents=True, exist_ok=True)
            store = StateStore(state_dir / "mailboxes.sqlite3")
            stack.callback(store.close)
            # Mailboxes are checked (and passwords read) before anything listens.
            self._watchers = WatcherPool(self._users, store, self._on_mail, self._on_mailbox_flags)

            address = self._start_broker(stack)
            service = self.config.service
            self.outbox = stack.enter_context(
                Outbox(
                    state_dir / "outbox.sqlite3",
                    service.resend_after_s,
                    service.outbox_ttl_s,
                    sync_every_commit=service.sync_every_commit,
                )
            )
            self.policies.load(list(self._users))

            self._connect(stack, address)
            if self._stop.is_set():
                log.info("service stopped before it was ready")
                return
            self._start_read_state_relay(stack)
            self._router = Router(service, self.registry, self.policies, self._send_probe)
            stack.callback(self._watchers.close)
            # The retained announcements arrived with the other retained messages.
            self.membership.trust_now()
            self._apply_ownership()
            log.info(
                "service %s ready: %d of %d users, broker %s",
                service.instance,
                len(self._owned),
                len(self._users),
                address,
            )
            # Objects alive now live as long as the service. Frozen, they are
            # skipped by full collections, which took 12-17 ms in the bench process.
            gc.freeze()
            self.ready.set()
            self._serve()
        log.info("service stopped")

    # Start-up

    def _start_broker(self, stack: ExitStack) -> BrokerAddress:
        if self.config.address is not None:
            return self.config.address
        settings = self.config.broker
        host, _, port = settings.listen.rpartition(":")
        accounts = Path(settings.accounts_file).expanduser() if settings.accounts_file else None
        broker = EmbeddedBroker(
            host.strip("[]") or "127.0.0.1",
            int(port),
            allow_anonymous=accounts is None,
            password_file=accounts,
        )
        broker.start()
        stack.callback(broker.stop)
        self.broker = broker
        log.info("embedded broker listening on %s:%d", broker.host, broker.port)
        return BrokerAddress(broker.host, broker.port, tls=False)

    def _connect(self, stack: ExitStack, address: BrokerAddress) -> None:
        broker = self.config.broker
        protocol = "3.1.1" if self.config.embedded else broker.protocol
        instance = self.config.service.instance
        announcement = self.topics.service_instance(instance)
        link = Link(
            LinkOptions(
                address=address,
                client_id=service_client_id(instance),
                username=broker.username,
                password=broker.password(),
                ca_file=broker.ca_file,
                protocol=protocol,
            ),
            will=Will(announcement, lambda: b""),
            on_connected=self._on_link_connected,
        )
        link.publish_retained(announcement, self.membership.announcement())
        link.subscribe(self.topics.service_instances(), self._on_instance)
        for kind, handler in (
            (TopicKind.STATE, self._on_state),
            (TopicKind.ATTRIBUTES, self._on_attributes),
            (TopicKind.ACK, self._on_ack),
            (TopicKind.POLICY, self._on_policy),
            (TopicKind.MAILSTATUS, self._on_mailstatus),
        ):
            link.subscribe(self.topics.all_users(kind), partial(self._dispatch, kind, handler))
        link.start()
        stack.callback(link.stop)
        stack.callback(withdraw, link, announcement)
        self.link = link

        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not link.wait_connected(0.2) and not self._stop.is_set():
            if link.fatal_error is not None or time.monotonic() > deadline:
                break
        if not link.connected:
            if link.fatal_error is not None:
                raise link.fatal_error
            if self._stop.is_set():
                return
            log.warning("broker %s not reachable yet; mail is held until it is", address)
            return
        # The retained states follow the subscription acknowledgements; give
        # them a moment to arrive so the first mail is routed with them.
        if link.wait_subscribed(CONNECT_TIMEOUT_S):
            time.sleep(RETAINED_GRACE_S)

    def _apply_ownership(self) -> None:
        """Start the watchers of users this instance gained, stop those of users it lost."""
        owned = self.membership.owned()
        if owned is None or owned == self._owned:
            return
        assert self._watchers is not None
        lost, gained = self._owned - owned, owned - self._owned
        self._owned = owned
        for user in sorted(lost):
            self._watchers.hand_over(user)
        for user in sorted(gained):
            self._watchers.start(user)
            # Pushes a dead owner (or this instance before a crash) recorded but
            # may not have published go out now rather than a resend interval later.
            for terminal, record in self.registry.terminals(user).items():
                if not _reads_off(record):
                    self._resend_pending(user, terminal)
        if self.ready.is_set() or len(self.membership.live) > 1:
            log.info(
                "instance %s routes %d of %d users (gained %d%s, handed over %d%s; live: %s)",
                self.membership.me,
                len(owned),
                len(self._users),
                len(gained),
                some(gained),
                len(lost),
                some(lost),
                ", ".join(sorted(self.membership.live)),
            )

    # Main loop

    def _serve(self) -> None:
        next_expiry = 0.0
        while True:
            self._wake.wait(TICK_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.link is not None and self.link.fatal_error is not None:
                raise self.link.fatal_error
            self._apply_ownership()
            assert self._watchers is not None
            if self._watchers.all_stopped():
                self._stop.set()
                raise next(
                    iter(self._watchers.errors.values()),
                    MailpushError("every mailbox watcher stopped"),
                )

            self._resend_due()
            self._restore_lost_policies()
            if time.monotonic() >= next_expiry:
                assert self.outbox is not None
                self.outbox.expire()
                next_expiry = time.monotonic() + EXPIRE_EVERY_S

    def _resend_due(self) -> None:
        assert self.outbox is not None
        for due in self.outbox.due():
            if due.user not in self._owned:
                continue
            if _reads_off(self.registry.terminals(due.user).get(due.terminal)):
                continue
            self._send(due.user, due.terminal, due.push_id, due.payload)

    # Mail

    def _on_mail(self, user: UserSettings, mail: NewMail) -> None:
        assert self.outbox is not None and self._router is not None
        if user.id not in self._owned:
            raise RetryLater(f"{user.id} was handed to another instance")
        if self.outbox.routed(user.id, mail.mail_id):
            log.debug("mail %s of %s was routed before; skipped", mail.mail_id, user.id)
            return

        if not self.registry.terminals(user.id):
            # A mail is never dropped for want of states: it waits in the
            # mailbox until the first terminal of the user reports.
            if mail.mail_id not in self._held:
                self._held.add(mail.mail_id)
                log.info(
                    "mail %s of %s held: no terminal of %s has reported yet",
                    mail.mail_id,
                    user.id,
                    user.id,
                )
            raise RetryLater(f"no terminal of {user.id} has reported yet")
        self._held.discard(mail.mail_id)
        self._await_reconnected_terminals(user.id)

        summary = summarize(mail.raw, mail.mail_id, mail.seen)
        routed = self._router.route(user, summary)
        if not self.outbox.record_routing(user.id, mail.mail_id, routed.pushes, sending=True):
            return
        for push in routed.pushes:
            self._publish(user.id, push.terminal, push.payload)
        log.info("mail %s of %s: %s", mail.mail_id, user.id, routed.decision.reason)

    def _on_link_connected(self) -> None:
        self.membership.reset()
        self._connected_at = time.monotonic()
        self._policies_heard = set()
        self._policies_checked = False

    def _restore_lost_policies(self) -> None:
        """Publish a stored policy again when the broker has none after a connect.

        A broker restarted without persistence (amqtt always) forgets the
        retained policy, and the policy commands read it from the broker, so
        the service, which kept a copy, puts it back.
        """
        if self._policies_checked or self.link is None or not self.link.connected:
            return
        if time.monotonic() - self._connected_at < POLICY_RESTORE_AFTER_S:
            return
        self._policies_checked = True
        for user in sorted(self._owned):
            policy = self.policies.stored(user)
            if policy is None or user in self._policies_heard:
                continue
            self.link.publish(self.topics.policy(user), encode(policy), retain=True)
            log.info("policy of %s published again: the broker had lost it", user)

    def _await_reconnected_terminals(self, user: str) -> None:
        """Wait, briefly, for terminals that a broker restart made look ``off``.

        A broker that shuts down publishes the last will of every agent it
        had, so right after it comes back every terminal reads as ``off``
        (connection-lost), and routing then would send the mail to all of
        them by the fallback. So without a broker connection the mail waits
        in the mailbox, and for RECONNECT_GRACE_S after a connect it waits for
        such terminals to report again.

        Raises:
            RetryLater: the broker is not connected.
        """
        assert self.link is not None
        if not self.link.wait_connected(BROKER_WAIT_S):
            raise RetryLater("the broker is not connected")

        remaining = RECONNECT_GRACE_S - (time.monotonic() - self._connected_at)
        if remaining <= 0:
            return
        waiting = {
            terminal: record.state.ts
            for terminal, record in self.registry.terminals(user).items()
            if record.state is not None
            and record.state.state == "off"
            and record.state.reason == "connection-lost"
        }
        if waiting:
            missing = self.registry.wait_for_states(user, waiting, remaining)
            if missing:
                log.debug(
                    "terminals %s of %s did not come back after the reconnect",
                    sorted(missing),
                    user,
                )

    def _send(self, user: str, terminal: str, push_id: str, payload: bytes) -> None:
        assert self.outbox is not None
        self._publish(user, terminal, payload)
        self.outbox.mark_sent(user, terminal, push_id)

    def _publish(self, user: str, terminal: str, payload: bytes) -> None:
        assert self.link is not None
        self.link.publish(self.topics.inbox(user, terminal), payload)

    def _send_probe(self, user: str, terminal: str, payload: bytes) -> None:
        assert self.link is not None
        self.link.publish(self.topics.probe(user, terminal), payload)

    # MQTT messages (network thread)

    def _on_instance(self, topic: str, payload: bytes) -> None:
        instance = self.topics.parse_service_instance(topic)
        if instance is None:
            self._drops.drop(topic, "invalid topic (instance id not valid)")
            return
        problem = self.membership.receive(instance, payload)
        if problem is not None:
            self._drops.drop(topic, problem)

    def _dispatch(self, kind: TopicKind, handler, topic: str, payload: bytes) -> None:
        ref = self.topics.parse(topic)
        if ref is None or ref.kind is not kind:
            self._drops.drop(topic, "invalid topic (user or terminal id not valid)")
            return
        if ref.user not in self._users:
            return
        try:
            handler(ref, payload)
        except PayloadError as exc:
            self._drops.drop(topic, str(exc))

    def _on_state(self, ref: TopicRef, payload: bytes) -> None:
        assert ref.terminal is not None
        if not payload:
            self.registry.forget(ref.user, ref.terminal)
            return
        state = decode(payload, UsageState)
        if (state.user, state.terminal) != (ref.user, ref.terminal):
            raise PayloadError(
                f"UsageState: user/terminal {state.user}/{state.terminal} do not match the topic"
            )

        held = self.registry.terminals(ref.user).get(ref.terminal)
        was_off = _reads_off(held)
        if not self.registry.update_state(state):
            return
        if state.state == "off":
            log.info(
                "terminal %s of %s is off (%s)", ref.terminal, ref.user, state.reason or "no reason"
            )
        elif was_off:
            log.info("terminal %s of %s is %s", ref.terminal, ref.user, state.state)
            if ref.user in self._owned:
                self._resend_pending(ref.user, ref.terminal)

    def _resend_pending(self, user: str, terminal: str) -> None:
        assert self.outbox is not None
        pending = self.outbox.pending(user, terminal)
        for push_id, payload in pending:
            self._send(user, terminal, push_id, payload)
        if pending:
            log.info(
                "sent %d unacknowledged pushes to %s of %s again", len(pending), terminal, user
            )

    def _on_attributes(self, ref: TopicRef, payload: bytes) -> None:
        assert ref.terminal is not None
        if payload:
            self.registry.update_attributes(
                ref.user, ref.terminal, decode(payload, DeviceAttributes)
            )

    def _on_ack(self, ref: TopicRef, payload: bytes) -> None:
        assert ref.terminal is not None and self.outbox is not None
        ack = decode(payload, Ack)
        if ref.user not in self._owned:
            return  # the owner applies it; a push whose ack is missed is resent and ignored
        if self.outbox.ack(ref.user, ref.terminal, ack.id):
            log.debug("push %s acknowledged by %s of %s", ack.id, ref.terminal, ref.user)

    def _on_policy(self, ref: TopicRef, payload: bytes) -> None:
        self._policies_heard.add(ref.user)
        self.policies.update(ref.user, payload)

    def _on_mailstatus(self, ref: TopicRef, payload: bytes) -> None:
        status = decode(payload, MailStatus)
        # NOTE: between an owner's death and the takeover no instance owns the
        # user, so a read state reported in that moment is not applied.
        if ref.user in self._owned:
            assert self._read_states is not None
            self._read_states.reported(ref.user, status)

    # Read state

    def _start_read_state_relay(self, stack: ExitStack) -> None:
        assert self.link is not None
        assert self.outbox is not None
        assert self._watchers is not None
        self._read_states = ReadStateRelay(
            self.topics,
            self.registry,
            self.link.publish,
            self._watchers.watcher,
            self.outbox.routed,
        )
        self._read_states.start()
        stack.callback(self._read_states.close)

    def _on_mailbox_flags(self, user: str, mail_id: str, seen: bool) -> None:
        if self._read_states is not None:
            self._read_states.mailbox_changed(user, mail_id, seen)


def _reads_off(record: TerminalRecord | None) -> bool:
    """Return True if a terminal is unknown, has no state yet or reads ``off``."""
    return record is None or record.state is None or record.state.state == "off"
