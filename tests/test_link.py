"""The agent's MQTT link against a real Mosquitto."""

import json
import subprocess
import time

import pytest

from mailpush.errors import AuthenticationError
from mailpush.protocol.broker_url import BrokerAddress
from mailpush.protocol.link import Link, LinkOptions, Will, backoff_delay
from tests.mqtt_client import Subscriber

pytestmark = pytest.mark.integration


def make_link(port, client_id="mailpush-alice-desk", will=None, **options):
    address = BrokerAddress("127.0.0.1", port, tls=False)
    return Link(LinkOptions(address=address, client_id=client_id, **options), will=will)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_backoff_capped_and_jittered():
    delays = [backoff_delay(attempt) for attempt in range(30)]

    assert all(0.5 <= delay <= 60.0 for delay in delays)
    assert len({round(delay, 6) for delay in delays}) > 20


def test_connects_with_mqtt5_session(mosquitto):
    link = make_link(mosquitto.port)
    link.start()
    try:
        assert link.wait_connected(10)
        assert link.protocol_name == "5"
    finally:
        link.stop()

    log = mosquitto.log()
    assert "mailpush-alice-desk" in log
    # Mosquitto 2.0 logs "(p5, c0, ...)": MQTT 5 with clean start off.
    assert "as mailpush-alice-desk (p5, c0" in log


def test_forced_mqtt311(mosquitto):
    link = make_link(mosquitto.port, protocol="3.1.1")
    link.start()
    try:
        assert link.wait_connected(10)
        assert link.protocol_name == "3.1.1"
    finally:
        link.stop()
    # Mosquitto 2.0 logs MQTT 3.1.1 as p2; c0 is clean_session=false.
    assert "as mailpush-alice-desk (p2, c0" in mosquitto.log()


def test_retained_latest_after_outage(mosquitto):
    link = make_link(mosquitto.port)
    link.start()
    assert link.wait_connected(10)

    mosquitto.stop()
    assert wait_until(lambda: not link.connected)
    for state in ("idle", "away", "active"):
        link.publish_retained("mailpush/v1/alice/terminals/desk/state", state.encode())
    mosquitto.start()

    try:
        assert link.wait_connected(30)
        watcher = Subscriber(mosquitto.port, "mailpush/v1/alice/terminals/desk/state")
        try:
            latest = watcher.wait_for(lambda m: m.payload == b"active")
        finally:
            watcher.close()
        late = Subscriber(mosquitto.port, "mailpush/v1/alice/terminals/desk/state")
        try:
            retained = late.wait_for(lambda m: True)
        finally:
            late.close()
    finally:
        link.stop()

    assert latest.payload == b"active"
    assert retained.retain
    assert retained.payload == b"active"


def test_subscriptions_survive_broker_restart(mosquitto):
    received = []
    link = make_link(mosquitto.port)
    link.subscribe("mailpush/v1/alice/terminals/desk/probe", lambda t, p: received.append(p))
    link.start()
    assert link.wait_connected(10)

    mosquitto.restart()  # no persistence file yet: the broker forgets every session
    assert wait_until(lambda: link.connected, 30)
    publisher = Subscriber(mosquitto.port, "unused/topic")
    try:
        publisher.publish("mailpush/v1/alice/terminals/desk/probe", b"after-restart")
        assert wait_until(lambda: b"after-restart" in received)
    finally:
        publisher.close()
        link.stop()


def test_will_published_on_kill(mosquitto, tmp_path):
    subscriber = Subscriber(mosquitto.port, "mailpush/v1/alice/terminals/desk/state")
    script = tmp_path / "victim.py"
    script.write_text(
        f"""
import time
from mailpush.protocol.link import Link, LinkOptions, Will
from mailpush.protocol.broker_url import BrokerAddress
link = Link(LinkOptions(BrokerAddress("127.0.0.1", {mosquitto.port}, False), "mailpush-alice-desk", keepalive_s=5),
            will=Will("mailpush/v1/alice/terminals/desk/state", lambda: b"will-off"))
link.start()
assert link.wait_connected(10)
link.publish_retained("mailpush/v1/alice/terminals/desk/state", b"alive").wait_for_publish(5)
print("ready", flush=True)
time.sleep(60)
"""
    )
    victim = subprocess.Popen(["python", str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "ready"
        subscriber.wait_for(lambda m: m.payload == b"alive")
        victim.kill()
        message = subscriber.wait_for(lambda m: m.payload == b"will-off", timeout=15)
        assert message.topic == "mailpush/v1/alice/terminals/desk/state"
    finally:
        victim.kill()
        victim.wait()
        subscriber.close()


def test_clean_stop_sends_no_will(mosquitto):
    subscriber = Subscriber(mosquitto.port, "mailpush/v1/alice/terminals/desk/state")
    link = make_link(
        mosquitto.port, will=Will("mailpush/v1/alice/terminals/desk/state", lambda: b"will-off")
    )
    link.start()
    assert link.wait_connected(10)
    link.publish_retained("mailpush/v1/alice/terminals/desk/state", b"bye").wait_for_publish(5)
    link.stop()

    subscriber.wait_for(lambda m: m.payload == b"bye")
    time.sleep(1.0)
    payloads = []
    while not subscriber.messages.empty():
        payloads.append(subscriber.messages.get().payload)
    subscriber.close()
    assert b"will-off" not in payloads


def test_handler_exception_keeps_loop(mosquitto, caplog):
    received = []

    def handler(topic, payload):
        if payload == b"boom":
            raise RuntimeError("handler bug")
        received.append(payload)

    link = make_link(mosquitto.port)
    link.subscribe("test/in", handler)
    link.start()
    assert link.wait_connected(10)
    publisher = Subscriber(mosquitto.port, "unused/topic")
    try:
        publisher.publish("test/in", b"boom")
        publisher.publish("test/in", b"fine")
        assert wait_until(lambda: received == [b"fine"])
        assert link.connected
        assert "handler bug" in caplog.text
    finally:
        publisher.close()
        link.stop()


def test_offline_queue_flushed_on_connect(mosquitto):
    subscriber = Subscriber(mosquitto.port, "test/acks")
    link = make_link(mosquitto.port)
    link.publish("test/acks", b"queued-1")
    link.publish("test/acks", b"queued-2")
    link.start()
    try:
        first = subscriber.wait_for(lambda m: True)
        second = subscriber.wait_for(lambda m: True)
        assert [first.payload, second.payload] == [b"queued-1", b"queued-2"]
        assert not first.retain
    finally:
        subscriber.close()
        link.stop()


@pytest.fixture
def secured_mosquitto(mosquitto, tmp_path):
    passwords = tmp_path / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "alice-desk", "right-password"],
        check=True,
        capture_output=True,
    )
    passwords.chmod(0o600)
    mosquitto.stop()
    mosquitto.extra_config = f"password_file {passwords}\n"
    mosquitto.start()
    # start() writes allow_anonymous true first; the password file still
    # rejects a wrong password for a known user.
    return mosquitto


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_refused_credentials_stop_link(secured_mosquitto, protocol):
    link = make_link(
        secured_mosquitto.port, username="alice-desk", password="wrong-password", protocol=protocol
    )
    link.start()
    try:
        assert not link.wait_connected(10)
        assert isinstance(link.fatal_error, AuthenticationError)
        message = str(link.fatal_error)
        assert "rejected the login" in message
        assert "wrong-password" not in message
        assert "\n" not in message
    finally:
        link.stop()


def test_right_credentials_connect(secured_mosquitto):
    link = make_link(secured_mosquitto.port, username="alice-desk", password="right-password")
    link.start()
    try:
        assert link.wait_connected(10)
    finally:
        link.stop()


def test_payloads_are_json(mosquitto):
    """Sanity check of the subscriber helper: JSON arrives intact."""
    subscriber = Subscriber(mosquitto.port, "test/json")
    try:
        subscriber.publish("test/json", json.dumps({"v": 1}).encode())
        assert json.loads(subscriber.wait_for(lambda m: True).payload) == {"v": 1}
    finally:
        subscriber.close()
