"""Read state between terminals and mailboxes: a mail marked read in one place shows everywhere.

A terminal's MailStatus sets the flag in the mailbox and becomes a ``status``
push to the user's other terminals. A flag that another mail client changes in
the mailbox becomes a ``status`` push to all of them.
"""

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable

from mailpush.protocol.messages import MailStatus, MailSummary, Push, encode
from mailpush.protocol.topics import Topics
from mailpush.server.mailbox.base import MailboxWatcher
from mailpush.server.registry import Registry

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0


class ReadStateRelay:
    """Applies terminals' read states on a thread of its own and reports mailbox changes.

    IMAP round trips may be slow, so MailStatus messages are queued here and
    applied off the MQTT network thread.

    Args:
        topics: the topic tree.
        registry: the terminals of each user.
        publish: sends a payload on a topic (QoS 1, not retained).
        watcher_of: the running watcher of a user, or None.
        routed: whether a user's mail was routed to the terminals.
    """

    def __init__(
        self,
        topics: Topics,
        registry: Registry,
        publish: Callable[[str, bytes], object],
        watcher_of: Callable[[str], MailboxWatcher | None],
        routed: Callable[[str, str], bool],
    ) -> None:
        self._topics = topics
        self._registry = registry
        self._publish = publish
        self._watcher_of = watcher_of
        self._routed = routed
        self._queue: queue.Queue[tuple[str, MailStatus] | None] = queue.Queue()
        # NOTE: the last read state reported per mail lives in memory only, so
        # after a restart a mailbox change may be reported to the terminals twice.
        self._seen: dict[tuple[str, str], bool] = {}
        self._thread = threading.Thread(target=self._apply_all, name="read-state", daemon=True)

    def start(self) -> None:
        """Start the thread that applies reported read states."""
        self._thread.start()

    def close(self) -> None:
        """Apply what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(JOIN_TIMEOUT_S)

    def reported(self, user: str, status: MailStatus) -> None:
        """Queue a terminal's MailStatus; called from the MQTT network thread."""
        self._queue.put((user, status))

    def mailbox_changed(self, user: str, mail_id: str, seen: bool) -> None:
        """Report a read-state change made in the mailbox (another mail client) to the terminals."""
        if self._seen.get((user, mail_id)) == seen:
            return
        if not self._routed(user, mail_id):
            return  # the terminals never got this mail, so there is nothing to update
        self._seen[(user, mail_id)] = seen
        word = "read" if seen else "unread"
        log.info("mail %s of %s marked %s in the mailbox", mail_id, user, word)
        self._send(user, mail_id, seen, skip=None, reason=f"marked {word} in the mailbox")

    def _apply_all(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            user, status = item
            try:
                self._apply(user, status)
            except Exception:
                log.exception("read state of mail %s of %s could not be applied", status.mail, user)

    def _apply(self, user: str, status: MailStatus) -> None:
        word = "read" if status.seen else "unread"
        watcher = self._watcher_of(user)
        if watcher is not None and watcher.set_seen(status.mail, status.seen):
            log.info("mail %s of %s marked %s by %s", status.mail, user, word, status.by)
        else:
            log.info(
                "mail %s of %s marked %s by %s; the mailbox could not be updated",
                status.mail,
                user,
                word,
                status.by,
            )
        self._seen[(user, status.mail)] = status.seen
        self._send(
            user, status.mail, status.seen, skip=status.by, reason=f"marked {word} on {status.by}"
        )

    def _send(self, user: str, mail_id: str, seen: bool, skip: str | None, reason: str) -> None:
        push = Push(
            id=uuid.uuid4().hex,
            kind="status",
            mail=MailSummary(id=mail_id, seen=seen),
            reason=reason,
            ts=round(time.time(), 3),
        )
        payload = encode(push)
        for terminal in self._registry.terminals(user):
            if terminal != skip:
                self._publish(self._topics.inbox(user, terminal), payload)
