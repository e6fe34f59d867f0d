"""Mailbox watchers: find new mail in an IMAP folder or a local Maildir."""

from mailpush.server.mailbox.base import MailboxWatcher, MailCallback, NewMail
from mailpush.server.mailbox.imap import ImapConfig, ImapWatcher
from mailpush.server.mailbox.maildir import MaildirWatcher
from mailpush.server.mailbox.state import ImapPosition, StateStore, default_state_path

__all__ = [
    "ImapConfig",
    "ImapPosition",
    "ImapWatcher",
    "MailCallback",
    "MailboxWatcher",
    "MaildirWatcher",
    "NewMail",
    "StateStore",
    "default_state_path",
]
