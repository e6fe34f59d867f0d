"""The durable outbox of ``mail`` and ``prompt`` pushes, kept until each is acknowledged.

A broker's session cannot promise delivery: a restarted broker without
persistence loses it, and the embedded amqtt broker keeps no offline queue
for anonymous clients. So the service stores every ``mail`` and ``prompt``
push here before publishing it, and deletes it from the queue only when the
terminal publishes an Ack with the push ``id``. The service sends the
unacknowledged pushes of a terminal again when that terminal publishes any
state other than ``off``, and every ``resend_after_s`` while it is online. A
push older than ``ttl_s`` expires with a log line.

The store is SQLite in WAL mode. Every public method that changes it is one
transaction, committed before the method returns, so a SIGKILL loses no
operation that returned, and each commit is synced, so a power cut loses none
either. ``sync_every_commit=False`` saves that fsync per commit, and then an
OS crash or a power cut can lose the commits of about the last 0.25 s (see
:mod:`mailpush.sqlite_files`). One
connection is shared by all threads behind a lock.

Besides the pushes, the outbox records which mails were routed for a user,
so that a mail that the mailbox watcher delivers again after a crash
produces no second push: :meth:`Outbox.record_routing` checks and records
that in the same transaction that queues the pushes.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from mailpush.sqlite_files import PrivateDatabase

logger = logging.getLogger(__name__)

DEFAULT_RESEND_AFTER_S = 30.0
DEFAULT_TTL_S = 7 * 86400.0
# Routing records outlive the pushes, so that a mail the watcher reports again
# weeks later (a lost watcher state, a restored mailbox) is still not pushed twice.
DEFAULT_ROUTED_TTL_S = 30 * 86400.0

QUEUED_KINDS = ("mail", "prompt")
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pushes (
    user TEXT NOT NULL,
    terminal TEXT NOT NULL,
    push_id TEXT NOT NULL,
    mail_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    sent REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    acked REAL,
    PRIMARY KEY (user, terminal, push_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS pushes_by_mail ON pushes (user, terminal, mail_id, kind);
CREATE INDEX IF NOT EXISTS pushes_unacked ON pushes (acked, sent);
CREATE TABLE IF NOT EXISTS routed (
    user TEXT NOT NULL,
    mail_id TEXT NOT NULL,
    routed REAL NOT NULL,
    PRIMARY KEY (user, mail_id)
);
"""


class QueuedPush(NamedTuple):
    """One push of a routing decision, as :meth:`Outbox.record_routing` takes it."""

    terminal: str
    push_id: str
    kind: str
    payload: bytes


class DuePush(NamedTuple):
    """An unacknowledged push whose last send is older than the resend interval."""

    user: str
    terminal: str
    push_id: str
    payload: bytes


class Outbox:
    """The SQLite outbox of unacknowledged pushes, safe to share between threads.

    Args:
        path: the database file; its folder is created if missing, and the
            file is created with mode 0600 because payloads hold mail summaries.
        resend_after_s: seconds after a send before :meth:`due` offers a push again.
        ttl_s: seconds after which an unacknowledged push expires.
        routed_ttl_s: seconds for which a routed mail id is remembered.
        clock: wall-clock time in Unix seconds; stored times must survive restarts.
        sync_every_commit: sync every commit to disk (``synchronous=FULL``), so
            that a power cut loses no commit either.

    Raises:
        MailpushError: the file cannot be opened or is not an outbox database.
    """

    def __init__(
        self,
        path: Path,
        resend_after_s: float = DEFAULT_RESEND_AFTER_S,
        ttl_s: float = DEFAULT_TTL_S,
        routed_ttl_s: float = DEFAULT_ROUTED_TTL_S,
        clock: Callable[[], float] = time.time,
        *,
        sync_every_commit: bool = True,
    ) -> None:
        self.path = Path(path)
        self.resend_after_s = resend_after_s
        self.ttl_s = ttl_s
        self.routed_ttl_s = max(routed_ttl_s, ttl_s)
        self._clock = clock
        self._db = PrivateDatabase(
            self.path,
            name="outbox",
            schema=_SCHEMA,
            version=_SCHEMA_VERSION,
            damaged_hint="the pushes queued in it are then lost",
            sync_every_commit=sync_every_commit,
        )

    def close(self) -> None:
        """Close the database; calling it again does nothing."""
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def add(
        self,
        user: str,
        terminal: str,
        push_id: str,
        payload: bytes,
        mail_id: str,
        kind: str = "mail",
    ) -> bool:
        """Queue one push, unless this terminal already has one of this kind for this mail.

        Returns:
            True if queued; False if a push of ``kind`` for ``mail_id`` was
            queued for ``terminal`` before (acknowledged or not), or the
            ``push_id`` is taken.

        Raises:
            ValueError: ``kind`` is not ``mail`` or ``prompt``.
        """
        _check_kind(kind)
        with self._db.transaction() as conn:
            return _insert_push(
                conn, user, QueuedPush(terminal, push_id, kind, payload), mail_id, self._clock()
            )

    def routed(self, user: str, mail_id: str) -> bool:
        """Return whether the routing of ``mail_id`` for ``user`` was recorded."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT 1 FROM routed WHERE user = ? AND mail_id = ?", (user, mail_id)
            ).fetchone()
        return row is not None

    def record_routing(
        self, user: str, mail_id: str, pushes: Sequence[QueuedPush], *, sending: bool = False
    ) -> bool:
        """Record that ``mail_id`` was routed and queue its pushes, in one transaction.

        An empty ``pushes`` is valid (a policy whose fallback is ``none``) and
        still marks the mail as routed. With ``sending``, the pushes are also
        marked sent, for a caller that publishes them right after, which saves
        a commit per push. A crash between the commit and the publish then
        delays them until the caller resends its pending pushes.

        Returns:
            True if recorded; False if the mail was routed before, in which
            case nothing is queued.

        Raises:
            ValueError: a push has a kind other than ``mail`` or ``prompt``.
        """
        pushes = [QueuedPush(*push) for push in pushes]
        for push in pushes:
            _check_kind(push.kind)

        now = self._clock()
        with self._db.transaction() as conn:
            inserted = conn.execute(
                "INSERT OR IGNORE INTO routed (user, mail_id, routed) VALUES (?, ?, ?)",
                (user, mail_id, now),
            ).rowcount
            if not inserted:
                return False
            for push in pushes:
                _insert_push(conn, user, push, mail_id, now, sent=now if sending else None)
        return True

    def mark_sent(self, user: str, terminal: str, push_id: str, now: float | None = None) -> bool:
        """Record that the push was published at ``now``, which restarts its resend interval.

        Returns:
            True if an unacknowledged push matched.
        """
        sent = self._clock() if now is None else now
        with self._db.transaction() as conn:
            changed = conn.execute(
                "UPDATE pushes SET sent = ?, attempts = attempts + 1"
                " WHERE user = ? AND terminal = ? AND push_id = ? AND acked IS NULL",
                (sent, user, terminal, push_id),
            ).rowcount
        return changed > 0

    def ack(self, user: str, terminal: str, push_id: str) -> bool:
        """Mark a push acknowledged, so it is neither pending nor due any more.

        The row stays until it expires, so that :meth:`add` still recognises
        the mail as pushed to that terminal.

        Returns:
            True if an unacknowledged push matched; False for an unknown id or a
            repeated Ack.
        """
        with self._db.transaction() as conn:
            changed = conn.execute(
                "UPDATE pushes SET acked = ?"
                " WHERE user = ? AND terminal = ? AND push_id = ? AND acked IS NULL",
                (self._clock(), user, terminal, push_id),
            ).rowcount
        return changed > 0

    def pending(self, user: str, terminal: str) -> list[tuple[str, bytes]]:
        """Return the unacknowledged pushes of a terminal, oldest first, as (push_id, payload).

        The service sends these again when the terminal comes back.
        """
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT push_id, payload FROM pushes"
                " WHERE user = ? AND terminal = ? AND acked IS NULL ORDER BY created, rowid",
                (user, terminal),
            ).fetchall()
        return [(push_id, bytes(payload)) for push_id, payload in rows]

    def due(self, now: float | None = None) -> list[DuePush]:
        """Return the unacknowledged pushes never sent or last sent ``resend_after_s`` ago.

        Whether each terminal is online is for the caller to decide, and the
        caller calls :meth:`mark_sent` for each push it publishes.
        """
        current = self._clock() if now is None else now
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT user, terminal, push_id, payload FROM pushes"
                " WHERE acked IS NULL AND (sent IS NULL OR sent <= ?) ORDER BY created, rowid",
                (current - self.resend_after_s,),
            ).fetchall()
        return [
            DuePush(user, terminal, push_id, bytes(payload))
            for user, terminal, push_id, payload in rows
        ]

    def expire(self, now: float | None = None) -> int:
        """Delete unacknowledged pushes older than ``ttl_s``, logging each one.

        Also deletes acknowledged pushes older than ``ttl_s`` and routing
        records older than ``routed_ttl_s``, without a log line.

        Returns:
            How many unacknowledged pushes expired.
        """
        current = self._clock() if now is None else now
        push_cutoff = current - self.ttl_s
        with self._db.transaction() as conn:
            expired = conn.execute(
                "SELECT user, terminal, push_id, mail_id, kind, attempts FROM pushes"
                " WHERE acked IS NULL AND created < ?",
                (push_cutoff,),
            ).fetchall()
            conn.execute("DELETE FROM pushes WHERE created < ?", (push_cutoff,))
            conn.execute("DELETE FROM routed WHERE routed < ?", (current - self.routed_ttl_s,))

        for user, terminal, push_id, mail_id, kind, attempts in expired:
            logger.info(
                "outbox: %s push %s for %s/%s (mail %s) expired unacknowledged after %d sends",
                kind,
                push_id,
                user,
                terminal,
                mail_id,
                attempts,
            )
        return len(expired)

    def counts(self) -> dict[str, int]:
        """Return how many pushes are unacknowledged and acknowledged, and mails routed."""
        # One statement, so that all three counts come from one snapshot.
        with self._db.read() as conn:
            unacked, acked, routed = conn.execute(
                "SELECT (SELECT COUNT(*) - COUNT(acked) FROM pushes),"
                " (SELECT COUNT(acked) FROM pushes), (SELECT COUNT(*) FROM routed)"
            ).fetchone()
        return {"unacknowledged": unacked, "acknowledged": acked, "routed": routed}


def _check_kind(kind: str) -> None:
    if kind not in QUEUED_KINDS:
        msg = f"outbox: push kind {kind!r} is not queued; only {', '.join(QUEUED_KINDS)} are"
        raise ValueError(msg)


def _insert_push(
    conn: sqlite3.Connection,
    user: str,
    push: QueuedPush,
    mail_id: str,
    now: float,
    sent: float | None = None,
) -> bool:
    """Insert one push row unless its id or its (terminal, mail, kind) exists; return whether.

    A push inserted with ``sent`` counts as sent once at that time.
    """
    inserted = conn.execute(
        "INSERT OR IGNORE INTO pushes"
        " (user, terminal, push_id, mail_id, kind, payload, created, sent, attempts)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            user,
            push.terminal,
            push.push_id,
            mail_id,
            push.kind,
            bytes(push.payload),
            now,
            sent,
            0 if sent is None else 1,
        ),
    ).rowcount
    return inserted > 0
