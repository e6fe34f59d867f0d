"""Tests of the Maildir watcher against real files, with a thread like the service's."""

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailpush.errors import ConfigError
from mailpush.server.mailbox import MaildirWatcher, NewMail, StateStore


class Collector:
    """An ``on_mail`` callback that records mails and lets a test wait for them."""

    def __init__(self, fail_first: int = 0) -> None:
        self.mails: list[NewMail] = []
        self.times: list[float] = []
        self.fail_first = fail_first
        self.calls = 0
        self._cond = threading.Condition()

    def __call__(self, mail: NewMail) -> None:
        with self._cond:
            self.calls += 1
            if self.calls <= self.fail_first:
                raise RuntimeError("outbox is full")
            self.mails.append(mail)
            self.times.append(time.monotonic())
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[NewMail]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.mails) >= count, timeout)
            return list(self.mails)

    def ids(self) -> list[str]:
        with self._cond:
            return [mail.mail_id for mail in self.mails]


@contextlib.contextmanager
def running(watcher: MaildirWatcher, collector: Collector) -> Iterator[threading.Thread]:
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            watcher.run(collector, stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="test-maildir-watcher")
    thread.start()
    try:
        # Mail delivered once the baseline is stored is new mail, never baseline.
        assert wait_until(lambda: watcher.store.maildir_handled(watcher.mailbox_key) is not None)
        yield thread
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive(), "watcher did not stop within 10 s"
    assert errors == []


def make_maildir(root: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def deliver(maildir: Path, name: str, body: str = "hello") -> Path:
    """Deliver a mail the way an MDA does: write it in tmp/, rename it into new/."""
    raw = f"Subject: {name}\r\n\r\n{body}\r\n".encode()
    temporary = maildir / "tmp" / name
    temporary.write_bytes(raw)
    target = maildir / "new" / name
    os.rename(temporary, target)
    return target


def read_mail(maildir: Path, name: str, flags: str) -> Path:
    """Move a mail from new/ to cur/ with flags, as a mail client does when showing it."""
    target = maildir / "cur" / f"{name}:2,{flags}"
    os.rename(maildir / "new" / name, target)
    return target


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    return make_maildir(tmp_path / "Maildir")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state.sqlite3") as state:
        yield state


def test_new_file_found_once(maildir, store):
    collector = Collector()
    watcher = MaildirWatcher(maildir, store)

    with running(watcher, collector):
        deliver(maildir, "1700000000.M1P1.host", body="first body")
        mails = collector.wait_for(1)
        time.sleep(1.0)  # several polls, which must not deliver it again

    assert [mail.mail_id for mail in mails] == ["1700000000.M1P1.host"]
    assert collector.ids() == ["1700000000.M1P1.host"]
    assert mails[0].raw == b"Subject: 1700000000.M1P1.host\r\n\r\nfirst body\r\n"
    assert mails[0].seen is False
    assert mails[0].mailbox_key == f"maildir:{maildir}"


def test_new_file_pushed_within_a_second(maildir, store):
    collector = Collector()

    with running(MaildirWatcher(maildir, store), collector):
        written = time.monotonic()
        deliver(maildir, "1700000001.M1P1.host")
        collector.wait_for(1)

    assert collector.times, "mail never delivered"
    # 0.2 s polling gives about 0.2 s; the margin is for a busy machine.
    assert collector.times[0] - written < 1.0


def test_moved_to_cur_not_found_again(maildir, store):
    collector = Collector()

    with running(MaildirWatcher(maildir, store), collector):
        deliver(maildir, "1700000002.M1P1.host")
        collector.wait_for(1)
        read_mail(maildir, "1700000002.M1P1.host", "S")
        deliver(maildir, "1700000003.M1P1.host")
        collector.wait_for(2)
        time.sleep(1.0)

    assert collector.ids() == ["1700000002.M1P1.host", "1700000003.M1P1.host"]


def test_existing_mail_not_pushed(maildir, store):
    deliver(maildir, "1600000000.M1P1.host")
    deliver(maildir, "1600000001.M1P1.host")
    read_mail(maildir, "1600000001.M1P1.host", "RS")
    collector = Collector()

    with running(MaildirWatcher(maildir, store), collector):
        time.sleep(1.0)
        deliver(maildir, "1700000004.M1P1.host")
        collector.wait_for(1)
        time.sleep(0.5)

    assert collector.ids() == ["1700000004.M1P1.host"]


def test_restart_keeps_handled_names(maildir, tmp_path):
    path = tmp_path / "state.sqlite3"
    first = Collector()
    with StateStore(path) as store, running(MaildirWatcher(maildir, store), first):
        deliver(maildir, "1700000005.M1P1.host")
        first.wait_for(1)

    # Delivered while no watcher runs: must be caught up, and only it.
    deliver(maildir, "1700000006.M1P1.host")
    second = Collector()
    with StateStore(path) as store, running(MaildirWatcher(maildir, store), second):
        second.wait_for(1)
        time.sleep(1.0)

    assert first.ids() == ["1700000005.M1P1.host"]
    assert second.ids() == ["1700000006.M1P1.host"]


def test_seen_flag_from_cur(maildir, store):
    collector = Collector()

    with running(MaildirWatcher(maildir, store), collector):
        tmp_file = maildir / "tmp" / "1700000007.M1P1.host"
        tmp_file.write_bytes(b"Subject: read elsewhere\r\n\r\nx\r\n")
        # A client that stores its own sent or read mail writes straight into cur/.
        os.rename(tmp_file, maildir / "cur" / "1700000007.M1P1.host:2,FS")
        mails = collector.wait_for(1)

    assert [mail.mail_id for mail in mails] == ["1700000007.M1P1.host"]
    assert mails[0].seen is True


def test_file_vanishing_before_read(maildir, store):
    watcher = MaildirWatcher(maildir, store)
    store.set_maildir_baseline(watcher.mailbox_key, [])
    deliver(maildir, "1700000008.M1P1.host")
    collector = Collector()
    handled: set[str] = set()

    listed = watcher._scan()
    read_mail(maildir, "1700000008.M1P1.host", "S")  # the client moves it after the listing
    completed = watcher._deliver_new(listed, handled, collector, threading.Event())

    assert completed is True
    assert collector.ids() == []

    watcher._deliver_new(watcher._scan(), handled, collector, threading.Event())

    assert collector.ids() == ["1700000008.M1P1.host"]
    assert collector.mails[0].seen is True


def test_client_moving_files_concurrently(maildir, store):
    names = [f"17000001{index:02d}.M1P1.host" for index in range(40)]
    collector = Collector()

    with running(MaildirWatcher(maildir, store, poll_s=0.01), collector):
        for name in names:
            deliver(maildir, name)
            read_mail(maildir, name, "S")  # moved at once, racing the watcher's reads
        assert wait_until(lambda: len(collector.ids()) >= len(names))
        time.sleep(0.5)

    assert sorted(collector.ids()) == names


def test_failing_callback_retried(maildir, store):
    collector = Collector(fail_first=1)

    with running(MaildirWatcher(maildir, store, retry_s=0.2), collector):
        deliver(maildir, "1700000009.M1P1.host")
        collector.wait_for(1)
        time.sleep(0.5)

    assert collector.calls == 2
    assert collector.ids() == ["1700000009.M1P1.host"]


def test_dot_files_ignored(maildir, store):
    collector = Collector()

    with running(MaildirWatcher(maildir, store), collector):
        (maildir / "new" / ".hidden").write_bytes(b"Subject: no\r\n\r\n")
        deliver(maildir, "1700000010.M1P1.host")
        collector.wait_for(1)
        time.sleep(0.5)

    assert collector.ids() == ["1700000010.M1P1.host"]


def test_not_a_maildir_rejected(tmp_path, store):
    with pytest.raises(ConfigError, match="is not a Maildir"):
        MaildirWatcher(tmp_path / "missing", store)
