"""Rate-limited logging of dropped MQTT messages.

A bad payload is logged at most once a minute per topic and reason, so a
misbehaving client cannot flood the log.
"""

import logging
import time
from collections.abc import Callable

DEFAULT_INTERVAL_S = 60.0
MAX_KEYS = 10_000


class DropLog:
    """Logs each (topic, reason) pair at most once per interval, with a count of repeats."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def drop(self, topic: str, reason: str) -> None:
        """Record a dropped message; log it unless the same pair was logged recently."""
        key = (topic, reason)
        now = self._clock()
        logged_at, suppressed = self._last.get(key, (float("-inf"), 0))
        if now - logged_at < self._interval_s:
            self._last[key] = (logged_at, suppressed + 1)
            return

        if len(self._last) >= MAX_KEYS:
            self._last.clear()
        self._last[key] = (now, 0)
        repeats = f" ({suppressed} more since the last report)" if suppressed else ""
        self._logger.warning("dropped a message on %s: %s%s", topic, reason, repeats)
