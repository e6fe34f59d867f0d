"""Latency from an X input event after a quiet spell to the input plugin's callback.

The X11 listener stops recording for a hold after each event, so it costs
little under a pointer storm. This script checks the other side of that
bargain: the first event after a quiet spell must still reach the activity
clock at once. The script starts its own Xvfb and runs the pynput backend in
this process. Each of ``--trials`` trials stays quiet for longer than the
hold, injects one pointer motion through the XTEST extension, and times the
gap from sending that request to the callback.

Run from the repository root::

    python bench/input_first_event.py [--trials 50]

The latency includes python-xlib sending the request, the X server handling
it and the XSync round trip, so it is an upper bound on the plugin's share.
"""

import argparse
import os
import statistics
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mailpush.sensors.base import clock  # noqa: E402
from mailpush.sensors.input.x11 import HOLD_S, PynputBackend  # noqa: E402
from tests.fixtures.xvfb import running_xvfb  # noqa: E402

# Quiet time before each injected event: longer than the hold, so that
# recording has resumed, as after a real pause of the user.
QUIET_S = HOLD_S + 0.2
CALLBACK_TIMEOUT_S = 5.0


def measure(display_name: str, trials: int) -> list[float]:
    """Return the latency of each trial in milliseconds."""
    import Xlib.display
    from Xlib import X
    from Xlib.ext import xtest

    arrived = threading.Event()
    arrival: list[float] = []

    def on_input() -> None:
        arrival.append(clock())
        arrived.set()

    backend = PynputBackend(on_input)
    backend.start()
    injector = Xlib.display.Display(display_name)
    latencies = []
    try:
        for trial in range(trials):
            threading.Event().wait(QUIET_S)
            arrived.clear()
            arrival.clear()

            sent = clock()
            xtest.fake_input(injector, X.MotionNotify, x=300 + trial % 2, y=300)
            # A round trip, not a flush: the X server sends buffered RECORD
            # data when it next writes to any client, and on a bare Xvfb no
            # window receives the motion.
            injector.sync()
            if not arrived.wait(CALLBACK_TIMEOUT_S):
                raise SystemExit(f"trial {trial}: no callback within {CALLBACK_TIMEOUT_S:.0f} s")

            latencies.append((arrival[0] - sent) * 1000)
    finally:
        injector.close()
        backend.stop()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trials", type=int, default=50, help="events to time, one per quiet spell"
    )
    args = parser.parse_args()

    with running_xvfb() as display:
        os.environ["DISPLAY"] = display
        latencies = measure(display, args.trials)

    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    print(f"trials          : {len(latencies)}, each after {QUIET_S:.1f} s without input")
    print(f"latency median  : {statistics.median(latencies):.2f} ms")
    print(f"latency p99     : {p99:.2f} ms")
    print(f"latency max     : {ordered[-1]:.2f} ms")
    print(f"hold after each event: {HOLD_S} s")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {os.uname().machine}")


if __name__ == "__main__":
    main()
