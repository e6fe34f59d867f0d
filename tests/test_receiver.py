"""Tests of the receiving end: store, queue for showing, acknowledge; on a real inbox file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailpush.agent.inbox import Inbox
from mailpush.agent.notify import Notifier, Shown
from mailpush.agent.receiver import Receiver
from mailpush.protocol.messages import Ack, MailSummary, Push, decode, encode

TOPIC = "mailpush/alice/laptop/inbox"
WAIT_S = 10.0


class RecordingNotifier(Notifier):
    """The logging notifier (no desktop), recording the id of each push it showed."""

    def __init__(self) -> None:
        super().__init__(desktop=False)
        self.shown: list[str] = []
        self.changed = threading.Condition()

    def show(self, push: Push) -> Shown:
        outcome = super().show(push)
        with self.changed:
            self.shown.append(push.id)
            self.changed.notify_all()
        return outcome

    def wait_shown(self, count: int) -> list[str]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.shown) >= count, WAIT_S)
            return list(self.shown)


class Acks:
    """The Ack payloads the receiver published, with what the inbox held at that moment."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox
        self.ids: list[str] = []
        self.stored_when_sent: list[bool] = []
        self.fail = False

    def __call__(self, payload: bytes) -> None:
        ack = decode(payload, Ack)
        self.ids.append(ack.id)
        self.stored_when_sent.append(any(push.id == ack.id for push in self.inbox.list()))
        if self.fail:
            raise RuntimeError("the broker connection is gone")


def make_push(push_id: str, mail_id: str, kind: str = "mail", seen: bool = False) -> Push:
    mail = MailSummary(id=mail_id, sender="Ann <ann@example.org>", subject="hello", seen=seen)
    return Push(id=push_id, kind=kind, mail=mail, delivered_to=["laptop"], ts=1_700_000_000.0)


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Receiver, Inbox, RecordingNotifier, Acks]]:
    inbox = Inbox(tmp_path / "inbox.sqlite3")
    notifier = RecordingNotifier()
    acks = Acks(inbox)
    receiver = Receiver(inbox, notifier, acks)
    receiver.start()
    yield receiver, inbox, notifier, acks
    receiver.stop()
    inbox.close()


def test_push_stored_before_ack(parts) -> None:
    receiver, inbox, notifier, acks = parts

    receiver.on_message(TOPIC, encode(make_push("p1", "m1")))

    assert acks.ids == ["p1"]
    assert acks.stored_when_sent == [True]
    assert notifier.wait_shown(1) == ["p1"]


def test_repeated_push_acked_not_shown(parts) -> None:
    receiver, inbox, notifier, acks = parts
    payload = encode(make_push("p1", "m1"))

    receiver.on_message(TOPIC, payload)
    receiver.on_message(TOPIC, payload)
    receiver.on_message(TOPIC, encode(make_push("p2", "m2")))

    assert acks.ids == ["p1", "p1", "p2"]
    assert notifier.wait_shown(2) == ["p1", "p2"]
    assert [push.id for push in inbox.list()] == ["p2", "p1"]


def test_status_push_acked_not_shown(parts) -> None:
    receiver, inbox, notifier, acks = parts
    receiver.on_message(TOPIC, encode(make_push("p1", "m1")))

    receiver.on_message(TOPIC, encode(make_push("s1", "m1", kind="status", seen=True)))
    receiver.on_message(TOPIC, encode(make_push("p2", "m2")))

    assert acks.ids == ["p1", "s1", "p2"]
    assert notifier.wait_shown(2) == ["p1", "p2"]
    assert inbox.get("m1").mail.seen is True


def test_shown_when_ack_fails(parts) -> None:
    receiver, inbox, notifier, acks = parts
    acks.fail = True

    # The Link logs what a handler raises; the push is stored and queued by then.
    with pytest.raises(RuntimeError, match="connection is gone"):
        receiver.on_message(TOPIC, encode(make_push("p1", "m1")))

    assert notifier.wait_shown(1) == ["p1"]
    assert inbox.get("m1") is not None


def test_invalid_payload_neither_stored_nor_acked(parts, caplog) -> None:
    receiver, inbox, notifier, acks = parts

    receiver.on_message(TOPIC, b'{"v": 1, "kind": "mail"}')
    receiver.on_message(TOPIC, encode(make_push("p1", "m1")))

    assert acks.ids == ["p1"]
    assert notifier.wait_shown(1) == ["p1"]
    assert [push.id for push in inbox.list()] == ["p1"]
    assert "dropped a message on " + TOPIC in caplog.text
