"""Private SQLite files: created 0600, WAL, schema checked, checkpointed in the background.

The agent's inbox and the service's outbox hold mail summaries. Every method
of theirs that changes the file commits before it returns, so a crash or a
kill of the process loses nothing that a method call returned.

By default (``sync_every_commit=True``) the file uses ``synchronous=FULL``:
every commit syncs the WAL, so not even a power cut loses a commit.
``sync_every_commit=False`` selects ``synchronous=NORMAL``: a commit writes
the WAL to the operating system without an fsync. That survives the process
dying, and only an OS crash or a power cut can lose the commits made since
the last checkpoint. A :class:`PrivateDatabase` runs those checkpoints on a
thread of its own about :data:`CHECKPOINT_DELAY_S` after a write, so their
fsyncs seldom delay a commit, and the commits at risk are those of about the
last 0.25 s.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mailpush.errors import MailpushError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0
# How long the checkpoint thread waits after a commit before it copies the WAL
# into the database file and syncs it. The commits of one mail (routing, send,
# Ack) fall within a few ms, so they share a checkpoint, and an OS crash can
# lose only the commits of about this long.
CHECKPOINT_DELAY_S = 0.25


class PrivateDatabase:
    """A private SQLite file shared by the threads of one process behind a lock.

    Args:
        path: the database file; its folder is created with mode 0700.
        name: what the file is (``inbox``, ``outbox``), the prefix of every message.
        schema: the ``CREATE ... IF NOT EXISTS`` statements.
        version: the schema version stored in ``PRAGMA user_version``.
        damaged_hint: what moving a damaged file aside costs, for the error.
        fix_modes: set an existing file (and its -wal and -shm files) that
            other users may read back to 0600, with a warning.
        sync_every_commit: sync the WAL in every commit (``synchronous=FULL``),
            so that a power cut loses no commit either.

    Raises:
        MailpushError: the file cannot be created or is not a database of this kind.
    """

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        schema: str,
        version: int,
        damaged_hint: str,
        fix_modes: bool = False,
        sync_every_commit: bool = True,
    ) -> None:
        self.path = Path(path)
        self.name = name
        # NOTE: with NORMAL an OS crash or a power cut loses the commits not yet
        # checkpointed; only the service's config (service.sync_every_commit) selects it.
        self.synchronous = "FULL" if sync_every_commit else "NORMAL"
        self._lock = threading.Lock()
        self._conn = _open(
            self.path,
            name=name,
            schema=schema,
            version=version,
            damaged_hint=damaged_hint,
            fix_modes=fix_modes,
            synchronous=self.synchronous,
        )
        self._checkpointer = _Checkpointer(self.path, name, self.synchronous, self._lock)
        self._lock_fd = _open_lock_file(self.path.with_name(self.path.name + "-lock"))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run one write transaction, committed before the caller goes on.

        BEGIN IMMEDIATE takes SQLite's write lock up front, so another process
        that opens the same file waits out the busy timeout instead of failing
        half-way through. An exception rolls the transaction back and propagates.
        """
        with self._lock, self._process_lock():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.rollback()
                raise
            self._conn.commit()
        self._checkpointer.wake()

    @contextmanager
    def _process_lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the lock file that processes sharing the database use.

        SQLite's default busy handler sleeps 1, 2, 5, 10 ms and more between
        tries (sqliteDefaultBusyCallback), so processes that write one file in
        turn would mostly sleep. A blocked flock returns as soon as the holder
        lets go.
        """
        if self._lock_fd < 0:
            yield
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock for reads, each statement reading one committed snapshot.

        No write lock is taken, so in WAL mode another connection's write
        transaction does not block these reads.
        """
        with self._lock:
            yield self._conn

    def close(self) -> None:
        """Stop the checkpoint thread and close the file; calling it again does nothing.

        SQLite checkpoints the WAL when the last connection to the file closes.
        """
        self._checkpointer.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        with self._lock:
            self._conn.close()


def _open_lock_file(path: Path) -> int:
    """Open (0600) the lock file beside a database; return -1 where flock is missing."""
    if fcntl is None:
        return -1
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.warning("%s: cannot open %s (%s); writers then wait in SQLite", path.name, path, exc)
        return -1


def _open(
    path: Path,
    *,
    name: str,
    schema: str,
    version: int,
    damaged_hint: str,
    fix_modes: bool = False,
    synchronous: str = "NORMAL",
) -> sqlite3.Connection:
    """Create or open a private SQLite file, or raise a one-line :class:`MailpushError`.

    The arguments are those of :class:`PrivateDatabase`, and ``synchronous``
    is ``NORMAL`` or ``FULL``.
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

    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
    )
    try:
        _prepare(conn, schema, version, synchronous)
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


def _prepare(conn: sqlite3.Connection, schema: str, version: int, synchronous: str) -> None:
    """Set the journal mode and create or check the schema."""
    conn.execute("PRAGMA journal_mode = WAL")
    # The setting belongs to the connection, not to the file, so every
    # connection sets it. The module docstring describes what each one keeps.
    conn.execute(f"PRAGMA synchronous = {synchronous}")

    (stored,) = conn.execute("PRAGMA user_version").fetchone()
    if stored > version:
        msg = f"schema version {stored} is newer than this mailpush ({version})"
        raise sqlite3.DatabaseError(msg)

    # IMMEDIATE takes the write lock at once: in WAL mode a deferred BEGIN that
    # turns into a write fails at once with "database is locked" while another
    # connection writes, instead of waiting out the busy timeout.
    conn.executescript("BEGIN IMMEDIATE;" + schema + f"PRAGMA user_version = {version}; COMMIT;")


class _Checkpointer:
    """Copies the WAL into the database file on a thread of its own, after each burst of commits.

    Without it SQLite checkpoints inside the commit that takes the WAL past
    1,000 pages, which then waits for the copy and two fsyncs, and the next
    commit starts the WAL anew and syncs its header. Here a PASSIVE
    checkpoint on a second connection copies the WAL without blocking the
    writers, and a one-page write (:meth:`_restart_wal`) then starts the WAL
    anew, so that the header's fsync is paid here too. SQLite's checkpoint in
    the commit stays enabled: under a load that never pauses the background
    checkpoint never completes, and the commit at 1,000 pages then finds
    little left to copy.

    The thread and its connection start at the first :meth:`wake`, so a
    process that only reads the file starts neither.
    """

    def __init__(
        self, path: Path, name: str, synchronous: str, writer_lock: threading.Lock
    ) -> None:
        self._path = path
        self._name = name
        self._synchronous = synchronous
        self._writer_lock = writer_lock
        self._lock = threading.Lock()
        self._written = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """Note a commit, and start the thread if it is not running yet."""
        self._written.set()
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None and not self._closing.is_set():
                self._thread = threading.Thread(
                    target=self._run, name=f"{self._name}-checkpoint", daemon=True
                )
                self._thread.start()

    def close(self) -> None:
        """Stop the thread; the last connection to close checkpoints what is left."""
        with self._lock:
            self._closing.set()
            thread = self._thread
        self._written.set()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        try:
            # No busy timeout: work that finds the file locked is skipped, and
            # the next commit wakes the thread again.
            conn = sqlite3.connect(self._path, isolation_level=None, timeout=0)
        except sqlite3.Error as exc:
            log.warning(
                "%s: cannot open %s for background checkpoints (%s); "
                "SQLite checkpoints in the commits instead",
                self._name,
                self._path,
                exc,
            )
            return

        try:
            # A checkpoint syncs the WAL and the database file only if this
            # connection's own setting is NORMAL or FULL.
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            self._serve(conn)
        except Exception:
            log.exception(
                "%s: background checkpoints of %s stopped; SQLite checkpoints in the commits "
                "instead",
                self._name,
                self._path,
            )
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            self._written.wait()
            # The wait lets a burst of commits finish first; close() cuts it short.
            if self._closing.wait(CHECKPOINT_DELAY_S):
                return
            self._written.clear()
            if self._checkpoint(conn):
                self._restart_wal(conn)

    def _checkpoint(self, conn: sqlite3.Connection) -> bool:
        """Copy the WAL into the database file; return whether all of a non-empty WAL was copied."""
        try:
            busy, wal_pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("%s: background checkpoint of %s failed: %s", self._name, self._path, exc)
            return False
        if busy or copied < wal_pages:
            # A reader or a writer held some pages, which the next wake copies.
            log.debug(
                "%s: checkpoint copied %d of %d WAL pages", self._name, max(copied, 0), wal_pages
            )
            return False
        return wal_pages > 0

    def _restart_wal(self, conn: sqlite3.Connection) -> None:
        """Start the WAL anew with a one-page write, unless a writer of this process is busy.

        The first commit after a complete checkpoint rewrites the WAL header
        and syncs it, even with ``synchronous=NORMAL``, because SQLite could
        otherwise corrupt the file on a power cut. Writing the schema version
        back unchanged is the smallest such commit. Holding the writers' lock
        makes a writer of this process wait for it without SQLite's busy
        sleeps, which last 1 ms or more.
        """
        if not self._writer_lock.acquire(blocking=False):
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            # Another process writes; its commit starts the WAL anew instead.
            log.debug("%s: WAL of %s not restarted: %s", self._name, self._path, exc)
            self._writer_lock.release()
            return

        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            conn.execute(f"PRAGMA user_version = {int(version)}")
            conn.commit()
        except sqlite3.Error as exc:
            log.warning("%s: background write to %s failed: %s", self._name, self._path, exc)
        finally:
            # A transaction left open would hold SQLite's write lock for good.
            if conn.in_transaction:
                conn.rollback()
            self._writer_lock.release()
