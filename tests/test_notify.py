"""Tests of desktop notifications: the log fallback, escaping, on_mail, and a real D-Bus bus.

The D-Bus tests start their own ``dbus-daemon`` (Debian package ``dbus``).
No notification daemon is installed here, so the tests export a small
``org.freedesktop.Notifications`` service on that bus with dbus-fast.
desktop-notifier calls it the same way as a real notification server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import pytest
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusDict, DBusInt32, DBusSignature, DBusStr, DBusUInt32
from dbus_fast.service import ServiceInterface, dbus_method, dbus_signal

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
    assert "fix agent.on_mail" in messages[1]
    assert all("\n" not in message for message in messages)


@pytest.mark.parametrize("command", [[], "notify-send hi", ["ok", 3], [""], ["a\0b"]])
def test_on_mail_validated(command) -> None:
    with pytest.raises(ConfigError, match="agent.on_mail: invalid command"):
        Notifier(on_mail=command)


def test_on_mail_environment_drops_nul() -> None:
    env = on_mail_environment(make_push(subject="a\0b"), base={"PATH": "/bin"})
    assert env["MAILPUSH_SUBJECT"] == "ab"
    assert env["PATH"] == "/bin"


# --- a real session bus -------------------------------------------------------


StrArray = Annotated[list[str], DBusSignature("as")]
ServerInfo = Annotated[list[str], DBusSignature("ssss")]
ClosedArgs = Annotated[list[int], DBusSignature("uu")]
ActionArgs = Annotated[list[object], DBusSignature("us")]


class NotificationServer(ServiceInterface):
    """The org.freedesktop.Notifications methods desktop-notifier calls, recording each Notify."""

    def __init__(self) -> None:
        super().__init__("org.freedesktop.Notifications")
        self.received: list[dict[str, object]] = []

    # Method names and signatures are fixed by the freedesktop notification spec.
    @dbus_method()
    def Notify(  # noqa: N802
        self,
        app_name: DBusStr,
        replaces_id: DBusUInt32,
        app_icon: DBusStr,
        summary: DBusStr,
        body: DBusStr,
        actions: StrArray,
        hints: DBusDict,
        expire_timeout: DBusInt32,
    ) -> DBusUInt32:
        self.received.append({"app_name": app_name, "summary": summary, "body": body})
        return len(self.received)

    @dbus_method()
    def GetCapabilities(self) -> StrArray:  # noqa: N802
        return ["body", "body-markup"]

    @dbus_method()
    def GetServerInformation(self) -> ServerInfo:  # noqa: N802
        return ["mailpush-test", "mailpush", "1.0", "1.2"]

    @dbus_method()
    def CloseNotification(self, notification_id: DBusUInt32):  # noqa: N802
        return None

    @dbus_signal()
    def NotificationClosed(self) -> ClosedArgs:  # noqa: N802
        return [0, 0]

    @dbus_signal()
    def ActionInvoked(self) -> ActionArgs:  # noqa: N802
        return [0, ""]


@pytest.fixture
def session_bus(tmp_path: Path, monkeypatch) -> Iterator[str]:
    """Start a private dbus-daemon whose socket is ``$XDG_RUNTIME_DIR/bus``."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        pytest.fail("dbus-daemon not found; install the Debian package dbus")

    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    socket_path = runtime / "bus"
    process = subprocess.Popen(
        [
            daemon,
            "--session",
            "--nofork",
            "--print-address=1",
            f"--address=unix:path={socket_path}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        address = process.stdout.readline().strip()
        assert address.startswith("unix:path="), f"dbus-daemon printed {address!r}"
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
        monkeypatch.delenv("DISPLAY", raising=False)
        yield f"unix:path={socket_path}"
    finally:
        process.terminate()
        process.wait(DEADLINE_S)
        process.stdout.close()


@pytest.fixture
def notification_server(session_bus: str) -> Iterator[NotificationServer]:
    """Export the notification service on the test bus from its own event loop thread."""
    server = NotificationServer()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-notification-server")
    thread.start()

    async def export() -> MessageBus:
        bus = await MessageBus(bus_address=session_bus).connect()
        bus.export("/org/freedesktop/Notifications", server)
        await bus.request_name("org.freedesktop.Notifications")
        return bus

    bus = asyncio.run_coroutine_threadsafe(export(), loop).result(DEADLINE_S)
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(bus.disconnect)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(DEADLINE_S)
        loop.close()


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

    assert notification_server.received == [
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
    with Notifier(send_timeout_s=DEADLINE_S, retry_after_s=0.0) as notifier:
        assert notifier.show(make_push()) == "log"

        server = NotificationServer()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="test-notification-server")
        thread.start()

        async def export() -> MessageBus:
            bus = await MessageBus(bus_address=session_bus).connect()
            bus.export("/org/freedesktop/Notifications", server)
            await bus.request_name("org.freedesktop.Notifications")
            return bus

        bus = asyncio.run_coroutine_threadsafe(export(), loop).result(DEADLINE_S)
        try:
            with caplog.at_level(logging.INFO, logger="mailpush.agent.notify"):
                assert notifier.show(make_push()) == "desktop"
            assert len(server.received) == 1
            assert "desktop notifications work again" in caplog.text
        finally:
            loop.call_soon_threadsafe(bus.disconnect)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(DEADLINE_S)
            loop.close()


def test_close_ends_thread(notification_server) -> None:
    notifier = Notifier()
    assert notifier.show(make_push()) == "desktop"

    notifier.close()

    assert wait_for(lambda: THREAD_NAME not in [t.name for t in threading.enumerate()])
