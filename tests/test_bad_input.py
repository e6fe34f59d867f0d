"""Bad input at the real edges: invalid ids, oversized and non-UTF-8 payloads, markup, vanishing mail.

The network cases run the real `mailpush-server` and `mailpush-agent` against a
real Mosquitto and publish what a broken or hostile client would. Cases that
other files already cover are not repeated here: markup escaping in
tests/test_notify.py (test_body_markup_escaped), a Maildir file moved away
while being read in tests/test_maildir.py (test_file_vanishing_before_read),
and a re-created IMAP folder in tests/test_imap.py
(test_uidvalidity_change_resets_baseline, test_folder_recreated_while_watching).
"""

import json
import subprocess
import threading
import time

import pytest

from mailpush.protocol.messages import MAX_PAYLOAD_BYTES, Push, encode
from mailpush.protocol.messages import MailSummary as Summary
from mailpush.protocol.topics import Topics
from mailpush.server.mailbox import MaildirWatcher, StateStore
from tests.mqtt_client import Subscriber
from tests.processes import AGENT, SERVER, home_env, start_agent, start_server, write_agent_config
from tests.test_maildir import Collector, deliver, make_maildir

pytestmark = pytest.mark.integration

BAD_IDS = ["Alice", "al/ice", "a+b", "#", "a\x00b", "alicé", "", "x" * 65, "desk\n"]
OVERSIZED = b'{"v": 1, "pad": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
NOT_UTF8 = b'{"v": 1, "id": "\xff\xfe", "ts": 1}'


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def idle_state(user: str, terminal: str) -> bytes:
    now = time.time()
    state = {
        "v": 1, "user": user, "terminal": terminal, "state": "idle",
        "since": now, "ts": now, "seq": 1, "confidence": 0.9,
    }  # fmt: skip
    return json.dumps(state).encode()


def maildir_server(tmp_path, mosquitto):
    maildir = make_maildir(tmp_path / "Maildir")
    config = tmp_path / "server.toml"
    config.write_text(
        f'[broker]\nurl = "{mosquitto.url}"\n'
        f'[service]\nstate_dir = "{tmp_path / "service"}"\n'
        f'[[users]]\nid = "alice"\nmailbox = {{ kind = "maildir", path = "{maildir}" }}\n'
    )
    return start_server(config, home_env(tmp_path / "server-home"), tmp_path / "server.log")


# ---------------------------------------------------------------- topics


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_topic_with_bad_id_not_parsed(bad):
    topics = Topics()

    assert topics.parse(f"mailpush/v1/{bad}/terminals/desk/state") is None
    assert topics.parse(f"mailpush/v1/alice/terminals/{bad}/ack") is None
    assert topics.parse(f"mailpush/v1/{bad}/policy") is None


def test_service_drops_bad_topics_and_payloads(tmp_path, mosquitto):
    server = maildir_server(tmp_path, mosquitto)
    client = Subscriber(mosquitto.port, "mailpush/v1/alice/#")
    try:
        # MQTT forbids '+', '#' and NUL in a topic name, so only these reach the broker.
        for user, terminal in (("Alice", "desk"), ("alicé", "desk"), ("alice", "DESK")):
            client.publish(
                f"mailpush/v1/{user}/terminals/{terminal}/state", idle_state(user, terminal)
            )
        state_topic = "mailpush/v1/alice/terminals/laptop/state"
        client.publish(state_topic, OVERSIZED)
        client.publish(state_topic, NOT_UTF8)
        client.publish("mailpush/v1/alice/terminals/laptop/attributes", b"\x00\xff\x80")
        client.publish("mailpush/v1/alice/policy", OVERSIZED)

        server.wait_for_log(
            "dropped a message on mailpush/v1/Alice/terminals/desk/state: invalid topic"
        )
        server.wait_for_log(
            "dropped a message on mailpush/v1/alice/terminals/DESK/state: invalid topic"
        )
        server.wait_for_log(f"dropped a message on {state_topic}: UsageState: payload of")
        server.wait_for_log(f"dropped a message on {state_topic}: UsageState: invalid payload")
        server.wait_for_log("dropped a message on mailpush/v1/alicé/terminals/desk/state: invalid")
        server.wait_for_log("terminals/laptop/attributes: DeviceAttributes: invalid payload")
        server.wait_for_log(
            "policy of alice rejected, keeping the last good one: Policy: payload of"
        )

        # The service lives on and still takes a valid state.
        client.publish(state_topic, idle_state("alice", "laptop"))
        server.wait_for_log("terminal laptop of alice is idle")
        assert server.process.poll() is None
        assert "Traceback" not in server.log()
        assert "terminal DESK" not in server.log()
    finally:
        client.close()
        server.terminate()


# ---------------------------------------------------------------- the agent's inbox


def test_agent_drops_bad_pushes_stores_markup(tmp_path, mosquitto, xvfb_display):
    home = tmp_path / "agent"
    home.mkdir()
    config = write_agent_config(home / "agent.toml", "alice", "laptop", mosquitto.url)
    env = home_env(home, xvfb_display)
    agent = start_agent(config, env, tmp_path / "agent.log")
    client = Subscriber(mosquitto.port, "mailpush/v1/alice/terminals/laptop/ack")
    inbox = "mailpush/v1/alice/terminals/laptop/inbox"
    subject = "<b>Win</b> & <script>alert(1)</script>"
    markup = Push(
        id="markup-1",
        kind="mail",
        mail=Summary(id="m1", sender="Eve <eve@example.org>", subject=subject, snippet="<i>x</i>"),
        ts=time.time(),
    )
    try:
        agent.wait_for_log("state idle")
        client.publish(inbox, OVERSIZED)
        client.publish(inbox, NOT_UTF8)
        client.publish(inbox, b"\x00" * 64)
        agent.wait_for_log(f"dropped a message on {inbox}: Push: payload of")
        agent.wait_for_log(f"dropped a message on {inbox}: Push: invalid payload: Invalid UTF-8")
        agent.wait_for_log(
            f"dropped a message on {inbox}: Push: invalid payload: JSON is malformed"
        )

        client.publish(inbox, encode(markup))
        ack = client.wait_for(lambda message: b"markup-1" in message.payload, timeout=20)
        assert json.loads(ack.payload)["id"] == "markup-1"
        agent.wait_for_log("mail push markup-1")
        assert agent.process.poll() is None
    finally:
        client.close()
        agent.terminate()

    listed = subprocess.run(
        [AGENT, "inbox", "--json", "--config", str(config)], env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    stored = json.loads(listed.stdout)
    assert [entry["mail"]["subject"] for entry in stored] == [subject]
    assert stored[0]["mail"]["snippet"] == "<i>x</i>"
    assert "Traceback" not in agent.log()


# ---------------------------------------------------------------- ids in configs


@pytest.mark.parametrize("bad", ["de+sk", "#", "désk", "Desk", "-desk", "x" * 65])
def test_agent_cli_rejects_bad_terminal(tmp_path, bad):
    result = subprocess.run(
        [AGENT, "config", "show", "--user", "alice", "--terminal", bad],
        env=home_env(tmp_path),
        capture_output=True,
        text=True,
    )

    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "WARNING" not in line]
    assert len(lines) == 1, result.stderr
    assert "invalid id" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("bad", ["a+b", "#", "al\\u0000ice", "Ünï", "al/ice", "bob\\n"])
def test_server_config_rejects_bad_user_id(tmp_path, bad):
    config = tmp_path / "server.toml"
    config.write_text(
        f'[[users]]\nid = "{bad}"\nmailbox = {{ kind = "maildir", path = "/tmp/m" }}\n'
    )

    result = subprocess.run(
        [SERVER, "config", "show", "--config", str(config)],
        env=home_env(tmp_path),
        capture_output=True,
        text=True,
    )

    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "WARNING" not in line]
    assert len(lines) == 1, result.stderr
    assert "users[0].id: invalid id" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- a Maildir file that vanishes


def test_maildir_file_deleted_while_read(tmp_path):
    maildir = make_maildir(tmp_path / "Maildir")
    collector = Collector()
    stop = threading.Event()
    with StateStore(tmp_path / "state.sqlite3") as store:
        watcher = MaildirWatcher(maildir, store)
        store.set_maildir_baseline(watcher.mailbox_key, [])
        doomed = deliver(maildir, "1700000100.M1P1.host")
        listed = watcher._scan()
        doomed.unlink()  # another client expunges it between the listing and the read

        assert watcher._deliver_new(listed, set(), collector, stop) is True
        assert collector.ids() == []

        deliver(maildir, "1700000101.M1P1.host")
        handled: set[str] = set()
        watcher._deliver_new(watcher._scan(), handled, collector, stop)

    assert collector.ids() == ["1700000101.M1P1.host"]
