"""Linux inotify through ctypes: the few calls the Maildir watcher needs.

The calls are ``inotify_init1``, ``inotify_add_watch`` and ``inotify_rm_watch``
from the C library (glibc and musl both export them). Events are read with
``os.read``, which is ``read(2)``, from a non-blocking descriptor. The event
layout and the flag values are those of ``<sys/inotify.h>`` and inotify(7).

On another system, or where the C library lacks inotify, creating an
:class:`Inotify` raises ``OSError`` with ``errno.ENOSYS``, so a caller can fall
back to polling.
"""

import ctypes
import errno
import functools
import math
import os
import select
import struct
import sys
from dataclasses import dataclass
from typing import Any

# Event flags from <sys/inotify.h>.
IN_CLOSE_WRITE = 0x00000008
IN_CLOSE_NOWRITE = 0x00000010
IN_OPEN = 0x00000020
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_MOVE_SELF = 0x00000800
# Flags the kernel sets in events: the queue overflowed (with wd -1), and the
# watch was removed (the folder was deleted, or inotify_rm_watch was called).
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
# A flag for inotify_add_watch: fail with ENOTDIR unless the path is a folder.
IN_ONLYDIR = 0x01000000

# struct inotify_event: int wd; uint32_t mask, cookie, len; then len bytes of
# NUL-padded name.
_EVENT_HEADER = struct.Struct("iIII")

# Enough for about 240 events with a full 255-byte name, so one read usually
# empties the queue.
_READ_SIZE = 64 * 1024

# Reasons, with the fix, for the errno values of inotify_init1 and
# inotify_add_watch, from the Linux man pages of both calls.
_REASONS = {
    errno.EMFILE: (
        "the limit of inotify instances or of open files is reached; "
        "raise fs.inotify.max_user_instances or the process's open-file limit"
    ),
    errno.ENFILE: "the system's limit of open files is reached",
    errno.ENOSPC: "the inotify watch limit is reached; raise fs.inotify.max_user_watches",
    errno.ENOMEM: "the kernel is out of memory",
    errno.ENOSYS: "the kernel has no inotify support",
}


@dataclass(frozen=True)
class Event:
    """One inotify event.

    Attributes:
        wd: The watch descriptor, or -1 for ``IN_Q_OVERFLOW``.
        mask: The ``IN_*`` flags of the event.
        cookie: Links the ``IN_MOVED_FROM`` and ``IN_MOVED_TO`` halves of one rename.
        name: The file name inside the watched folder; empty for an event on the folder itself.
    """

    wd: int
    mask: int
    cookie: int
    name: str


class Inotify:
    """One inotify instance with a non-blocking, close-on-exec descriptor.

    Use it as a context manager, or call :meth:`close`.

    Raises:
        OSError: inotify cannot be used here. ``errno.ENOSYS`` means that
            the system or its C library has no inotify; ``strerror`` names
            the limit to raise where a limit was reached.
    """

    def __init__(self) -> None:
        self._libc = _c_library()
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _error(ctypes.get_errno(), "inotify_init1")
        self._fd: int | None = fd

    def __enter__(self) -> "Inotify":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def fileno(self) -> int:
        """Return the descriptor, which becomes readable when events are queued.

        Raises:
            ValueError: The instance is closed.
        """
        if self._fd is None:
            raise ValueError("inotify instance is closed")
        return self._fd

    def add_watch(self, path: str | os.PathLike[str], mask: int) -> int:
        """Watch ``path`` for the events in ``mask`` and return the watch descriptor.

        Watching a path that is already watched returns the same descriptor
        and replaces its mask.

        Raises:
            OSError: The kernel rejected the watch, for example ``ENOENT``
                for a missing path or ``ENOSPC`` at the watch limit.
        """
        wd = self._libc.inotify_add_watch(self.fileno(), os.fsencode(path), mask)
        if wd < 0:
            raise _error(ctypes.get_errno(), "inotify_add_watch", os.fspath(path))
        return wd

    def remove_watch(self, wd: int) -> None:
        """Remove one watch; the kernel then queues an ``IN_IGNORED`` event for it.

        Raises:
            OSError: ``wd`` is not a watch of this instance (``EINVAL``).
        """
        if self._libc.inotify_rm_watch(self.fileno(), wd) < 0:
            raise _error(ctypes.get_errno(), "inotify_rm_watch")

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for an event; return whether one is queued."""
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        # Rounded up, so a short remaining wait does not turn into a busy loop.
        return bool(poller.poll(max(0, math.ceil(timeout_s * 1000))))

    def read_events(self) -> list[Event]:
        """Read every queued event without blocking; an empty list if none is queued."""
        events: list[Event] = []
        while True:
            try:
                data = os.read(self.fileno(), _READ_SIZE)
            except BlockingIOError:
                return events
            events.extend(_parse(data))

    def close(self) -> None:
        """Close the descriptor, which removes every watch; calling it again does nothing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@functools.cache
def _c_library() -> Any:
    """Load the C library's inotify functions, with errno saved for ``ctypes.get_errno``.

    Raises:
        OSError: ``ENOSYS`` on a system or C library without inotify.
    """
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, f"inotify exists only on Linux, not on {sys.platform}")

    # The process's own symbols include the C library it was linked against.
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        init1 = libc.inotify_init1
        add_watch = libc.inotify_add_watch
        rm_watch = libc.inotify_rm_watch
    except AttributeError as exc:
        raise OSError(errno.ENOSYS, "the C library has no inotify functions") from exc

    init1.argtypes = [ctypes.c_int]
    init1.restype = ctypes.c_int
    add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add_watch.restype = ctypes.c_int
    rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    rm_watch.restype = ctypes.c_int
    return libc


def _error(number: int, call: str, path: str | None = None) -> OSError:
    reason = _REASONS.get(number) or f"{call} failed: {os.strerror(number)}"
    if path is None:
        return OSError(number, reason)
    return OSError(number, reason, path)


def _parse(data: bytes) -> list[Event]:
    """Split one read(2) result into events; the kernel never splits an event across reads."""
    events = []
    offset = 0
    while offset + _EVENT_HEADER.size <= len(data):
        wd, mask, cookie, length = _EVENT_HEADER.unpack_from(data, offset)
        offset += _EVENT_HEADER.size
        raw_name = data[offset : offset + length].rstrip(b"\0")
        offset += length
        events.append(Event(wd, mask, cookie, os.fsdecode(raw_name)))
    return events
