"""The whole chain: a mail arrives, the service routes it, the agent on the terminal in use gets it.

Every test runs the real `mailpush-server` and `mailpush-agent` commands
against a real Mosquitto (or the embedded broker) and a real Dovecot or Maildir.
"""

import json
import subprocess
import time
from email.message import EmailMessage

import pytest

from tests.fixtures.mosquitto import free_port
from tests.fixtures.xvfb import running_xvfb
from tests.mqtt_client import Subscriber
from tests.processes import (
    AGENT,
    home_env,
    move_pointer,
    start_agent,
    start_server,
    write_agent_config,
)

pytestmark = pytest.mark.integration


def make_mail(subject: str, body: str = "Hello there.") -> bytes:
    message = EmailMessage()
    message["From"] = "Carol <carol@example.org>"
    message["To"] = "alice@example.org"
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    message.set_content(body)
    return bytes(message)


def server_config(path, broker_line, mailbox, state_dir, extra=""):
    path.write_text(
        f"[broker]\n{broker_line}\n"
        f'[service]\nstate_dir = "{state_dir}"\nresend_after_s = 2\n{extra}'
        f'[[users]]\nid = "alice"\nmailbox = {mailbox}\n'
    )
    return path


def imap_mailbox(dovecot, tmp_path):
    secret = tmp_path / "imap-password"
    secret.write_text(dovecot.password)
    secret.chmod(0o600)
    return (
        f'{{ kind = "imap", host = "127.0.0.1", port = {dovecot.port}, tls = false, '
        f'username = "{dovecot.user}", password_file = "{secret}" }}'
    )


def pushes(subscriber, count, timeout=10.0):
    """Collect ``count`` inbox messages as (terminal, push) pairs."""
    collected = []
    for _ in range(count):
        message = subscriber.wait_for(lambda m: m.topic.endswith("/inbox"), timeout=timeout)
        collected.append((message.topic.split("/")[-2], json.loads(message.payload)))
    return collected


@pytest.fixture
def two_displays():
    with running_xvfb() as first, running_xvfb() as second:
        yield first, second


def test_mail_reaches_active_terminal(tmp_path, mosquitto, dovecot, two_displays):
    active_display, idle_display = two_displays
    dovecot.append(make_mail("before the service"))  # existing mail is not pushed
    config = server_config(
        tmp_path / "server.toml",
        f'url = "{mosquitto.url}"',
        imap_mailbox(dovecot, tmp_path),
        tmp_path / "service",
    )
    watcher = Subscriber(mosquitto.port, "mailpush/v1/alice/#")
    server = start_server(config, home_env(tmp_path / "server-home"), tmp_path / "server.log")
    agents = []
    try:
        for terminal, display in (("laptop", active_display), ("desktop", idle_display)):
            home = tmp_path / terminal
            home.mkdir()
            agent_config = write_agent_config(home / "agent.toml", "alice", terminal, mosquitto.url)
            agents.append(
                start_agent(agent_config, home_env(home, display), tmp_path / f"{terminal}.log")
            )
        for agent in agents:
            agent.wait_for_log("state idle")
        server.wait_for_log("terminal laptop of alice is idle")
        server.wait_for_log("terminal desktop of alice is idle")

        move_pointer(active_display)
        watcher.wait_for(
            lambda m: (
                m.topic.endswith("laptop/state") and json.loads(m.payload)["state"] == "active"
            )
        )

        appended = time.monotonic()
        dovecot.append(make_mail("Lunch?"))
        received = pushes(watcher, 2)
        elapsed = time.monotonic() - appended

        by_kind = {push["kind"]: (terminal, push) for terminal, push in received}
        assert by_kind["mail"][0] == "laptop"
        assert by_kind["prompt"][0] == "desktop"
        assert by_kind["mail"][1]["mail"]["subject"] == "Lunch?"
        assert by_kind["prompt"][1]["delivered_to"] == ["laptop"]
        assert "most-active picked laptop" in by_kind["mail"][1]["reason"]
        assert elapsed < 2.0, f"push took {elapsed:.2f} s"

        agents[0].wait_for_log("mail push")
        agents[1].wait_for_log("prompt push")
        assert "before the service" not in agents[0].log()
    finally:
        for agent in agents:
            agent.terminate()
        server.terminate()
        watcher.close()


def test_service_sigkill_pushes_each_mail_once(tmp_path, mosquitto, dovecot, xvfb_display):
    config = server_config(
        tmp_path / "server.toml",
        f'url = "{mosquitto.url}"',
        imap_mailbox(dovecot, tmp_path),
        tmp_path / "service",
    )
    env = home_env(tmp_path / "server-home")
    agent_home = tmp_path / "agent"
    agent_home.mkdir()
    agent_config = write_agent_config(agent_home / "agent.toml", "alice", "laptop", mosquitto.url)
    agent = start_agent(agent_config, home_env(agent_home, xvfb_display), tmp_path / "agent.log")
    server = start_server(config, env, tmp_path / "server-1.log")
    watcher = Subscriber(mosquitto.port, "mailpush/v1/alice/terminals/+/inbox")
    subjects = [f"mail {n}" for n in range(12)]
    try:
        agent.wait_for_log("state idle")
        for index, subject in enumerate(subjects):
            dovecot.append(make_mail(subject))
            time.sleep(0.2)
            if index in (3, 7):
                server.kill()
                server = start_server(config, env, tmp_path / f"server-{index}.log")

        deadline = time.monotonic() + 30
        got: dict[str, int] = {}
        while time.monotonic() < deadline and len(got) < len(subjects):
            try:
                message = watcher.wait_for(
                    lambda m: True, timeout=max(0.1, deadline - time.monotonic())
                )
            except AssertionError:
                break
            push = json.loads(message.payload)
            if push["kind"] == "mail":
                got[push["mail"]["subject"]] = got.get(push["mail"]["subject"], 0) + 1

        assert sorted(got) == sorted(subjects)
        # A push may be sent again until acked; the receiver shows it once.
        agent.wait_for_log("mail 11")
        time.sleep(1.0)
        shown = [
            line for line in agent.log().splitlines() if "mail push" in line and "shown" in line
        ]
        assert len(shown) == len(subjects), "\n".join(shown)
    finally:
        agent.terminate()
        server.terminate()
        watcher.close()


def test_embedded_broker_and_maildir(tmp_path, xvfb_display):
    port = free_port()
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    config = server_config(
        tmp_path / "server.toml",
        f'listen = "127.0.0.1:{port}"',
        f'{{ kind = "maildir", path = "{maildir}" }}',
        tmp_path / "service",
    )
    server = start_server(config, home_env(tmp_path / "server-home"), tmp_path / "server.log")
    agent_home = tmp_path / "agent"
    agent_home.mkdir()
    url = f"mqtt://127.0.0.1:{port}"
    agent_config = write_agent_config(
        agent_home / "agent.toml", "alice", "laptop", url, protocol="3.1.1"
    )
    agent_env = home_env(agent_home, xvfb_display)
    agent = start_agent(agent_config, agent_env, tmp_path / "agent.log")
    try:
        server.wait_for_log("terminal laptop of alice is idle")
        move_pointer(xvfb_display)
        agent.wait_for_log("state active")

        written = time.monotonic()
        (maildir / "tmp" / "1.mail").write_bytes(make_mail("via maildir"))
        (maildir / "tmp" / "1.mail").rename(maildir / "new" / "1.mail")
        agent.wait_for_log("mail push", timeout=5)
        assert time.monotonic() - written < 2.0
        assert "most-active picked laptop" in agent.log()
    finally:
        agent.terminate()
        server.terminate()


def test_offline_terminal_gets_push_on_return(tmp_path, xvfb_display):
    """The embedded broker keeps no offline queue: the service's outbox delivers instead."""
    port = free_port()
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    config = server_config(
        tmp_path / "server.toml",
        f'listen = "127.0.0.1:{port}"',
        f'{{ kind = "maildir", path = "{maildir}" }}',
        tmp_path / "service",
    )
    server = start_server(config, home_env(tmp_path / "server-home"), tmp_path / "server.log")
    agent_home = tmp_path / "agent"
    agent_home.mkdir()
    url = f"mqtt://127.0.0.1:{port}"
    agent_config = write_agent_config(
        agent_home / "agent.toml", "alice", "laptop", url, protocol="3.1.1"
    )
    agent_env = home_env(agent_home, xvfb_display)
    agent = start_agent(agent_config, agent_env, tmp_path / "agent-1.log")
    try:
        server.wait_for_log("terminal laptop of alice is idle")
        assert agent.terminate() == 0
        server.wait_for_log("terminal laptop of alice is off (stopped)")

        (maildir / "new" / "2.mail").write_bytes(make_mail("while you were away"))
        server.wait_for_log("mail 2.mail of alice: fallback all")

        agent = start_agent(agent_config, agent_env, tmp_path / "agent-2.log")
        agent.wait_for_log("mail push", timeout=15)
        server.wait_for_log("sent 1 unacknowledged pushes to laptop of alice again")
    finally:
        agent.terminate()
        server.terminate()

    # The inbox command reads the same XDG folders as the agent did.
    listed = subprocess.run(
        [AGENT, "inbox", "--json", "--config", str(agent_config)],
        env=agent_env,
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [entry["mail"]["subject"] for entry in entries] == ["while you were away"]


def test_mail_held_until_a_terminal_reports(tmp_path, xvfb_display):
    """With no terminal known at all, a mail waits in the mailbox instead of going nowhere."""
    port = free_port()
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    config = server_config(
        tmp_path / "server.toml",
        f'listen = "127.0.0.1:{port}"',
        f'{{ kind = "maildir", path = "{maildir}" }}',
        tmp_path / "service",
    )
    server = start_server(config, home_env(tmp_path / "server-home"), tmp_path / "server.log")
    agent = None
    try:
        (maildir / "new" / "early.mail").write_bytes(make_mail("before any terminal"))
        server.wait_for_log("mail early.mail of alice held: no terminal of alice has reported yet")

        agent_home = tmp_path / "agent"
        agent_home.mkdir()
        url = f"mqtt://127.0.0.1:{port}"
        agent_config = write_agent_config(
            agent_home / "agent.toml", "alice", "laptop", url, protocol="3.1.1"
        )
        agent = start_agent(
            agent_config, home_env(agent_home, xvfb_display), tmp_path / "agent.log"
        )
        agent.wait_for_log("mail push", timeout=20)
        assert "before any terminal" in server.log() or "early.mail" in server.log()
        assert server.log().count("held: no terminal") == 1
    finally:
        if agent is not None:
            agent.terminate()
        server.terminate()


def test_policy_restored_after_broker_restart(tmp_path):
    """The embedded broker forgets retained messages; the service puts the policy back."""
    port = free_port()
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    config = server_config(
        tmp_path / "server.toml",
        f'listen = "127.0.0.1:{port}"',
        f'{{ kind = "maildir", path = "{maildir}" }}',
        tmp_path / "service",
    )
    env = home_env(tmp_path / "server-home")
    agent_home = tmp_path / "agent"
    agent_home.mkdir()
    url = f"mqtt://127.0.0.1:{port}"
    agent_config = write_agent_config(agent_home / "agent.toml", "alice", "laptop", url, protocol="3.1.1")
    agent_env = home_env(agent_home)
    server = start_server(config, env, tmp_path / "server-1.log")
    try:
        result = subprocess.run(
            [AGENT, "policy", "set", "--all", "--config", str(agent_config)],
            env=agent_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        server.wait_for_log("policy of alice set by laptop")
    finally:
        server.terminate()

    server = start_server(config, env, tmp_path / "server-2.log")
    try:
        server.wait_for_log("policy of alice published again: the broker had lost it")
        shown = subprocess.run(
            [AGENT, "policy", "show", "--config", str(agent_config)],
            env=agent_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert "set by laptop" in shown.stdout
        assert "no policy set" not in shown.stdout
    finally:
        server.terminate()
