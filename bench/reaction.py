"""Reaction time: from the first input on an ``away`` terminal to its ``active`` state on MQTT.

Runs the real ``mailpush-agent start`` (pynput backend) on an Xvfb display,
with an active window and an away threshold of one second so that each sample
starts from ``away`` within seconds. A persistent ``xdotool -`` moves the
pointer every 10 ms from the start of a sample until the state topic shows
``active``; the default hysteresis (two distinct input times) applies. The end
of a sample is when a plain paho subscriber receives the ``active`` state,
which is when the service's registry would get it.
"""

import contextlib
import json
import os
import random
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench._procstat import stop_process
from bench.agent_footprint import _agent_command
from bench.runner import Row, Section, Stats, goal_row
from mailpush.protocol.topics import Topics
from tests.fixtures.xvfb import running_xvfb

USER = "bench"
TERMINAL = "desk"
STATE_TIMEOUT_S = 30.0
MOVE_INTERVAL_S = 0.01
# A random pause after `away`, so a sample does not start at the same point
# of the agent's fusion schedule each time.
PAUSE_RANGE_S = (0.1, 0.6)


class _StateWatcher:
    """Records each state on the terminal's state topic with the time it arrived."""

    def __init__(self, port: int) -> None:
        self._condition = threading.Condition()
        self._states: list[tuple[float, str]] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(Topics().state(USER, TERMINAL), qos=1)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the state subscriber was not acknowledged")

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        received = time.time()
        try:
            state = json.loads(message.payload).get("state", "")
        except ValueError:
            return
        with self._condition:
            self._states.append((received, state))
            self._condition.notify_all()

    def wait_for(self, state: str, after: float, timeout: float = STATE_TIMEOUT_S) -> float:
        """Return when ``state`` first arrived after the time ``after``."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                for received, seen in self._states:
                    if seen == state and received >= after:
                        return received
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {state!r} state within {timeout:.0f} s")
                self._condition.wait(remaining)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def run(broker_url: str, port: int, count: int) -> Section:
    """Measure ``count`` away-to-active reactions and return the section."""
    stats = Stats.of(measure(broker_url, port, count, confirm_events=2))
    single = Stats.of(measure(broker_url, port, count, confirm_events=1))
    section = Section("reaction", "Reaction: input on an away terminal -> active state on MQTT")
    section.rows.append(goal_row(Row("first input -> active, default hysteresis", stats), 200.0))
    section.rows.append(goal_row(Row("first input -> active, confirm_events = 1", single), 200.0))
    section.figures = {
        "reaction_p50_ms": round(stats.median_ms, 1),
        "reaction_p99_ms": round(stats.p99_ms, 1),
        "reaction_no_hysteresis_p50_ms": round(single.median_ms, 1),
        "reaction_no_hysteresis_p99_ms": round(single.p99_ms, 1),
        "reaction_samples": stats.count,
    }
    section.notes = [
        "Input is a pointer move every 10 ms; the agent's default hysteresis needs two "
        "distinct input times before it reports active.",
    ]
    return section


def measure(broker_url: str, port: int, count: int, confirm_events: int) -> list[float]:
    """Return ``count`` reaction times in milliseconds, with ``fusion.confirm_events`` set."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mailpush-bench-")))
        display = stack.enter_context(running_xvfb())
        watcher = _StateWatcher(port)
        stack.callback(watcher.close)
        _start_agent(stack, workdir, broker_url, display, confirm_events)
        xdotool = _start_xdotool(stack, display)

        samples = []
        watcher.wait_for("away", 0.0)
        for _ in range(count):
            time.sleep(random.uniform(*PAUSE_RANGE_S))
            started = time.time()
            stop = threading.Event()
            mover = threading.Thread(target=_move, args=(xdotool, stop), name="bench-mover")
            mover.start()
            try:
                active = watcher.wait_for("active", started)
            finally:
                stop.set()
                mover.join()
            samples.append((active - started) * 1000)
            watcher.wait_for("away", active)
        return samples


def _move(xdotool: subprocess.Popen[str], stop: threading.Event) -> None:
    assert xdotool.stdin is not None
    step = 0
    while not stop.is_set():
        xdotool.stdin.write(f"mousemove {300 + step % 2} 300\n")
        xdotool.stdin.flush()
        step += 1
        stop.wait(MOVE_INTERVAL_S)


def _start_xdotool(stack: contextlib.ExitStack, display: str) -> subprocess.Popen[str]:
    xdotool = subprocess.Popen(
        ["xdotool", "-"], env={**os.environ, "DISPLAY": display}, stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )  # fmt: skip
    stack.callback(stop_process, xdotool)
    return xdotool


def _start_agent(
    stack: contextlib.ExitStack, workdir: Path, broker_url: str, display: str, confirm_events: int
) -> None:
    config = workdir / "agent.toml"
    config.write_text(
        f'user = "{USER}"\nterminal = "{TERMINAL}"\n\n[broker]\nurl = "{broker_url}"\n\n'
        "[fusion]\nactive_window_s = 1\naway_after_s = 1\n"
        f"confirm_events = {confirm_events}\n\n"
        '[sensors.input]\nbackend = "pynput"\n',
        encoding="utf-8",
    )
    env = {**os.environ, "DISPLAY": display, "XDG_STATE_HOME": str(workdir / "state"),
           "XDG_DATA_HOME": str(workdir / "data"), "XDG_CONFIG_HOME": str(workdir / "config")}  # fmt: skip
    env.pop("WAYLAND_DISPLAY", None)
    env.pop("MAILPUSH_INPUT_BACKEND", None)
    log = stack.enter_context((workdir / "agent.log").open("wb"))
    agent = subprocess.Popen(
        [_agent_command(), "start", "--config", str(config)],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    stack.callback(stop_process, agent)
