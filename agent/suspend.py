"""Detection of a system suspend from two clocks that disagree about elapsed time.

``time.monotonic()`` stops while the system is suspended (on Linux it is
CLOCK_MONOTONIC; on macOS and Windows it also excludes sleep), while the wall
clock and Linux's CLOCK_BOOTTIME keep counting. When the two advance by very
different amounts between two samples, the difference is time spent asleep.
"""

import dataclasses

from mailpush.sensors.base import Reading

# Below this gap a "suspend" is more likely a wall clock step (an NTP
# correction) and too short to matter to a state judged in minutes.
MIN_SUSPEND_S = 5.0


def detect_suspend(
    prev_wall: float, prev_mono: float, wall: float, mono: float, poll_s: float
) -> float:
    """Return how many seconds the system slept between two samples, or 0.0.

    Args:
        prev_wall: the earlier sample of a clock that counts suspend, in seconds
            (``time.time()``, or better ``time.clock_gettime(time.CLOCK_BOOTTIME)``,
            which no one can set).
        prev_mono: ``time.monotonic()`` taken with ``prev_wall``.
        wall: the later sample of the same counting clock.
        mono: ``time.monotonic()`` taken with ``wall``.
        poll_s: the interval between samples; a gap shorter than this, or than
            ``MIN_SUSPEND_S``, is not reported.

    A wall clock set forward by more than the threshold reads as a suspend, and
    one set back reads as none; CLOCK_BOOTTIME is immune to both.
    """
    gap = (wall - prev_wall) - (mono - prev_mono)
    if gap < max(poll_s, MIN_SUSPEND_S):
        return 0.0
    return gap


def discount_suspend(reading: Reading, resumed_at: float, slept_s: float) -> Reading:
    """Move the times in a reading taken before a suspend back by the time slept.

    Where :func:`mailpush.sensors.base.clock` stops during suspend (macOS,
    Windows), an input just before sleeping would otherwise look fresh after
    waking. Times at or after ``resumed_at`` are kept, so an input made after
    waking still counts.
    """

    def shift(moment: float | None) -> float | None:
        if moment is None or moment >= resumed_at:
            return moment
        return moment - slept_s

    return dataclasses.replace(
        reading,
        last_input=shift(reading.last_input),
        last_presence=shift(reading.last_presence),
    )
