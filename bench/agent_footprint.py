"""Measure the mailpush agent's CPU and memory, idle and under a pointer storm.

Runs ``mailpush-agent start`` the way a user runs it: as its own process, with
the pynput input backend on an X display, connected to an MQTT broker. This
script starts a Mosquitto on a free loopback port and an Xvfb for the agent,
and measures the agent's process from outside, through ``/proc``:

1. idle: the CPU time used over ``--idle-seconds`` with no input, and the
   resident set size (RSS) at the end;
2. storm: the CPU time used while xdotool moves the pointer ``--rate`` times a
   second for ``--storm-seconds``, and the peak RSS.

A separate X client (the pynput counter of ``bench/input_storm.py``) counts the
motion events the X server delivered, so the rate printed is the rate received.

Run from the repository root (Linux only)::

    python -m bench.agent_footprint [--idle-seconds 60] [--storm-seconds 30] [--rate 1000] [--json FILE]

CPU figures are percent of one core (100 = one core busy). Memory figures are
MiB (2**20 bytes), although the JSON keys end in ``_mb``. The peak RSS is the
process's VmHWM, so it includes start-up as well as both phases.

NOTE: Xvfb, xdotool, the counter and this script's pacing loop run on the same
CPUs as the agent. On a machine with few cores they compete with it.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._procstat import describe_machine, read_memory, sample_cpu, stop_process
from bench.input_storm import COUNTER
from mailpush.protocol.topics import Topics
from tests.fixtures.mosquitto import MOSQUITTO, Mosquitto, free_port
from tests.fixtures.xvfb import running_xvfb
from tests.mqtt_client import Subscriber

USER = "bench"
TERMINAL = "desk"
FIRST_STATE_TIMEOUT_S = 30.0
SETTLE_S = 5.0
COUNTER_READY_TIMEOUT_S = 20.0
# The agent is woken by the first events of a burst, so `active` comes
# within milliseconds of the storm's start. The margin is for a loaded machine.
ACTIVE_TIMEOUT_S = 5.0
# Time for the agent's listener to handle what the X server still had queued
# when xdotool exited. input_storm.py allows the same.
DRAIN_S = 0.2
PACE_TICK_S = 0.005
RSS_SAMPLE_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 15
# Two positions one pixel apart, so that every move is a real motion event.
MOVES = ("mousemove 400 300\n", "mousemove 401 300\n")


class BenchError(RuntimeError):
    """An expected failure: a missing tool, or a process that did not start or stopped early."""


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its figures and return the exit status."""
    args = parse_args(argv)
    # SIGTERM ends the script through the same cleanup path as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        results = run(args)
    except BenchError as exc:
        print(f"agent_footprint: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("agent_footprint: interrupted; stopped the processes it started", file=sys.stderr)
        return 130

    print_report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if not results["agent_published_active"]:
        print(
            "agent_footprint: error: the agent did not publish `active` during the storm",
            file=sys.stderr,
        )
        return 1
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line. An invalid value exits with one line of usage error."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.agent_footprint",
        description="Measure the mailpush agent's CPU and memory, idle and under a pointer storm.",
    )
    numbers = (
        ("--idle-seconds", float, 60.0, "length of the idle phase in seconds (default: 60)"),
        ("--storm-seconds", float, 30.0, "length of the pointer storm in seconds (default: 30)"),
        ("--rate", int, 1000, "pointer motion events per second to request (default: 1000)"),
    )
    for flag, kind, default, text in numbers:
        parser.add_argument(flag, type=_positive(kind), default=default, help=text)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the broker, the display and the agent, measure both phases, and stop them all."""
    _require_tools()
    machine = describe_machine()
    with contextlib.ExitStack() as stack:
        stack.callback(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mailpush-bench-")))
        broker = _start_broker(stack, workdir)
        display = stack.enter_context(running_xvfb())
        watcher = _subscribe(stack, broker.port)
        agent = _start_agent(stack, workdir, broker.url, display)
        # Registered last, so it runs first when the stack unwinds: a second
        # Ctrl-C must not cut the cleanup short.
        stack.callback(signal.signal, signal.SIGINT, signal.SIG_IGN)

        try:
            results = _measure(args, stack, workdir, display, watcher, agent)
        except ProcessLookupError:
            raise _agent_failure(
                workdir, agent, "the agent exited during the measurement"
            ) from None
    return {**results, **dataclasses.asdict(machine)}


def _measure(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    workdir: Path,
    display: str,
    watcher: Subscriber,
    agent: subprocess.Popen[bytes],
) -> dict[str, Any]:
    alive = _liveness_check(workdir, agent)
    if _wait_for_state(watcher, None, FIRST_STATE_TIMEOUT_S, alive) is None:
        raise _agent_failure(
            workdir, agent, f"the agent published no state within {FIRST_STATE_TIMEOUT_S:.0f} s"
        )
    _sleep(SETTLE_S, alive)

    idle_start = sample_cpu(agent.pid)
    _sleep(args.idle_seconds, alive)
    idle_cpu = sample_cpu(agent.pid).percent_since(idle_start)
    idle_memory = read_memory(agent.pid)

    x_env = {**os.environ, "DISPLAY": display}
    counter = _start_counter(stack, workdir, x_env)
    storm_rss_kib = [read_memory(agent.pid).rss_kib]
    storm_start = sample_cpu(agent.pid)
    sent, storm_s = _drive_storm(
        stack, workdir, x_env, args.rate, args.storm_seconds,
        sampler=lambda: storm_rss_kib.append(read_memory(agent.pid).rss_kib),
    )  # fmt: skip
    time.sleep(DRAIN_S)
    storm_cpu = sample_cpu(agent.pid).percent_since(storm_start)
    storm_memory = read_memory(agent.pid)
    received = _read_count(counter)
    # Only the storm moves the pointer, so an `active` state can only come from it.
    active = _wait_for_state(watcher, "active", ACTIVE_TIMEOUT_S, alive)

    return {
        "agent_idle_cpu_percent": round(idle_cpu, 3),
        "agent_idle_rss_mb": round(idle_memory.rss_mib, 2),
        "agent_storm_cpu_percent": round(storm_cpu, 3),
        "agent_peak_rss_mb": round(storm_memory.peak_rss_mib, 2),
        "storm_events_per_s": round(received / storm_s, 1),
        "agent_storm_max_rss_mb": round(max(storm_rss_kib + [storm_memory.rss_kib]) / 1024, 2),
        "agent_threads": storm_memory.threads,
        "agent_published_active": active is not None,
        "storm_events_received": received,
        "storm_events_sent": sent,
        "storm_seconds": round(storm_s, 3),
        "idle_seconds": args.idle_seconds,
        "rate_requested": args.rate,
        "agent_executable": os.path.realpath(f"/proc/{agent.pid}/exe"),
    }


def print_report(results: dict[str, Any]) -> None:
    """Print the figures as a table of metric, value and unit, then the machine."""
    r = results
    # fmt: off
    rows = [
        ("agent idle CPU", f"{r['agent_idle_cpu_percent']:.2f}", "% of one core"),
        ("agent idle RSS (VmRSS)", f"{r['agent_idle_rss_mb']:.1f}", "MiB"),
        ("agent storm CPU", f"{r['agent_storm_cpu_percent']:.2f}", "% of one core"),
        ("agent peak RSS (VmHWM)", f"{r['agent_peak_rss_mb']:.1f}", "MiB"),
        ("agent max RSS in storm", f"{r['agent_storm_max_rss_mb']:.1f}", "MiB, sampled every 0.5 s"),
        ("agent threads", str(r["agent_threads"]), "threads"),
        ("storm events received", str(r["storm_events_received"]), f"events of {r['storm_events_sent']} sent"),
        ("storm rate received", f"{r['storm_events_per_s']:.0f}", f"events/s over {r['storm_seconds']:.1f} s"),
        ("agent published active", "yes" if r["agent_published_active"] else "NO", "during the storm"),
    ]
    # fmt: on
    width = max(len(row[0]) for row in rows)
    print(f"{'metric':<{width}}  {'value':>8}  unit")
    for metric, value, unit in rows:
        print(f"{metric:<{width}}  {value:>8}  {unit}")
    print(
        f"machine: {r['cpu_model']}, {r['cores']} logical CPUs, {r['python']}, "
        f"1-min load average {r['load_average']:.2f} before the run"
    )
    print(f"agent process: {r['agent_executable']}")


def _require_tools() -> None:
    for tool, package in (("xdotool", "xdotool"), ("Xvfb", "xvfb")):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found; install the Debian package {package}")
    if not os.access(MOSQUITTO, os.X_OK):
        raise BenchError(f"{MOSQUITTO} not found; install the Debian package mosquitto")
    if not Path("/proc/self/stat").exists():
        raise BenchError("/proc not found; this benchmark reads /proc and runs on Linux only")


def _agent_command() -> str:
    # Version managers such as pyenv put a shell shim first on PATH. The console
    # script beside this Python is the real one, so the pid started is the
    # agent's own Python process from its first instruction.
    beside = Path(sys.executable).parent / "mailpush-agent"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mailpush-agent")
    if found is None:
        raise BenchError(
            "mailpush-agent not found; install the package from the repository root: pip install -e ."
        )
    return found


def _start_broker(stack: contextlib.ExitStack, workdir: Path) -> Mosquitto:
    folder = workdir / "mosquitto"
    folder.mkdir()
    broker = Mosquitto(port=free_port(), workdir=folder)
    stack.callback(broker.stop)
    try:
        broker.start()
    except TimeoutError as exc:
        raise BenchError(
            f"mosquitto did not start: {exc}; its log: {broker.log()[-500:]}"
        ) from None
    return broker


def _subscribe(stack: contextlib.ExitStack, port: int) -> Subscriber:
    try:
        subscriber = Subscriber(port, Topics().state(USER, TERMINAL))
    except (OSError, queue.Empty):
        raise BenchError(f"could not subscribe to the agent's state on 127.0.0.1:{port}") from None
    stack.callback(subscriber.close)
    return subscriber


def _wait_for_state(
    subscriber: Subscriber, wanted: str | None, timeout: float, check: Callable[[], None]
) -> str | None:
    """Return the first state received (or the first equal to ``wanted``), or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        check()
        try:
            message = subscriber.wait_for(
                lambda message: wanted is None or _state_of(message.payload) == wanted,
                timeout=min(remaining, 1.0),
            )
        except AssertionError:  # how Subscriber.wait_for reports a timeout
            continue
        return _state_of(message.payload)
    return None


def _state_of(payload: bytes) -> str | None:
    try:
        state = json.loads(payload).get("state")
    except (ValueError, AttributeError):
        return None
    return state if isinstance(state, str) else None


def _start_agent(
    stack: contextlib.ExitStack, workdir: Path, broker_url: str, display: str
) -> subprocess.Popen[bytes]:
    config = workdir / "agent.toml"
    config.write_text(
        f'user = "{USER}"\nterminal = "{TERMINAL}"\n\n'
        f'[broker]\nurl = "{broker_url}"\n\n'
        '[sensors.input]\nbackend = "pynput"\n',
        encoding="utf-8",
    )
    env = {
        **os.environ,
        "DISPLAY": display,
        "XDG_STATE_HOME": str(workdir / "state"),
        "XDG_DATA_HOME": str(workdir / "data"),
        "XDG_CONFIG_HOME": str(workdir / "config"),
    }
    # Either would override the pynput backend that the config sets.
    env.pop("WAYLAND_DISPLAY", None)
    env.pop("MAILPUSH_INPUT_BACKEND", None)

    log = stack.enter_context((workdir / "agent.log").open("wb"))
    # A session of its own keeps a terminal's Ctrl-C away from the agent, so
    # this script stops it first, while the broker still runs to take its `off`.
    agent = subprocess.Popen(
        [_agent_command(), "start", "--config", str(config)],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    stack.callback(stop_process, agent)
    return agent


def _start_counter(
    stack: contextlib.ExitStack, workdir: Path, env: dict[str, str]
) -> subprocess.Popen[str]:
    # Its stderr goes to a file, because its listener prints a traceback when
    # a Ctrl-C from the terminal has already stopped Xvfb.
    errors = stack.enter_context((workdir / "counter.log").open("wb"))
    counter = subprocess.Popen(
        [sys.executable, "-c", COUNTER],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True, start_new_session=True,
    )  # fmt: skip
    stack.callback(stop_process, counter)
    assert counter.stdout is not None

    ready, _, _ = select.select([counter.stdout], [], [], COUNTER_READY_TIMEOUT_S)
    if not ready or counter.stdout.readline().strip() != "ready":
        raise BenchError(
            f"the motion counter (a pynput listener) did not start within {COUNTER_READY_TIMEOUT_S:.0f} s"
        )
    return counter


def _read_count(counter: subprocess.Popen[str]) -> int:
    assert counter.stdin is not None and counter.stdout is not None
    counter.stdin.write("\n")
    counter.stdin.flush()
    line = counter.stdout.readline().strip()
    if not line.isdigit():
        raise BenchError(f"the motion counter returned {line!r} instead of a count of events")
    return int(line)


def _drive_storm(
    stack: contextlib.ExitStack,
    workdir: Path,
    env: dict[str, str],
    rate: int,
    seconds: float,
    sampler: Callable[[], None],
) -> tuple[int, float]:
    """Move the pointer ``rate`` times a second, and return the moves sent and the seconds taken.

    xdotool reads its commands from stdin and runs each line as it arrives,
    so this loop paces the moves against the clock and catches up after a
    late tick. One chained command line, as input_storm.py builds, takes
    about 45 bytes of arguments per move (an estimate), so it would pass
    Linux's usual 2 MiB ARG_MAX in a storm of about 45 s at 1,000 events/s.
    """
    errors = stack.enter_context((workdir / "xdotool.log").open("w+b"))
    xdotool = subprocess.Popen(
        ["xdotool", "-"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors, text=True, start_new_session=True,
    )  # fmt: skip
    stack.callback(stop_process, xdotool)
    assert xdotool.stdin is not None

    total = round(rate * seconds)
    sent = 0
    start = time.monotonic()
    next_sample = start + RSS_SAMPLE_INTERVAL_S
    try:
        while sent < total:
            now = time.monotonic()
            due = min(total, int((now - start) * rate) + 1)
            if due > sent:
                xdotool.stdin.write("".join(MOVES[index % 2] for index in range(sent, due)))
                xdotool.stdin.flush()
                sent = due
            if now >= next_sample:
                sampler()
                next_sample += RSS_SAMPLE_INTERVAL_S
            time.sleep(PACE_TICK_S)
        xdotool.stdin.close()
        code = xdotool.wait(timeout=seconds + STOP_TIMEOUT_S)
    except (BrokenPipeError, subprocess.TimeoutExpired):
        code = None
    elapsed = time.monotonic() - start

    if code != 0:
        errors.seek(0)
        message = errors.read().decode(errors="replace").strip() or f"exit status {code}"
        raise BenchError(f"xdotool failed during the storm: {message}")
    return sent, elapsed


def _liveness_check(workdir: Path, agent: subprocess.Popen[bytes]) -> Callable[[], None]:
    def check() -> None:
        if agent.poll() is not None:
            raise _agent_failure(workdir, agent, f"the agent exited with status {agent.returncode}")

    return check


def _agent_failure(workdir: Path, agent: subprocess.Popen[bytes], message: str) -> BenchError:
    try:
        lines = (workdir / "agent.log").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    tail = "\n  ".join(lines[-LOG_TAIL_LINES:]) or "(empty)"
    return BenchError(f"{message} (pid {agent.pid}); the end of its log:\n  {tail}")


def _sleep(seconds: float, check: Callable[[], None]) -> None:
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        check()
        time.sleep(min(remaining, 0.5))


def _positive(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; expected a number above 0")
        return value

    return convert


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
