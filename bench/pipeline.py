"""The push service and an agent's receiver in this process, with timestamps at each step.

:class:`Pipeline` runs the real :class:`PushService` (its own MQTT link, outbox,
registry, router and mailbox watcher) in a thread, and the agent's receiving
end (a :class:`Link` with the agent's client id, the :class:`Receiver`, a real
:class:`Inbox` and a :class:`Notifier` that logs instead of using D-Bus) on the
same broker. It records three times per mail id, all from ``time.time()``:

- ``learned``: the service's ``_on_mail`` was called, which is when a watcher
  hands it a mail (after the IMAP FETCH, or after reading the Maildir file);
- ``sent``: the service handed the first push of the mail to its MQTT link,
  after the routing decision and the outbox writes;
- ``shown``: the notifier returned from showing the push.

The service's ``_on_mail`` and ``_publish`` are wrapped on the instance, in this process only.
No product code reads anything from the benchmark.
"""

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailpush.agent.inbox import Inbox
from mailpush.agent.notify import Notifier
from mailpush.agent.receiver import Receiver
from mailpush.protocol.broker_url import parse_broker_url
from mailpush.protocol.ids import agent_client_id
from mailpush.protocol.link import Link, LinkOptions
from mailpush.protocol.messages import Push, UsageState, decode, encode
from mailpush.protocol.topics import Topics
from mailpush.server.config import build_config
from mailpush.server.mailbox.base import NewMail
from mailpush.server.service import PushService

USER = "alice"
TERMINAL = "laptop"
READY_TIMEOUT_S = 30.0


class _RecordingNotifier(Notifier):
    """A notifier that logs each push (no desktop) and records when it was shown."""

    def __init__(self, shown: dict[str, float], arrived: threading.Condition) -> None:
        super().__init__(desktop=False)
        self._shown = shown
        self._arrived = arrived

    def show(self, push: Any) -> Any:
        outcome = super().show(push)
        with self._arrived:
            self._shown[push.mail.id] = time.time()
            self._arrived.notify_all()
        return outcome


@dataclass
class Pipeline:
    """A running service and receiver; use :func:`running_pipeline` to get one.

    Attributes:
        service: the push service.
        learned: mail id to the time the service was handed the mail.
        sent: mail id to the time the service published its first push.
        shown: mail id to the time the receiver's notifier showed it.
    """

    service: PushService
    learned: dict[str, float] = field(default_factory=dict)
    sent: dict[str, float] = field(default_factory=dict)
    shown: dict[str, float] = field(default_factory=dict)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def route_now(self, mail_id: str, raw: bytes) -> None:
        """Hand one mail to the service directly, the way a mailbox watcher does."""
        user = self.service.config.users[0]
        mail = NewMail(mailbox_key="bench:direct", mail_id=mail_id, raw=raw, seen=False)
        self.service._on_mail(user, mail)

    def collect_sent(self) -> None:
        """Fill :attr:`sent` from the pushes published so far."""

    def wait_shown(self, mail_id: str, timeout: float = 30.0) -> float:
        """Return the time ``mail_id`` was shown; raise TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while mail_id not in self.shown:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"mail {mail_id} was not shown within {timeout:.0f} s")
                self.arrived.wait(remaining)
            return self.shown[mail_id]


@contextlib.contextmanager
def running_pipeline(broker_url: str, workdir: Path, mailbox: dict[str, Any]) -> Iterator[Pipeline]:
    """Start the service for one user with ``mailbox`` and a receiver for one terminal.

    ``mailbox`` is the user's ``mailbox`` table of the service config. The
    terminal reports ``active`` once, and the service counts a state as fresh
    for a day, so the router never waits for a probe.
    """
    # The notifier logs every push at INFO; a thousand lines would drown the tables.
    logging.getLogger("mailpush").setLevel(logging.WARNING)
    config = build_config(
        {
            "broker": {"url": broker_url},
            "service": {"state_dir": str(workdir / "service"), "stale_after_s": 86400.0},
            "users": [{"id": USER, "report_mode": "timed", "mailbox": mailbox}],
        }
    )
    service = PushService(config)
    pipeline = Pipeline(service)
    original = service._on_mail

    def timed_on_mail(user: Any, mail: NewMail) -> None:
        pipeline.learned.setdefault(mail.mail_id, time.time())
        original(user, mail)

    original_publish = service._publish
    published: list[tuple[float, bytes]] = []

    def timed_publish(user: str, terminal: str, payload: bytes) -> None:
        # Decoding here would add to the time measured, so it waits for the lookup.
        published.append((time.time(), payload))
        original_publish(user, terminal, payload)

    def sent_lookup() -> None:
        while published:
            when, payload = published.pop(0)
            pipeline.sent.setdefault(decode(payload, Push).mail.id, when)

    service._on_mail = timed_on_mail  # type: ignore[method-assign]
    service._publish = timed_publish  # type: ignore[method-assign]
    pipeline.collect_sent = sent_lookup

    with contextlib.ExitStack() as stack:
        thread = threading.Thread(target=service.run, name="bench-service", daemon=True)
        thread.start()
        stack.callback(thread.join, 15)
        stack.callback(service.stop)
        if not service.ready.wait(READY_TIMEOUT_S):
            raise RuntimeError(f"the push service was not ready within {READY_TIMEOUT_S:.0f} s")

        _start_receiver(stack, broker_url, workdir, pipeline)
        _wait_registered(service)
        yield pipeline


def _start_receiver(
    stack: contextlib.ExitStack, broker_url: str, workdir: Path, pipeline: Pipeline
) -> None:
    topics = Topics()
    link = Link(LinkOptions(parse_broker_url(broker_url), agent_client_id(USER, TERMINAL)))
    inbox = Inbox(workdir / "inbox.sqlite3")
    stack.callback(inbox.close)
    notifier = _RecordingNotifier(pipeline.shown, pipeline.arrived)
    ack_topic = topics.ack(USER, TERMINAL)
    receiver = Receiver(inbox, notifier, lambda payload: link.publish(ack_topic, payload))
    receiver.start()
    stack.callback(receiver.stop)
    link.subscribe(topics.inbox(USER, TERMINAL), receiver.on_message)
    link.start()
    stack.callback(link.stop)
    if not link.wait_connected(READY_TIMEOUT_S) or not link.wait_subscribed(READY_TIMEOUT_S):
        raise RuntimeError("the receiver's MQTT link did not connect and subscribe")

    now = time.time()
    state = UsageState(
        user=USER, terminal=TERMINAL, state="active", since=now, ts=now, seq=1, confidence=0.9
    )
    link.publish_retained(topics.state(USER, TERMINAL), encode(state))


def _wait_registered(service: PushService) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not service.registry.terminals(USER):
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not register the receiver's terminal")
        time.sleep(0.01)
