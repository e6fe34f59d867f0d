"""CPU cost of the input plugin under a pointer storm of about 1,000 events/s.

Starts its own Xvfb, runs the plugin (pynput backend) in this process, and
moves the X pointer with one chained xdotool command in batches: ``batch``
moves, then a sleep, paced to the target rate. A separate counter process
(a plain pynput listener) counts the motion events the X server delivered,
so the rate printed is the rate received, not the rate requested.

Run from the repository root::

    python bench/input_storm.py [--rate 1000] [--seconds 10]

Prints the events/s achieved and the CPU used by this process (the one
hosting the plugin) as a percentage of one core, next to an idle baseline.
"""

import argparse
import os
import resource
import subprocess
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mailpush.sensors.input.plugin import ActivityClock, InputOptions, InputSensor  # noqa: E402
from mailpush.sensors.input.x11 import event_callback  # noqa: E402
from tests.fixtures.xvfb import running_xvfb  # noqa: E402

COUNTER = textwrap.dedent(
    """
    import sys, threading
    from pynput import mouse
    count = 0
    def on_move(*_):
        global count
        count += 1
    listener = mouse.Listener(on_move=on_move)
    listener.start()
    listener.wait()
    print("ready", flush=True)
    sys.stdin.readline()
    print(count, flush=True)
    """
)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def storm_command(rate: int, seconds: float, batch: int) -> list[str]:
    """Build one xdotool command that moves the pointer ``rate`` times a second."""
    command = ["xdotool"]
    for index in range(int(rate * seconds)):
        command += ["mousemove", str(400 + index % 2), "300"]
        if index % batch == batch - 1:
            command += ["sleep", f"{batch / rate:.4f}"]
    return command


def callback_cost_us(calls: int = 200_000) -> float:
    """Return the CPU microseconds of one call of the plugin's pynput callback alone."""
    callback = event_callback(ActivityClock(lambda: None, 1.0).touch)
    start = time.thread_time()
    for index in range(calls):
        callback(index, 300, False)
    return (time.thread_time() - start) / calls * 1e6


def measure_idle(seconds: float) -> float:
    start_cpu, start = cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds() - start_cpu) / (time.monotonic() - start) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="target motion events per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the storm")
    parser.add_argument("--batch", type=int, default=10, help="moves between two xdotool sleeps")
    args = parser.parse_args()

    with running_xvfb() as display:
        os.environ["DISPLAY"] = display
        env = {**os.environ, "DISPLAY": display}
        counter = subprocess.Popen(
            [sys.executable, "-c", COUNTER], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert counter.stdout is not None and counter.stdin is not None
        counter.stdout.readline()

        sensor = InputSensor(InputOptions(backend="pynput"))
        wakes = []
        sensor.start(lambda: wakes.append(time.monotonic()))
        try:
            idle = measure_idle(args.seconds)

            start_cpu, start = cpu_seconds(), time.monotonic()
            storm = storm_command(args.rate, args.seconds, args.batch)
            subprocess.run(storm, env=env, check=True)
            time.sleep(0.2)  # let the listener drain what the X server queued
            wall = time.monotonic() - start
            busy = (cpu_seconds() - start_cpu) / wall * 100
        finally:
            sensor.stop()
            counter.stdin.write("\n")
            counter.stdin.flush()
            received = int(counter.stdout.readline())
            counter.wait(timeout=10)

    print(f"events received : {received} in {wall:.2f} s = {received / wall:.0f} events/s")
    print(f"plugin process  : {busy:.1f} % of one core during the storm ({idle:.1f} % idle)")
    print(f"wake calls      : {len(wakes)}")
    cost = callback_cost_us()
    share = cost * received / wall / 1e4
    print(f"callback alone  : {cost:.2f} us per event = {share:.2f} % of one core at this rate")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {os.uname().machine}")


if __name__ == "__main__":
    main()
