"""Private SQLite files: created 0600, WAL, every commit synced, schema checked.

The agent's inbox and the service's outbox hold mail summaries, and both must
survive a crash or a power cut without losing what a method call returned.
"""

import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mailpush.errors import MailpushError

log = logging.getLogger(__name__)


def open_private_database(
    path: Path,
    *,
    name: str,
    schema: str,
    version: int,
    damaged_hint: str,
    fix_modes: bool = False,
) -> sqlite3.Connection:
    """Create or open a private SQLite file, or raise a one-line :class:`MailpushError`.

    Args:
        path: the database file; its folder is created with mode 0700.
        name: what the file is (``inbox``, ``outbox``), the prefix of every message.
        schema: the ``CREATE ... IF NOT EXISTS`` statements.
        version: the schema version stored in ``PRAGMA user_version``.
        damaged_hint: what moving a damaged file aside costs, for the error.
        fix_modes: set an existing file (and its -wal and -shm files) that
            other users may read back to 0600, with a warning.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Create the file 0600 first: SQLite would use the umask, and its
        # -wal and -shm files copy the main file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as exc:
        msg = f"{name}: cannot create {path}: {exc.strerror}; check the folder's owner and mode"
        raise MailpushError(msg) from None

    if fix_modes:
        for candidate in (
            path,
            path.with_name(path.name + "-wal"),
            path.with_name(path.name + "-shm"),
        ):
            _restrict_mode(candidate, name)

    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        _prepare(conn, schema, version)
    except sqlite3.DatabaseError as exc:
        conn.close()
        msg = (
            f"{name}: {path} is not a usable {name} database ({exc}); move it aside and "
            f"restart ({damaged_hint})"
        )
        raise MailpushError(msg) from None
    return conn


def _restrict_mode(path: Path, name: str) -> None:
    """Set ``path`` to mode 0600 if group or others may access it, with a warning."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if not mode & 0o077:
        return

    try:
        path.chmod(0o600)
    except OSError as exc:
        msg = (
            f"{name}: {path} is readable by other users (mode {mode:04o}) and cannot be "
            f"changed ({exc.strerror}); run: chmod 600 {path}"
        )
        raise MailpushError(msg) from None
    log.warning("%s: %s was readable by other users (mode %04o); set it to 0600", name, path, mode)


def _prepare(conn: sqlite3.Connection, schema: str, version: int) -> None:
    """Set the journal mode and create or check the schema."""
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL syncs the WAL on every commit, so a power cut loses nothing that a
    # call returned; an application crash alone would lose nothing with NORMAL.
    conn.execute("PRAGMA synchronous = FULL")

    (stored,) = conn.execute("PRAGMA user_version").fetchone()
    if stored > version:
        msg = f"schema version {stored} is newer than this mailpush ({version})"
        raise sqlite3.DatabaseError(msg)

    # IMMEDIATE takes the write lock at once: in WAL mode a deferred BEGIN that
    # turns into a write fails at once with "database is locked" while another
    # connection writes, instead of waiting out the busy timeout.
    conn.executescript("BEGIN IMMEDIATE;" + schema + f"PRAGMA user_version = {version}; COMMIT;")


@contextmanager
def immediate_transaction(
    conn: sqlite3.Connection, lock: threading.Lock
) -> Iterator[sqlite3.Connection]:
    """Hold ``lock`` and run one transaction, committed before the caller goes on.

    BEGIN IMMEDIATE takes SQLite's write lock up front, so another process
    that opens the same file waits out the busy timeout instead of failing
    half-way through. An exception rolls the transaction back and propagates.
    """
    with lock:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
