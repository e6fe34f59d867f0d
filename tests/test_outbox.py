"""Tests of the durable push outbox on a real SQLite file."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from mailpush.errors import MailpushError
from mailpush.server.outbox import DuePush, Outbox, QueuedPush


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def outbox(tmp_path: Path, clock: FakeClock):
    box = Outbox(tmp_path / "outbox.sqlite3", resend_after_s=30, ttl_s=7 * 86400, clock=clock)
    yield box
    box.close()


def test_add_then_pending(outbox: Outbox) -> None:
    assert outbox.add("ann", "laptop", "p1", b"one", mail_id="m1")
    assert outbox.add("ann", "laptop", "p2", b"two", mail_id="m2")
    assert outbox.add("ann", "pi", "p3", b"three", mail_id="m1", kind="prompt")

    assert outbox.pending("ann", "laptop") == [("p1", b"one"), ("p2", b"two")]
    assert outbox.pending("ann", "pi") == [("p3", b"three")]
    assert outbox.pending("bob", "laptop") == []


def test_add_dedupes_mail_per_terminal(outbox: Outbox) -> None:
    assert outbox.add("ann", "laptop", "p1", b"one", mail_id="m1")

    assert not outbox.add("ann", "laptop", "p2", b"again", mail_id="m1")
    assert not outbox.add("ann", "laptop", "p1", b"same id", mail_id="m9")
    assert outbox.add("ann", "laptop", "p3", b"prompt", mail_id="m1", kind="prompt")
    assert outbox.add("bob", "laptop", "p1", b"other user", mail_id="m1")
    assert outbox.pending("ann", "laptop") == [("p1", b"one"), ("p3", b"prompt")]


def test_add_dedupes_after_ack(outbox: Outbox) -> None:
    outbox.add("ann", "laptop", "p1", b"one", mail_id="m1")
    assert outbox.ack("ann", "laptop", "p1")

    assert not outbox.add("ann", "laptop", "p2", b"again", mail_id="m1")
    assert outbox.pending("ann", "laptop") == []


def test_status_kind_rejected(outbox: Outbox) -> None:
    with pytest.raises(ValueError, match="'status' is not queued"):
        outbox.add("ann", "laptop", "p1", b"x", mail_id="m1", kind="status")


def test_ack_once(outbox: Outbox) -> None:
    outbox.add("ann", "laptop", "p1", b"one", mail_id="m1")

    assert not outbox.ack("ann", "pi", "p1")
    assert not outbox.ack("bob", "laptop", "p1")
    assert outbox.ack("ann", "laptop", "p1")
    assert not outbox.ack("ann", "laptop", "p1")
    assert not outbox.ack("ann", "laptop", "unknown")


def test_due_follows_resend_interval(outbox: Outbox, clock: FakeClock) -> None:
    outbox.add("ann", "laptop", "p1", b"one", mail_id="m1")
    assert outbox.due() == [DuePush("ann", "laptop", "p1", b"one")]

    assert outbox.mark_sent("ann", "laptop", "p1")
    clock.now += 29
    assert outbox.due() == []
    clock.now += 1
    assert outbox.due() == [DuePush("ann", "laptop", "p1", b"one")]
    assert outbox.due(now=clock.now - 5) == []

    outbox.ack("ann", "laptop", "p1")
    assert outbox.due() == []
    assert not outbox.mark_sent("ann", "laptop", "p1")


def test_expire_logs_ids_not_payload(outbox, clock, caplog) -> None:
    outbox.add("ann", "laptop", "p-old", b"SECRET SUBJECT", mail_id="m1")
    outbox.mark_sent("ann", "laptop", "p-old")
    outbox.mark_sent("ann", "laptop", "p-old")
    outbox.add("ann", "laptop", "p-acked", b"acked", mail_id="m2")
    outbox.ack("ann", "laptop", "p-acked")
    clock.now += 86400
    outbox.add("ann", "laptop", "p-new", b"new", mail_id="m3")
    clock.now += 6 * 86400 + 1

    with caplog.at_level(logging.INFO, logger="mailpush.server.outbox"):
        assert outbox.expire() == 1

    assert outbox.pending("ann", "laptop") == [("p-new", b"new")]
    assert outbox.counts() == {"unacknowledged": 1, "acknowledged": 0, "routed": 0}
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1
    assert "p-old" in lines[0]
    assert "ann/laptop" in lines[0]
    assert "m1" in lines[0]
    assert "after 2 sends" in lines[0]
    assert "SECRET" not in caplog.text


def test_expire_keeps_young_pushes(outbox: Outbox, clock: FakeClock) -> None:
    outbox.add("ann", "laptop", "p1", b"one", mail_id="m1")
    clock.now += 7 * 86400 - 1

    assert outbox.expire() == 0
    assert outbox.pending("ann", "laptop") == [("p1", b"one")]


def test_record_routing_once(outbox: Outbox) -> None:
    pushes = [
        QueuedPush("laptop", "p1", "mail", b"mail"),
        ("pi", "p2", "prompt", b"prompt"),
    ]
    assert not outbox.routed("ann", "m1")

    assert outbox.record_routing("ann", "m1", pushes)
    assert outbox.routed("ann", "m1")
    assert not outbox.routed("bob", "m1")
    assert not outbox.record_routing("ann", "m1", [QueuedPush("desk", "p3", "mail", b"x")])
    assert outbox.pending("ann", "laptop") == [("p1", b"mail")]
    assert outbox.pending("ann", "pi") == [("p2", b"prompt")]
    assert outbox.pending("ann", "desk") == []


def test_record_routing_sending_marks_sent(outbox: Outbox, clock: FakeClock) -> None:
    assert outbox.record_routing(
        "ann", "m1", [QueuedPush("laptop", "p1", "mail", b"one")], sending=True
    )

    assert outbox.due() == []  # sent at routing time, so not due at once
    assert outbox.pending("ann", "laptop") == [("p1", b"one")]
    clock.now += 30
    assert outbox.due() == [DuePush("ann", "laptop", "p1", b"one")]


def test_record_routing_without_pushes(outbox: Outbox) -> None:
    assert outbox.record_routing("ann", "m1", [])
    assert outbox.routed("ann", "m1")
    assert outbox.counts()["unacknowledged"] == 0


def test_record_routing_is_atomic(outbox: Outbox) -> None:
    bad = [QueuedPush("laptop", "p1", "mail", b"ok"), QueuedPush("pi", "p2", "status", b"no")]
    with pytest.raises(ValueError):
        outbox.record_routing("ann", "m1", bad)
    assert not outbox.routed("ann", "m1")

    # A failure inside the transaction rolls the routing record back too.
    not_bytes = [QueuedPush("laptop", "p1", "mail", b"ok"), QueuedPush("pi", "p2", "mail", None)]
    with pytest.raises(TypeError):
        outbox.record_routing("ann", "m1", not_bytes)
    assert not outbox.routed("ann", "m1")
    assert outbox.pending("ann", "laptop") == []


def test_routing_record_outlives_pushes(outbox: Outbox, clock: FakeClock) -> None:
    outbox.record_routing("ann", "m1", [QueuedPush("laptop", "p1", "mail", b"x")])
    clock.now += 8 * 86400
    outbox.expire()
    assert outbox.routed("ann", "m1")

    clock.now += 30 * 86400
    outbox.expire()
    assert not outbox.routed("ann", "m1")


def test_reopen_keeps_everything(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path, clock=clock) as first:
        first.record_routing("ann", "m1", [QueuedPush("laptop", "p1", "mail", b"\x00\xffbytes")])
        first.add("ann", "pi", "p2", b"two", mail_id="m2")
        first.mark_sent("ann", "pi", "p2")
        first.ack("ann", "pi", "p2")

    with Outbox(path, clock=clock) as second:
        assert second.routed("ann", "m1")
        assert second.pending("ann", "laptop") == [("p1", b"\x00\xffbytes")]
        assert second.pending("ann", "pi") == []
        assert not second.add("ann", "pi", "p3", b"again", mail_id="m2")


def test_file_mode_0600(tmp_path: Path, clock: FakeClock) -> None:
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "state" / "outbox.sqlite3"
        with Outbox(path, clock=clock) as outbox:
            outbox.add("ann", "laptop", "p1", b"x", mail_id="m1")
            modes = {
                candidate.name: stat.S_IMODE(candidate.stat().st_mode)
                for candidate in path.parent.iterdir()
            }
    finally:
        os.umask(old_umask)

    assert modes["outbox.sqlite3"] == 0o600
    assert modes.get("outbox.sqlite3-wal", 0o600) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_sigkill_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    script = textwrap.dedent(
        f"""
        import os, signal
        from mailpush.server.outbox import Outbox, QueuedPush
        outbox = Outbox({str(path)!r})
        for n in range(50):
            outbox.record_routing("ann", f"m{{n}}", [QueuedPush("laptop", f"p{{n}}", "mail", b"x")])
        outbox.ack("ann", "laptop", "p0")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    assert result.returncode == -signal.SIGKILL

    with Outbox(path) as outbox:
        pending = outbox.pending("ann", "laptop")
        assert len(pending) == 49
        assert pending[0][0] == "p1"
        assert outbox.routed("ann", "m49")


def test_reads_while_another_connection_writes(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path, clock=clock) as outbox:
        outbox.record_routing("ann", "m1", [QueuedPush("laptop", "p1", "mail", b"one")])
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        try:
            # A read that took the write lock would wait out the busy timeout and fail.
            assert outbox.routed("ann", "m1")
            assert outbox.pending("ann", "laptop") == [("p1", b"one")]
            assert outbox.due() == [DuePush("ann", "laptop", "p1", b"one")]
            assert outbox.counts() == {"unacknowledged": 1, "acknowledged": 0, "routed": 1}
        finally:
            writer.rollback()
            writer.close()


def test_two_threads_share_outbox(outbox: Outbox) -> None:
    errors: list[BaseException] = []

    def route(worker: int) -> None:
        try:
            for n in range(200):
                mail_id = f"m{n}"
                pushes = [QueuedPush("laptop", f"w{worker}-{n}", "mail", b"x")]
                outbox.record_routing("ann", mail_id, pushes)
                outbox.due()
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    threads = [
        threading.Thread(target=route, args=(worker,), name=f"router-{worker}")
        for worker in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []
    # Each mail was routed by exactly one of the two threads.
    assert outbox.counts() == {"unacknowledged": 200, "acknowledged": 0, "routed": 200}
    assert len(outbox.pending("ann", "laptop")) == 200


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)

    with pytest.raises(MailpushError) as caught:
        Outbox(path)

    message = str(caught.value)
    assert str(path) in message
    assert "move it aside" in message
    assert "\n" not in message


def test_unwritable_folder(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/proc/mailpush-outbox/outbox.sqlite3")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "outbox.sqlite3"

    with pytest.raises(MailpushError, match="outbox: cannot create"):
        Outbox(target)
