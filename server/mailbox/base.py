r"""Types shared by every mailbox watcher.

A watcher finds new mail in one mailbox and calls ``on_mail`` once per mail.
The delivery contract is *at least once*, and exactly once in the absence of
crashes: the watcher calls ``on_mail(mail)`` and marks the mail handled in the
state store only after ``on_mail`` returns. A crash between the two causes the
mail to be delivered again after the restart, with the same ``mail_id``, so the
receiver (the outbox) must ignore a ``mail_id`` it has stored before.

A watcher also keeps the read state in step. When the ``\Seen`` flag of a
handled mail changes, whoever changed it, the watcher calls
``on_flags(mail_id, seen)``. The service calls ``set_seen`` to set or clear
that flag when a user reads a mail on a terminal.
"""

import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewMail:
    r"""One new mail found in a mailbox.

    Attributes:
        mailbox_key: Identifies the watched mailbox, such as
            ``imap://user@host:993/INBOX`` or ``maildir:/home/user/Maildir``.
        mail_id: Stable id of the mail in that mailbox: ``{uidvalidity}-{uid}``
            for IMAP, the file's unique name before the ``:2,`` flags for a Maildir.
        raw: The whole message as RFC 5322 bytes.
        seen: Whether the mail has the ``\Seen`` flag (``S`` in a Maildir name).
    """

    mailbox_key: str
    mail_id: str
    raw: bytes = field(repr=False)
    seen: bool


MailCallback = Callable[[NewMail], None]

# Called as on_flags(mail_id, seen) when the \Seen flag of a handled mail changes.
FlagCallback = Callable[[str, bool], None]


class RetryLater(Exception):  # noqa: N818 - it names what the watcher does, not an error
    """Raised by ``on_mail`` when a mail cannot be handled yet.

    The watcher offers the same mail again after its retry interval and logs
    at DEBUG only, because the callback has already logged the reason.
    """


class MailboxWatcher(Protocol):
    """The interface of a mailbox watcher, as the service uses it.

    A watcher must set ``mailbox_key`` and implement ``run`` and ``set_seen``.
    It reconnects or retries by itself; only an error that retrying cannot fix
    (a rejected login, a missing Maildir) leaves ``run`` with an exception.
    """

    mailbox_key: str

    def run(
        self, on_mail: MailCallback, stop: threading.Event, on_flags: FlagCallback | None = None
    ) -> None:
        r"""Watch the mailbox and call ``on_mail`` for each new mail until ``stop`` is set.

        ``on_mail`` runs in the watcher's thread, one mail at a time, in arrival
        order. The mail is marked handled only after ``on_mail`` returns; if it
        raises, the watcher logs the error and offers the same mail again later.

        ``on_flags(mail_id, seen)`` runs in the watcher's thread too, when the
        ``\Seen`` state of a handled mail changes, whoever changed it (a change
        made through ``set_seen`` may be reported as well). The first time the
        watcher sees a mail it only records the state. An exception raised by
        ``on_flags`` is logged and does not stop the watcher.
        """
        ...

    def set_seen(self, mail_id: str, seen: bool) -> bool:
        r"""Set (``seen`` true) or clear the ``\Seen`` flag of one mail.

        Safe to call from another thread while ``run`` runs.

        Returns:
            True when the flag is now as requested; False, after logging one
            line, when the mail is not found or the mailbox cannot be reached.
        """
        ...


class SeenTracker:
    r"""The last known ``\Seen`` state of the mails a watcher tracks, to report changes.

    Used by one watcher thread only. Its size is the number of mails the
    watcher tracks, because the watcher drops the ids it no longer tracks
    with :meth:`retain`.

    Args:
        on_flags: Called with ``(mail_id, seen)`` for each change, or None.
        source: The watcher's name for log lines, such as ``maildir`` or ``imap``.
    """

    def __init__(self, on_flags: FlagCallback | None, source: str) -> None:
        self.on_flags = on_flags
        self.source = source
        self._seen: dict[str, bool] = {}
        self._missed_once: set[str] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, mail_id: object) -> bool:
        return mail_id in self._seen

    def observe(self, mail_id: str, seen: bool) -> None:
        """Store the state of one mail, and report it if it differs from the stored one."""
        previous = self._seen.get(mail_id)
        self._seen[mail_id] = seen
        if previous is None or previous == seen or self.on_flags is None:
            return
        try:
            self.on_flags(mail_id, seen)
        except Exception:
            log.exception("%s: reporting the read state of mail %s failed", self.source, mail_id)

    def retain(self, present: Collection[str]) -> None:
        """Forget every mail that is missing from ``present`` for the second time in a row.

        One miss is not enough, because a directory listing may skip a file
        that a mail client renames while it is listed (POSIX leaves readdir's
        result unspecified for entries added or removed meanwhile).
        """
        missing = {mail_id for mail_id in self._seen if mail_id not in present}
        for mail_id in missing & self._missed_once:
            del self._seen[mail_id]
        self._missed_once = missing - self._missed_once
