r"""Tests of read state in the mailbox watchers: set_seen and on_flags.

The Maildir tests use real files and rename them the way mail clients do. The
IMAP tests run against a real Dovecot and change ``\Seen`` over a second
imapclient connection, as another mail client would.
"""

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailpush.errors import ConfigError
from mailpush.server.mailbox import ImapConfig, ImapWatcher, MaildirWatcher, NewMail, StateStore
from mailpush.server.mailbox.base import RetryLater, SeenTracker
from tests.fixtures.dovecot import free_port

SEEN = b"\\Seen"


class Recorder:
    """The ``on_mail`` and ``on_flags`` callbacks of one watcher, recording what they get."""

    def __init__(self, defer: Callable[[NewMail], bool] = lambda mail: False) -> None:
        self.mails: list[NewMail] = []
        self.flags: list[tuple[str, bool]] = []
        self.defer = defer
        self.flags_error: Exception | None = None
        self._cond = threading.Condition()

    def on_mail(self, mail: NewMail) -> None:
        if self.defer(mail):
            raise RetryLater("test defers this mail")
        with self._cond:
            self.mails.append(mail)
            self._cond.notify_all()

    def on_flags(self, mail_id: str, seen: bool) -> None:
        with self._cond:
            self.flags.append((mail_id, seen))
            self._cond.notify_all()
        if self.flags_error is not None:
            raise self.flags_error

    def wait_mails(self, count: int, timeout: float = 15.0) -> list[str]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.mails) >= count, timeout)
            return [mail.mail_id for mail in self.mails]

    def wait_flags(self, expected: tuple[str, bool], timeout: float = 15.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: expected in self.flags, timeout)

    def flags_of(self, mail_id: str) -> list[bool]:
        with self._cond:
            return [seen for reported, seen in self.flags if reported == mail_id]


@contextlib.contextmanager
def running(watcher, recorder: Recorder, ready: Callable[[], bool]) -> Iterator[None]:
    """Run a watcher in a thread, as the service does, until the block ends."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            watcher.run(recorder.on_mail, stop, recorder.on_flags)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="test-flags-watcher")
    thread.start()
    try:
        assert wait_until(ready), "watcher stored no baseline"
        yield
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive(), "watcher did not stop within 20 s"
    assert errors == []


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state.sqlite3") as state:
        yield state


# Shared tracker


def test_tracker_first_observation_silent():
    reports: list[tuple[str, bool]] = []
    tracker = SeenTracker(lambda mail_id, seen: reports.append((mail_id, seen)), "test")

    tracker.observe("a", True)
    tracker.observe("a", True)
    tracker.observe("a", False)

    assert reports == [("a", False)]


def test_tracker_forgets_after_two_misses():
    tracker = SeenTracker(None, "test")
    tracker.observe("a", False)
    tracker.observe("b", False)

    tracker.retain({"b"})
    assert "a" in tracker
    tracker.retain({"a", "b"})
    tracker.retain({"b"})
    assert "a" in tracker
    tracker.retain({"b"})

    assert "a" not in tracker
    assert len(tracker) == 1


def test_tracker_logs_callback_error(caplog):
    def failing(mail_id: str, seen: bool) -> None:
        raise RuntimeError("terminal link down")

    tracker = SeenTracker(failing, "test")
    tracker.observe("a", False)

    with caplog.at_level(logging.ERROR, logger="mailpush.server.mailbox.base"):
        tracker.observe("a", True)

    assert "reporting the read state of mail a failed" in caplog.text


# Maildir


def make_maildir(root: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def deliver(maildir: Path, name: str, folder: str = "new", info: str | None = None) -> Path:
    """Write a mail in tmp/ and rename it into new/ or cur/, as an MDA or a client does."""
    temporary = maildir / "tmp" / name
    temporary.write_bytes(f"Subject: {name}\r\n\r\nbody\r\n".encode())
    target = maildir / folder / (name if info is None else f"{name}:2,{info}")
    os.rename(temporary, target)
    return target


def rename_flags(maildir: Path, name: str, info: str) -> Path:
    """Give a mail in new/ or cur/ new flags, as another mail client does."""
    [current] = [p for sub in ("new", "cur") for p in (maildir / sub).glob(f"{name}*")]
    target = maildir / "cur" / f"{name}:2,{info}"
    os.rename(current, target)
    return target


def files_of(maildir: Path, name: str) -> list[str]:
    return sorted(
        f"{sub}/{path.name}" for sub in ("new", "cur") for path in (maildir / sub).glob(f"{name}*")
    )


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    return make_maildir(tmp_path / "Maildir")


def maildir_ready(watcher: MaildirWatcher) -> Callable[[], bool]:
    return lambda: watcher.store.maildir_handled(watcher.mailbox_key) is not None


def test_maildir_set_seen_moves_new_to_cur(maildir, store):
    name = "1700000000.M1P1.host"
    original = deliver(maildir, name)
    body = original.read_bytes()

    assert MaildirWatcher(maildir, store).set_seen(name, True) is True

    assert files_of(maildir, name) == [f"cur/{name}:2,S"]
    assert (maildir / "cur" / f"{name}:2,S").read_bytes() == body


@pytest.mark.parametrize(
    ("info", "seen", "expected"),
    [
        ("FR", True, "FRS"),
        ("T", True, "ST"),
        ("Fa", True, "FSa"),  # a lower-case keyword sorts after S in ASCII
        ("", True, "S"),
        ("FRS", False, "FR"),
        ("DFSa", False, "DFa"),
        ("S", False, ""),
        ("RS", True, "RS"),
        ("R", False, "R"),
    ],
)
def test_maildir_set_seen_in_cur(maildir, store, info, seen, expected):
    name = "1700000001.M1P1.host"
    deliver(maildir, name, folder="cur", info=info)

    assert MaildirWatcher(maildir, store).set_seen(name, seen) is True

    assert files_of(maildir, name) == [f"cur/{name}:2,{expected}"]


def test_maildir_unseen_in_new_left_alone(maildir, store):
    name = "1700000002.M1P1.host"
    deliver(maildir, name)

    assert MaildirWatcher(maildir, store).set_seen(name, False) is True

    assert files_of(maildir, name) == [f"new/{name}"]


def test_maildir_set_seen_missing_name(maildir, store, caplog):
    deliver(maildir, "1700000003.M1P1.host")
    watcher = MaildirWatcher(maildir, store)

    with caplog.at_level(logging.WARNING, logger="mailpush.server.mailbox.maildir"):
        assert watcher.set_seen("1700000099.M1P1.host", True) is False

    assert "mail 1700000099.M1P1.host not found" in caplog.text
    assert len(caplog.records) == 1
    assert files_of(maildir, "1700000003.M1P1.host") == ["new/1700000003.M1P1.host"]


@pytest.mark.parametrize("mail_id", ["", "../new/x", "x:2,S", ".hidden"])
def test_maildir_set_seen_invalid_id(maildir, store, mail_id, caplog):
    with caplog.at_level(logging.WARNING, logger="mailpush.server.mailbox.maildir"):
        assert MaildirWatcher(maildir, store).set_seen(mail_id, True) is False

    assert "not a Maildir unique name" in caplog.text


def test_maildir_set_seen_prefix_not_matched(maildir, store):
    deliver(maildir, "1700000004.M1P1.host.longer")

    assert MaildirWatcher(maildir, store).set_seen("1700000004.M1P1.host", True) is False


def test_maildir_set_seen_file_renamed_meanwhile(maildir, store):
    name = "1700000005.M1P1.host"
    deliver(maildir, name)
    watcher = MaildirWatcher(maildir, store)
    find = watcher._find
    calls = []

    def find_then_client_renames(mail_id: str) -> Path | None:
        found = find(mail_id)
        calls.append(found)
        if len(calls) == 1:
            rename_flags(maildir, name, "R")  # another client replies, after the listing
        return found

    watcher._find = find_then_client_renames

    assert watcher.set_seen(name, True) is True

    assert len(calls) == 2
    assert files_of(maildir, name) == [f"cur/{name}:2,RS"]


def test_maildir_set_seen_file_deleted_meanwhile(maildir, store, caplog):
    name = "1700000006.M1P1.host"
    path = deliver(maildir, name)
    watcher = MaildirWatcher(maildir, store)
    find = watcher._find

    def find_then_client_deletes(mail_id: str) -> Path | None:
        found = find(mail_id)
        if path.exists():
            path.unlink()
        return found

    watcher._find = find_then_client_deletes

    with caplog.at_level(logging.WARNING, logger="mailpush.server.mailbox.maildir"):
        assert watcher.set_seen(name, True) is False

    assert "not found" in caplog.text


def test_maildir_read_elsewhere_reported_once(maildir, store):
    name = "1700000007.M1P1.host"
    recorder = Recorder()
    watcher = MaildirWatcher(maildir, store)

    with running(watcher, recorder, maildir_ready(watcher)):
        deliver(maildir, name)
        recorder.wait_mails(1)

        rename_flags(maildir, name, "S")
        assert recorder.wait_flags((name, True))
        time.sleep(1.0)  # several polls and listings, which must not report it again
        assert recorder.flags_of(name) == [True]

        rename_flags(maildir, name, "FR")
        assert recorder.wait_flags((name, False))
        time.sleep(0.5)

    assert recorder.flags_of(name) == [True, False]
    assert [mail.mail_id for mail in recorder.mails] == [name]


def test_maildir_unhandled_mail_not_reported(maildir, store):
    handled, deferred = "1700000008.M1P1.host", "1700000009.M1P1.host"
    recorder = Recorder(defer=lambda mail: mail.mail_id == deferred)
    watcher = MaildirWatcher(maildir, store, retry_s=0.2)

    with running(watcher, recorder, maildir_ready(watcher)):
        deliver(maildir, handled)
        recorder.wait_mails(1)
        deliver(maildir, deferred)

        rename_flags(maildir, deferred, "S")
        rename_flags(maildir, handled, "S")
        assert recorder.wait_flags((handled, True))
        time.sleep(1.0)  # several listings, which must not report the deferred mail

    assert recorder.flags_of(deferred) == []


def test_maildir_set_seen_while_running(maildir, store):
    names = [f"17000001{index:02d}.M1P1.host" for index in range(10)]
    recorder = Recorder()
    watcher = MaildirWatcher(maildir, store, poll_s=0.01)

    with running(watcher, recorder, maildir_ready(watcher)):
        for name in names:
            deliver(maildir, name)
        recorder.wait_mails(len(names))

        results = [watcher.set_seen(name, True) for name in names]
        deliver(maildir, "1700000200.M1P1.host")
        recorder.wait_mails(len(names) + 1)
        time.sleep(0.5)

    assert results == [True] * len(names)
    assert [files_of(maildir, name) for name in names] == [[f"cur/{n}:2,S"] for n in names]
    # The renames must not look like new mail.
    assert sorted(mail.mail_id for mail in recorder.mails) == [*names, "1700000200.M1P1.host"]
    # A report of the watcher's own change is allowed, but only the new state, once.
    assert all(recorder.flags_of(name) in ([], [True]) for name in names)


def test_maildir_failing_on_flags_keeps_watching(maildir, store, caplog):
    name = "1700000010.M1P1.host"
    recorder = Recorder()
    recorder.flags_error = RuntimeError("broker gone")
    watcher = MaildirWatcher(maildir, store)

    with caplog.at_level(logging.ERROR, logger="mailpush.server.mailbox.base"):
        with running(watcher, recorder, maildir_ready(watcher)):
            deliver(maildir, name)
            recorder.wait_mails(1)
            rename_flags(maildir, name, "S")
            assert recorder.wait_flags((name, True))
            deliver(maildir, "1700000011.M1P1.host")
            assert recorder.wait_mails(2) == [name, "1700000011.M1P1.host"]

    assert "broker gone" in caplog.text


# IMAP


def mail(subject: str) -> bytes:
    return f"From: a@example.org\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()


def config_for(server, **overrides) -> ImapConfig:
    settings = {
        "host": server.host,
        "port": server.port,
        "tls": False,
        "username": server.user,
        "password": server.password,
        "timeout_s": 5.0,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 2.0,
    }
    settings.update(overrides)
    return ImapConfig(**settings)


def imap_ready(watcher: ImapWatcher) -> Callable[[], bool]:
    return lambda: watcher.store.imap_position(watcher.mailbox_key) is not None


def flags_of(server, uid: int) -> tuple[bytes, ...]:
    """Read a mail's flags over another connection, read-only."""
    with server.client() as client:
        client.select_folder("INBOX", readonly=True)
        return client.get_flags([uid])[uid]


def change_seen(server, uid: int, seen: bool) -> None:
    """Set or clear \\Seen over another connection, as another mail client does."""
    with server.client() as client:
        client.select_folder("INBOX")
        if seen:
            client.add_flags([uid], [SEEN])
        else:
            client.remove_flags([uid], [SEEN])


@pytest.mark.integration
def test_imap_set_seen_sets_and_clears(dovecot, store):
    uid = dovecot.append(mail("to read"))
    mail_id = f"{dovecot.uidvalidity()}-{uid}"
    watcher = ImapWatcher(config_for(dovecot), store)

    assert watcher.set_seen(mail_id, True) is True
    assert SEEN in flags_of(dovecot, uid)

    assert watcher.set_seen(mail_id, False) is True
    assert SEEN not in flags_of(dovecot, uid)


@pytest.mark.integration
def test_imap_set_seen_keeps_other_flags(dovecot, store):
    uid = dovecot.append(mail("flagged"), flags=(b"\\Flagged", b"$Important"))
    watcher = ImapWatcher(config_for(dovecot), store)

    assert watcher.set_seen(f"{dovecot.uidvalidity()}-{uid}", True) is True

    assert set(flags_of(dovecot, uid)) == {b"\\Flagged", b"$Important", SEEN}


@pytest.mark.integration
def test_imap_set_seen_wrong_uidvalidity(dovecot, store, caplog):
    uid = dovecot.append(mail("renumbered"))
    watcher = ImapWatcher(config_for(dovecot), store)

    with caplog.at_level(logging.WARNING, logger="mailpush.server.mailbox.imap"):
        assert watcher.set_seen(f"{dovecot.uidvalidity() + 1}-{uid}", True) is False

    assert "UIDVALIDITY" in caplog.text
    assert len(caplog.records) == 1
    assert SEEN not in flags_of(dovecot, uid)


@pytest.mark.integration
def test_imap_set_seen_missing_uid(dovecot, store, caplog):
    dovecot.append(mail("present"))
    watcher = ImapWatcher(config_for(dovecot), store)

    with caplog.at_level(logging.WARNING, logger="mailpush.server.mailbox.imap"):
        assert watcher.set_seen(f"{dovecot.uidvalidity()}-42", True) is False

    assert "not found" in caplog.text
    assert len(caplog.records) == 1


@pytest.mark.parametrize("mail_id", ["", "12", "12-", "-3", "a-3", "12-0", "1700000000.M1P1.host"])
def test_imap_set_seen_invalid_id(store, mail_id, caplog):
    config = ImapConfig(host="127.0.0.1", port=free_port(), tls=False, username="u", password="p")

    with caplog.at_level(logging.WARNING, logger="mailpush.server.mailbox.imap"):
        assert ImapWatcher(config, store).set_seen(mail_id, True) is False

    assert "is not an IMAP mail id" in caplog.text


def test_imap_set_seen_server_unreachable(store, caplog):
    config = ImapConfig(
        host="127.0.0.1", port=free_port(), tls=False, username="u", password="p", timeout_s=2.0
    )

    with caplog.at_level(logging.WARNING, logger="mailpush.server.mailbox.imap"):
        assert ImapWatcher(config, store).set_seen("1-1", True) is False

    assert len(caplog.records) == 1
    assert "\n" not in caplog.records[0].getMessage()
    assert "failed" in caplog.text


@pytest.mark.integration
def test_imap_set_seen_wrong_password(dovecot, store, caplog):
    uid = dovecot.append(mail("locked"))
    watcher = ImapWatcher(config_for(dovecot, password="wrong-password"), store)

    with caplog.at_level(logging.WARNING, logger="mailpush.server.mailbox.imap"):
        assert watcher.set_seen(f"{dovecot.uidvalidity()}-{uid}", True) is False

    assert "rejected the login" in caplog.text
    assert "wrong-password" not in caplog.text
    assert SEEN not in flags_of(dovecot, uid)


@pytest.mark.integration
def test_imap_read_elsewhere_reported(dovecot, store):
    recorder = Recorder()
    watcher = ImapWatcher(config_for(dovecot), store)

    with running(watcher, recorder, imap_ready(watcher)):
        uid = dovecot.append(mail("read on the phone"))
        [mail_id] = recorder.wait_mails(1)

        changed = time.monotonic()
        change_seen(dovecot, uid, True)
        assert recorder.wait_flags((mail_id, True))
        delay = time.monotonic() - changed

        change_seen(dovecot, uid, False)
        assert recorder.wait_flags((mail_id, False))

    assert recorder.flags_of(mail_id) == [True, False]
    # flags_sync_s is 60 s, so only the IDLE report explains a fast report.
    # Dovecot 2.3 batches IDLE notifications for 0.5 s; 5 s leaves room for a busy machine.
    assert delay < 5.0


@pytest.mark.integration
def test_imap_unhandled_mail_not_reported(dovecot, store):
    deferring = threading.Event()
    deferring.set()
    recorder = Recorder(defer=lambda m: deferring.is_set() and b"deferred" in m.raw)
    watcher = ImapWatcher(config_for(dovecot, retry_s=0.2, flags_sync_s=0.2), store)

    with running(watcher, recorder, imap_ready(watcher)):
        handled_uid = dovecot.append(mail("handled"))
        [handled_id] = recorder.wait_mails(1)
        deferred_uid = dovecot.append(mail("deferred"))
        deferred_id = f"{dovecot.uidvalidity()}-{deferred_uid}"

        change_seen(dovecot, deferred_uid, True)
        change_seen(dovecot, handled_uid, True)
        assert recorder.wait_flags((handled_id, True))
        time.sleep(1.0)  # several read-state checks, which must not report the deferred mail
        assert recorder.flags_of(deferred_id) == []

        deferring.clear()
        assert recorder.wait_mails(2) == [handled_id, deferred_id]
        time.sleep(0.5)

    # Its first observation, as on_mail got it, is the seen state, not a change.
    assert recorder.mails[1].seen is True
    assert recorder.flags_of(deferred_id) == []


@pytest.mark.integration
def test_imap_set_seen_while_running(dovecot, store):
    recorder = Recorder()
    watcher = ImapWatcher(config_for(dovecot), store)

    with running(watcher, recorder, imap_ready(watcher)):
        uid = dovecot.append(mail("read on the laptop"))
        [mail_id] = recorder.wait_mails(1)

        assert watcher.set_seen(mail_id, True) is True
        assert SEEN in flags_of(dovecot, uid)

        later = dovecot.append(mail("still watching"))
        assert recorder.wait_mails(2)[1] == f"{dovecot.uidvalidity()}-{later}"
        # The watcher's own change may be reported, but as the new state only.
        assert wait_until(lambda: recorder.flags_of(mail_id) == [True], timeout=5.0)

    assert recorder.flags_of(mail_id) == [True]


@pytest.mark.integration
def test_imap_flag_check_leaves_mail_unseen(dovecot, store):
    recorder = Recorder()
    watcher = ImapWatcher(config_for(dovecot, flags_sync_s=0.1, idle_renew_s=0.3), store)

    with running(watcher, recorder, imap_ready(watcher)):
        uid = dovecot.append(mail("unread"))
        recorder.wait_mails(1)
        time.sleep(1.0)  # several read-state checks

    assert SEEN not in flags_of(dovecot, uid)
    assert recorder.flags == []


@pytest.mark.integration
def test_imap_change_during_outage_reported(dovecot, store):
    recorder = Recorder()
    watcher = ImapWatcher(config_for(dovecot), store)

    with running(watcher, recorder, imap_ready(watcher)):
        uid = dovecot.append(mail("read while cut off"))
        [mail_id] = recorder.wait_mails(1)

        dovecot.stop()
        dovecot.start()
        change_seen(dovecot, uid, True)
        # Either the reconnect's read-state check or an IDLE report finds it.
        assert recorder.wait_flags((mail_id, True))

    assert recorder.flags_of(mail_id) == [True]


@pytest.mark.integration
def test_imap_polling_reports_flags(dovecot_factory, store):
    server = dovecot_factory("imap_capability = IMAP4rev1 UIDPLUS\n")
    recorder = Recorder()
    watcher = ImapWatcher(config_for(server, poll_s=0.2, flags_sync_s=0.5), store)

    with running(watcher, recorder, imap_ready(watcher)):
        uid = server.append(mail("polled"))
        [mail_id] = recorder.wait_mails(1)
        change_seen(server, uid, True)
        assert recorder.wait_flags((mail_id, True))


@pytest.mark.integration
def test_imap_failing_on_flags_keeps_watching(dovecot, store, caplog):
    recorder = Recorder()
    recorder.flags_error = RuntimeError("broker gone")
    watcher = ImapWatcher(config_for(dovecot), store)

    with caplog.at_level(logging.ERROR, logger="mailpush.server.mailbox.base"):
        with running(watcher, recorder, imap_ready(watcher)):
            uid = dovecot.append(mail("first"))
            [mail_id] = recorder.wait_mails(1)
            change_seen(dovecot, uid, True)
            assert recorder.wait_flags((mail_id, True))
            later = dovecot.append(mail("second"))
            assert recorder.wait_mails(2)[1] == f"{dovecot.uidvalidity()}-{later}"

    assert "broker gone" in caplog.text


def test_imap_config_rejects_zero_flags_sync():
    with pytest.raises(ConfigError, match="flags_sync_s"):
        ImapConfig(host="127.0.0.1", username="u", password="p", flags_sync_s=0)
