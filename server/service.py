"""The push service: mailbox watchers, terminal registry, policy, router and outbox.

One :class:`PushService` serves every configured user. Each mailbox has a
watcher thread, and MQTT messages (states, attributes, acks, policies, read
states) arrive on the link's network thread. The main thread resends
unacknowledged pushes and expires old ones.
"""

import logging
import queue
import threading
import time
import uuid
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from mailpush.errors import MailpushError, PayloadError
from mailpush.protocol.broker_url import BrokerAddress
from mailpush.protocol.droplog import DropLog
from mailpush.protocol.ids import service_client_id
from mailpush.protocol.link import Link, LinkOptions
from mailpush.protocol.messages import (
    Ack,
    DeviceAttributes,
    MailStatus,
    MailSummary,
    Push,
    UsageState,
    decode,
    encode,
)
from mailpush.protocol.topics import TopicKind, TopicRef, Topics
from mailpush.server.broker import EmbeddedBroker
from mailpush.server.config import ImapMailbox, MaildirMailbox, ServerConfig, UserSettings
from mailpush.server.mailbox.base import MailboxWatcher, NewMail, RetryLater
from mailpush.server.mailbox.imap import ImapWatcher
from mailpush.server.mailbox.maildir import MaildirWatcher
from mailpush.server.mailbox.state import StateStore
from mailpush.server.outbox import Outbox
from mailpush.server.policies import PolicyStore
from mailpush.server.registry import Registry
from mailpush.server.router import Router
from mailpush.server.summary import summarize

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


class PushService:
    """Runs the whole push service until :meth:`stop`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.topics = Topics(config.broker.topic_root)
        self.registry = Registry()
        self._users = {user.id: user for user in config.users}
        self._stop = threading.Event()
        self._drops = DropLog(log)
        self._watcher_errors: dict[str, MailpushError] = {}
        self._held: set[str] = set()
        self._connected_at = float("-inf")
        self._policies_heard: set[str] = set()
        self._policies_checked = True
        self._watchers: dict[str, MailboxWatcher] = {}
        self._read_state: queue.Queue[tuple[str, MailStatus] | None] = queue.Queue()
        # NOTE: the last read state reported per mail lives in memory only, so
        # after a restart a mailbox change may be reported to the terminals twice.
        self._seen: dict[tuple[str, str], bool] = {}
        self.policies = PolicyStore(config.state_dir / "policies")
        self.outbox: Outbox | None = None
        self.link: Link | None = None
        self.broker: EmbeddedBroker | None = None
        self.ready = threading.Event()

    def stop(self) -> None:
        """Ask the service to stop; safe from a signal handler."""
        self._stop.set()

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
            self._watchers = {user.id: _make_watcher(user, store) for user in self.config.users}

            address = self._start_broker(stack)
            service = self.config.service
            self.outbox = stack.enter_context(
                Outbox(state_dir / "outbox.sqlite3", service.resend_after_s, service.outbox_ttl_s)
            )
            self.policies.load(list(self._users))

            self._connect(stack, address)
            if self._stop.is_set():
                log.info("service stopped before it was ready")
                return
            self._start_read_state_worker(stack)
            router = Router(service, self.registry, self.policies, self._send_probe)
            threads = [self._start_watcher(stack, user, router) for user in self.config.users]
            log.info(
                "service %s ready: %d users, broker %s", service.instance, len(threads), address
            )
            self.ready.set()
            self._serve(threads)
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
        link = Link(
            LinkOptions(
                address=address,
                client_id=service_client_id(self.config.service.instance),
                username=broker.username,
                password=broker.password(),
                ca_file=broker.ca_file,
                protocol=protocol,
            ),
            on_connected=self._on_link_connected,
        )
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

    def _start_watcher(
        self, stack: ExitStack, user: UserSettings, router: Router
    ) -> threading.Thread:
        watcher = self._watchers[user.id]
        on_mail = partial(self._on_mail, user, router)
        on_flags = partial(self._on_mailbox_flags, user.id)
        thread = threading.Thread(
            target=self._watch,
            args=(user.id, watcher, on_mail, on_flags),
            name=f"mailbox-{user.id}",
            daemon=True,
        )
        thread.start()
        stack.callback(thread.join, 10)
        return thread

    def _watch(self, user: str, watcher: MailboxWatcher, on_mail, on_flags) -> None:
        try:
            watcher.run(on_mail, self._stop, on_flags)
        except MailpushError as exc:
            log.error("mailbox of %s stopped: %s", user, exc)
            self._watcher_errors[user] = exc
        except Exception:
            log.exception("mailbox watcher of %s failed", user)
            self._watcher_errors[user] = MailpushError(
                f"mailbox watcher of {user} failed; see the log"
            )

    # Main loop

    def _serve(self, watchers: list[threading.Thread]) -> None:
        next_expiry = 0.0
        while not self._stop.wait(TICK_S):
            if self.link is not None and self.link.fatal_error is not None:
                raise self.link.fatal_error
            if watchers and not any(thread.is_alive() for thread in watchers):
                self._stop.set()
                raise next(
                    iter(self._watcher_errors.values()),
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
            record = self.registry.terminals(due.user).get(due.terminal)
            if record is None or record.state is None or record.state.state == "off":
                continue
            self._send(due.user, due.terminal, due.push_id, due.payload)

    # Mail

    def _on_mail(self, user: UserSettings, router: Router, mail: NewMail) -> None:
        assert self.outbox is not None
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
        routed = router.route(user, summary)
        if not self.outbox.record_routing(user.id, mail.mail_id, routed.pushes):
            return
        for push in routed.pushes:
            self._send(user.id, push.terminal, push.push_id, push.payload)
        log.info("mail %s of %s: %s", mail.mail_id, user.id, routed.decision.reason)

    def _on_link_connected(self) -> None:
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
        for user in self._users:
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
        assert self.link is not None and self.outbox is not None
        self.link.publish(self.topics.inbox(user, terminal), payload)
        self.outbox.mark_sent(user, terminal, push_id)

    def _send_probe(self, user: str, terminal: str, payload: bytes) -> None:
        assert self.link is not None
        self.link.publish(self.topics.probe(user, terminal), payload)

    # MQTT messages (network thread)

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
        was_off = held is None or held.state is None or held.state.state == "off"
        if not self.registry.update_state(state):
            return
        if state.state == "off":
            log.info(
                "terminal %s of %s is off (%s)", ref.terminal, ref.user, state.reason or "no reason"
            )
        elif was_off:
            log.info("terminal %s of %s is %s", ref.terminal, ref.user, state.state)
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
        if self.outbox.ack(ref.user, ref.terminal, ack.id):
            log.debug("push %s acknowledged by %s of %s", ack.id, ref.terminal, ref.user)

    def _on_policy(self, ref: TopicRef, payload: bytes) -> None:
        self._policies_heard.add(ref.user)
        self.policies.update(ref.user, payload)

    def _on_mailstatus(self, ref: TopicRef, payload: bytes) -> None:
        status = decode(payload, MailStatus)
        self._read_state.put((ref.user, status))

    # Read state

    def _start_read_state_worker(self, stack: ExitStack) -> None:
        """Apply MailStatus messages on a thread of their own: IMAP round trips may be slow."""
        thread = threading.Thread(target=self._apply_read_states, name="read-state", daemon=True)
        thread.start()

        def stop_worker() -> None:
            self._read_state.put(None)
            thread.join(10)

        stack.callback(stop_worker)

    def _apply_read_states(self) -> None:
        while True:
            item = self._read_state.get()
            if item is None:
                return
            user, status = item
            try:
                self._apply_read_state(user, status)
            except Exception:
                log.exception("read state of mail %s of %s could not be applied", status.mail, user)

    def _apply_read_state(self, user: str, status: MailStatus) -> None:
        word = "read" if status.seen else "unread"
        watcher = self._watchers.get(user)
        if watcher is not None and watcher.set_seen(status.mail, status.seen):
            log.info("mail %s of %s marked %s by %s", status.mail, user, word, status.by)
        else:
            log.info(
                "mail %s of %s marked %s by %s; the mailbox could not be updated",
                status.mail,
                user,
                word,
                status.by,
            )
        self._seen[(user, status.mail)] = status.seen
        self._send_status(
            user, status.mail, status.seen, skip=status.by, reason=f"marked {word} on {status.by}"
        )

    def _on_mailbox_flags(self, user: str, mail_id: str, seen: bool) -> None:
        """Report a read-state change made in the mailbox (another mail client) to the terminals."""
        if self._seen.get((user, mail_id)) == seen:
            return
        assert self.outbox is not None
        if not self.outbox.routed(user, mail_id):
            return  # the terminals never got this mail, so there is nothing to update
        self._seen[(user, mail_id)] = seen
        word = "read" if seen else "unread"
        log.info("mail %s of %s marked %s in the mailbox", mail_id, user, word)
        self._send_status(user, mail_id, seen, skip=None, reason=f"marked {word} in the mailbox")

    def _send_status(
        self, user: str, mail_id: str, seen: bool, skip: str | None, reason: str
    ) -> None:
        assert self.link is not None
        push = Push(
            id=uuid.uuid4().hex,
            kind="status",
            mail=MailSummary(id=mail_id, seen=seen),
            reason=reason,
            ts=round(time.time(), 3),
        )
        payload = encode(push)
        for terminal in self.registry.terminals(user):
            if terminal != skip:
                self.link.publish(self.topics.inbox(user, terminal), payload)


def _make_watcher(user: UserSettings, store: StateStore) -> MailboxWatcher:
    mailbox = user.mailbox
    if isinstance(mailbox, MaildirMailbox):
        if mailbox.create:
            for sub in ("cur", "new", "tmp"):
                (mailbox.path / sub).mkdir(parents=True, exist_ok=True)
        return MaildirWatcher(mailbox.path, store)
    assert isinstance(mailbox, ImapMailbox)
    return ImapWatcher(mailbox.imap_config(), store)
