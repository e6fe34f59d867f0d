"""Secrets never leak: not on a command line, not in a log at any level, not in status or config show.

The agent and the service run at debug level against a real Mosquitto that
requires passwords and a real Dovecot, and a mail goes through. Then every
log, every output and every process's command line is searched for the
password strings. A password file that other users can read is rejected
with the fix.
"""

import subprocess
import uuid
from email.message import EmailMessage
from pathlib import Path

import psutil
import pytest

from tests.processes import AGENT, SERVER, home_env, start_agent, start_server
from tests.test_fuzz_payloads import assert_one_line

pytestmark = pytest.mark.integration


def secret_file(path: Path, secret: str, mode: int = 0o600) -> Path:
    path.write_text(secret + "\n")
    path.chmod(mode)
    return path


def make_mail(subject: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Carol <carol@example.org>"
    message["To"] = "alice@example.org"
    message["Subject"] = subject
    message.set_content("Hello there.")
    return bytes(message)


def command_lines(process: subprocess.Popen) -> list[str]:
    """Return /proc/PID/cmdline of a process and of all its children, NULs as spaces."""
    parent = psutil.Process(process.pid)
    lines = []
    for member in [parent, *parent.children(recursive=True)]:
        raw = Path(f"/proc/{member.pid}/cmdline").read_bytes()
        lines.append(raw.replace(b"\x00", b" ").decode(errors="replace"))
    return lines


def files_under(folder: Path, skip: set[Path]) -> dict[str, bytes]:
    """Return the bytes of every file under ``folder`` except those in ``skip``."""
    return {
        str(path): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file() and path not in skip
    }


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_secrets_never_shown(tmp_path, mosquitto, dovecot, xvfb_display):
    agent_secret = f"agent-pw-{uuid.uuid4().hex}"
    service_secret = f"service-pw-{uuid.uuid4().hex}"
    secrets = [agent_secret, service_secret, dovecot.password]

    accounts = tmp_path / "mosquitto-passwords"
    for index, (user, secret) in enumerate(
        (("alice-laptop", agent_secret), ("mailpush-service", service_secret))
    ):
        create = ["-c"] if index == 0 else []
        subprocess.run(["mosquitto_passwd", "-b", *create, str(accounts), user, secret], check=True)
    mosquitto.stop()
    mosquitto.extra_config = f"password_file {accounts}\n"
    mosquitto.start()

    server_home = tmp_path / "server-home"
    agent_home = tmp_path / "agent-home"
    for folder in (server_home, agent_home):
        folder.mkdir()
    password_files = {
        secret_file(server_home / "broker-password", service_secret),
        secret_file(server_home / "imap-password", dovecot.password),
        secret_file(agent_home / "broker-password", agent_secret),
    }
    server_config = server_home / "server.toml"
    server_config.write_text(
        f'[broker]\nurl = "{mosquitto.url}"\nusername = "mailpush-service"\n'
        f'password_file = "{server_home / "broker-password"}"\n'
        f'[service]\nstate_dir = "{server_home / "service"}"\n'
        f'[[users]]\nid = "alice"\nmailbox = {{ kind = "imap", host = "127.0.0.1", '
        f'port = {dovecot.port}, tls = false, username = "{dovecot.user}", '
        f'password_file = "{server_home / "imap-password"}" }}\n'
    )
    agent_config = agent_home / "agent.toml"
    agent_config.write_text(
        f'user = "alice"\nterminal = "laptop"\n[broker]\nurl = "{mosquitto.url}"\n'
        f'username = "alice-laptop"\npassword_file = "{agent_home / "broker-password"}"\n'
        '[fusion]\nheartbeat_s = 60\n[sensors.input]\nbackend = "pynput"\n'
    )

    server_env = home_env(server_home)
    agent_env = home_env(agent_home, xvfb_display)
    server = start_server(server_config, server_env, tmp_path / "server.log")
    agent = start_agent(agent_config, agent_env, tmp_path / "agent.log")
    try:
        agent.wait_for_log("state idle")
        server.wait_for_log("terminal laptop of alice is idle")
        dovecot.append(make_mail("a secret-free mail"))
        agent.wait_for_log("mail push", timeout=30)

        shown = {
            "agent cmdline": "\n".join(command_lines(agent.process)),
            "server cmdline": "\n".join(command_lines(server.process)),
        }
        for name, command, env in (
            ("agent config show", [AGENT, "config", "show", "--config", str(agent_config)], agent_env),
            ("agent status", [AGENT, "status", "--config", str(agent_config)], agent_env),
            ("agent status --json", [AGENT, "status", "--json", "--config", str(agent_config)], agent_env),
            ("server config show", [SERVER, "config", "show", "--config", str(server_config)], server_env),
        ):  # fmt: skip
            result = run(command, env)
            assert result.returncode == 0, f"{name}: {result.stderr}"
            shown[name] = result.stdout + result.stderr
    finally:
        agent.terminate()
        server.terminate()

    shown["agent log"] = agent.log()
    shown["server log"] = server.log()
    # Debug logging was really on, so the search covered every level.
    assert " DEBUG " in shown["agent log"]
    assert " DEBUG " in shown["server log"]
    assert "running (pid" in shown["agent status"]
    assert "password" in shown["server config show"]  # the source is named, not the value

    for name, text in shown.items():
        for secret in secrets:
            assert secret not in text, f"{name} contains a secret"
    for folder in (server_home, agent_home):
        for path, content in files_under(folder, password_files).items():
            for secret in secrets:
                assert secret.encode() not in content, f"{path} contains a secret"


def test_agent_rejects_readable_broker_password(tmp_path):
    secret = "agent-pw-" + uuid.uuid4().hex
    password = secret_file(tmp_path / "broker-password", secret, mode=0o644)
    config = tmp_path / "agent.toml"
    config.write_text(
        'user = "alice"\nterminal = "laptop"\n[broker]\nurl = "mqtt://127.0.0.1:9"\n'
        f'username = "alice-laptop"\npassword_file = "{password}"\n'
    )

    result = run([AGENT, "start", "--config", str(config)], home_env(tmp_path))

    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if "WARNING" not in line]
    assert len(error) == 1, result.stderr
    assert_one_line(error[0])
    assert f"chmod 600 {password}" in error[0]
    assert secret not in result.stderr + result.stdout


@pytest.mark.parametrize("which", ["imap", "broker"])
def test_server_rejects_readable_password(tmp_path, mosquitto, which):
    secret = "service-pw-" + uuid.uuid4().hex
    password = secret_file(tmp_path / f"{which}-password", secret, mode=0o644)
    imap_password = password if which == "imap" else secret_file(tmp_path / "ok", "x")
    broker_lines = f'url = "{mosquitto.url}"\nusername = "svc"\n'
    if which == "broker":
        broker_lines += f'password_file = "{password}"\n'
    config = tmp_path / "server.toml"
    config.write_text(
        f"[broker]\n{broker_lines}"
        f'[service]\nstate_dir = "{tmp_path / "service"}"\n'
        f'[[users]]\nid = "alice"\nmailbox = {{ kind = "imap", host = "127.0.0.1", port = 9, '
        f'tls = false, username = "alice", password_file = "{imap_password}" }}\n'
    )

    result = run([SERVER, "start", "--config", str(config)], home_env(tmp_path))

    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if "WARNING" not in line]
    assert len(error) == 1, result.stderr
    assert f"chmod 600 {password}" in error[0]
    assert secret not in result.stderr + result.stdout
