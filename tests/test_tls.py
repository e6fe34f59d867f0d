"""Strict TLS to the broker and the IMAP server, with certificates the tests generate.

The broker runs the packaged Mosquitto config, whose only listener is MQTT
over TLS, with a certificate for ``localhost`` signed by the test CA. A wrong
CA or a wrong host name must end the connection attempt with one line, and the
broker must see neither an MQTT session nor a plain-text connection.
"""

import logging
import subprocess
import threading
import time

import pytest

from mailpush.errors import BrokerError
from mailpush.protocol.broker_url import parse_broker_url
from mailpush.protocol.link import Link, LinkOptions
from mailpush.server.mailbox import ImapConfig, ImapWatcher, StateStore
from tests.fixtures.tls import ProductionBroker
from tests.processes import AGENT, SERVER, home_env

pytestmark = pytest.mark.integration

# What Mosquitto 2.0.11 logs (seen here) when a client ends the handshake
# because it rejects the certificate, and when plain MQTT reaches a TLS port.
REJECTED_BY_CLIENT = ("alert unknown ca", "alert bad certificate")
PLAIN_TEXT = "wrong version number"


@pytest.fixture(scope="module")
def broker(tmp_path_factory, tls_ca):
    running = ProductionBroker(tmp_path_factory.mktemp("tls-broker"), tls_ca)
    running.secret = running.add_account("alice", "desk")
    running.service_secret = running.add_service()
    running.start()
    try:
        yield running
    finally:
        running.stop()


class LogWindow:
    """The part of the broker log written since the window opened."""

    def __init__(self, broker: ProductionBroker) -> None:
        self.broker = broker
        self.start = len(broker.log())

    def text(self) -> str:
        return self.broker.log()[self.start :]


def assert_no_session(window: LogWindow, attempts: int = 1) -> None:
    """The broker saw ``attempts`` TLS handshakes the client rejected, and nothing else.

    Mosquitto logs a rejected handshake either as "New connection from ..."
    followed by an OpenSSL error or as "Client connection from ... failed",
    depending on when the alert arrives, so only the alert is counted.
    """
    deadline = time.monotonic() + 10
    while rejected_handshakes(window.text()) < attempts and time.monotonic() < deadline:
        time.sleep(0.05)
    text = window.text()
    assert rejected_handshakes(text) == attempts, text
    assert "New client connected" not in text, "an MQTT session was opened"
    assert PLAIN_TEXT not in text, "the client fell back to plain text"


def rejected_handshakes(text: str) -> int:
    return sum(text.count(marker) for marker in REJECTED_BY_CLIENT)


def make_link(broker, url, ca_file):
    password = broker.secret.read_text().rstrip("\n")
    options = LinkOptions(
        parse_broker_url(url),
        "mailpush-alice-desk",
        username="alice.desk",
        password=password,
        ca_file=str(ca_file) if ca_file else None,
    )
    return Link(options)


def test_link_verifies_and_connects(broker):
    link = make_link(broker, broker.url, broker.ca.ca_file)
    link.start()
    try:
        assert link.wait_connected(10)
        assert link.fatal_error is None
    finally:
        link.stop()


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("wrong-ca", "unable to get local issuer certificate"),
        ("system-store", "unable to get local issuer certificate"),
        ("wrong-host", "IP address mismatch"),
    ],
)
def test_link_rejects_certificate(broker, unrelated_ca, case, fragment):
    url = broker.url.replace("localhost", "127.0.0.1") if case == "wrong-host" else broker.url
    ca_file = {"wrong-ca": unrelated_ca.ca_file, "system-store": None}.get(case, broker.ca.ca_file)
    window = LogWindow(broker)
    link = make_link(broker, url, ca_file)

    link.start()
    try:
        assert not link.wait_connected(10)
        error = link.fatal_error
        # A certificate error is final: the link neither retries nor lowers its checks.
        time.sleep(0.5)
        assert not link.connected
    finally:
        link.stop()

    assert isinstance(error, BrokerError)
    message = str(error)
    assert "\n" not in message
    assert "TLS certificate verification failed" in message
    assert fragment in message
    assert "broker.ca_file" in message
    assert_no_session(window)


def agent_config(tmp_path, broker, url, ca_file):
    path = tmp_path / "agent.toml"
    path.write_text(
        f'user = "alice"\nterminal = "desk"\n'
        f'[broker]\nurl = "{url}"\nusername = "alice.desk"\n'
        f'password_file = "{broker.secret}"\nca_file = "{ca_file}"\n'
        "[sensors.input]\nenabled = false\n"
    )
    return path


def run_cli(command, tmp_path, timeout=60):
    started = time.monotonic()
    result = subprocess.run(
        command, env=home_env(tmp_path / "home"), capture_output=True, text=True, timeout=timeout
    )
    return result, time.monotonic() - started


@pytest.mark.parametrize("case", ["wrong-ca", "wrong-host"])
@pytest.mark.parametrize("command", [["start"], ["policy", "show"]])
def test_agent_cli_rejects_certificate(
    broker,
    unrelated_ca,
    tmp_path,
    case,
    command,
):
    url = broker.url.replace("localhost", "127.0.0.1") if case == "wrong-host" else broker.url
    ca_file = unrelated_ca.ca_file if case == "wrong-ca" else broker.ca.ca_file
    config = agent_config(tmp_path, broker, url, ca_file)
    window = LogWindow(broker)

    result, elapsed = run_cli([AGENT, *command, "--config", str(config)], tmp_path)

    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr
    assert last_line.startswith("mailpush-agent: error: broker mqtts://"), result.stderr
    assert "TLS certificate verification failed" in last_line
    assert "Traceback" not in result.stderr
    assert elapsed < 30
    assert_no_session(window)


def test_agent_start_connects_over_tls(broker, tmp_path):
    config = agent_config(tmp_path, broker, broker.url, broker.ca.ca_file)
    window = LogWindow(broker)
    process = subprocess.Popen(
        [AGENT, "start", "--config", str(config)],
        env=home_env(tmp_path / "home"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while "u'alice.desk'" not in window.text() and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(15)

    assert "as mailpush-alice-desk (p5, c0" in window.text()
    assert PLAIN_TEXT not in window.text()


def test_service_rejects_certificate(broker, unrelated_ca, tmp_path):
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    config = tmp_path / "server.toml"
    config.write_text(
        f'[broker]\nurl = "{broker.url}"\nusername = "mailpush-service"\n'
        f'password_file = "{broker.service_secret}"\nca_file = "{unrelated_ca.ca_file}"\n'
        f'[service]\nstate_dir = "{tmp_path / "service"}"\n'
        f'[[users]]\nid = "alice"\nmailbox = {{ kind = "maildir", path = "{maildir}" }}\n'
    )
    window = LogWindow(broker)

    result, elapsed = run_cli([SERVER, "start", "--config", str(config)], tmp_path)

    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr
    assert last_line.startswith("mailpush-server: error: broker mqtts://"), result.stderr
    assert "TLS certificate verification failed" in last_line
    assert "Traceback" not in result.stderr
    assert elapsed < 30
    assert_no_session(window)


def test_plain_text_detected_by_log_check(broker):
    """A plain MQTT client on the TLS port: the check above would catch such a fallback."""
    window = LogWindow(broker)
    link = make_link(broker, broker.url.replace("mqtts://", "mqtt://"), None)
    link.start()
    try:
        assert not link.wait_connected(3)
    finally:
        link.stop()

    deadline = time.monotonic() + 10
    while PLAIN_TEXT not in window.text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert PLAIN_TEXT in window.text()
    assert "New client connected" not in window.text()


def test_imap_rejects_wrong_host_name(dovecot_factory, tmp_path, caplog):
    # tests/test_imap.py covers a trusted and an untrusted CA. This test covers
    # the host-name check, because Dovecot's certificate names IP:127.0.0.1 only.
    server = dovecot_factory(tls=True)
    config = ImapConfig(
        host="localhost",
        port=server.tls_port,
        tls=True,
        ca_file=str(server.ca_file),
        username=server.user,
        password=server.password,
        timeout_s=5.0,
        reconnect_min_s=0.2,
        reconnect_max_s=2.0,
    )
    stop = threading.Event()

    with StateStore(tmp_path / "state.sqlite3") as store:
        watcher = ImapWatcher(config, store)
        thread = threading.Thread(target=watcher.run, args=(lambda mail: None, stop))
        with caplog.at_level(logging.WARNING, logger="mailpush.server.mailbox"):
            thread.start()
            try:
                deadline = time.monotonic() + 15
                while "certificate" not in caplog.text and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                stop.set()
                thread.join(timeout=20)
        position = store.imap_position(watcher.mailbox_key)

    assert "certificate" in caplog.text
    assert "localhost" in caplog.text
    assert position is None
    assert "Login:" not in server.log_path.read_text()
