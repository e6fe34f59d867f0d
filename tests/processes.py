"""Start mailpush-agent and mailpush-server as subprocesses, the way a user runs them."""

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

AGENT = shutil.which("mailpush-agent") or "mailpush-agent"
SERVER = shutil.which("mailpush-server") or "mailpush-server"


@dataclass
class Running:
    """A started mailpush process with its log file."""

    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        """Return the process's output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        """Block until ``text`` appears in the output; fail with the log if it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.process.poll() is not None:
                raise AssertionError(
                    f"process exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the log after {timeout} s:\n{self.log()[-3000:]}")

    def terminate(self, timeout: float = 15.0) -> int:
        """Send SIGTERM and wait; kill if it does not stop. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """Send SIGKILL and reap the process."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def home_env(home: Path, display: str | None = None) -> dict[str, str]:
    """Return an environment whose XDG folders all lie under ``home``."""
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_STATE_HOME": str(home / "state"),
        "XDG_DATA_HOME": str(home / "data"),
    }
    env.pop("WAYLAND_DISPLAY", None)
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    if display is not None:
        env["DISPLAY"] = display
    else:
        env.pop("DISPLAY", None)
    return env


def start(command: list[str], env: dict[str, str], log_path: Path) -> Running:
    """Start a command with its output appended to ``log_path``."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Running(process, log_path)


def write_agent_config(
    path: Path,
    user: str,
    terminal: str,
    broker_url: str,
    *,
    extra: str = "",
    protocol: str = "auto",
) -> Path:
    """Write an agent config; the input sensor uses pynput so Xvfb drives it."""
    path.write_text(
        f'user = "{user}"\nterminal = "{terminal}"\n'
        f'[broker]\nurl = "{broker_url}"\nprotocol = "{protocol}"\n'
        "[fusion]\nactive_window_s = 60\nheartbeat_s = 60\n"
        '[sensors.input]\nbackend = "pynput"\n' + extra
    )
    return path


def start_agent(config: Path, env: dict[str, str], log_path: Path) -> Running:
    """Run ``mailpush-agent start`` with a config file."""
    return start([AGENT, "start", "--config", str(config), "--log-level", "debug"], env, log_path)


def start_server(config: Path, env: dict[str, str], log_path: Path) -> Running:
    """Run ``mailpush-server start`` with a config file and wait until it is ready."""
    running = start(
        [SERVER, "start", "--config", str(config), "--log-level", "debug"], env, log_path
    )
    running.wait_for_log("ready:", timeout=30)
    return running


def move_pointer(display: str, times: int = 4) -> None:
    """Move the X pointer a few times, enough for the fusion to confirm ``active``."""
    env = {**os.environ, "DISPLAY": display}
    for step in range(times):
        subprocess.run(
            ["xdotool", "mousemove", str(50 + 31 * step), str(80 + 17 * step)], env=env, check=True
        )
        time.sleep(0.3)
