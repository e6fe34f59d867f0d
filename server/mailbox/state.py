"""The durable memory of the mailbox watchers: which mail was already handled.

One SQLite file stores, per mailbox, the IMAP UIDVALIDITY and the last UID
handled, or the names of the Maildir files handled. Each ``mark_*`` call is its
own committed transaction, so a SIGKILL loses at most the mail being delivered
at that moment, which is then delivered again (see ``mailbox.base``).
"""

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_state_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS imap_position (
    mailbox_key TEXT PRIMARY KEY,
    uidvalidity INTEGER NOT NULL,
    last_uid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS maildir_baseline (
    mailbox_key TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS maildir_handled (
    mailbox_key TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (mailbox_key, name)
) WITHOUT ROWID;
"""


def default_state_path() -> Path:
    """Return the default store path, ``server.sqlite3`` in the user's state folder."""
    return Path(user_state_dir("mailpush")) / "server.sqlite3"


@dataclass(frozen=True)
class ImapPosition:
    """How far an IMAP folder has been handled: every UID up to ``last_uid`` is done."""

    uidvalidity: int
    last_uid: int


class StateStore:
    """The SQLite store of handled mail, shared by the watchers of one service.

    The methods may be called from several threads; one lock serializes them.
    Use it as a context manager, or call ``close()``.

    Args:
        path: The SQLite file; the parent folder is created. Defaults to
            :func:`default_state_path`.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_state_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            # WAL with synchronous=NORMAL keeps every committed transaction
            # across a process crash; a power loss may drop the last few,
            # which only leads to a re-delivery that the outbox ignores.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error:
            self._db.close()
            raise

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # IMAP

    def imap_position(self, mailbox_key: str) -> ImapPosition | None:
        """Return the stored position of an IMAP folder, or None before its first run."""
        with self._lock:
            row = self._db.execute(
                "SELECT uidvalidity, last_uid FROM imap_position WHERE mailbox_key = ?",
                (mailbox_key,),
            ).fetchone()
        return ImapPosition(row[0], row[1]) if row else None

    def set_imap_position(self, mailbox_key: str, position: ImapPosition) -> None:
        """Store a folder's position, replacing any other; used for a new baseline."""
        with self._lock:
            self._db.execute(
                "INSERT INTO imap_position (mailbox_key, uidvalidity, last_uid) VALUES (?, ?, ?) "
                "ON CONFLICT (mailbox_key) DO UPDATE "
                "SET uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid",
                (mailbox_key, position.uidvalidity, position.last_uid),
            )

    def mark_imap_handled(self, mailbox_key: str, uidvalidity: int, uid: int) -> None:
        """Record that the mail ``uid`` was handled, after ``on_mail`` returned for it.

        The last UID only moves forward, and only while ``uidvalidity`` is the
        stored one, so a late call from before a UIDVALIDITY change is ignored.
        """
        with self._lock:
            self._db.execute(
                "UPDATE imap_position SET last_uid = MAX(last_uid, ?) "
                "WHERE mailbox_key = ? AND uidvalidity = ?",
                (uid, mailbox_key, uidvalidity),
            )

    # Maildir

    def maildir_handled(self, mailbox_key: str) -> set[str] | None:
        """Return the handled file names of a Maildir, or None if it has no baseline yet."""
        with self._lock:
            has_baseline = self._db.execute(
                "SELECT 1 FROM maildir_baseline WHERE mailbox_key = ?", (mailbox_key,)
            ).fetchone()
            if not has_baseline:
                return None
            rows = self._db.execute(
                "SELECT name FROM maildir_handled WHERE mailbox_key = ?", (mailbox_key,)
            ).fetchall()
        return {row[0] for row in rows}

    def set_maildir_baseline(self, mailbox_key: str, names: Iterable[str]) -> None:
        """Record the mail present at the first start as handled, in one transaction."""
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO maildir_baseline (mailbox_key) VALUES (?)", (mailbox_key,)
            )
            self._db.executemany(
                "INSERT OR IGNORE INTO maildir_handled (mailbox_key, name) VALUES (?, ?)",
                ((mailbox_key, name) for name in names),
            )

    def mark_maildir_handled(self, mailbox_key: str, name: str) -> None:
        """Record that the Maildir file ``name`` was handled, after ``on_mail`` returned."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO maildir_handled (mailbox_key, name) VALUES (?, ?)",
                (mailbox_key, name),
            )

    def forget_maildir_names(self, mailbox_key: str, names: Iterable[str]) -> None:
        """Drop handled names whose files are gone, so the table does not grow forever."""
        with self._lock, self._transaction():
            self._db.executemany(
                "DELETE FROM maildir_handled WHERE mailbox_key = ? AND name = ?",
                ((mailbox_key, name) for name in names),
            )

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db)


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK on an exception (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
