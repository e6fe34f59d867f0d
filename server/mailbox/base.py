"""Types shared by every mailbox watcher.

A watcher finds new mail in one mailbox and calls ``on_mail`` once per mail.
The delivery contract is *at least once*, and exactly once in the absence of
crashes: the watcher calls ``on_mail(mail)`` and marks the mail handled in the
state store only after ``on_mail`` returns. A crash between the two causes the
mail to be delivered again after the restart, with the same ``mail_id``, so the
receiver (the outbox) must ignore a ``mail_id`` it has stored before.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


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


class RetryLater(Exception):  # noqa: N818 - it names what the watcher does, not an error
    """Raised by ``on_mail`` when a mail cannot be handled yet.

    The watcher offers the same mail again after its retry interval and logs
    at DEBUG only, because the callback has already said why.
    """


class MailboxWatcher(Protocol):
    """The interface of a mailbox watcher, as the service uses it.

    A watcher must set ``mailbox_key`` and implement ``run``. It reconnects or
    retries by itself; only an error that retrying cannot fix (a rejected
    login, a missing Maildir) leaves ``run`` with an exception.
    """

    mailbox_key: str

    def run(self, on_mail: MailCallback, stop: threading.Event) -> None:
        """Watch the mailbox and call ``on_mail`` for each new mail until ``stop`` is set.

        ``on_mail`` runs in the watcher's thread, one mail at a time, in arrival
        order. The mail is marked handled only after ``on_mail`` returns; if it
        raises, the watcher logs the error and offers the same mail again later.
        """
        ...
