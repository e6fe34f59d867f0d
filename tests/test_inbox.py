"""Tests of the agent's local push store."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import platformdirs
import pytest

from mailpush.agent.inbox import Inbox, default_path
from mailpush.errors import MailpushError
from mailpush.protocol.messages import MailSummary, Push


def make_push(push_id: str, mail_id: str, kind: str = "mail", seen: bool = False, **mail) -> Push:
    summary = MailSummary(
        id=mail_id,
        sender=mail.get("sender", "Ann <ann@example.org>"),
        subject=mail.get("subject", f"subject of {mail_id}"),
        snippet=mail.get("snippet", "Hello"),
        seen=seen,
    )
    return Push(id=push_id, kind=kind, mail=summary, delivered_to=["laptop"], ts=1_700_000_000.0)


@pytest.fixture
def inbox(tmp_path: Path):
    box = Inbox(tmp_path / "inbox.sqlite3")
    yield box
    box.close()


def ids(pushes: list[Push]) -> list[str]:
    return [push.id for push in pushes]


def test_store_and_list_newest_first(inbox: Inbox) -> None:
    assert inbox.store(make_push("p1", "m1"))
    assert inbox.store(make_push("p2", "m2", kind="prompt"))
    assert inbox.store(make_push("p3", "m3"))

    assert ids(inbox.list()) == ["p3", "p2", "p1"]
    assert ids(inbox.list(limit=2)) == ["p3", "p2"]
    assert inbox.list(limit=0) == []
    assert inbox.list()[0] == make_push("p3", "m3")


def test_store_dedupes_push_id(inbox: Inbox) -> None:
    assert inbox.store(make_push("p1", "m1"))
    assert not inbox.store(make_push("p1", "m1"))
    assert not inbox.store(make_push("p1", "other", subject="changed"))

    assert ids(inbox.list()) == ["p1"]
    assert inbox.list()[0].mail.subject == "subject of m1"


def test_dedupe_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite3"
    with Inbox(path) as first:
        first.store(make_push("p1", "m1"))
        first.store(make_push("s1", "m1", kind="status", seen=True))

    with Inbox(path) as second:
        assert not second.store(make_push("p1", "m1"))
        assert not second.store(make_push("s1", "m1", kind="status", seen=True))
        assert second.store(make_push("p2", "m2"))
        assert ids(second.list()) == ["p2", "p1"]
        assert second.get("m1").mail.seen is True


def test_sigkill_loses_no_stored_push(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite3"
    # The kill comes right after the last store, before any background checkpoint.
    script = textwrap.dedent(
        f"""
        import os, signal
        from mailpush.agent.inbox import Inbox
        from mailpush.protocol.messages import MailSummary, Push
        inbox = Inbox({str(path)!r})
        for n in range(50):
            mail = MailSummary(id=f"m{{n}}", subject=f"subject of m{{n}}")
            inbox.store(Push(id=f"p{{n}}", kind="mail", mail=mail, ts=1_700_000_000.0))
        inbox.mark_read("m0")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    assert result.returncode == -signal.SIGKILL

    with Inbox(path) as inbox:
        stored = inbox.list()
        assert len(stored) == 50
        assert stored[0].id == "p49"
        assert inbox.get("m0").mail.seen is True
        assert not inbox.store(make_push("p49", "m49"))


def test_reads_while_another_connection_writes(inbox: Inbox) -> None:
    inbox.store(make_push("p1", "m1"))
    writer = sqlite3.connect(inbox.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        # The agent's CLI lists the inbox while the agent stores pushes.
        assert ids(inbox.list()) == ["p1"]
        assert inbox.get("m1") == make_push("p1", "m1")
    finally:
        writer.rollback()
        writer.close()


def test_status_updates_seen_without_entry(inbox: Inbox) -> None:
    inbox.store(make_push("p1", "m1"))
    inbox.store(make_push("p2", "m1", kind="prompt"))

    assert inbox.store(make_push("s1", "m1", kind="status", seen=True))

    listed = inbox.list()
    assert ids(listed) == ["p2", "p1"]
    assert [push.mail.seen for push in listed] == [True, True]

    assert inbox.store(make_push("s2", "m1", kind="status", seen=False))
    assert inbox.get("m1").mail.seen is False


def test_status_for_unknown_mail(inbox: Inbox) -> None:
    assert inbox.store(make_push("s1", "m9", kind="status", seen=True))
    assert inbox.list() == []
    assert inbox.get("m9") is None


def test_get_returns_newest_for_mail(inbox: Inbox) -> None:
    inbox.store(make_push("p1", "m1", kind="prompt"))
    inbox.store(make_push("p2", "m2"))
    inbox.store(make_push("p3", "m1"))

    assert inbox.get("m1").id == "p3"
    assert inbox.get("m2").id == "p2"
    assert inbox.get("absent") is None


def test_mark_read(inbox: Inbox) -> None:
    inbox.store(make_push("p1", "m1"))

    assert inbox.mark_read("m1")
    assert inbox.get("m1").mail.seen is True
    assert not inbox.mark_read("m1")
    assert inbox.mark_read("m1", seen=False)
    assert inbox.get("m1").mail.seen is False
    assert not inbox.mark_read("absent")


def test_created_0600_under_open_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        path = tmp_path / "data" / "inbox.sqlite3"
        with Inbox(path) as inbox:
            inbox.store(make_push("p1", "m1"))
            modes = {
                entry.name: stat.S_IMODE(entry.stat().st_mode) for entry in path.parent.iterdir()
            }
    finally:
        os.umask(old_umask)

    assert modes["inbox.sqlite3"] == 0o600
    assert modes.get("inbox.sqlite3-wal", 0o600) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_readable_file_fixed_with_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "inbox.sqlite3"
    with Inbox(path) as inbox:
        inbox.store(make_push("p1", "m1"))
    path.chmod(0o644)

    with caplog.at_level(logging.WARNING, logger="mailpush.agent.inbox"), Inbox(path) as inbox:
        assert ids(inbox.list()) == ["p1"]

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "readable by other users (mode 0644)" in caplog.text


def test_unfixable_mode_names_chmod(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "inbox.sqlite3"
    Inbox(path).close()
    path.chmod(0o640)

    def refuse(self, mode):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "chmod", refuse)
    with pytest.raises(MailpushError) as caught:
        Inbox(path)

    message = str(caught.value)
    assert f"chmod 600 {path}" in message
    assert "mode 0640" in message
    assert "\n" not in message


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite3"
    path.write_bytes(b"\x00garbage" * 500)
    path.chmod(0o600)

    with pytest.raises(MailpushError, match="is not a usable inbox database"):
        Inbox(path)


def test_default_path_in_user_data_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))

    expected = Path(platformdirs.user_data_dir("mailpush")) / "inbox.sqlite3"
    assert default_path() == expected
    with Inbox() as inbox:
        assert inbox.path == expected
        assert expected.exists()
