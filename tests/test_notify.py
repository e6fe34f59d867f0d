"""Tests of desktop notifications: the log fallback, escaping, on_mail, and a real D-Bus bus.

The D-Bus tests start their own ``dbus-daemon`` and export a fake
``org.freedesktop.Notifications`` service on it (tests/fixtures/notifications.py).
desktop-notifier calls it the same way as a real notification server, and the
fake presses a notification's button by emitting ``ActionInvoked``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailpush.agent.notify import (
    THREAD_NAME,
    Notifier,
    ensure_session_bus,
    find_session_bus,
    format_notification,
    on_mail_environment,
)
from mailpush.errors import ConfigError
from mailpush.protocol.messages import MailSummary, Push

# session_bus, notification_server and action_server come from this module.
pytest_plugins = ["tests.fixtures.notifications"]

DEADLINE_S = 10.0


def make_push(kind: str = "mail", **mail) -> Push:
    summary = MailSummary(
        id=mail.pop("id", "1700000000-42"),
        sender=mail.pop("sender", "Ann Example <ann@example.org>"),
        subject=mail.pop("subject", "Quarterly report"),
        snippet=mail.pop("snippet", "Numbers attached"),
        **mail,
    )
    return Push(id="push-1", kind=kind, mail=summary, delivered_to=["laptop"], ts=1_700_000_000.0)


def wait_for(condition, timeout: float = DEADLINE_S) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def no_session_bus(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "runtime"))
    if Path(f"/run/user/{os.getuid()}/bus").exists():
        pytest.fail(f"/run/user/{os.getuid()}/bus exists, so this machine has a session bus")


@pytest.fixture
def notifier() -> Iterator[Notifier]:
    shown = Notifier(send_timeout_s=DEADLINE_S)
    yield shown
    shown.close()


# --- formatting ---------------------------------------------------------------


def test_mail_title_and_body() -> None:
    title, body = format_notification(make_push())

    assert title == "Ann Example <ann@example.org>"
    assert body == "Quarterly report\nNumbers attached"


def test_body_markup_escaped() -> None:
    push = make_push(subject="<b>Win</b> & more", snippet="<a href='x'>click</a>")

    title, body = format_notification(push)

    assert body == "&lt;b&gt;Win&lt;/b&gt; &amp; more\n&lt;a href='x'&gt;click&lt;/a&gt;"
    assert "<" not in body
    assert title == "Ann Example <ann@example.org>"


def test_header_line_breaks_collapsed() -> None:
    push = make_push(sender="Ann\nExample", subject="line one\r\nline two")

    title, body = format_notification(push)

    assert title == "Ann Example"
    assert body.split("\n")[0] == "line one line two"


def test_prompt_names_terminal() -> None:
    push = make_push(kind="prompt")

    title, body = format_notification(push)

    assert title == "Mail for laptop: Quarterly report"
    assert body == "From Ann Example &lt;ann@example.org&gt;"


def test_empty_fields_named() -> None:
    title, body = format_notification(make_push(sender="", subject="", snippet=""))

    assert title == "(unknown sender)"
    assert body == "(no subject)"


def test_status_shows_nothing(notifier: Notifier) -> None:
    assert format_notification(make_push(kind="status")) is None
    assert notifier.show(make_push(kind="status")) == "none"


# --- fallback without a session bus -------------------------------------------


def test_fallback_logs_sender_and_subject(no_session_bus, notifier, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="mailpush.agent.notify"):
        assert notifier.show(make_push()) == "log"
        assert notifier.show(make_push(subject="Second")) == "log"
        assert notifier.show(make_push(kind="prompt")) == "log"

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 1
    assert "no D-Bus session bus" in warnings[0].getMessage()
    assert infos == [
        "mail from Ann Example <ann@example.org>: Quarterly report",
        "mail from Ann Example <ann@example.org>: Second",
        "mail for laptop from Ann Example <ann@example.org>: Quarterly report",
    ]
    assert "Numbers attached" not in caplog.text


def test_fallback_never_raises(no_session_bus, notifier, monkeypatch) -> None:
    def broken(*_args):
        raise RuntimeError("formatting exploded")

    monkeypatch.setattr("mailpush.agent.notify.format_notification", broken)
    assert notifier.show(make_push()) == "log"


def test_find_session_bus_order(tmp_path: Path) -> None:
    import socket

    runtime = tmp_path / "runtime"
    runtime.mkdir()
    assert find_session_bus({"XDG_RUNTIME_DIR": str(runtime)}) in (
        None,
        f"unix:path=/run/user/{os.getuid()}/bus",
    )

    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(runtime / "bus"))
        expected = f"unix:path={runtime / 'bus'}"
        assert find_session_bus({"XDG_RUNTIME_DIR": str(runtime)}) == expected
        assert (
            find_session_bus(
                {"XDG_RUNTIME_DIR": str(runtime), "DBUS_SESSION_BUS_ADDRESS": "unix:path=/x"}
            )
            == "unix:path=/x"
        )

        environ: dict[str, str] = {"XDG_RUNTIME_DIR": str(runtime)}
        assert ensure_session_bus(environ) == expected
        assert environ["DBUS_SESSION_BUS_ADDRESS"] == expected


# --- on_mail ------------------------------------------------------------------


DUMP_ENV = (
    "import json, os, sys; "
    "json.dump({k: v for k, v in os.environ.items() if k.startswith('MAILPUSH_')}, "
    "open(sys.argv[1], 'w'))"
)


def test_on_mail_gets_fields_in_env(no_session_bus, tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    push = make_push(subject="Héllo; $(rm -rf /) `x`", sender="Bob <bob@example.org>")

    with Notifier(on_mail=[sys.executable, "-c", DUMP_ENV, str(out)]) as notifier:
        assert notifier.show(push) == "log"
        notifier.wait_for_commands(DEADLINE_S)

    assert json.loads(out.read_text()) == {
        "MAILPUSH_FROM": "Bob <bob@example.org>",
        "MAILPUSH_SUBJECT": "Héllo; $(rm -rf /) `x`",
        "MAILPUSH_MAIL_ID": "1700000000-42",
        "MAILPUSH_PUSH_ID": "push-1",
        "MAILPUSH_KIND": "mail",
    }


def test_on_mail_only_for_mail(no_session_bus, tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    with Notifier(on_mail=[sys.executable, "-c", DUMP_ENV, str(out)]) as notifier:
        notifier.show(make_push(kind="prompt"))
        notifier.show(make_push(kind="status"))
        notifier.wait_for_commands(DEADLINE_S)

    assert not out.exists()


def test_on_mail_does_not_block_show(no_session_bus, caplog) -> None:
    with Notifier(
        on_mail=[sys.executable, "-c", "import time; time.sleep(30)"], on_mail_timeout_s=1.0
    ) as notifier:
        started = time.monotonic()
        assert notifier.show(make_push()) == "log"
        assert time.monotonic() - started < 1.0
        with caplog.at_level(logging.WARNING, logger="mailpush.agent.notify"):
            notifier.wait_for_commands(DEADLINE_S)

    assert "killed after 1 s" in caplog.text


def test_on_mail_failures_logged_once(no_session_bus, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mailpush.agent.notify"):
        with Notifier(on_mail=[sys.executable, "-c", "raise SystemExit(3)"]) as notifier:
            notifier.show(make_push())
            notifier.wait_for_commands(DEADLINE_S)
        with Notifier(on_mail=["/nonexistent/mailpush-hook"]) as notifier:
            notifier.show(make_push())
            notifier.wait_for_commands(DEADLINE_S)

    messages = [r.getMessage() for r in caplog.records if "on_mail" in r.getMessage()]
    assert len(messages) == 2
    assert "exited with status 3 (push push-1)" in messages[0]
    assert "cannot run /nonexistent/mailpush-hook" in messages[1]
    assert "fix receiver.on_mail" in messages[1]
    assert all("\n" not in message for message in messages)


@pytest.mark.parametrize("command", [[], "notify-send hi", ["ok", 3], [""], ["a\0b"]])
def test_on_mail_validated(command) -> None:
    with pytest.raises(ConfigError, match="receiver.on_mail: invalid command"):
        Notifier(on_mail=command)


def test_on_mail_environment_drops_nul() -> None:
    env = on_mail_environment(make_push(subject="a\0b"), base={"PATH": "/bin"})
    assert env["MAILPUSH_SUBJECT"] == "ab"
    assert env["PATH"] == "/bin"


# --- a real session bus -------------------------------------------------------


def test_bus_without_server_falls_back(session_bus, notifier, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="mailpush.agent.notify"):
        assert notifier.show(make_push()) == "log"
        assert notifier.show(make_push()) == "log"

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "org.freedesktop.Notifications" in warnings[0]
    # The session bus was found through $XDG_RUNTIME_DIR/bus.
    assert os.environ["DBUS_SESSION_BUS_ADDRESS"] == session_bus


def test_desktop_notification_delivered(notification_server, notifier) -> None:
    push = make_push(subject="<i>Lunch</i> & talk", snippet="at 12")

    assert notifier.show(push) == "desktop"
    assert notifier.show(make_push(kind="prompt")) == "desktop"

    assert notification_server.server.received == [
        {
            "app_name": "mailpush",
            "summary": "Ann Example <ann@example.org>",
            "body": "&lt;i&gt;Lunch&lt;/i&gt; &amp; talk\nat 12",
        },
        {
            "app_name": "mailpush",
            "summary": "Mail for laptop: Quarterly report",
            "body": "From Ann Example &lt;ann@example.org&gt;",
        },
    ]
    assert [t.name for t in threading.enumerate()].count(THREAD_NAME) == 1


def test_recovers_when_server_appears(session_bus, caplog) -> None:
    # Imported here: a top-level import would come before pytest_plugins
    # registers the module, and pytest could no longer rewrite its asserts.
    from tests.fixtures.notifications import running_notification_server

    with Notifier(send_timeout_s=DEADLINE_S, retry_after_s=0.0) as notifier:
        assert notifier.show(make_push()) == "log"

        with running_notification_server(session_bus) as fake:
            with caplog.at_level(logging.INFO, logger="mailpush.agent.notify"):
                assert notifier.show(make_push()) == "desktop"
            assert len(fake.notifications) == 1
            assert "desktop notifications work again" in caplog.text


def test_close_ends_thread(notification_server) -> None:
    notifier = Notifier()
    assert notifier.show(make_push()) == "desktop"

    notifier.close()

    assert wait_for(lambda: THREAD_NAME not in [t.name for t in threading.enumerate()])


# --- the "Mark read" button ---------------------------------------------------


class PressRecorder:
    """An on_mark_read callback that records each mail id and the thread it ran on."""

    def __init__(self) -> None:
        self.mail_ids: list[str] = []
        self.threads: list[str] = []

    def __call__(self, mail_id: str) -> None:
        self.mail_ids.append(mail_id)
        self.threads.append(threading.current_thread().name)


def test_mark_read_button_calls_back(action_server) -> None:
    pressed = PressRecorder()
    with Notifier(send_timeout_s=DEADLINE_S, on_mark_read=pressed) as notifier:
        assert notifier.show(make_push(id="1700000000-7")) == "desktop"

        (notification,) = action_server.notifications
        key = notification.action_key("Mark read")
        assert key is not None, f"no Mark read action in {notification.actions}"

        action_server.press(notification.id, key)
        assert wait_for(lambda: pressed.mail_ids != [])

    assert pressed.mail_ids == ["1700000000-7"]
    assert pressed.threads == [THREAD_NAME]


def test_mark_read_press_matches_notification(action_server) -> None:
    pressed = PressRecorder()
    with Notifier(send_timeout_s=DEADLINE_S, on_mark_read=pressed) as notifier:
        assert notifier.show(make_push(id="1700000000-1")) == "desktop"
        assert notifier.show(make_push(id="1700000000-2")) == "desktop"

        second = action_server.notifications[1]
        action_server.press(second.id, second.action_key("Mark read"))
        assert wait_for(lambda: pressed.mail_ids != [])

    assert pressed.mail_ids == ["1700000000-2"]


def test_other_action_not_mark_read(action_server) -> None:
    pressed = PressRecorder()
    with Notifier(send_timeout_s=DEADLINE_S, on_mark_read=pressed) as notifier:
        assert notifier.show(make_push()) == "desktop"
        assert notifier.show(make_push(id="1700000000-43")) == "desktop"

        first, second = action_server.notifications
        # "default" is the key a server sends when the notification body is clicked.
        action_server.press(first.id, "default")
        action_server.press(second.id, second.action_key("Mark read"))
        assert wait_for(lambda: pressed.mail_ids != [])

    assert pressed.mail_ids == ["1700000000-43"]


def test_no_button_without_actions_capability(notification_server) -> None:
    pressed = PressRecorder()
    with Notifier(send_timeout_s=DEADLINE_S, on_mark_read=pressed) as notifier:
        assert notifier.show(make_push()) == "desktop"

    (notification,) = notification_server.notifications
    assert notification.action_key("Mark read") is None
    assert "Mark read" not in notification.actions


def test_button_only_on_mail(action_server) -> None:
    with Notifier(send_timeout_s=DEADLINE_S, on_mark_read=PressRecorder()) as notifier:
        assert notifier.show(make_push(kind="prompt")) == "desktop"
        assert notifier.show(make_push()) == "desktop"

    prompt, mail = action_server.notifications
    assert prompt.action_key("Mark read") is None
    assert mail.action_key("Mark read") is not None


def test_no_button_without_callback(action_server, notifier) -> None:
    assert notifier.show(make_push()) == "desktop"

    (notification,) = action_server.notifications
    assert notification.action_key("Mark read") is None


def test_failing_mark_read_logged(action_server, caplog) -> None:
    calls: list[str] = []

    def broken(mail_id: str) -> None:
        calls.append(mail_id)
        raise RuntimeError("inbox is locked\nby another process")

    with caplog.at_level(logging.WARNING):
        with Notifier(send_timeout_s=DEADLINE_S, on_mark_read=broken) as notifier:
            assert notifier.show(make_push()) == "desktop"
            first = action_server.notifications[0]
            action_server.press(first.id, first.action_key("Mark read"))
            assert wait_for(lambda: len(calls) == 1)
            assert wait_for(lambda: len(caplog.records) == 1)

            # The notifier thread survived the exception and still serves.
            assert notifier.show(make_push(id="1700000000-43")) == "desktop"
            second = action_server.notifications[1]
            action_server.press(second.id, second.action_key("Mark read"))
            assert wait_for(lambda: len(calls) == 2)
            assert wait_for(lambda: len(caplog.records) == 2)

    assert calls == ["1700000000-42", "1700000000-43"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "notify: marking mail 1700000000-42 read failed: "
        "RuntimeError: inbox is locked by another process",
        "notify: marking mail 1700000000-43 read failed: "
        "RuntimeError: inbox is locked by another process",
    ]
    assert all(r.name == "mailpush.agent.notify" for r in caplog.records)
    assert all(r.exc_info is None for r in caplog.records)
