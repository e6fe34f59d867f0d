"""Per-account access control on Mosquitto, with the packaged config and real accounts.

Accounts come from `mailpush-server accounts add`; the broker runs
packaging/mosquitto/mosquitto.conf with only ports, paths and the test CA
changed. Users alice and bob each have the terminals desk and phone. Every
cross-user and cross-terminal publish and read must fail, and the service and
agents must still work end to end through the same broker.
"""

import json
import os
import stat
import subprocess
import time
from itertools import product

import pytest

from mailpush.protocol.topics import TopicKind, Topics
from tests.fixtures.tls import ProductionBroker, TlsClient
from tests.processes import AGENT, SERVER, home_env, start_agent, start_server

pytestmark = pytest.mark.integration

USERS = ("alice", "bob")
TERMINALS = ("desk", "phone")
ACTORS = list(product(USERS, TERMINALS))
TOPICS = Topics()
TERMINAL_KINDS = (
    TopicKind.STATE,
    TopicKind.ATTRIBUTES,
    TopicKind.ACK,
    TopicKind.INBOX,
    TopicKind.PROBE,
)
USER_KINDS = (TopicKind.POLICY, TopicKind.MAILSTATUS)
RETAINED_KINDS = (TopicKind.STATE, TopicKind.ATTRIBUTES, TopicKind.POLICY)
NOT_AUTHORIZED = 0x87  # MQTT 5.0 section 2.4, reason code "Not authorized"


def every_topic():
    """Return every topic of both users, their terminals and every kind."""
    topics = []
    for user in USERS:
        for terminal in TERMINALS:
            topics += [TOPICS.terminal(user, terminal, kind) for kind in TERMINAL_KINDS]
        topics += [TOPICS.policy(user), TOPICS.mailstatus(user)]
    return topics


def may_publish(actor, topic):
    """Return whether the documented rules let terminal ``actor`` publish to ``topic``."""
    user, terminal = actor
    ref = TOPICS.parse(topic)
    if ref.user != user:
        return False
    if ref.terminal is None:
        return ref.kind in USER_KINDS
    return ref.terminal == terminal and ref.kind in (
        TopicKind.STATE,
        TopicKind.ATTRIBUTES,
        TopicKind.ACK,
    )


def may_read(actor, topic):
    """Return whether the documented rules let terminal ``actor`` receive from ``topic``."""
    user, terminal = actor
    ref = TOPICS.parse(topic)
    if ref.user != user:
        return False
    if ref.terminal is None:
        return ref.kind == TopicKind.POLICY
    if ref.kind in (TopicKind.STATE, TopicKind.ATTRIBUTES):
        return True  # the user's own terminals, for `policy show` and `policy explain`
    return ref.terminal == terminal and ref.kind in (TopicKind.INBOX, TopicKind.PROBE)


def username(actor):
    return f"{actor[0]}.{actor[1]}"


@pytest.fixture(scope="module")
def accounts_broker(tmp_path_factory, tls_ca):
    """Create the accounts once; each test starts its own broker process on them."""
    broker = ProductionBroker(tmp_path_factory.mktemp("acl-broker"), tls_ca)
    broker.secrets = {actor: broker.add_account(*actor) for actor in ACTORS}
    broker.secrets["service"] = broker.add_service()
    return broker


@pytest.fixture
def broker(accounts_broker):
    accounts_broker.start()
    try:
        yield accounts_broker
    finally:
        accounts_broker.stop()


@pytest.fixture
def observer(broker):
    """The service's account, subscribed to everything under the root."""
    client = TlsClient(broker, "mailpush-service", broker.secrets["service"], client_id="observer")
    client.subscribe(f"{TOPICS.root}/#")
    yield client
    client.close()


def terminal_client(broker, actor, protocol="5", **options):
    return TlsClient(broker, username(actor), broker.secrets[actor], protocol=protocol, **options)


def test_accounts_add_writes_files(accounts_broker):
    secret = accounts_broker.secrets[("alice", "desk")]
    password = secret.read_text().rstrip("\n")
    acl = accounts_broker.acl_file.read_text()
    hashes = accounts_broker.password_file.read_text()

    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert len(password) >= 40
    assert password not in hashes
    assert password not in acl
    assert "alice.desk:$7$1000$" in hashes
    assert "user alice.desk\n" in acl
    assert "topic write mailpush/v1/alice/terminals/desk/state\n" in acl
    assert stat.S_IMODE(os.stat(accounts_broker.password_file).st_mode) == 0o640


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["add", "alice", "desk"], "account alice.desk already exists"),
        (["add", "Alice", "desk"], "USER: invalid id 'Alice'"),
        (["add", "alice", "desk/x"], "TERMINAL: invalid id"),
        (["add", "carol", "desk", "--topic-root", "mailpush/#"], "--topic-root: invalid"),
        (["add-service", "mailpush-service"], "account mailpush-service already exists"),
    ],
)
def test_accounts_add_rejects(accounts_broker, tmp_path, args, fragment):
    before = (accounts_broker.password_file.read_text(), accounts_broker.acl_file.read_text())
    command = [SERVER, "accounts", *args, "--password-file", str(accounts_broker.password_file)]
    command += ["--acl-file", str(accounts_broker.acl_file)]
    command += ["--secret-file", str(tmp_path / "new.password")]

    result = subprocess.run(command, capture_output=True, text=True)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "new.password").exists()
    after = (accounts_broker.password_file.read_text(), accounts_broker.acl_file.read_text())
    assert after == before


def test_accounts_add_missing_file(tmp_path):
    missing = tmp_path / "passwords"
    acl = tmp_path / "acl"
    acl.touch(mode=0o640)

    result = subprocess.run(
        [SERVER, "accounts", "add", "alice", "desk", "--password-file", str(missing)]
        + ["--acl-file", str(acl), "--secret-file", str(tmp_path / "secret")],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 2
    assert f"--password-file: {missing} not found" in result.stderr
    assert "install -m 0640" in result.stderr
    assert not (tmp_path / "secret").exists()


def test_wrong_password_and_anonymous_rejected(broker):
    wrong = TlsClient(broker, "alice.desk", None, password="not-the-password")
    anonymous = TlsClient(broker, None, None)
    try:
        assert wrong.connack.is_failure
        assert anonymous.connack.is_failure
    finally:
        wrong.close()
        anonymous.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_publish_matrix(broker, observer, protocol):
    refused = []
    for actor in ACTORS:
        client = terminal_client(broker, actor, protocol)
        try:
            for topic in every_topic():
                code = client.publish(topic, f"{username(actor)} {protocol}".encode())
                allowed = may_publish(actor, topic)
                if protocol == "5":
                    # Mosquitto 2.0 sends PUBACK 0x87 for a denied MQTT 5 publish. With
                    # 3.1.1 it drops the message and still sends a plain PUBACK.
                    if allowed == (code.value == NOT_AUTHORIZED):
                        refused.append((username(actor), topic, str(code)))
            # A last allowed message: once it arrives, everything sent before it has.
            client.publish(TOPICS.state(*actor), b"fence")
        finally:
            client.close()

    assert refused == [], "PUBACK reason codes that contradict the rules"
    fences = {TOPICS.state(*actor) for actor in ACTORS}
    assert observer.wait_for(
        lambda: fences <= {m[0] for m in observer.messages if m[1] == b"fence"}
    )

    delivered = {(payload.decode().split()[0], topic) for topic, payload, _ in observer.messages}
    expected = {
        (username(actor), topic)
        for actor in ACTORS
        for topic in every_topic()
        if may_publish(actor, topic)
    }
    delivered = {entry for entry in delivered if entry[0] != "fence"}
    assert delivered - expected == set(), "publishes the broker let through"
    assert expected - delivered == set(), "allowed publishes that never arrived"


def test_read_matrix_live(broker, observer):
    readers = {actor: terminal_client(broker, actor) for actor in ACTORS}
    try:
        for client in readers.values():
            # Mosquitto 2.0's ACL file does not check SUBSCRIBE; it grants the
            # wildcard and filters each message on delivery, which is what counts.
            client.subscribe(f"{TOPICS.root}/#")
        for topic in every_topic():
            observer.publish(topic, b"marker")
        for actor in ACTORS:
            observer.publish(TOPICS.inbox(*actor), b"fence")

        for actor, client in readers.items():
            fence = TOPICS.inbox(*actor)
            assert client.wait_for(lambda c=client, f=fence: (f, b"fence", False) in c.messages)
            received = {topic for topic, payload, _ in client.messages if payload == b"marker"}
            expected = {topic for topic in every_topic() if may_read(actor, topic)}
            assert received - expected == set(), f"{username(actor)} read topics it may not"
            assert expected - received == set(), f"{username(actor)} missed topics it may read"
    finally:
        for client in readers.values():
            client.close()


def test_read_matrix_retained(broker, observer):
    retained = [topic for topic in every_topic() if TOPICS.parse(topic).kind in RETAINED_KINDS]
    for topic in retained:
        observer.publish(topic, b"retained", retain=True)

    for actor in ACTORS:
        client = terminal_client(broker, actor)
        try:
            client.subscribe(f"{TOPICS.root}/#")
            observer.publish(TOPICS.inbox(*actor), b"fence")
            assert client.wait_for(lambda c=client: any(m[1] == b"fence" for m in c.messages))

            received = {topic for topic, payload, flag in client.messages if flag}
            expected = {topic for topic in retained if may_read(actor, topic)}
            assert received == expected, f"retained messages seen by {username(actor)}"
        finally:
            client.close()


def test_last_will_needs_terminal_permission(broker, observer):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    actor = ("alice", "desk")
    foreign = [TOPICS.state("alice", "phone"), TOPICS.state("bob", "desk"), TOPICS.inbox(*actor)]
    for topic in [*foreign, TOPICS.state(*actor)]:
        client = terminal_client(
            broker, actor, client_id=f"will-{len(observer.messages)}", will=topic
        )
        assert not client.connack.is_failure
        # MQTT 5 reason 0x04 makes the broker publish the will, as on a lost connection.
        client.client.disconnect(
            reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        )
        client.client.loop_stop()

    own = TOPICS.state(*actor)
    assert observer.wait_for(lambda: (own, b"will", False) in observer.messages)
    wills = [topic for topic, payload, _ in observer.messages if payload == b"will"]
    assert wills == [own]


def agent_toml(home, broker, actor, secret):
    path = home / "agent.toml"
    path.write_text(
        f'user = "{actor[0]}"\nterminal = "{actor[1]}"\n'
        f'[broker]\nurl = "{broker.url}"\nusername = "{username(actor)}"\n'
        f'password_file = "{secret}"\nca_file = "{broker.ca.ca_file}"\n'
        "[sensors.input]\nenabled = false\n"
    )
    return path


def run_agent(command, config, env):
    result = subprocess.run(
        [AGENT, *command, "--config", str(config)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_service_and_agents_through_acl(broker, tmp_path):
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    server_config = tmp_path / "server.toml"
    server_config.write_text(
        f'[broker]\nurl = "{broker.url}"\nusername = "mailpush-service"\n'
        f'password_file = "{broker.secrets["service"]}"\nca_file = "{broker.ca.ca_file}"\n'
        f'[service]\nstate_dir = "{tmp_path / "service"}"\n'
        f'[[users]]\nid = "alice"\nmailbox = {{ kind = "maildir", path = "{maildir}" }}\n'
    )
    server = start_server(
        server_config, home_env(tmp_path / "server-home"), tmp_path / "server.log"
    )
    agents, envs, configs = {}, {}, {}
    try:
        for terminal in TERMINALS:
            actor = ("alice", terminal)
            home = tmp_path / terminal
            home.mkdir()
            envs[terminal] = home_env(home)
            configs[terminal] = agent_toml(home, broker, actor, broker.secrets[actor])
            agents[terminal] = start_agent(
                configs[terminal], envs[terminal], tmp_path / f"{terminal}.log"
            )
        for terminal in TERMINALS:
            server.wait_for_log(f"terminal {terminal} of alice is idle")

        # A mail goes to both idle terminals, and both acknowledge it.
        (maildir / "new" / "m1").write_bytes(b"From: dan@example.org\nSubject: hello\n\nHi.\n")
        for terminal in TERMINALS:
            agents[terminal].wait_for_log("for mail m1 shown")
            server.wait_for_log(f"acknowledged by {terminal} of alice")

        # The policy commands publish the user's policy and read the siblings' states.
        run_agent(["policy", "set", "--all"], configs["desk"], envs["desk"])
        server.wait_for_log("policy of alice set by desk")
        shown = json.loads(run_agent(["policy", "show", "--json"], configs["phone"], envs["phone"]))
        assert shown["policy"]["set_by"] == "desk"
        assert shown["source"] == "broker"
        explained = json.loads(
            run_agent(["policy", "explain", "--json"], configs["phone"], envs["phone"])
        )
        assert sorted(view["terminal"] for view in explained["terminals"]) == ["desk", "phone"]

        # Mail status travels from a terminal to the service.
        run_agent(["inbox", "read", "m1"], configs["phone"], envs["phone"])
        server.wait_for_log("mail m1 of alice marked read by phone")

        # The broker publishes a lost terminal's will with that terminal's rights.
        agents["phone"].kill()
        server.wait_for_log("terminal phone of alice is off (connection-lost)")
    finally:
        for agent in agents.values():
            agent.terminate()
        server.terminate()

    log = broker.run_log()
    assert "not authorised" not in log
    assert "Denied PUBLISH" not in log


def test_link_warns_on_rejected_publish(broker, caplog):
    from mailpush.protocol.broker_url import parse_broker_url
    from mailpush.protocol.link import Link, LinkOptions

    actor = ACTORS[0]
    link = Link(
        LinkOptions(
            address=parse_broker_url(broker.url),
            client_id="mailpush-link-warning",
            username=username(actor),
            password=broker.secrets[actor].read_text().strip(),
            ca_file=str(broker.ca.ca_file),
            protocol="5",
        )
    )
    link.start()
    try:
        assert link.wait_connected(10)
        info = link.publish(f"{TOPICS.root}/someone-else/policy", b"{}")
        info.wait_for_publish(10)
        deadline = time.monotonic() + 10
        while "rejected a message" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        link.stop()

    assert "rejected a message from this client" in caplog.text
    assert caplog.text.count("rejected a message") == 1
