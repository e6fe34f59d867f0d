"""Read state follows the user: marked on one terminal, in the mailbox, or in another client."""

import json
import subprocess
import time
from email.message import EmailMessage

import pytest

from tests.processes import AGENT, home_env, start_agent, start_server

pytestmark = pytest.mark.integration


def make_mail(subject: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Dan <dan@example.org>"
    message["To"] = "alice@example.org"
    message["Subject"] = subject
    message.set_content("Read me.")
    return bytes(message)


def agent_config(path, terminal, url):
    path.write_text(
        f'user = "alice"\nterminal = "{terminal}"\n[broker]\nurl = "{url}"\n'
        "[sensors.input]\nenabled = false\n"
    )
    return path


def inbox(config, env):
    result = subprocess.run(
        [AGENT, "inbox", "--json", "--config", str(config)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return {entry["mail"]["id"]: entry for entry in json.loads(result.stdout)}


def wait_until(predicate, timeout=15.0, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{message} not met within {timeout} s")


def maildir_names(maildir):
    return sorted(p.name for sub in ("new", "cur") for p in (maildir / sub).iterdir())


def test_read_state_follows_user(tmp_path, mosquitto):
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    server_config = tmp_path / "server.toml"
    server_config.write_text(
        f'[broker]\nurl = "{mosquitto.url}"\n[service]\nstate_dir = "{tmp_path / "service"}"\n'
        f'[[users]]\nid = "alice"\nmailbox = {{ kind = "maildir", path = "{maildir}" }}\n'
    )
    server = start_server(
        server_config, home_env(tmp_path / "server-home"), tmp_path / "server.log"
    )
    agents = {}
    envs = {}
    configs = {}
    try:
        for terminal in ("laptop", "phone"):
            home = tmp_path / terminal
            home.mkdir()
            envs[terminal] = home_env(home)
            configs[terminal] = agent_config(home / "agent.toml", terminal, mosquitto.url)
            agents[terminal] = start_agent(
                configs[terminal], envs[terminal], tmp_path / f"{terminal}.log"
            )
        server.wait_for_log("terminal laptop of alice is idle")
        server.wait_for_log("terminal phone of alice is idle")

        (maildir / "new" / "m1").write_bytes(make_mail("please read"))
        for terminal in agents:
            agents[terminal].wait_for_log("for mail m1 shown")
        assert inbox(configs["phone"], envs["phone"])["m1"]["mail"]["seen"] is False

        # Marked read on the laptop: the mailbox and the phone follow.
        marked = subprocess.run(
            [AGENT, "inbox", "read", "m1", "--config", str(configs["laptop"])],
            env=envs["laptop"],
            capture_output=True,
            text=True,
        )
        assert marked.returncode == 0, marked.stderr
        server.wait_for_log("mail m1 of alice marked read by laptop")
        assert maildir_names(maildir) == ["m1:2,S"]
        wait_until(
            lambda: inbox(configs["phone"], envs["phone"])["m1"]["mail"]["seen"] is True,
            message="phone shows m1 read",
        )
        assert inbox(configs["laptop"], envs["laptop"])["m1"]["mail"]["seen"] is True

        # Marked unread in another mail client (the S flag removed): every terminal follows.
        (maildir / "cur" / "m1:2,S").rename(maildir / "cur" / "m1:2,")
        server.wait_for_log("mail m1 of alice marked unread in the mailbox")
        for terminal in ("laptop", "phone"):
            wait_until(
                lambda terminal=terminal: (
                    inbox(configs[terminal], envs[terminal])["m1"]["mail"]["seen"] is False
                ),
                message=f"{terminal} shows m1 unread",
            )
    finally:
        for agent in agents.values():
            agent.terminate()
        server.terminate()


def test_inbox_read_unknown_mail(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    config = agent_config(home / "agent.toml", "laptop", "mqtt://127.0.0.1:1")
    env = home_env(home)
    data = home / "data" / "mailpush"
    data.mkdir(parents=True)

    result = subprocess.run(
        [AGENT, "inbox", "read", "nope", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
    )

    assert result.returncode == 1
    assert "nope: no such mail in this terminal's inbox" in result.stderr
    assert "Traceback" not in result.stderr
