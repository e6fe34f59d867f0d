"""The push service: mailbox watchers, terminal registry, policy, router and outbox.

One :class:`PushService` serves every configured user. Each mailbox has a
watcher thread; MQTT messages (states, attributes, acks, policies) arrive on
the link's network thread; the main thread resends unacknowledged pushes and
expires old ones.
"""

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
from mailpush.protocol.link import Link, LinkOptions
from mailpush.protocol.messages import Ack, DeviceAttributes, UsageState, decode
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
            address = self._start_broker(stack)
            state_dir = self.config.state_dir
            state_dir.mkdir(parents=True, exist_ok=True)
            service = self.config.service
            self.outbox = stack.enter_context(
                Outbox(state_dir / "outbox.sqlite3", service.resend_after_s, service.outbox_ttl_s)
            )
            store = StateStore(state_dir / "mailboxes.sqlite3")
            stack.callback(store.close)
            self.policies.load(list(self._users))

            self._connect(stack, address)
            router = Router(service, self.registry, self.policies, self._send_probe)
            watchers = [
                self._start_watcher(stack, user, store, router) for user in self.config.users
            ]
            log.info(
                "service %s ready: %d users, broker %s", service.instance, len(watchers), address
            )
            self.ready.set()
            self._serve(watchers)
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
            )
        )
        for kind, handler in (
            (TopicKind.STATE, self._on_state),
            (TopicKind.ATTRIBUTES, self._on_attributes),
            (TopicKind.ACK, self._on_ack),
            (TopicKind.POLICY, self._on_policy),
        ):
            link.subscribe(self.topics.all_users(kind), partial(self._dispatch, kind, handler))
        link.start()
        stack.callback(link.stop)
        self.link = link

        if not link.wait_connected(CONNECT_TIMEOUT_S):
            if link.fatal_error is not None:
                raise link.fatal_error
            log.warning("broker %s not reachable yet; mail is held until it is", address)
            return
        # The retained states follow the subscription acknowledgements; give
        # them a moment to arrive so the first mail is routed with them.
        if link.wait_subscribed(CONNECT_TIMEOUT_S):
            time.sleep(RETAINED_GRACE_S)

    def _start_watcher(
        self, stack: ExitStack, user: UserSettings, store: StateStore, router: Router
    ) -> threading.Thread:
        watcher = _make_watcher(user, store)
        on_mail = partial(self._on_mail, user, router)
        thread = threading.Thread(
            target=self._watch,
            args=(user.id, watcher, on_mail),
            name=f"mailbox-{user.id}",
            daemon=True,
        )
        thread.start()
        stack.callback(thread.join, 10)
        return thread

    def _watch(self, user: str, watcher: MailboxWatcher, on_mail) -> None:
        try:
            watcher.run(on_mail, self._stop)
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

        summary = summarize(mail.raw, mail.mail_id, mail.seen)
        routed = router.route(user, summary)
        if not self.outbox.record_routing(user.id, mail.mail_id, routed.pushes):
            return
        for push in routed.pushes:
            self._send(user.id, push.terminal, push.push_id, push.payload)
        log.info("mail %s of %s: %s", mail.mail_id, user.id, routed.decision.reason)

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
        self.policies.update(ref.user, payload)


def _make_watcher(user: UserSettings, store: StateStore) -> MailboxWatcher:
    mailbox = user.mailbox
    if isinstance(mailbox, MaildirMailbox):
        if mailbox.create:
            for sub in ("cur", "new", "tmp"):
                (mailbox.path / sub).mkdir(parents=True, exist_ok=True)
        return MaildirWatcher(mailbox.path, store)
    assert isinstance(mailbox, ImapMailbox)
    return ImapWatcher(mailbox.imap_config(), store)
