"""Tests of the private SQLite helper: sync setting and background checkpoints, on real files."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailpush import sqlite_files
from mailpush.sqlite_files import PrivateDatabase

SCHEMA = "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);"
VERSION = 3
WAIT_S = 10.0


def open_notes(path: Path, **options: bool) -> PrivateDatabase:
    return PrivateDatabase(
        path, name="notes", schema=SCHEMA, version=VERSION, damaged_hint="test", **options
    )


@pytest.fixture
def notes(tmp_path: Path) -> Iterator[PrivateDatabase]:
    db = open_notes(tmp_path / "notes.sqlite3")
    yield db
    db.close()


def add_notes(db: PrivateDatabase, count: int) -> None:
    for n in range(count):
        with db.transaction() as conn:
            conn.execute("INSERT INTO notes (body) VALUES (?)", (f"note {n}",))


def rows_in_main_file(path: Path) -> int:
    """Count the rows that the database file contains without its WAL, or -1 without the table."""
    # immutable=1 makes SQLite read the file alone and ignore the -wal file.
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0]
    except sqlite3.OperationalError:
        return -1
    finally:
        conn.close()


def wal_pages(path: Path) -> int:
    """Checkpoint from a connection of the test's own and return how many pages the WAL holds."""
    conn = sqlite3.connect(path, timeout=0)
    try:
        return conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    finally:
        conn.close()


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def checkpoint_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "notes-checkpoint" and t.is_alive()]


def test_full_sync_by_default(notes: PrivateDatabase) -> None:
    with notes.read() as conn:
        (level,) = conn.execute("PRAGMA synchronous").fetchone()
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()

    assert level == 2  # FULL
    assert mode == "wal"


def test_sync_every_commit_off_is_normal(tmp_path: Path) -> None:
    db = open_notes(tmp_path / "notes.sqlite3", sync_every_commit=False)
    try:
        with db.read() as conn:
            (level,) = conn.execute("PRAGMA synchronous").fetchone()
    finally:
        db.close()

    assert level == 1  # NORMAL


def test_commit_visible_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite3"
    first = open_notes(path)
    add_notes(first, 3)
    first.close()

    second = open_notes(path)
    try:
        with second.read() as conn:
            assert conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 3
    finally:
        second.close()


def test_failed_transaction_rolled_back(notes: PrivateDatabase) -> None:
    with pytest.raises(sqlite3.IntegrityError), notes.transaction() as conn:
        conn.execute("INSERT INTO notes (id, body) VALUES (1, 'kept?')")
        conn.execute("INSERT INTO notes (id, body) VALUES (1, 'same id')")

    with notes.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 0
    add_notes(notes, 1)


def test_background_checkpoint_fills_main_file(notes: PrivateDatabase) -> None:
    assert rows_in_main_file(notes.path) == -1

    add_notes(notes, 20)

    assert wait_until(lambda: rows_in_main_file(notes.path) == 20)


def test_background_restart_leaves_one_page(notes: PrivateDatabase) -> None:
    add_notes(notes, 20)

    # The one-page write that starts the WAL anew leaves exactly one page in
    # it, where the 20 commits left dozens.
    assert wait_until(lambda: wal_pages(notes.path) == 1)
    with notes.read() as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == VERSION
        assert conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 20


def test_restart_skipped_while_writer_busy(
    notes: PrivateDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_files, "CHECKPOINT_DELAY_S", 0.05)
    add_notes(notes, 20)

    # read() holds the writers' lock, so the thread may checkpoint but must not write.
    with notes.read():
        time.sleep(0.5)
        assert wal_pages(notes.path) > 1

    add_notes(notes, 1)
    assert wait_until(lambda: wal_pages(notes.path) == 1)


def test_reads_start_no_thread(notes: PrivateDatabase) -> None:
    with notes.read() as conn:
        conn.execute("SELECT COUNT(*) FROM notes").fetchone()

    assert checkpoint_threads() == []


def test_close_stops_thread(tmp_path: Path) -> None:
    db = open_notes(tmp_path / "notes.sqlite3")
    add_notes(db, 1)
    assert checkpoint_threads() == ["notes-checkpoint"]

    db.close()
    db.close()

    assert checkpoint_threads() == []
    # The WAL is gone; the empty lock file for other processes stays.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.sqlite3", "notes.sqlite3-lock"]
