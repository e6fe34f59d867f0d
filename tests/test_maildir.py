"""Tests of the Maildir watcher against real files, with a thread like the service's."""

import contextlib
import ctypes
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailpush.errors import ConfigError
from mailpush.server.mailbox import MaildirWatcher, NewMail, StateStore, inotify
from mailpush.server.mailbox import maildir as maildir_module
from mailpush.server.mailbox.base import FlagCallback

# Longer than any wait in these tests, so only an inotify event can wake the watcher in time.
SLOW_POLL_S = 30.0


class Collector:
    """An ``on_mail`` callback that records mails and lets a test wait for them."""

    def __init__(self, fail_first: int = 0, hold_first: threading.Event | None = None) -> None:
        self.mails: list[NewMail] = []
        self.times: list[float] = []
        self.fail_first = fail_first
        # While this event is not set, the first call blocks, as a busy outbox would.
        self.hold_first = hold_first
        self.calls = 0
        self._cond = threading.Condition()

    def __call__(self, mail: NewMail) -> None:
        with self._cond:
            self.calls += 1
            calls = self.calls
        if calls == 1 and self.hold_first is not None:
            assert self.hold_first.wait(30), "the test never released the first mail"
        with self._cond:
            if calls <= self.fail_first:
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
def running(
    watcher: MaildirWatcher, collector: Collector, on_flags: FlagCallback | None = None
) -> Iterator[threading.Thread]:
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            watcher.run(collector, stop, on_flags)
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
    # inotify wakes the watcher at once; the margin is for a busy machine.
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


# ---------------------------------------------------------------- inotify


def count_listings(watcher: MaildirWatcher) -> Callable[[], int]:
    """Count the watcher's completed listings of new/ and cur/, the baseline included."""
    done: list[int] = []
    original = watcher._scan

    def listing() -> dict | None:
        result = original()
        done.append(1)
        return result

    watcher._scan = listing
    return lambda: len(done)


def inotify_descriptors() -> int:
    """Return how many inotify instances this process has open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
    return count


def slow_watcher(maildir: Path, store: StateStore, **options: float) -> MaildirWatcher:
    """Return a watcher whose polls and full listings all wait ``SLOW_POLL_S``."""
    settings = {"poll_s": SLOW_POLL_S, "safety_poll_s": SLOW_POLL_S, "rescan_s": SLOW_POLL_S}
    return MaildirWatcher(maildir, store, **(settings | options))


class FailingLibc:
    """The C library's inotify functions, with one of them failing as the kernel does.

    The failing function sets ctypes' copy of errno and returns -1, which is
    what a function loaded with ``use_errno=True`` leaves behind on failure.
    """

    def __init__(self, real: object, function: str, number: int) -> None:
        self._real = real
        self._function = function
        self._number = number

    def __getattr__(self, name: str):
        if name != self._function:
            return getattr(self._real, name)

        def failing(*args: object) -> int:
            ctypes.set_errno(self._number)
            return -1

        return failing


def test_mail_wakes_watcher_via_inotify(maildir, store, caplog):
    collector = Collector()
    watcher = slow_watcher(maildir, store)
    listings = count_listings(watcher)
    before = inotify_descriptors()

    with caplog.at_level(logging.INFO, logger="mailpush.server.mailbox"):
        with running(watcher, collector):
            # After the first listing of the loop, only a wake-up can find a mail in time.
            assert wait_until(lambda: listings() >= 2)
            during = inotify_descriptors()
            deliver(maildir, "1700000300.M1P1.host")
            mails = collector.wait_for(1, timeout=5.0)

    assert [mail.mail_id for mail in mails] == ["1700000300.M1P1.host"]
    assert "with inotify" in caplog.text
    assert during == before + 1
    assert inotify_descriptors() == before


def test_flag_rename_wakes_watcher(maildir, store):
    name = "1700000301.M1P1.host"
    collector = Collector()
    flags: list[tuple[str, bool]] = []
    reported = threading.Event()

    def on_flags(mail_id: str, seen: bool) -> None:
        flags.append((mail_id, seen))
        reported.set()

    watcher = slow_watcher(maildir, store)
    listings = count_listings(watcher)
    with running(watcher, collector, on_flags):
        assert wait_until(lambda: listings() >= 2)
        deliver(maildir, name)
        collector.wait_for(1, timeout=5.0)
        read_mail(maildir, name, "S")  # a mail client showing it: new/ to cur/ with S
        assert reported.wait(5.0), "the read state change was not reported"

    assert flags == [(name, True)]


def test_file_written_in_new_read_when_closed(maildir, store):
    name = "1700000900.M1P1.host"
    collector = Collector()
    watcher = slow_watcher(maildir, store)
    listings = count_listings(watcher)

    with running(watcher, collector):
        assert wait_until(lambda: listings() >= 2)
        # Written straight into new/, as cp does, not through tmp/.
        with open(maildir / "new" / name, "wb") as mail:
            mail.write(b"Subject: in two parts\r\n")
            mail.flush()
            assert wait_until(lambda: listings() >= 3), "the creation did not wake the watcher"
            early = collector.ids()
            mail.write(b"\r\nsecond part\r\n")
        mails = collector.wait_for(1, timeout=5.0)

    assert early == []
    assert [mail.mail_id for mail in mails] == [name]
    assert mails[0].raw == b"Subject: in two parts\r\n\r\nsecond part\r\n"


def test_linked_file_held_while_open(maildir, store):
    name = "1700000902.M1P1.host"
    release = threading.Event()
    collector = Collector(hold_first=release)
    watcher = slow_watcher(maildir, store)
    listings = count_listings(watcher)

    with running(watcher, collector):
        assert wait_until(lambda: listings() >= 2)
        deliver(maildir, "1700000903.M1P1.host")
        assert wait_until(lambda: collector.calls >= 1)
        # While the watcher is busy, a mail arrives by link() and another
        # program opens it first, which looks like a writer to inotify.
        temporary = maildir / "tmp" / name
        temporary.write_bytes(b"Subject: opened\r\n\r\nx\r\n")
        os.link(temporary, maildir / "new" / name)
        temporary.unlink()
        reader = open(maildir / "new" / name, "rb")
        before_release = listings()
        release.set()
        assert wait_until(lambda: listings() > before_release)
        early = collector.ids()
        reader.close()
        mails = collector.wait_for(2, timeout=5.0)

    assert early == ["1700000903.M1P1.host"]
    assert [mail.mail_id for mail in mails] == ["1700000903.M1P1.host", name]


def test_hard_link_delivery_not_held_back(maildir, store):
    name = "1700000901.M1P1.host"
    collector = Collector()
    watcher = slow_watcher(maildir, store)
    listings = count_listings(watcher)

    with running(watcher, collector):
        assert wait_until(lambda: listings() >= 2)
        # The delivery of the original Maildir description: link() into new/, then unlink().
        temporary = maildir / "tmp" / name
        temporary.write_bytes(b"Subject: linked\r\n\r\nx\r\n")
        os.link(temporary, maildir / "new" / name)
        temporary.unlink()
        mails = collector.wait_for(1, timeout=5.0)

    assert [mail.mail_id for mail in mails] == [name]
    assert mails[0].raw == b"Subject: linked\r\n\r\nx\r\n"


def test_stop_ends_inotify_wait(maildir, store):
    watcher = slow_watcher(maildir, store)
    listings = count_listings(watcher)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(Collector(), stop), name="test-stop")
    thread.start()
    assert wait_until(lambda: listings() >= 2)

    stop.set()
    thread.join(timeout=5.0)

    assert not thread.is_alive(), "run() did not return within 5 s of stop"


def test_burst_listed_once(maildir, store):
    names = [f"1700001{index:03d}.M1P1.host" for index in range(300)]
    release = threading.Event()
    collector = Collector(hold_first=release)
    watcher = slow_watcher(maildir, store)
    listings = count_listings(watcher)

    with running(watcher, collector):
        assert wait_until(lambda: listings() >= 2)
        deliver(maildir, "1700000399.M1P1.host")
        assert wait_until(lambda: collector.calls >= 1)
        # The watcher is busy with the first mail while the burst arrives.
        for name in names:
            deliver(maildir, name)
        before_release = listings()
        release.set()
        collector.wait_for(len(names) + 1, timeout=10.0)
        # Reading the 300 files queues 600 events (open, close); they must not list again.
        time.sleep(0.5)
        listed_after = listings() - before_release

    assert sorted(collector.ids()) == sorted(["1700000399.M1P1.host", *names])
    # 300 queued events lead to one listing, which finds all 300 mails.
    assert listed_after == 1


def test_queue_overflow_lists_again(maildir, store, caplog):
    queue_size = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    release = threading.Event()
    collector = Collector(hold_first=release)
    watcher = slow_watcher(maildir, store)
    listings = count_listings(watcher)
    churn = maildir / "cur" / ".churn"
    churn.write_bytes(b"")

    with caplog.at_level(logging.DEBUG, logger="mailpush.server.mailbox"):
        with running(watcher, collector):
            assert wait_until(lambda: listings() >= 2)
            deliver(maildir, "1700000500.M1P1.host")
            assert wait_until(lambda: collector.calls >= 1)
            # Each rename queues two events (IN_MOVED_FROM, IN_MOVED_TO), so this
            # fills the queue, and the kernel drops the event of the next mail.
            for _ in range(queue_size // 2 + 1):
                os.rename(churn, churn.with_name(".churned"))
                os.rename(churn.with_name(".churned"), churn)
            deliver(maildir, "1700000501.M1P1.host")
            release.set()
            collector.wait_for(2, timeout=5.0)

    assert collector.ids() == ["1700000500.M1P1.host", "1700000501.M1P1.host"]
    assert "inotify event queue overflowed" in caplog.text


def test_replaced_folder_watched_again(maildir, store, caplog):
    collector = Collector()
    watcher = slow_watcher(maildir, store, poll_s=0.1)
    listings = count_listings(watcher)

    with caplog.at_level(logging.INFO, logger="mailpush.server.mailbox"):
        with running(watcher, collector):
            assert wait_until(lambda: listings() >= 2)
            # The new/ in place now is another folder, so the old watch receives no events.
            os.rename(maildir / "new", maildir / "new.old")
            (maildir / "new").mkdir()
            watched_again = f"watching {maildir / 'new'} with inotify again"
            assert wait_until(lambda: watched_again in caplog.text)
            deliver(maildir, "1700000600.M1P1.host")
            mails = collector.wait_for(1, timeout=5.0)

    assert [mail.mail_id for mail in mails] == ["1700000600.M1P1.host"]


@pytest.mark.parametrize(
    ("function", "number", "reason"),
    [
        ("inotify_init1", errno.EMFILE, "raise fs.inotify.max_user_instances"),
        ("inotify_add_watch", errno.ENOSPC, "raise fs.inotify.max_user_watches"),
    ],
)
def test_inotify_limit_falls_back_to_polling(
    maildir, store, caplog, monkeypatch, function, number, reason
):
    libc = FailingLibc(inotify._c_library(), function, number)
    monkeypatch.setattr(inotify, "_c_library", lambda: libc)
    monkeypatch.setattr(maildir_module, "_inotify_warned", False)
    collector = Collector()
    watcher = slow_watcher(maildir, store, poll_s=0.05)
    second = slow_watcher(maildir, store, poll_s=0.05)
    before = inotify_descriptors()

    with caplog.at_level(logging.INFO, logger="mailpush.server.mailbox"):
        with running(watcher, collector), running(second, Collector()):
            during = inotify_descriptors()
            deliver(maildir, "1700000700.M1P1.host")
            mails = collector.wait_for(1, timeout=5.0)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    fallbacks = [r.getMessage() for r in caplog.records if "checking it every" in r.getMessage()]
    assert [mail.mail_id for mail in mails] == ["1700000700.M1P1.host"]
    assert len(fallbacks) == 2  # one per watcher, only the first as a warning
    assert len(warnings) == 1
    assert reason in warnings[0]
    assert "checking it every 0.05 s instead" in warnings[0]
    # The instance opened before inotify_add_watch failed is closed again.
    assert during == before


def test_no_inotify_falls_back_to_polling(maildir, store, caplog, monkeypatch):
    monkeypatch.setattr(inotify.sys, "platform", "darwin")
    inotify._c_library.cache_clear()
    try:
        with pytest.raises(OSError, match="inotify exists only on Linux") as raised:
            inotify.Inotify()
    finally:
        monkeypatch.undo()
        inotify._c_library.cache_clear()
    assert raised.value.errno == errno.ENOSYS

    def no_inotify() -> None:
        raise raised.value

    monkeypatch.setattr(inotify, "_c_library", no_inotify)
    collector = Collector()
    watcher = slow_watcher(maildir, store, poll_s=0.05)

    with caplog.at_level(logging.INFO, logger="mailpush.server.mailbox"):
        with running(watcher, collector):
            deliver(maildir, "1700000800.M1P1.host")
            mails = collector.wait_for(1, timeout=5.0)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [mail.mail_id for mail in mails] == ["1700000800.M1P1.host"]
    assert warnings == [
        f"maildir: cannot watch {maildir} with inotify (inotify exists only on Linux, "
        "not on darwin); checking it every 0.05 s instead"
    ]
