"""The "Mark read" button end to end: notification, inbox, MailStatus on the broker.

The agent (:class:`mailpush.agent.runner.Agent`) runs in a thread of this
process against a real Mosquitto and a private D-Bus session bus. On that bus
a fake notification server with the ``actions`` capability records each
notification, and it presses a button the way a server does, by emitting
``ActionInvoked``. Plain paho clients play the push service: they publish a
Push on the terminal's inbox topic and read the MailStatus the agent sends.
"""

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mailpush.agent.config import AgentConfig, build_config
from mailpush.agent.inbox import Inbox
from mailpush.agent.runner import Agent, inbox_path
from mailpush.protocol.messages import MailStatus, MailSummary, Push, decode, encode
from mailpush.sensors.registry import discover
from tests.fixtures.mosquitto import Mosquitto, free_port
from tests.mqtt_client import Subscriber

pytestmark = pytest.mark.integration

# session_bus and action_server come from this module.
pytest_plugins = ["tests.fixtures.notifications"]

USER, TERMINAL = "alice", "desk"
ROOT = f"mailpush/v1/{USER}"
INBOX_TOPIC = f"{ROOT}/terminals/{TERMINAL}/inbox"
ACK_TOPIC = f"{ROOT}/terminals/{TERMINAL}/ack"
MAILSTATUS_TOPIC = f"{ROOT}/mailstatus"
MAIL_ID = "1700000000-42"
DEADLINE_S = 20.0
# The service resends an unacknowledged push. This test resends faster than
# the service's default 30 s, because the agent may not have subscribed yet.
RESEND_S = 2.0


def agent_config(broker_url: str) -> AgentConfig:
    """Build an agent config the way ``mailpush-agent start`` does, notifications on."""
    data = {
        "user": USER,
        "terminal": TERMINAL,
        "broker": {"url": broker_url},
        "receiver": {"notify": True},
        "sensors": {"input": {"enabled": False}, "power": {"enabled": False}},
    }
    return build_config(data, discover())


@contextmanager
def running_agent(config: AgentConfig, tmp_path: Path) -> Iterator[Agent]:
    """Run the agent in a thread; stop it and join the thread on every path."""
    agent = Agent(config, discover(), tmp_path / "state", tmp_path / "data")
    failures: list[BaseException] = []

    def run() -> None:
        try:
            agent.run()
        except BaseException as exc:  # reported to the test below
            failures.append(exc)

    thread = threading.Thread(target=run, name="agent-under-test", daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        agent.stop()
        thread.join(15)
    assert not thread.is_alive(), "the agent did not stop within 15 s"
    assert failures == []


def wait_for(condition: Callable[[], Any], timeout: float = DEADLINE_S) -> Any:
    """Poll ``condition`` until it returns a true value, and return that value or None."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return condition()


def mail_push() -> Push:
    summary = MailSummary(
        id=MAIL_ID, sender="Ann Example <ann@example.org>", subject="Quarterly report"
    )
    return Push(
        id="push-1",
        kind="mail",
        mail=summary,
        delivered_to=[TERMINAL],
        reason="test",
        ts=time.time(),
    )


def deliver(client: Subscriber, push: Push) -> None:
    """Publish ``push`` to the agent's inbox until it is acknowledged, as the service does."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        client.publish(INBOX_TOPIC, encode(push))
        try:
            client.wait_for(
                lambda m: m.topic == ACK_TOPIC and json.loads(m.payload)["id"] == push.id,
                timeout=RESEND_S,
            )
        except AssertionError:
            continue
        return
    raise AssertionError(f"the agent did not acknowledge push {push.id} within {DEADLINE_S} s")


def mark_read_key(action_server) -> tuple[int, str]:
    """Wait for the mail's notification and return its id and the "Mark read" action key."""
    notification = wait_for(
        lambda: next((n for n in action_server.notifications if n.action_key("Mark read")), None)
    )
    assert notification is not None, (
        f"no notification with a Mark read button: {action_server.notifications}"
    )
    return notification.id, notification.action_key("Mark read")


def stored_seen(tmp_path: Path) -> bool:
    """Return the seen flag the agent's inbox holds for the mail."""
    with Inbox(inbox_path(tmp_path / "data", USER, TERMINAL)) as inbox:
        push = inbox.get(MAIL_ID)
    assert push is not None, f"mail {MAIL_ID} is not in the agent's inbox"
    return push.mail.seen


def test_button_marks_read_everywhere(mosquitto, action_server, tmp_path) -> None:
    client = Subscriber(mosquitto.port, topic=f"{ROOT}/#")
    try:
        with running_agent(agent_config(mosquitto.url), tmp_path):
            deliver(client, mail_push())
            notification_id, key = mark_read_key(action_server)
            assert stored_seen(tmp_path) is False

            pressed_at = time.time()
            action_server.press(notification_id, key)
            message = client.wait_for(lambda m: m.topic == MAILSTATUS_TOPIC, timeout=DEADLINE_S)

            assert stored_seen(tmp_path) is True
    finally:
        client.close()

    status = decode(message.payload, MailStatus)
    assert status.mail == MAIL_ID
    assert status.seen is True
    assert status.by == TERMINAL
    assert pressed_at - 1 <= status.ts <= time.time()
    assert message.retain is False


class SessionClient:
    """A paho client with a persistent session, so the broker keeps its messages while it is away."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="mailstatus-reader", clean_session=False
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_message = lambda _client, _userdata, message: self.messages.append(message)
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(DEADLINE_S), "the broker did not acknowledge the subscription"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_press_offline_sent_on_reconnect(action_server, tmp_path, caplog) -> None:
    # Persistence keeps the reader's session and its queued messages across the restart.
    broker = Mosquitto(
        port=free_port(), workdir=tmp_path / "mosquitto", extra_config="persistence true\n"
    )
    broker.workdir.mkdir()
    broker.start()
    reader: SessionClient | None = None
    try:
        reader = SessionClient(broker.port, MAILSTATUS_TOPIC)
        pusher = Subscriber(broker.port, topic=ACK_TOPIC)
        try:
            with running_agent(agent_config(broker.url), tmp_path):
                deliver(pusher, mail_push())
                notification_id, key = mark_read_key(action_server)

                with caplog.at_level(logging.INFO):
                    broker.stop()
                    assert wait_for(lambda: "cannot reach broker" in caplog.text), (
                        "the agent did not notice that the broker stopped"
                    )

                    action_server.press(notification_id, key)
                    # The agent logs after its inbox write, so reading the inbox
                    # then does not race with that write.
                    assert wait_for(lambda: "marked read from its notification" in caplog.text)
                    assert stored_seen(tmp_path) is True

                    broker.start()
                    assert wait_for(lambda: reader.messages), (
                        f"no MailStatus after the broker came back; broker log:\n{broker.log()[-2000:]}"
                    )
        finally:
            pusher.close()
    finally:
        if reader is not None:
            reader.close()
        broker.stop()

    # QoS 1 allows a duplicate, so only the first message is checked.
    status = decode(reader.messages[0].payload, MailStatus)
    assert status.mail == MAIL_ID
    assert status.seen is True
    assert status.by == TERMINAL
