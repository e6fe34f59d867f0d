"""The receiving end of pushes: validate, store, hand to the notifier, acknowledge.

A push is stored before its Ack goes out, so a crash or kill of the agent
after the Ack loses nothing. A crash before the Ack makes the service send the push again,
and the inbox recognises it by its id. A push seen before is acknowledged
again, because the first Ack may have been lost, but it is never shown twice.
A new push is queued for the notifier before the Ack is published, so that
publishing the Ack does not delay the notification.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable

from mailpush.agent.inbox import Inbox
from mailpush.agent.notify import Notifier
from mailpush.errors import PayloadError
from mailpush.protocol.droplog import DropLog
from mailpush.protocol.messages import Ack, Push, decode, encode

log = logging.getLogger(__name__)

_STOP = object()


class Receiver:
    """Handles the messages on one terminal's inbox topic.

    Args:
        inbox: where pushes are stored.
        notifier: shows them; it runs on the receiver's own thread so a slow
            notification service never holds up the MQTT network thread.
        send_ack: publishes an Ack payload on the terminal's ack topic.
    """

    def __init__(self, inbox: Inbox, notifier: Notifier, send_ack: Callable[[bytes], None]) -> None:
        self._inbox = inbox
        self._notifier = notifier
        self._send_ack = send_ack
        self._drops = DropLog(log)
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(
            target=self._show_loop, name="mailpush-receiver", daemon=True
        )

    def start(self) -> None:
        """Start the thread that shows notifications."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Show what is queued, then stop the thread and close the notifier."""
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._notifier.close()

    def on_message(self, topic: str, payload: bytes) -> None:
        """Handle one inbox message; called on the MQTT network thread."""
        try:
            push = decode(payload, Push)
        except PayloadError as exc:
            self._drops.drop(topic, str(exc))
            return

        is_new = self._inbox.store(push)
        if is_new and push.kind != "status":
            self._queue.put(push)
        self._send_ack(encode(Ack(id=push.id, ts=round(time.time(), 3))))

        if not is_new:
            log.debug("push %s received again; acknowledged, not shown", push.id)
        elif push.kind == "status":
            log.info(
                "mail %s marked %s on another terminal",
                push.mail.id,
                "read" if push.mail.seen else "unread",
            )

    def _show_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, Push)
            shown = self._notifier.show(item)
            log.info(
                "%s push %s for mail %s shown (%s): %s",
                item.kind,
                item.id,
                item.mail.id,
                shown,
                item.reason or "no reason given",
            )
