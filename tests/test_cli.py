"""Both command lines as a user types them: exit codes and one-line errors."""

import subprocess

import pytest

from tests.processes import AGENT, SERVER, home_env


def run(command, tmp_path, timeout=60):
    return subprocess.run(
        command, env=home_env(tmp_path / "home"), capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result, code, text):
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if "WARNING" not in line]
    assert len(lines) == 1, result.stderr
    assert text in lines[0]
    assert "Traceback" not in result.stderr


def test_config_init_writes_valid_file(tmp_path):
    path = tmp_path / "agent.toml"

    created = run(
        [AGENT, "config", "init", "--user", "alice", "--terminal", "desk", "--config", str(path)],
        tmp_path,
    )
    again = run(
        [AGENT, "config", "init", "--user", "alice", "--terminal", "desk", "--config", str(path)],
        tmp_path,
    )
    shown = run([AGENT, "config", "show", "--config", str(path)], tmp_path)

    assert created.returncode == 0, created.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    assert_one_line_error(again, 1, "already exists; pass --force")
    assert shown.returncode == 0, shown.stderr
    assert '"terminal": "desk"' in shown.stdout


def test_config_init_default_location(tmp_path):
    result = run([AGENT, "config", "init", "--user", "alice", "--terminal", "desk"], tmp_path)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "home" / "config" / "mailpush" / "agent.toml").exists()


@pytest.mark.parametrize(
    ("arguments", "text"),
    [
        (["config", "init", "--user", "Alice", "--terminal", "desk"], "--user: invalid id 'Alice'"),
        (["start", "--user", "alice", "--terminal", "a/b"], "terminal: invalid id 'a/b'"),
        (
            ["start", "--user", "alice", "--terminal", "desk", "--broker", "http://x"],
            "broker.url: invalid URL",
        ),
        (["status"], "config file not found; run `mailpush-agent config init"),
    ],
)
def test_agent_bad_input_exits_2(tmp_path, arguments, text):
    result = run([AGENT, *arguments], tmp_path)

    assert_one_line_error(result, 2, text)


def test_agent_unknown_config_key(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('user = "alice"\nterminal = "desk"\n[fusion]\nactive_window = 5\n')

    result = run([AGENT, "start", "--config", str(path)], tmp_path)

    assert_one_line_error(result, 2, "fusion.active_window: unknown key")


def test_agent_refused_login_exits_3(tmp_path, mosquitto):
    passwords = tmp_path / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "alice-desk", "right"], check=True
    )
    mosquitto.stop()
    mosquitto.extra_config = f"password_file {passwords}\n"
    mosquitto.start()
    secret = tmp_path / "secret"
    secret.write_text("wrong\n")
    secret.chmod(0o600)
    path = tmp_path / "agent.toml"
    path.write_text(
        f'user = "alice"\nterminal = "desk"\n[broker]\nurl = "{mosquitto.url}"\n'
        f'username = "alice-desk"\npassword_file = "{secret}"\n'
    )

    result = run([AGENT, "start", "--config", str(path)], tmp_path)

    assert result.returncode == 3, result.stderr
    assert "rejected the login" in result.stderr
    assert "wrong" not in result.stderr.replace("wrong-", "")
    assert "Traceback" not in result.stderr


def test_sensors_lists_builtins(tmp_path):
    result = run([AGENT, "sensors", "--user", "alice", "--terminal", "desk"], tmp_path)

    assert result.returncode == 0, result.stderr
    assert "input" in result.stdout
    assert "power" in result.stdout


def test_server_bad_config_exits_2(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('[[users]]\nid = "alice"\nmailbox = { kind = "maildir" }\n')

    result = run([SERVER, "start", "--config", str(path)], tmp_path)

    assert_one_line_error(result, 2, "users[0].mailbox.path: missing")


def test_server_missing_maildir_exits_2(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text(
        f'[broker]\nlisten = "127.0.0.1:0"\n[service]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[users]]\nid = "alice"\nmailbox = {{ kind = "maildir", path = "{tmp_path / "nowhere"}" }}\n'
    )

    result = run([SERVER, "start", "--config", str(path)], tmp_path)

    assert result.returncode == 2, result.stderr
    assert "is not a Maildir" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_deliver_writes_into_new(tmp_path):
    maildir = tmp_path / "Maildir"
    path = tmp_path / "server.toml"
    path.write_text(
        f'[[users]]\nid = "alice"\nmailbox = {{ kind = "maildir", path = "{maildir}" }}\n'
    )

    result = run([SERVER, "deliver", "--sample", "--config", str(path)], tmp_path)
    empty = tmp_path / "empty.eml"
    empty.write_text("")
    refused = run([SERVER, "deliver", str(empty), "--config", str(path)], tmp_path)

    assert result.returncode == 0, result.stderr
    delivered = list((maildir / "new").iterdir())
    assert len(delivered) == 1
    assert b"Subject: Hello from mailpush" in delivered[0].read_bytes()
    assert list((maildir / "tmp").iterdir()) == []
    assert_one_line_error(refused, 1, "the mail file is empty")
