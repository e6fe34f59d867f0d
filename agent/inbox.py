"""The agent's local store of received pushes.

The receiver stores each push here before it publishes the Ack, and skips a
push whose ``id`` is already stored, so a resend from the service's outbox
(after a lost Ack or an agent restart) never shows a second notification.

The store is SQLite rather than a JSON Lines file for three reasons. Storing
a push and checking its id happen in one transaction, so a crash between the
two cannot leave a duplicate or a lost push. A ``status`` push changes the
``seen`` flag of a stored mail in place, which a JSON Lines file could only
do by rewriting itself or by appending events that every reader replays.
And the service's CLI can read the file while the agent writes it (WAL mode).
``sqlite3 inbox.sqlite3 'SELECT * FROM pushes'`` still makes it greppable.

The file contains mail summaries (sender, subject, snippet), so it is created
with mode 0600 in a 0700 folder, whatever the umask.

:meth:`Inbox.store` commits before it returns, so a crash or kill of the agent
after the Ack loses nothing, and each commit is synced, so a power cut loses
nothing either. With ``sync_every_commit=False`` an OS crash or a power cut
can lose the pushes stored in about the last 0.25 s (see
:mod:`mailpush.sqlite_files`), and the service sends none of them again,
because they were acknowledged.
"""

from __future__ import annotations

import builtins
import logging
from pathlib import Path

import msgspec
import platformdirs

from mailpush.errors import PayloadError
from mailpush.protocol.messages import Push, decode, encode
from mailpush.sqlite_files import PrivateDatabase

logger = logging.getLogger(__name__)

FILE_NAME = "inbox.sqlite3"
_SCHEMA_VERSION = 1

# Every received push id is a row, for deduplication; ``status`` rows carry no
# payload and are never listed.
# NOTE: rows are never deleted, so the file grows with every push received.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pushes (
    push_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    mail_id TEXT NOT NULL,
    payload BLOB,
    seen INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS pushes_by_mail ON pushes (mail_id);
"""


def default_path() -> Path:
    """Return the default inbox file in the platform's user data folder."""
    return Path(platformdirs.user_data_dir("mailpush")) / FILE_NAME


class Inbox:
    """The pushes a terminal received, newest first, safe to share between threads.

    Args:
        path: the database file; :func:`default_path` when None.
        sync_every_commit: sync every commit to disk (``synchronous=FULL``), so
            that a power cut loses no stored push either.

    Raises:
        MailpushError: the file cannot be created, has unsafe permissions that
            cannot be fixed, or is not an inbox database.
    """

    def __init__(self, path: Path | None = None, *, sync_every_commit: bool = True) -> None:
        self.path = Path(path) if path is not None else default_path()
        self._db = PrivateDatabase(
            self.path,
            name="inbox",
            schema=_SCHEMA,
            version=_SCHEMA_VERSION,
            damaged_hint="pushes resent by the service then show again",
            fix_modes=True,
            sync_every_commit=sync_every_commit,
        )

    def close(self) -> None:
        """Close the database; calling it again does nothing."""
        self._db.close()

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def store(self, push: Push) -> bool:
        """Store a push durably; call it before publishing the Ack.

        A ``mail`` or ``prompt`` push becomes a listed entry. A ``status``
        push sets the ``seen`` flag of the stored entries for its mail and
        is kept only as an id, so a resent status is recognised too.

        Returns:
            True if stored now; False if a push with this id was stored before.
        """
        seen = int(push.mail.seen)
        payload = None if push.kind == "status" else encode(push)

        with self._db.transaction() as conn:
            inserted = conn.execute(
                "INSERT OR IGNORE INTO pushes (push_id, kind, mail_id, payload, seen)"
                " VALUES (?, ?, ?, ?, ?)",
                (push.id, push.kind, push.mail.id, payload, seen),
            ).rowcount
            if inserted and push.kind == "status":
                conn.execute(
                    "UPDATE pushes SET seen = ? WHERE mail_id = ? AND kind != 'status'",
                    (seen, push.mail.id),
                )
        return inserted > 0

    def list(self, limit: int | None = None) -> builtins.list[Push]:
        """Return the stored ``mail`` and ``prompt`` pushes, newest first.

        Each push's ``mail.seen`` is the current flag, which later ``status``
        pushes and :meth:`mark_read` may have changed.

        Args:
            limit: the maximum number of pushes; all when None.
        """
        query = (
            "SELECT push_id, payload, seen FROM pushes WHERE kind != 'status' ORDER BY rowid DESC"
        )
        params: tuple[int, ...] = ()
        if limit is not None:
            query += " LIMIT ?"
            params = (max(limit, 0),)

        with self._db.read() as conn:
            rows = conn.execute(query, params).fetchall()
        return [push for row in rows if (push := _restore(*row)) is not None]

    def get(self, mail_id: str) -> Push | None:
        """Return the newest stored push about ``mail_id``, or None."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT push_id, payload, seen FROM pushes"
                " WHERE mail_id = ? AND kind != 'status' ORDER BY rowid DESC LIMIT 1",
                (mail_id,),
            ).fetchone()
        if row is None:
            return None
        return _restore(*row)

    def mark_read(self, mail_id: str, seen: bool = True) -> bool:
        """Set the ``seen`` flag of the stored entries for ``mail_id``.

        Returns:
            True if a stored entry changed; False if none exists or it already had that flag.
        """
        with self._db.transaction() as conn:
            changed = conn.execute(
                "UPDATE pushes SET seen = ? WHERE mail_id = ? AND kind != 'status' AND seen != ?",
                (int(seen), mail_id, int(seen)),
            ).rowcount
        return changed > 0


def _restore(push_id: str, payload: bytes, seen: int) -> Push | None:
    """Decode a stored push and apply the current seen flag; None if the row is unreadable."""
    try:
        push = decode(bytes(payload), Push)
    except PayloadError as exc:
        # NOTE: a row written by a newer, incompatible mailpush is skipped, not migrated.
        logger.warning("inbox: stored push %s is unreadable and skipped: %s", push_id, exc)
        return None
    mail = msgspec.structs.replace(push.mail, seen=bool(seen))
    return msgspec.structs.replace(push, mail=mail)
