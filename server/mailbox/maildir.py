"""Watch a local Maildir for new mail and for read-state changes.

The user's mail client owns the Maildir, so the watcher only reads it, with one
exception: ``set_seen`` adds or removes the ``S`` flag the way a mail client
does, by renaming the file. It never deletes a file or changes its content. It
finds mail in ``new/`` and ``cur/`` and remembers the unique names it has
handled in the state store.

A listing of both folders with ``os.scandir`` is the only source of truth, and
everything else only decides when to list. On Linux an inotify watch on ``new/`` and ``cur/``
wakes the watcher as soon as a file is created, renamed or deleted in either:
a delivery agent writes a mail to ``tmp/`` and renames it into ``new/`` (the
Maildir convention), and a mail client that adds or removes a flag renames the
file in ``cur/``, so the same listing finds new mail and read-state changes.
A file written straight into ``new/`` is read once its writer closes it
(see ``folder_watch``).
The watcher reads every queued event before it lists, so one listing covers
every mail delivered since the previous one, however many events they caused.

Every ``safety_poll_s`` it also stats both folders and lists them if the mtime
of either changed, which catches what inotify cannot report (see the note in
``MaildirWatcher``). Where inotify cannot be used at all (not Linux, or a limit
is reached), it logs one warning and does the same check every ``poll_s``.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mailpush.errors import ConfigError
from mailpush.server.mailbox.base import (
    FlagCallback,
    MailCallback,
    NewMail,
    RetryLater,
    SeenTracker,
)
from mailpush.server.mailbox.folder_watch import FolderWatch
from mailpush.server.mailbox.state import StateStore

log = logging.getLogger(__name__)

# Whether a Maildir of this process has failed to get an inotify watch before.
_inotify_warned = False

# The info part of a Maildir file name starts with ":2," followed by the flags.
INFO_SEPARATOR = ":2,"

# The flag of a mail that has been read.
SEEN_FLAG = "S"

# A folder whose mtime is this recent is listed again even if the mtime did
# not change. Two renames within one tick of the file system's clock leave the
# same mtime behind, so the second would be missed until the next change.
RECENT_CHANGE_S = 2.0


@dataclass(frozen=True)
class _Entry:
    path: Path
    seen: bool


class MaildirWatcher:
    """Find new mail in one Maildir and hand each mail to ``on_mail`` once.

    At the first start on a Maildir (no baseline in the store), the mail already
    there is recorded as handled and not pushed, so the user is not flooded.

    NOTE: inotify does not report changes that another host makes on a
    network file system (NFS, SMB), so there a new mail waits up to
    ``safety_poll_s`` seconds.

    Args:
        path: The Maildir, the folder that contains ``cur/``, ``new/`` and ``tmp/``.
        store: The state store that remembers handled names.
        poll_s: Seconds between two checks for changes of a folder that
            inotify does not watch.
        safety_poll_s: Seconds between two checks for changes while inotify
            watches both folders.
        rescan_s: Seconds between two full listings even without a change.
        retry_s: Seconds to wait after ``on_mail`` raised before offering the mail again.

    Raises:
        ConfigError: ``path`` is not a Maildir.
    """

    def __init__(
        self,
        path: str | Path,
        store: StateStore,
        *,
        poll_s: float = 0.2,
        safety_poll_s: float = 2.0,
        rescan_s: float = 30.0,
        retry_s: float = 5.0,
    ) -> None:
        self.path = Path(path).expanduser().absolute()
        missing = [sub for sub in ("cur", "new") if not (self.path / sub).is_dir()]
        if missing:
            msg = (
                f"maildir: {self.path} is not a Maildir (no {' or '.join(missing)} folder); "
                "set the Maildir path to the folder that contains cur/, new/ and tmp/"
            )
            raise ConfigError(msg)

        self.mailbox_key = f"maildir:{self.path}"
        self.store = store
        self.poll_s = poll_s
        self.safety_poll_s = safety_poll_s
        self.rescan_s = rescan_s
        self.retry_s = retry_s
        self._warned: set[str] = set()
        self._scan_failing = False
        self._watch: FolderWatch | None = None

    def run(
        self, on_mail: MailCallback, stop: threading.Event, on_flags: FlagCallback | None = None
    ) -> None:
        """Watch the Maildir until ``stop`` is set; see ``MailboxWatcher.run``.

        ``run`` returns within about 0.25 s (``folder_watch.STOP_CHECK_S``)
        after ``stop`` is set, unless ``on_mail`` or ``on_flags`` is still running.

        Raises:
            ConfigError: The Maildir cannot be listed at start-up.
        """
        handled = self._load_handled()
        tracker = SeenTracker(on_flags, "maildir")
        self._watch = self._open_watch()
        detection = "with inotify" if self._watch is not None else f"every {self.poll_s:g} s"
        log.info(
            "maildir: watching %s %s (%d mails already handled)", self.path, detection, len(handled)
        )
        try:
            self._loop(on_mail, stop, handled, tracker)
        finally:
            if self._watch is not None:
                self._watch.close()
                self._watch = None

    def _loop(
        self,
        on_mail: MailCallback,
        stop: threading.Event,
        handled: set[str],
        tracker: SeenTracker,
    ) -> None:
        last_stamp: tuple[int, int] | None = None
        last_full_scan = time.monotonic()
        polled = True
        while not stop.is_set():
            # Events are read before listing: one that arrives during the
            # listing stays queued and wakes the next wait at once.
            woken = self._watch is not None and self._watch.drain()
            stamp = self._folder_stamp()
            stamp_changed = polled and (stamp != last_stamp or _is_recent(stamp))
            full_scan_due = time.monotonic() - last_full_scan >= self.rescan_s
            if woken or stamp_changed or full_scan_due:
                # The stamp is taken before listing, so a change during the
                # listing shows up as a new stamp at the next check.
                last_stamp = stamp
                if full_scan_due:
                    last_full_scan = time.monotonic()
                    self._warned.clear()
                # NOTE: every wake-up lists both folders in full, so its cost
                # grows with the number of mails in the Maildir.
                listing = self._scan()
                if listing is not None:
                    self._track_flags(listing, handled, tracker)
                    if not self._deliver_new(listing, handled, on_mail, stop, tracker):
                        last_stamp = None
                        polled = True
                        stop.wait(self.retry_s)
                        continue

            polled = self._wait(stop)

    def _open_watch(self) -> FolderWatch | None:
        """Watch ``new/`` and ``cur/`` with inotify, or log one warning and return None."""
        # NOTE: each watcher opens its own inotify instance, so the watchers
        # of one user ID beyond fs.inotify.max_user_instances (128 by default) poll.
        try:
            return FolderWatch.open(self.path)
        except OSError as exc:
            # Past the limit every further Maildir fails the same way, so only
            # the first failure of the process is a warning.
            global _inotify_warned
            level = logging.INFO if _inotify_warned else logging.WARNING
            _inotify_warned = True
            log.log(
                level,
                "maildir: cannot watch %s with inotify (%s); checking it every %g s instead",
                self.path,
                exc.strerror or exc,
                self.poll_s,
            )
            return None

    def _wait(self, stop: threading.Event) -> bool:
        """Wait for an inotify event, the next poll or ``stop``, and return False if an event came.

        The stamp of the folders is compared after a poll only. While both
        folders are watched, an event reports each change, and the stamp of a
        folder that changed a moment ago would cause a listing at every wake-up.
        """
        watch = self._watch
        if watch is None:
            stop.wait(self.poll_s)
            return True

        timeout = self.safety_poll_s if watch.complete else self.poll_s
        if watch.wait(stop, timeout):
            return False
        if not stop.is_set():
            watch.refresh()
        return True

    def set_seen(self, mail_id: str, seen: bool) -> bool:
        """Add or remove the ``S`` flag of one mail by renaming its file; see ``MailboxWatcher``.

        A file in ``new/`` moves to ``cur/`` with the flag, as a mail client
        does when it shows a mail. If the file vanishes during the rename
        because another client moved or renamed it, the folders are listed
        again once.
        """
        if not mail_id or mail_id.startswith(".") or "/" in mail_id or ":" in mail_id:
            log.warning("maildir: %r is not a Maildir unique name; read state not changed", mail_id)
            return False

        for _attempt in range(2):
            try:
                path = self._find(mail_id)
            except OSError as exc:
                log.warning("maildir: cannot list %s (%s); read state not changed", self.path, exc)
                return False
            if path is None:
                log.warning(
                    "maildir: mail %s not found in %s; read state not changed", mail_id, self.path
                )
                return False

            target = self._flagged_path(path, seen)
            if target == path:
                return True
            try:
                os.rename(path, target)
            except FileNotFoundError:
                # Another client moved or renamed the file since it was listed.
                continue
            except OSError as exc:
                log.warning("maildir: cannot rename %s to %s (%s)", path, target.name, exc)
                return False
            log.debug("maildir: renamed %s to %s", path, target)
            return True

        log.warning(
            "maildir: mail %s in %s was moved twice while being flagged; read state not changed",
            mail_id,
            self.path,
        )
        return False

    def _find(self, mail_id: str) -> Path | None:
        """Return the file of one mail, or None if absent; ``cur/`` wins over ``new/``.

        ``new/`` is listed first for the same reason as in ``_scan``.

        Raises:
            OSError: A folder cannot be listed.
        """
        prefix = mail_id + INFO_SEPARATOR
        found = None
        for sub in ("new", "cur"):
            with os.scandir(self.path / sub) as entries:
                for entry in entries:
                    if entry.name == mail_id or entry.name.startswith(prefix):
                        found = Path(entry.path)
        return found

    def _flagged_path(self, path: Path, seen: bool) -> Path:
        """Return the path of ``path`` with ``S`` added or removed; ``path`` itself if unchanged."""
        name, _, info = path.name.partition(INFO_SEPARATOR)
        old_flags = set(info)
        flags = old_flags | {SEEN_FLAG} if seen else old_flags - {SEEN_FLAG}

        if path.parent.name == "new":
            if not seen:
                # No client has shown a mail in new/ yet, so it is unread already.
                return path
        elif flags == old_flags:
            return path

        # The Maildir spec (cr.yp.to/proto/maildir.html) requires the flags in
        # ASCII order, so Dovecot's lower-case keyword letters follow "S".
        return self.path / "cur" / f"{name}{INFO_SEPARATOR}{''.join(sorted(flags))}"

    def _load_handled(self) -> set[str]:
        listing = self._scan()
        if listing is None:
            # Without a listing, a baseline would be empty and pruning would
            # forget every handled name, so both would cause a flood later.
            msg = f"maildir: cannot list {self.path}; check that it exists and can be read"
            raise ConfigError(msg)
        present = set(listing)

        handled = self.store.maildir_handled(self.mailbox_key)
        if handled is None:
            self.store.set_maildir_baseline(self.mailbox_key, present)
            log.info(
                "maildir: first start on %s: %d existing mails recorded as handled, not pushed",
                self.path,
                len(present),
            )
            return present

        # NOTE: names are pruned only here, at start-up, so the table grows
        # with the mail delivered while the service runs.
        deleted = handled - present
        if deleted:
            self.store.forget_maildir_names(self.mailbox_key, deleted)
        return handled - deleted

    def _folder_stamp(self) -> tuple[int, int]:
        try:
            return (
                os.stat(self.path / "new").st_mtime_ns,
                os.stat(self.path / "cur").st_mtime_ns,
            )
        except OSError:
            return (0, 0)

    def _scan(self) -> dict[str, _Entry] | None:
        """List ``new/`` then ``cur/``, keyed by unique name; None if listing failed.

        ``new/`` is listed first: a mail client renames a file from ``new/`` into
        ``cur/``, so a file moved during the scan is seen in at least one of them.
        """
        found: dict[str, _Entry] = {}
        try:
            for sub in ("new", "cur"):
                with os.scandir(self.path / sub) as entries:
                    for entry in entries:
                        if entry.name.startswith(".") or not entry.is_file():
                            continue
                        name, _, flags = entry.name.partition(INFO_SEPARATOR)
                        seen = sub == "cur" and "S" in flags
                        found[name] = _Entry(Path(entry.path), seen)
        except OSError as exc:
            if not self._scan_failing:
                log.warning("maildir: cannot list %s (%s); retrying", self.path, exc)
            self._scan_failing = True
            return None

        if self._scan_failing:
            log.info("maildir: %s can be listed again", self.path)
        self._scan_failing = False
        return found

    def _track_flags(
        self, found: dict[str, _Entry], handled: set[str], tracker: SeenTracker
    ) -> None:
        """Report read-state changes of the handled mail in one listing."""
        for name, entry in found.items():
            if name in handled:
                tracker.observe(name, entry.seen)
        tracker.retain(found.keys())

    def _deliver_new(
        self,
        found: dict[str, _Entry],
        handled: set[str],
        on_mail: MailCallback,
        stop: threading.Event,
        tracker: SeenTracker | None = None,
    ) -> bool:
        """Deliver every unhandled mail, oldest first; return False if ``on_mail`` raised."""
        waiting = [name for name in found if name not in handled]
        waiting.sort(key=lambda name: (_mtime(found[name].path), name))

        for name in waiting:
            if stop.is_set():
                break
            entry = found[name]
            if self._watch is not None and self._watch.being_written(entry.path):
                # Its last close wakes the watcher again.
                log.debug("maildir: %s is still being written; reading it later", entry.path)
                continue
            raw = self._read(name, entry.path)
            if raw is None:
                continue

            mail = NewMail(self.mailbox_key, name, raw, entry.seen)
            try:
                on_mail(mail)
            except RetryLater as exc:
                log.debug("maildir: mail %s deferred: %s", name, exc)
                return False
            except Exception:
                log.exception(
                    "maildir: handling mail %s failed; retrying in %.0f s", name, self.retry_s
                )
                return False
            self.store.mark_maildir_handled(self.mailbox_key, name)
            handled.add(name)
            if tracker is not None:
                tracker.observe(name, entry.seen)
        return True

    def _read(self, name: str, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            # The mail client moved it (new/ to cur/, or a flag change renamed
            # it in cur/); the next listing finds it under its new name.
            log.debug("maildir: %s moved while being read; reading it again later", name)
        except OSError as exc:
            if name not in self._warned:
                log.warning("maildir: cannot read %s (%s); retrying", path, exc)
                self._warned.add(name)
        return None


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _is_recent(stamp: tuple[int, int]) -> bool:
    return time.time_ns() - max(stamp) < RECENT_CHANGE_S * 1e9
