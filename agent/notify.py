"""Show received pushes as desktop notifications, with a log line as the fallback.

desktop-notifier (6.x) is asyncio code, and on Linux it talks to the
``org.freedesktop.Notifications`` service on the D-Bus session bus. The
receiver calls :meth:`Notifier.show` from paho's network thread, so the
notifier runs its own event loop in a thread named ``mailpush-notify`` and
waits for each notification for at most ``send_timeout_s``.

A notification service may be unreachable: a service started outside a
desktop session has no session bus, and a bus may have no notification
server. Then each push becomes an INFO log line with its sender and subject,
and the reason is logged once at WARNING. The service is probed again every ``retry_after_s``.

A systemd user service gets no ``DBUS_SESSION_BUS_ADDRESS`` unless the
desktop session exports it, but the bus socket usually exists at
``$XDG_RUNTIME_DIR/bus`` (``/run/user/UID/bus``). :func:`ensure_session_bus`
sets the variable from that socket, because dbus-fast only reads the variable.

With an ``on_mark_read`` callback, a ``mail`` notification carries a "Mark
read" button where the platform supports buttons. On Linux that is a server
whose ``GetCapabilities`` lists ``actions`` (freedesktop notification spec).
desktop-notifier 6.2 sends buttons to servers without it too, so the
notifier checks the capability itself.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mailpush.agent.on_mail import on_mail_environment, run_on_mail, validate_on_mail
from mailpush.protocol.messages import Push

if TYPE_CHECKING:
    # At run time asyncio is imported by the first desktop notification,
    # because it adds about 1.4 MiB RSS (CPython 3.11, x86_64) to an agent
    # that may never show one.
    import asyncio

# Re-exported: callers and tests have imported these from this module.
__all__ = [
    "Notifier",
    "ensure_session_bus",
    "find_session_bus",
    "format_notification",
    "on_mail_environment",
    "run_on_mail",
    "validate_on_mail",
]

logger = logging.getLogger(__name__)

Shown = Literal["desktop", "log", "none"]

THREAD_NAME = "mailpush-notify"
DEFAULT_SEND_TIMEOUT_S = 5.0
DEFAULT_RETRY_AFTER_S = 300.0
DEFAULT_ON_MAIL_TIMEOUT_S = 30.0
MARK_READ_TITLE = "Mark read"
# The action key sent to the notification server. It only has to be unique
# within one notification.
MARK_READ_ACTION = "mark-read"


def find_session_bus(environ: Mapping[str, str] | None = None) -> str | None:
    """Return the D-Bus session bus address: the variable, else the socket in the runtime dir.

    Args:
        environ: the environment to read; ``os.environ`` when None.

    Returns:
        A D-Bus address such as ``unix:path=/run/user/1000/bus``, or None.
    """
    env = os.environ if environ is None else environ
    address = env.get("DBUS_SESSION_BUS_ADDRESS")
    if address:
        return address

    runtime_dirs = [env.get("XDG_RUNTIME_DIR", "")]
    if hasattr(os, "getuid"):
        runtime_dirs.append(f"/run/user/{os.getuid()}")
    for runtime_dir in runtime_dirs:
        if runtime_dir and Path(runtime_dir, "bus").is_socket():
            return f"unix:path={Path(runtime_dir, 'bus')}"
    return None


def ensure_session_bus(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Set ``DBUS_SESSION_BUS_ADDRESS`` from the runtime dir's socket when it is unset.

    Returns:
        The session bus address in effect, or None when there is none.
    """
    env = os.environ if environ is None else environ
    address = find_session_bus(env)
    if address and not env.get("DBUS_SESSION_BUS_ADDRESS"):
        env["DBUS_SESSION_BUS_ADDRESS"] = address
        logger.debug("notify: using the session bus at %s", address)
    return address


def format_notification(push: Push) -> tuple[str, str] | None:
    """Return the (title, body) to show for a push, or None for a ``status`` push.

    Notification servers may read a subset of HTML in the body, so ``&``,
    ``<`` and ``>`` in it are escaped. The freedesktop notification spec
    defines the title as plain text, so it stays as it is, on one line.
    """
    # Imported on the first push: the html package loads its table of 2,231
    # HTML5 entities, about 0.4 MiB RSS (CPython 3.11, x86_64), for escape()
    # that needs none of them.
    import html

    mail = push.mail
    sender = _one_line(mail.sender) or "(unknown sender)"
    subject = _one_line(mail.subject) or "(no subject)"

    if push.kind == "mail":
        body = subject if not mail.snippet else f"{subject}\n{mail.snippet}"
        return sender, html.escape(body, quote=False)
    if push.kind == "prompt":
        terminals = ", ".join(push.delivered_to) or "another terminal"
        return f"Mail for {terminals}: {subject}", html.escape(f"From {sender}", quote=False)
    return None


class Notifier:
    """Shows pushes on the desktop, or logs them when no notification service is reachable.

    Args:
        app_name: the application name the notification server shows.
        on_mail: a command (program and arguments, run without a shell) to run
            for every ``mail`` push, with ``MAILPUSH_FROM``, ``MAILPUSH_SUBJECT``,
            ``MAILPUSH_MAIL_ID``, ``MAILPUSH_PUSH_ID`` and ``MAILPUSH_KIND`` in its environment.
        on_mail_timeout_s: seconds before the ``on_mail`` command is killed.
        send_timeout_s: seconds :meth:`show` waits for the notification service.
        retry_after_s: seconds before an unreachable service is tried again.
        desktop: whether to try desktop notifications at all.
        on_mark_read: called with the mail id when the user presses the "Mark
            read" button of a ``mail`` notification. It runs on the notifier's
            event loop thread, so it should return quickly; an exception from
            it is logged and dropped. None shows no button.

    Raises:
        ConfigError: ``on_mail`` is not a non-empty list of strings.
    """

    def __init__(
        self,
        app_name: str = "mailpush",
        on_mail: list[str] | None = None,
        on_mail_timeout_s: float = DEFAULT_ON_MAIL_TIMEOUT_S,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
        desktop: bool = True,
        on_mark_read: Callable[[str], None] | None = None,
    ) -> None:
        self.app_name = app_name
        self.on_mail = validate_on_mail(on_mail)
        self.on_mark_read = on_mark_read
        self.on_mail_timeout_s = on_mail_timeout_s
        self.send_timeout_s = send_timeout_s
        self.retry_after_s = retry_after_s

        self._lock = threading.Lock()
        self._desktop_enabled = desktop
        self._unavailable_reason: str | None = None
        self._next_probe = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._notifier: Any = None
        self._commands: ThreadPoolExecutor | None = None
        self._pending_commands: list[Future[None]] = []

    def show(self, push: Push) -> Shown:
        """Show one push and start its ``on_mail`` command; never raises.

        Returns:
            ``desktop`` when a notification server took it, ``log`` when it was
            logged instead, ``none`` for a ``status`` push, which shows nothing.
        """
        try:
            return self._show(push)
        except Exception as exc:  # a notification must never stop the receiver
            logger.warning("notify: failed to show push %s: %s", push.id, exc)
            return "log"

    def wait_for_commands(self, timeout: float | None = None) -> None:
        """Wait until the ``on_mail`` commands started so far have ended; for tests and shutdown."""
        with self._lock:
            pending, self._pending_commands = self._pending_commands, []
        for future in pending:
            future.result(timeout)

    def close(self) -> None:
        """Stop the notification thread and wait for running ``on_mail`` commands."""
        with self._lock:
            loop, thread, commands = self._loop, self._thread, self._commands
            self._loop, self._thread, self._commands = None, None, None
        if commands is not None:
            commands.shutdown(wait=True)
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(self.send_timeout_s)

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _show(self, push: Push) -> Shown:
        content = format_notification(push)
        if content is None:
            return "none"
        if push.kind == "mail" and self.on_mail:
            self._start_on_mail(self.on_mail, push)

        title, body = content
        mark_read_id = push.mail.id if push.kind == "mail" and self.on_mark_read else None
        if self._desktop_available() and self._send_desktop(title, body, mark_read_id):
            return "desktop"

        self._log_push(push)
        return "log"

    def _desktop_available(self) -> bool:
        """Return whether to try the desktop now: it worked before, or a retry is due."""
        if not self._desktop_enabled:
            return False
        if self._unavailable_reason is None:
            return True
        return time.monotonic() >= self._next_probe

    def _send_desktop(self, title: str, body: str, mark_read_id: str | None) -> bool:
        """Send one notification through the notifier thread; return whether it was dispatched."""
        on_linux = sys.platform.startswith("linux")
        if on_linux and ensure_session_bus() is None and not os.environ.get("DISPLAY"):
            self._mark_unavailable(
                "no D-Bus session bus: DBUS_SESSION_BUS_ADDRESS is unset and "
                "$XDG_RUNTIME_DIR/bus does not exist"
            )
            return False

        import asyncio

        try:
            loop = self._ensure_loop()
            future = asyncio.run_coroutine_threadsafe(self._send(title, body, mark_read_id), loop)
            future.result(self.send_timeout_s)
        except FutureTimeoutError:
            future.cancel()
            self._mark_unavailable(f"no answer within {self.send_timeout_s:g} s")
            return False
        except Exception as exc:  # dbus-fast and the OS raise many types here
            self._mark_unavailable(_describe(exc))
            return False

        if self._unavailable_reason is not None:
            logger.info("notify: desktop notifications work again")
            self._unavailable_reason = None
        return True

    async def _send(self, title: str, body: str, mark_read_id: str | None) -> None:
        """Probe the notification service, then send; raise when it was not dispatched.

        A "Mark read" button is added for ``mark_read_id`` when the service supports buttons.
        """
        import asyncio

        if self._notifier is None:
            self._notifier = _new_desktop_notifier(self.app_name)

        # The probe raises when the bus or the service is missing; send() alone
        # would only log a warning with a traceback and return.
        capabilities = await self._notifier.get_capabilities()

        # NOTE: desktop-notifier 6.2 caches the capabilities per instance, so a
        # server replaced by one with other capabilities is seen only after a failed send.
        buttons = []
        if mark_read_id is not None and _supports_buttons(capabilities):
            buttons.append(self._mark_read_button(mark_read_id))

        dispatched = asyncio.Event()
        await self._notifier.send(
            title=title, message=body, buttons=buttons, on_dispatched=dispatched.set
        )
        if not dispatched.is_set():
            msg = "the notification service did not accept the notification"
            raise RuntimeError(msg)

    def _mark_read_button(self, mail_id: str) -> Any:
        """Return a desktop-notifier Button that calls ``on_mark_read`` for ``mail_id``."""
        from desktop_notifier import Button

        return Button(
            title=MARK_READ_TITLE,
            identifier=MARK_READ_ACTION,
            on_pressed=lambda: self._on_mark_read_pressed(mail_id),
        )

    def _on_mark_read_pressed(self, mail_id: str) -> None:
        """Call ``on_mark_read`` and log its exception in one line, not dbus-fast's traceback."""
        if self.on_mark_read is None:
            return
        try:
            self.on_mark_read(mail_id)
        except Exception as exc:  # the callback may fail in any way (inbox, link)
            logger.warning("notify: marking mail %s read failed: %s", mail_id, _describe(exc))

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        """Start the notifier thread with its own event loop, once."""
        import asyncio

        with self._lock:
            if self._loop is not None:
                return self._loop
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=_run_loop, args=(loop,), name=THREAD_NAME, daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
            return loop

    def _mark_unavailable(self, reason: str) -> None:
        """Switch to log lines; warn at the first failure, and at DEBUG on failed retries."""
        first = self._unavailable_reason is None
        self._unavailable_reason = reason
        self._next_probe = time.monotonic() + self.retry_after_s
        # A new notifier on the next probe, so a bus that appears later is found.
        self._notifier = None
        if first:
            logger.warning(
                "notify: no desktop notification service (%s); logging mail instead, "
                "retrying every %g s",
                reason,
                self.retry_after_s,
            )
        else:
            logger.debug("notify: desktop notifications still unavailable: %s", reason)

    def _log_push(self, push: Push) -> None:
        """Log sender and subject only; the snippet is part of the mail body."""
        sender = _one_line(push.mail.sender) or "(unknown sender)"
        subject = _one_line(push.mail.subject) or "(no subject)"
        if push.kind == "prompt":
            terminals = ", ".join(push.delivered_to) or "another terminal"
            logger.info("mail for %s from %s: %s", terminals, sender, subject)
        else:
            logger.info("mail from %s: %s", sender, subject)

    def _start_on_mail(self, command: list[str], push: Push) -> None:
        """Run the ``on_mail`` command in the command thread, so show() does not wait for it."""
        with self._lock:
            if self._commands is None:
                self._commands = ThreadPoolExecutor(1, thread_name_prefix="mailpush-on-mail")
            future = self._commands.submit(run_on_mail, command, push, self.on_mail_timeout_s)
            self._pending_commands = [f for f in self._pending_commands if not f.done()]
            self._pending_commands.append(future)


def _new_desktop_notifier(app_name: str) -> Any:
    """Create a desktop-notifier instance; imported here so a headless agent can skip it."""
    from desktop_notifier import DesktopNotifier

    return DesktopNotifier(app_name=app_name)


def _supports_buttons(capabilities: frozenset[Any]) -> bool:
    """Return whether desktop-notifier reports buttons, which on Linux means ``actions``."""
    from desktop_notifier import Capability

    return Capability.BUTTONS in capabilities


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Run the notifier's event loop until close() stops it."""
    import asyncio

    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


def _one_line(text: str) -> str:
    """Collapse line breaks and runs of whitespace, so a header cannot fake extra lines."""
    return " ".join(text.split())


def _describe(exc: BaseException) -> str:
    """Return a one-line reason for a failed notification."""
    detail = str(exc).replace("\n", " ").strip()
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
