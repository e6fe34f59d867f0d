"""inotify watches on a Maildir's ``new/`` and ``cur/``, for the Maildir watcher.

A :class:`FolderWatch` wakes a waiting watcher as soon as a file is created,
renamed or deleted in either folder. It decides nothing about mail: the
watcher lists both folders after every wake-up, and that listing is the only
source of truth.

It also reports which files in ``new/`` are still being written. The Maildir
convention is to write a mail in ``tmp/`` and to ``link()`` or ``rename()``
it into ``new/``. Some tools (``cp``, scripts) write straight into ``new/``
instead, and inotify reports such a file at its creation, before its
content is there. ``open(O_CREAT)`` queues ``IN_CREATE`` and then
``IN_OPEN``, so a file whose first event after ``IN_CREATE`` is ``IN_OPEN``
counts as being written until its next ``IN_CLOSE_WRITE`` or
``IN_CLOSE_NOWRITE``. Opens are not counted, because inotify merges two
identical events in a row, such as the opens of two programs. ``rename()``
queues no ``IN_CREATE`` and ``link()`` no ``IN_OPEN``, so a mail delivered
the Maildir way is held back only if another program opens it first, and
then only until that program closes it.

NOTE: a program that opens the file while it is being written and closes it
before the writer does ends the hold early, so the watcher may then read an
incomplete file. So may a file opened before the watch began or while the
event queue overflowed, which is read as soon as a listing finds it, as
with polling.
"""

import logging
import threading
import time
from pathlib import Path

from mailpush.server.mailbox.inotify import (
    IN_CLOSE_NOWRITE,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_OPEN,
    IN_Q_OVERFLOW,
    Event,
    Inotify,
)

log = logging.getLogger(__name__)

# Events that show a file arriving in, leaving or renamed within a folder.
# Flags are part of a Maildir file name, so IN_ATTRIB and IN_MODIFY are not
# needed. IN_MOVE_SELF reports that the folder itself was renamed away.
CHANGE_MASK = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_MOVE_SELF

# new/ also reports opens and closes, to tell when a file created there is complete.
NEW_MASK = CHANGE_MASK | IN_OPEN | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE | IN_ONLYDIR
CUR_MASK = CHANGE_MASK | IN_ONLYDIR

# Opens and read-only closes do not change what a listing finds.
_ACCESS_EVENTS = IN_OPEN | IN_CLOSE_NOWRITE

# While waiting for an inotify event, the watcher checks the stop event this often.
STOP_CHECK_S = 0.25


class FolderWatch:
    """inotify watches on ``new/`` and ``cur/`` of one Maildir.

    Each watch is tied to the folder that was at the path when it was added.
    :meth:`refresh` moves it to the folder at the path now, after a folder
    or the whole Maildir was deleted, renamed or replaced.

    Not thread-safe: one watcher thread calls every method.
    """

    def __init__(self, inotify: Inotify, maildir: Path) -> None:
        self._inotify = inotify
        self._masks = {maildir / "new": NEW_MASK, maildir / "cur": CUR_MASK}
        self._new = maildir / "new"
        self._watches: dict[Path, int] = {}
        self._changed = False
        # Names created in new/ and not opened since, and names held back as being written.
        self._created: set[str] = set()
        self._writing: set[str] = set()

    @classmethod
    def open(cls, maildir: Path) -> "FolderWatch":
        """Create an inotify instance that watches ``new/`` and ``cur/`` of ``maildir``.

        Raises:
            OSError: inotify cannot be used, or a folder cannot be watched.
        """
        inotify = Inotify()
        watch = cls(inotify, maildir)
        try:
            for folder, mask in watch._masks.items():
                watch._watches[folder] = inotify.add_watch(folder, mask)
        except OSError:
            inotify.close()
            raise
        return watch

    @property
    def complete(self) -> bool:
        """Whether both folders are watched."""
        return len(self._watches) == len(self._masks)

    def drain(self) -> bool:
        """Read every queued event; return whether a folder changed since the last call.

        An open or a read-only close of a file does not count as a change.
        """
        self._absorb(self._inotify.read_events())
        changed, self._changed = self._changed, False
        return changed

    def being_written(self, path: Path) -> bool:
        """Return whether ``path`` was created in ``new/`` and has not been closed since.

        Events queued since the last call are read first, so the open that
        came with the file's creation is seen.
        """
        if path.parent != self._new:
            return False
        self._absorb(self._inotify.read_events())
        return path.name in self._writing

    def wait(self, stop: threading.Event, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for an event or ``stop``; return whether an event came."""
        deadline = time.monotonic() + timeout_s
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._inotify.wait(min(remaining, STOP_CHECK_S)):
                return True
        return False

    def refresh(self) -> None:
        """Watch the folder now at each path, if it is not the watched one or none is watched.

        For a folder that is watched already, ``inotify_add_watch`` returns
        the same descriptor, so a refresh without a change costs one system
        call per folder.
        """
        for folder, mask in self._masks.items():
            old = self._watches.get(folder)
            try:
                wd = self._inotify.add_watch(folder, mask)
            except OSError as exc:
                if old is None:
                    log.debug("maildir: still cannot watch %s with inotify (%s)", folder, exc)
                else:
                    self._drop(old)
                    log.info(
                        "maildir: cannot watch %s with inotify any more (%s); "
                        "checking it more often until it can be watched again",
                        folder,
                        exc.strerror or exc,
                    )
                continue

            if wd == old:
                continue
            if old is None:
                log.info("maildir: watching %s with inotify again", folder)
            else:
                self._drop(old)
            self._watches[folder] = wd
            if folder == self._new:
                # The opens of files in the folder that was here before do not matter.
                self._forget_files()

    def close(self) -> None:
        """Close the inotify instance, which removes every watch."""
        self._inotify.close()

    def _absorb(self, events: list[Event]) -> None:
        """Update the state from a batch of events."""
        new_wd = self._watches.get(self._new)
        for event in events:
            if not event.mask & _ACCESS_EVENTS:
                self._changed = True

            if event.mask & IN_Q_OVERFLOW:
                # The dropped events are unknown, so a listing follows, and no
                # file of new/ is held back any longer.
                log.debug("maildir: inotify event queue overflowed; listing the folders again")
                self._forget_files()
            elif event.mask & IN_IGNORED:
                # The kernel removed the watch because its folder was deleted.
                self._forget(event.wd)
            elif event.mask & IN_MOVE_SELF:
                # The watch would follow the folder to its new name.
                self._drop(event.wd)
            elif event.wd == new_wd:
                self._track_file(event)

    def _track_file(self, event: Event) -> None:
        name = event.name
        if event.mask & IN_CREATE:
            self._created.add(name)
            self._writing.discard(name)
        elif event.mask & IN_OPEN:
            if name in self._created:
                self._created.discard(name)
                self._writing.add(name)
        elif event.mask & (IN_CLOSE_WRITE | IN_CLOSE_NOWRITE):
            if name in self._writing:
                self._writing.discard(name)
                # The watcher may have held the file back, and a read-only
                # close alone does not count as a change.
                self._changed = True
        elif event.mask & (IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE):
            # The name now stands for another file, or for none.
            self._created.discard(name)
            self._writing.discard(name)

    def _forget_files(self) -> None:
        self._created.clear()
        self._writing.clear()

    def _drop(self, wd: int) -> None:
        """Forget a watch and remove it, if the kernel has not removed it already."""
        self._forget(wd)
        try:
            self._inotify.remove_watch(wd)
        except OSError:
            # EINVAL: the kernel removed it when its folder was deleted.
            pass

    def _forget(self, wd: int) -> None:
        for folder, watched in list(self._watches.items()):
            if watched == wd:
                del self._watches[folder]
                if folder == self._new:
                    self._forget_files()
