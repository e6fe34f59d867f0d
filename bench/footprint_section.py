"""Agent footprint for ``python -m bench``, with aw-watcher-afk and LNXlink under the same storm.

Our agent is measured by bench/agent_footprint.py. Each other program runs
from its own virtual environment, outside this project, on its own Xvfb,
while the same xdotool storm (``agent_footprint._drive_storm``) moves the
pointer; its CPU is read from ``/proc`` the same way.

- aw-watcher-afk (ActivityWatch, installed from its public repository) needs
  an aw-server, so ``aw-server --testing`` from the same venv runs on
  loopback port 5666 and ``aw-watcher-afk --testing`` reports to it.
- LNXlink runs with only its ``idle`` module, publishing to a Mosquitto on
  loopback.
"""

import contextlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench import agent_footprint
from bench._procstat import sample_cpu, stop_process
from bench.runner import Row, Section, goal_row
from tests.fixtures.mosquitto import Mosquitto, free_port
from tests.fixtures.xvfb import running_xvfb

STORM_RATE = 1000
SETTLE_S = 5.0


def footprint_section(
    idle_s: float, storm_s: float, aw_venv: Path | None, lnxlink_venv: Path | None
) -> Section:
    """Measure our agent idle and in the storm, and each other program in the same storm."""
    args = agent_footprint.parse_args(
        ["--idle-seconds", str(idle_s), "--storm-seconds", str(storm_s), "--rate", str(STORM_RATE)]
    )
    ours = agent_footprint.run(args)
    section = Section("footprint", "Agent footprint (pynput on Xvfb, 1,000 pointer events/s)")
    storm = ours["agent_storm_cpu_percent"]
    section.rows.append(
        goal_row(
            Row("agent idle CPU", value=ours["agent_idle_cpu_percent"], unit="% of a core"),
            0.1,
            what="",
        )
    )
    section.rows.append(
        goal_row(Row("agent idle RSS", value=ours["agent_idle_rss_mb"], unit="MiB"), 35.0, what="")
    )
    section.rows.append(Row("agent storm CPU", value=storm, unit="% of a core"))
    section.figures = {
        key: ours[key]
        for key in ("agent_idle_cpu_percent", "agent_idle_rss_mb", "agent_storm_cpu_percent")
    }
    section.figures["storm_events_per_s"] = ours["storm_events_per_s"]

    for name, venv, measure, limit in (
        ("aw", aw_venv, _aw_storm_cpu, 0.5),
        ("lnxlink", lnxlink_venv, _lnxlink_storm_cpu, 1.0),
    ):
        label = "aw-watcher-afk" if name == "aw" else "LNXlink"
        key = f"agent_storm_cpu_ratio_vs_{name}"
        if venv is None or not venv.is_dir():
            section.notes.append(
                f"{label}: not measured, no virtual environment given (--{name}-venv)."
            )
            section.figures[key] = None
            continue
        try:
            theirs = measure(venv, storm_s)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            section.notes.append(f"{label}: measurement failed: {exc}")
            section.figures[key] = None
            continue
        section.rows.append(Row(f"{label} storm CPU", value=theirs, unit="% of a core"))
        if theirs == 0:
            # NOTE: LNXlink's idle module reads the idle time over D-Bus (dbus-idle);
            # without a D-Bus session it may do no work at all, so no ratio is given.
            section.notes.append(
                f"{label} used no measurable CPU; its idle sensing probably did not run (see {label}'s log)."
            )
        ratio = Row(
            f"our storm CPU / {label}'s", value=storm / theirs if theirs else None, unit="x"
        )
        section.rows.append(goal_row(ratio, limit, what="") if name == "aw" else ratio)
        if name == "lnxlink" and ratio.value is not None:
            ratio.goal, ratio.met = "< 1 x", ratio.value < 1.0
        section.figures[key] = round(ratio.value, 3) if ratio.value is not None else None
        section.figures[f"{name}_storm_cpu_percent"] = round(theirs, 3)
    return section


def _aw_storm_cpu(venv: Path, storm_s: float) -> float:
    with contextlib.ExitStack() as stack:
        workdir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="mailpush-bench-aw-"))
        )
        display = stack.enter_context(running_xvfb())
        env = _env(workdir, display)
        _start(stack, workdir, [str(venv / "bin" / "aw-server"), "--testing"], env, "aw-server")
        time.sleep(SETTLE_S)
        watcher = _start(
            stack,
            workdir,
            [str(venv / "bin" / "aw-watcher-afk"), "--testing"],
            env,
            "aw-watcher-afk",
        )
        return _storm_cpu(stack, workdir, env, watcher, storm_s)


def _lnxlink_storm_cpu(venv: Path, storm_s: float) -> float:
    with contextlib.ExitStack() as stack:
        workdir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="mailpush-bench-lnx-"))
        )
        broker = Mosquitto(port=free_port(), workdir=workdir)
        stack.callback(broker.stop)
        broker.start()
        display = stack.enter_context(running_xvfb())
        env = _env(workdir, display)
        config = workdir / "lnxlink.yaml"
        config.write_text(
            "mqtt:\n  prefix: lnxlink\n  clientId: bench\n  server: 127.0.0.1\n"
            f"  port: {broker.port}\n  auth:\n    user: ''\n    pass: ''\n    tls: false\n"
            "  discovery:\n    enabled: false\n  lwt:\n    enabled: true\n    qos: 1\n    retain: true\n"
            "update_interval: 5\nmodules:\n- idle\ncustom_modules: []\nexclude: []\nsettings: {}\n",
            encoding="utf-8",
        )
        command = [str(venv / "bin" / "lnxlink"), "-c", str(config), "-i"]
        process = _start(stack, workdir, command, env, "lnxlink")
        return _storm_cpu(stack, workdir, env, process, storm_s)


def _storm_cpu(
    stack: contextlib.ExitStack, workdir: Path, env: dict[str, str],
    process: subprocess.Popen[bytes], storm_s: float,
) -> float:  # fmt: skip
    time.sleep(SETTLE_S)
    if process.poll() is not None:
        raise RuntimeError(f"{process.args[0]} exited with status {process.returncode}")
    before = sample_cpu(process.pid)
    agent_footprint._drive_storm(stack, workdir, env, STORM_RATE, storm_s, sampler=lambda: None)
    time.sleep(agent_footprint.DRAIN_S)
    return sample_cpu(process.pid).percent_since(before)


def _env(workdir: Path, display: str) -> dict[str, str]:
    env = {**os.environ, "DISPLAY": display, "HOME": str(workdir / "home"),
           "XDG_CONFIG_HOME": str(workdir / "config"), "XDG_DATA_HOME": str(workdir / "data"),
           "XDG_CACHE_HOME": str(workdir / "cache")}  # fmt: skip
    env.pop("WAYLAND_DISPLAY", None)
    return env


def _start(
    stack: contextlib.ExitStack, workdir: Path, command: list[str], env: dict[str, str], name: str
) -> subprocess.Popen[bytes]:
    log = stack.enter_context((workdir / f"{name}.log").open("wb"))
    process = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    stack.callback(stop_process, process)
    return process
