"""The mailbox watcher threads of the users one service instance owns.

A watcher is started when its user comes to this instance and stopped when
the user goes to another one; see :mod:`mailpush.server.membership`.
"""

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from mailpush.errors import MailpushError
from mailpush.server.config import ImapMailbox, MaildirMailbox, UserSettings
from mailpush.server.mailbox.base import FlagCallback, MailboxWatcher, NewMail
from mailpush.server.mailbox.imap import ImapWatcher
from mailpush.server.mailbox.maildir import MaildirWatcher
from mailpush.server.mailbox.state import StateStore

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0

MailHandler = Callable[[UserSettings, NewMail], None]
FlagsHandler = Callable[[str, str, bool], None]


@dataclass(frozen=True)
class _Running:
    watcher: MailboxWatcher
    thread: threading.Thread
    stop: threading.Event


class WatcherPool:
    """Starts and stops one watcher thread per owned user.

    Every mailbox is checked (and its password read) when the pool is built,
    so a wrong mailbox fails the start of the service, not a later handover.

    Args:
        users: every configured user, by id.
        store: the durable record of handled mail, shared by all watchers.
        on_mail: called with the user and each new mail.
        on_flags: called with the user id, the mail id and its read state.

    Raises:
        MailpushError: a mailbox is misconfigured.
    """

    def __init__(
        self,
        users: Mapping[str, UserSettings],
        store: StateStore,
        on_mail: MailHandler,
        on_flags: FlagsHandler,
    ) -> None:
        self._users = users
        self._store = store
        self._on_mail = on_mail
        self._on_flags = on_flags
        self._spare = {user.id: make_watcher(user, store) for user in users.values()}
        self._running: dict[str, _Running] = {}
        self._handed_over: list[threading.Thread] = []
        self.errors: dict[str, MailpushError] = {}
        """The error that stopped each user's watcher, if one did."""

    def start(self, user_id: str) -> None:
        """Start watching ``user_id``'s mailbox in a thread of its own."""
        user = self._users[user_id]
        watcher = self._spare.pop(user_id, None)
        if watcher is None:
            try:
                watcher = make_watcher(user, self._store)
            except MailpushError as exc:
                log.error("mailbox of %s cannot be watched: %s", user_id, exc)
                self.errors[user_id] = exc
                return
        self.errors.pop(user_id, None)
        stop = threading.Event()
        on_mail = partial(self._on_mail, user)
        on_flags = partial(self._on_flags, user_id)
        thread = threading.Thread(
            target=self._watch,
            args=(user_id, watcher, stop, on_mail, on_flags),
            name=f"mailbox-{user_id}",
            daemon=True,
        )
        self._running[user_id] = _Running(watcher, thread, stop)
        thread.start()

    def hand_over(self, user_id: str) -> None:
        """Stop watching ``user_id``'s mailbox; the thread ends on its own."""
        # An error of a watcher now handed over no longer counts against this instance.
        self.errors.pop(user_id, None)
        running = self._running.pop(user_id, None)
        if running is not None:
            running.stop.set()
            self._handed_over.append(running.thread)

    def watcher(self, user_id: str) -> MailboxWatcher | None:
        """Return the running watcher of ``user_id``, or None."""
        running = self._running.get(user_id)
        return running.watcher if running is not None else None

    def all_stopped(self) -> bool:
        """Return True if watchers were started and every one of them has stopped."""
        started = bool(self._running) or bool(self.errors)
        return started and not any(running.thread.is_alive() for running in self._running.values())

    def close(self) -> None:
        """Stop every watcher and wait for its thread."""
        for running in self._running.values():
            running.stop.set()
        threads = [running.thread for running in self._running.values()] + self._handed_over
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)

    def _watch(
        self,
        user: str,
        watcher: MailboxWatcher,
        stop: threading.Event,
        on_mail: Callable[[NewMail], None],
        on_flags: FlagCallback,
    ) -> None:
        try:
            watcher.run(on_mail, stop, on_flags)
        except MailpushError as exc:
            log.error("mailbox of %s stopped: %s", user, exc)
            self.errors[user] = exc
        except Exception:
            log.exception("mailbox watcher of %s failed", user)
            self.errors[user] = MailpushError(f"mailbox watcher of {user} failed; see the log")


def make_watcher(user: UserSettings, store: StateStore) -> MailboxWatcher:
    """Build the watcher for ``user``'s mailbox; a Maildir with ``create`` is created first."""
    mailbox = user.mailbox
    if isinstance(mailbox, MaildirMailbox):
        if mailbox.create:
            for sub in ("cur", "new", "tmp"):
                (mailbox.path / sub).mkdir(parents=True, exist_ok=True)
        return MaildirWatcher(mailbox.path, store)
    assert isinstance(mailbox, ImapMailbox)
    return ImapWatcher(mailbox.imap_config(), store)
