"""Tests of the IMAP watcher against a real Dovecot that the tests start."""

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailpush.errors import AuthenticationError, ConfigError
from mailpush.server.mailbox import ImapConfig, ImapWatcher, NewMail, StateStore
from mailpush.server.mailbox.imap import took_unsolicited_exists

pytestmark = pytest.mark.integration


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

    def wait_for(self, count: int, timeout: float = 15.0) -> list[NewMail]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.mails) >= count, timeout)
            return list(self.mails)

    def ids(self) -> list[str]:
        with self._cond:
            return [mail.mail_id for mail in self.mails]


@contextlib.contextmanager
def running(watcher: ImapWatcher, collector: Collector) -> Iterator[threading.Thread]:
    """Run the watcher in a thread until the block ends; wait until it holds its baseline."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            watcher.run(collector, stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="test-imap-watcher")
    thread.start()
    try:
        assert wait_until(lambda: watcher.store.imap_position(watcher.mailbox_key) is not None)
        yield thread
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive(), "watcher did not stop within 20 s"
    assert errors == []


def wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


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


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state.sqlite3") as state:
        yield state


def test_append_pushed_via_idle(dovecot, store):
    collector = Collector()
    watcher = ImapWatcher(config_for(dovecot), store)

    with running(watcher, collector):
        appended = time.monotonic()
        uid = dovecot.append(mail("hello"))
        mails = collector.wait_for(1)

    uidvalidity = dovecot.uidvalidity()
    assert [m.mail_id for m in mails] == [f"{uidvalidity}-{uid}"]
    assert mails[0].raw == mail("hello")
    assert mails[0].seen is False
    # Dovecot 2.3 batches IDLE notifications for 0.5 s; 3 s leaves room for a busy machine.
    assert collector.times[0] - appended < 3.0


def test_burst_all_once_in_uid_order(dovecot, store):
    collector = Collector()

    with running(ImapWatcher(config_for(dovecot), store), collector):
        with dovecot.client() as client:
            for index in range(20):
                flags = (b"\\Seen",) if index == 7 else ()
                client.append("INBOX", mail(f"burst {index}"), flags=flags)
        collector.wait_for(20)
        time.sleep(1.0)  # a second EXISTS or a NOOP must not deliver any again

    uidvalidity = dovecot.uidvalidity()
    assert collector.ids() == [f"{uidvalidity}-{uid}" for uid in range(1, 21)]
    assert [m.seen for m in collector.mails] == [index == 7 for index in range(20)]


def test_fetch_leaves_mail_unseen(dovecot, store):
    collector = Collector()

    with running(ImapWatcher(config_for(dovecot), store), collector):
        uid = dovecot.append(mail("still unread"))
        collector.wait_for(1)

    with dovecot.client() as client:
        client.select_folder("INBOX", readonly=True)
        flags = client.get_flags([uid])[uid]
    assert b"\\Seen" not in flags


def test_existing_mail_not_pushed(dovecot, store, caplog):
    dovecot.append(mail("old 1"))
    dovecot.append(mail("old 2"))
    collector = Collector()

    with caplog.at_level(logging.INFO, logger="mailpush.server.mailbox.imap"):
        with running(ImapWatcher(config_for(dovecot), store), collector):
            uid = dovecot.append(mail("new"))
            collector.wait_for(1)
            time.sleep(0.5)

    assert collector.ids() == [f"{dovecot.uidvalidity()}-{uid}"]
    assert "first start" in caplog.text


def test_restart_catches_up_without_repeats(dovecot, tmp_path):
    path = tmp_path / "state.sqlite3"
    first = Collector()
    with StateStore(path) as store, running(ImapWatcher(config_for(dovecot), store), first):
        dovecot.append(mail("before stop 1"))
        dovecot.append(mail("before stop 2"))
        first.wait_for(2)

    missed = [dovecot.append(mail(f"while stopped {index}")) for index in range(3)]
    second = Collector()
    with StateStore(path) as store, running(ImapWatcher(config_for(dovecot), store), second):
        second.wait_for(3)
        later = dovecot.append(mail("after restart"))
        second.wait_for(4)
        time.sleep(0.5)

    uidvalidity = dovecot.uidvalidity()
    assert first.ids() == [f"{uidvalidity}-1", f"{uidvalidity}-2"]
    assert second.ids() == [f"{uidvalidity}-{uid}" for uid in [*missed, later]]


def test_killed_session_reconnects_and_catches_up(dovecot, store, caplog):
    collector = Collector()

    with caplog.at_level(logging.INFO, logger="mailpush.server.mailbox.imap"):
        with running(ImapWatcher(config_for(dovecot), store), collector):
            dovecot.append(mail("before the cut"))
            collector.wait_for(1)

            assert dovecot.kill_imap_sessions() >= 1
            uid = dovecot.append(mail("during the cut"))
            collector.wait_for(2)

    assert collector.ids()[1] == f"{dovecot.uidvalidity()}-{uid}"
    assert len(collector.ids()) == 2
    assert "reconnecting in" in caplog.text


def test_server_restart_reconnects_and_catches_up(dovecot, store):
    collector = Collector()

    with running(ImapWatcher(config_for(dovecot), store), collector):
        dovecot.append(mail("before restart"))
        collector.wait_for(1)

        dovecot.stop()
        time.sleep(0.5)  # the watcher fails to reconnect at least once
        dovecot.start()
        uid = dovecot.append(mail("after restart"))
        collector.wait_for(2)

    assert collector.ids() == [f"{dovecot.uidvalidity()}-1", f"{dovecot.uidvalidity()}-{uid}"]


def test_uidvalidity_change_resets_baseline(dovecot, tmp_path, caplog):
    path = tmp_path / "state.sqlite3"
    dovecot.create_folder("Watched")
    settings = {"folder": "Watched"}
    first = Collector()
    with (
        StateStore(path) as store,
        running(ImapWatcher(config_for(dovecot, **settings), store), first),
    ):
        dovecot.append(mail("first"), folder="Watched")
        first.wait_for(1)
    old_uidvalidity = dovecot.uidvalidity("Watched")

    dovecot.delete_folder("Watched")
    dovecot.create_folder("Watched")
    for index in range(3):
        dovecot.append(mail(f"renumbered {index}"), folder="Watched")
    new_uidvalidity = dovecot.uidvalidity("Watched")
    assert new_uidvalidity != old_uidvalidity

    second = Collector()
    with caplog.at_level(logging.WARNING, logger="mailpush.server.mailbox.imap"):
        with StateStore(path) as store:
            with running(ImapWatcher(config_for(dovecot, **settings), store), second):
                time.sleep(1.0)  # room for a wrongful flood of the 3 renumbered mails
                uid = dovecot.append(mail("new after reset"), folder="Watched")
                second.wait_for(1)
                time.sleep(0.5)

    assert first.ids() == [f"{old_uidvalidity}-1"]
    assert second.ids() == [f"{new_uidvalidity}-{uid}"]
    assert uid == 4
    assert "UIDVALIDITY" in caplog.text


def test_folder_recreated_while_watching(dovecot, store):
    dovecot.create_folder("Watched")
    collector = Collector()

    with running(ImapWatcher(config_for(dovecot, folder="Watched"), store), collector):
        dovecot.append(mail("first"), folder="Watched")
        collector.wait_for(1)

        dovecot.delete_folder("Watched")
        dovecot.create_folder("Watched")
        dovecot.append(mail("renumbered"), folder="Watched")
        new_uidvalidity = dovecot.uidvalidity("Watched")
        assert wait_until(
            lambda: store.imap_position(f"imap://{dovecot.user}@{dovecot.host}:"
                                        f"{dovecot.port}/Watched").uidvalidity == new_uidvalidity
        )  # fmt: skip
        uid = dovecot.append(mail("new"), folder="Watched")
        collector.wait_for(2)

    assert collector.ids()[1:] == [f"{new_uidvalidity}-{uid}"]


def test_polling_without_idle(dovecot_factory, store):
    server = dovecot_factory("imap_capability = IMAP4rev1 UIDPLUS\n")
    collector = Collector()

    with running(ImapWatcher(config_for(server, poll_s=0.3), store), collector):
        uids = [server.append(mail(f"polled {index}")) for index in range(3)]
        collector.wait_for(3)

    assert collector.ids() == [f"{server.uidvalidity()}-{uid}" for uid in uids]


def test_short_idle_timers_keep_working(dovecot, store):
    collector = Collector()
    config = config_for(dovecot, idle_renew_s=0.7, noop_every_s=0.3)

    with running(ImapWatcher(config, store), collector):
        time.sleep(2.0)  # several NOOPs and IDLE renewals
        uid = dovecot.append(mail("after renewals"))
        collector.wait_for(1)

    assert collector.ids() == [f"{dovecot.uidvalidity()}-{uid}"]


def test_failing_callback_retried(dovecot, store):
    collector = Collector(fail_first=1)

    with running(ImapWatcher(config_for(dovecot, retry_s=0.2), store), collector):
        uid = dovecot.append(mail("retried"))
        collector.wait_for(1)
        time.sleep(0.5)

    assert collector.calls == 2
    assert collector.ids() == [f"{dovecot.uidvalidity()}-{uid}"]


def test_wrong_password_raises_once(dovecot, store):
    watcher = ImapWatcher(config_for(dovecot, password="wrong-password"), store)
    started = time.monotonic()

    with pytest.raises(AuthenticationError) as raised:
        watcher.run(Collector(), threading.Event())

    message = str(raised.value)
    assert "\n" not in message
    assert dovecot.user in message
    assert "wrong-password" not in message
    assert "check the username and password" in message
    assert time.monotonic() - started < 10.0


@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_tls_with_ca_file(dovecot_factory, store, mode):
    server = dovecot_factory(tls=True)
    if mode == "tls":
        config = config_for(server, port=server.tls_port, tls=True, ca_file=str(server.ca_file))
    else:
        config = config_for(server, starttls=True, ca_file=str(server.ca_file))
    collector = Collector()

    with running(ImapWatcher(config, store), collector):
        uid = server.append(mail("over tls"))
        collector.wait_for(1)

    assert collector.ids() == [f"{server.uidvalidity()}-{uid}"]


def test_untrusted_certificate_retried(dovecot_factory, store, caplog):
    server = dovecot_factory(tls=True)
    watcher = ImapWatcher(config_for(server, port=server.tls_port, tls=True), store)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(Collector(), stop))

    with caplog.at_level(logging.WARNING, logger="mailpush.server.mailbox.imap"):
        thread.start()
        try:
            assert wait_until(lambda: "certificate" in caplog.text)
        finally:
            stop.set()
            thread.join(timeout=20)

    assert "set ca_file" in caplog.text
    assert store.imap_position(watcher.mailbox_key) is None


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"tls": True, "starttls": True}, "both set"),
        ({"idle_renew_s": 1800}, "idle_renew_s"),
        ({"port": 70000}, "port 70000"),
        ({"host": ""}, "required"),
        ({"poll_s": 0}, "poll_s"),
    ],
)
def test_config_rejects_invalid(overrides, fragment):
    settings = {"host": "127.0.0.1", "username": "u", "password": "p", **overrides}

    with pytest.raises(ConfigError, match=fragment):
        ImapConfig(**settings)


def test_config_repr_hides_password():
    config = ImapConfig(host="127.0.0.1", username="u", password="hunter2")

    assert "hunter2" not in repr(config)


def test_exists_announced_during_command_is_seen(dovecot):
    dovecot.append(mail("first"))  # INBOX exists before the watcher's connection selects it
    with dovecot.client() as client:
        client.select_folder("INBOX")
        took_unsolicited_exists(client)  # the SELECT's own EXISTS

        dovecot.append(mail("second"))
        client.noop()  # Dovecot reports the new message with the reply of any command

        assert took_unsolicited_exists(client)
        assert not took_unsolicited_exists(client)
