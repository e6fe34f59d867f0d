"""Every routing case end to end: real `mailpush-server`, real Mosquitto, a Maildir.

The policy is set with the real `mailpush-agent policy set`. Case (a) runs a real
`mailpush-agent start` under Xvfb; the other terminals are third-party MQTT
clients (as phone apps would be) that publish retained UsageState and
DeviceAttributes payloads exactly as the protocol describes, and ack pushes.
"""

import json
import queue
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.mqtt_client import Subscriber
from tests.processes import (
    AGENT,
    Running,
    home_env,
    move_pointer,
    start_agent,
    start_server,
    write_agent_config,
)

pytestmark = pytest.mark.integration

USER = "alice"
BASE = f"mailpush/v1/{USER}"

# After the service logs a mail's decision it has handed every push to its MQTT
# client. A push not seen within this window after that was never sent.
QUIET_S = 1.0


class SimTerminal:
    """A third-party terminal speaking protocol version 1 with plain paho-mqtt.

    It publishes its attributes and states retained at QoS 1, acks every push
    it receives, and answers a Probe with a fresh state when ``probe_answer``
    names one.
    """

    def __init__(
        self,
        port: int,
        terminal: str,
        kind: str,
        capabilities: tuple[str, ...] = (),
        color: bool = True,
    ) -> None:
        self.terminal = terminal
        self.kind = kind
        self.capabilities = list(capabilities)
        self.color = color
        self.pushes: queue.Queue[dict] = queue.Queue()
        self.probes: list[str] = []
        self.probe_answer: dict | None = None
        self._seq = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"mailpush-{USER}-{terminal}"
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(self._topic("inbox"), 1), (self._topic("probe"), 1)])
        assert self._subscribed.wait(10), f"{terminal}: no SUBACK"
        self._publish("attributes", self._attributes())

    def state(self, state: str, *, age_s: float = 0.0, **fields: object) -> None:
        """Publish a retained UsageState sensed ``age_s`` seconds ago."""
        with self._lock:
            self._seq += 1
            seq = self._seq
        now = time.time()
        payload = {
            "v": 1,
            "user": USER,
            "terminal": self.terminal,
            "state": state,
            "since": now - age_s - 30,
            "ts": now - age_s,
            "seq": seq,
            "confidence": 0.9,
            **fields,
        }
        self._publish("state", payload)

    def close(self) -> None:
        """Disconnect cleanly; the retained state stays on the broker."""
        self.client.disconnect()
        self.client.loop_stop()

    def _attributes(self) -> dict:
        return {
            "v": 1,
            "kind": self.kind,
            "name": f"test {self.kind}",
            "capabilities": self.capabilities,
            "display": {"width": 1080, "height": 2340, "color": self.color},
            "agent": {"name": "routing-test", "version": "1"},
        }

    def _topic(self, kind: str) -> str:
        return f"{BASE}/terminals/{self.terminal}/{kind}"

    def _publish(self, kind: str, payload: dict, retain: bool = True) -> None:
        info = self.client.publish(self._topic(kind), json.dumps(payload), qos=1, retain=retain)
        info.wait_for_publish(10)

    def _on_message(self, client, userdata, message) -> None:
        payload = json.loads(message.payload)
        if message.topic.endswith("/probe"):
            self.probes.append(payload["id"])
            if self.probe_answer is not None:
                answer = {**self.probe_answer, "probe": payload["id"]}
                state = answer.pop("state")
                # Publishing waits for the PUBACK, which paho's network thread
                # (this one) delivers, so the answer goes out from another thread.
                threading.Thread(target=self.state, args=(state,), kwargs=answer).start()
            return
        self.pushes.put(payload)
        ack = {"v": 1, "id": payload["id"], "ts": time.time()}
        threading.Thread(target=self._publish, args=("ack", ack, False)).start()


@dataclass
class Routed:
    """The pushes one mail caused, as the broker carried them."""

    mail: dict[str, dict] = field(default_factory=dict)
    prompt: dict[str, dict] = field(default_factory=dict)
    probes: list[str] = field(default_factory=list)


@dataclass
class Service:
    """A running push service with its Maildir and a watcher on the user's topics."""

    server: Running
    maildir: Path
    watcher: Subscriber
    port: int
    tmp_path: Path

    def set_policy(self, *arguments: str) -> None:
        """Run `mailpush-agent policy set ARGUMENTS` and wait until the service took it."""
        folder = self.tmp_path / "policy-cli"
        folder.mkdir(exist_ok=True)
        config = folder / "agent.toml"
        config.write_text(
            f'user = "{USER}"\nterminal = "setup"\n[broker]\nurl = "mqtt://127.0.0.1:{self.port}"\n'
        )
        before = self.server.log().count("policy of alice set by setup")
        result = subprocess.run(
            [AGENT, "policy", "set", *arguments, "--config", str(config)],
            env=home_env(folder / "home"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        wait_until(
            lambda: self.server.log().count("policy of alice set by setup") > before,
            "the service did not take the policy",
            self.server,
        )

    def route(self, subject: str, images: bool = False) -> Routed:
        """Drop a mail into the Maildir and return the probes and pushes it caused."""
        name = f"{uuid.uuid4().hex}.mail"
        (self.maildir / "tmp" / name).write_bytes(make_mail(subject, images))
        (self.maildir / "tmp" / name).rename(self.maildir / "new" / name)
        self.server.wait_for_log(f"mail {name} of alice:", timeout=30)
        return self._collect(name)

    def _collect(self, mail_id: str) -> Routed:
        routed = Routed()
        quiet_until = time.monotonic() + QUIET_S
        while time.monotonic() < quiet_until:
            try:
                message = self.watcher.messages.get(timeout=0.05)
            except queue.Empty:
                continue
            terminal, kind = message.topic.split("/")[-2:]
            if kind == "probe":
                routed.probes.append(terminal)
                continue
            if kind != "inbox":
                continue
            push = json.loads(message.payload)
            if push["mail"]["id"] != mail_id:
                continue
            target = routed.mail if push["kind"] == "mail" else routed.prompt
            assert terminal not in target, f"{terminal} got two {push['kind']} pushes"
            target[terminal] = push
            quiet_until = time.monotonic() + QUIET_S
        return routed


def wait_until(condition, message: str, server: Running, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message}:\n{server.log()[-3000:]}")
        time.sleep(0.05)


def make_mail(subject: str, images: bool) -> bytes:
    message = EmailMessage()
    message["From"] = "Carol <carol@example.org>"
    message["To"] = "alice@example.org"
    message["Subject"] = subject
    message.set_content("Hello.")
    if images:
        message.add_attachment(
            b"\x89PNG\r\n\x1a\n", maintype="image", subtype="png", filename="beach.png"
        )
    return bytes(message)


def start_service(tmp_path: Path, port: int, report_mode: str = "both") -> Service:
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    config = tmp_path / "server.toml"
    config.write_text(
        f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\n'
        f'[service]\nstate_dir = "{tmp_path / "service"}"\nprobe_timeout_ms = 5000\n'
        f'[[users]]\nid = "{USER}"\nreport_mode = "{report_mode}"\n'
        f'mailbox = {{ kind = "maildir", path = "{maildir}" }}\n'
    )
    watcher = Subscriber(port, f"{BASE}/terminals/+/+")
    server = start_server(config, home_env(tmp_path / "server-home"), tmp_path / "server.log")
    return Service(server, maildir, watcher, port, tmp_path)


@pytest.fixture
def service(tmp_path, mosquitto):
    running = start_service(tmp_path, mosquitto.port)
    try:
        yield running
    finally:
        running.server.terminate()
        running.watcher.close()


@pytest.fixture
def terminals(mosquitto):
    """Create simulated terminals; all are disconnected at the end of the test."""
    made: list[SimTerminal] = []

    def make(terminal: str, kind: str, *capabilities: str, color: bool = True) -> SimTerminal:
        sim = SimTerminal(mosquitto.port, terminal, kind, capabilities, color)
        made.append(sim)
        return sim

    yield make
    for sim in made:
        sim.close()


def report(service: Service, sim: SimTerminal, state: str, **fields: object) -> None:
    """Publish a terminal's first state and wait until the service registered it."""
    sim.state(state, **fields)
    service.server.wait_for_log(f"terminal {sim.terminal} of alice is {state}")


def assert_routed(routed: Routed, mail: set[str], prompt: set[str]) -> None:
    assert set(routed.mail) == mail
    assert set(routed.prompt) == prompt
    for push in (*routed.mail.values(), *routed.prompt.values()):
        assert push["delivered_to"] == sorted(mail)


# ---------------------------------------------------------------- the cases


def test_case_a_terminal_in_use(tmp_path, mosquitto, service, terminals, xvfb_display):
    """(a) The mail goes to the terminal the user is using now: a real agent, then a phone."""
    phone = terminals("phone", "phone", "images")
    report(service, phone, "idle", evidence={"input_idle_s": 900.0})
    home = tmp_path / "nb"
    home.mkdir()
    config = write_agent_config(
        home / "agent.toml", USER, "nb", mosquitto.url, extra='[sensors.power]\nkind = "laptop"\n'
    )
    agent = start_agent(config, home_env(home, xvfb_display), tmp_path / "nb.log")
    try:
        service.server.wait_for_log("terminal nb of alice is idle")
        service.set_policy("--most-active")
        move_pointer(xvfb_display)
        agent.wait_for_log("state active")
        wait_until(
            lambda: "most-active picked nb" in explain_now(service), "nb is not active", agent
        )

        first = service.route("at the notebook")
        agent.wait_for_log("mail push")
        phone.state("active", evidence={"input_idle_s": 0.0})
        wait_until(
            lambda: "most-active picked phone" in explain_now(service), "phone not active", agent
        )
        second = service.route("on the phone")
        agent.wait_for_log("prompt push")
    finally:
        agent.terminate()

    assert_routed(first, mail={"nb"}, prompt={"phone"})
    assert 'rule "terminal in use": most-active picked nb (active' in first.mail["nb"]["reason"]
    assert_routed(second, mail={"phone"}, prompt={"nb"})
    assert phone.pushes.get(timeout=10)["kind"] == "prompt"
    assert phone.pushes.get(timeout=10)["mail"]["subject"] == "on the phone"


def explain_now(service: Service) -> str:
    """Return `policy explain` output for a plain mail, as the broker sees the terminals now."""
    config = service.tmp_path / "policy-cli" / "agent.toml"
    result = subprocess.run(
        [AGENT, "policy", "explain", "--config", str(config), "--wait", "0.5"],
        env=home_env(service.tmp_path / "policy-cli" / "home"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout


def test_case_b_notebook_whenever_on(service, terminals):
    """(b) The notebook gets the mail in any state but off; otherwise the terminal in use."""
    notebook = terminals("nb", "laptop", "images")
    desktop = terminals("pc", "desktop", "images")
    phone = terminals("phone", "phone")
    report(service, notebook, "away", evidence={"input_idle_s": 3600.0})
    report(service, desktop, "active", evidence={"input_idle_s": 1.0})
    report(service, phone, "idle")
    service.set_policy("--prefer", "laptop")

    while_on = service.route("notebook is on")
    notebook.state("off", reason="stopped")
    service.server.wait_for_log("terminal nb of alice is off (stopped)")
    while_off = service.route("notebook is off")

    assert_routed(while_on, mail={"nb"}, prompt={"pc", "phone"})
    assert 'rule "prefer laptop": prefer:laptop picked nb' in while_on.mail["nb"]["reason"]
    assert notebook.pushes.get(timeout=10)["mail"]["subject"] == "notebook is on"
    assert_routed(while_off, mail={"pc"}, prompt={"phone"})
    assert 'rule "terminal in use": most-active picked pc' in while_off.mail["pc"]["reason"]


def test_case_c_desktop_whenever_on(service, terminals):
    """(c) The desktop gets the mail whenever it is powered on, even when idle."""
    desktop = terminals("pc", "desktop", "images", "color")
    notebook = terminals("nb", "laptop", "images")
    report(service, desktop, "idle", evidence={"input_idle_s": 400.0})
    report(service, notebook, "active", evidence={"input_idle_s": 0.0})
    service.set_policy("--prefer", "desktop")

    while_on = service.route("desktop is on")
    desktop.state("off", reason="suspended")
    service.server.wait_for_log("terminal pc of alice is off (suspended)")
    while_off = service.route("desktop sleeps")

    assert_routed(while_on, mail={"pc"}, prompt={"nb"})
    assert desktop.pushes.get(timeout=10)["mail"]["subject"] == "desktop is on"
    assert_routed(while_off, mail={"nb"}, prompt=set())


def test_case_d_phone_and_computer_at_once(service, terminals):
    """(d) The phone and the notebook or desktop, whichever is on, get the mail together."""
    phone = terminals("phone", "phone", "images")
    notebook = terminals("nb", "laptop", "images")
    desktop = terminals("pc", "desktop", "images")
    pi = terminals("kitchen-pi", "pi")
    report(service, phone, "carried", evidence={"skin_contact": True})
    report(service, notebook, "idle")
    report(service, desktop, "off", reason="stopped")
    report(service, pi, "present", evidence={"presence": True})
    service.set_policy("--kinds", "phone+laptop+desktop")

    routed = service.route("to phone and computer")

    assert_routed(routed, mail={"phone", "nb"}, prompt={"kitchen-pi"})
    assert phone.pushes.get(timeout=10)["kind"] == "mail"
    assert notebook.pushes.get(timeout=10)["kind"] == "mail"
    assert desktop.pushes.empty()


def test_case_e_closest_terminal(service, terminals):
    """(e) The terminal nearest the user gets the mail, even when another is in active use."""
    notebook = terminals("nb", "laptop", "images")
    tablet = terminals("tab", "tablet", "images")
    desktop = terminals("pc", "desktop", "images")
    report(service, notebook, "active", position={"zone": "study", "proximity": 0.2})
    report(service, tablet, "present", position={"zone": "kitchen", "proximity": 0.95})
    report(service, desktop, "idle", position={"zone": "office", "proximity": 0.5})
    service.set_policy("--closest")

    routed = service.route("nearest wins")

    assert_routed(routed, mail={"tab"}, prompt={"nb", "pc"})
    assert 'rule "closest": closest picked tab (proximity 0.95)' in routed.mail["tab"]["reason"]
    assert tablet.pushes.get(timeout=10)["mail"]["subject"] == "nearest wins"


PHOTO_POLICY = """\
# Photos go to the nearest terminal that can show images; other mail to the nearest one.
[[rules]]
name = "photos"
match = { has_images = true }
require = ["images", "color"]
select = "closest"
prompt_others = true

[[rules]]
name = "nearest"
select = "closest"
prompt_others = true
"""


def test_case_f_photos_to_colour_screen(tmp_path, service, terminals):
    """(f) A mail with photos skips the nearer black-and-white phones; they get a prompt."""
    near_bw = terminals("bw-near", "phone", "sound", color=False)
    far_bw = terminals("bw-far", "phone", color=False)
    colour = terminals("colour", "phone", "images", "color", "sound")
    report(service, near_bw, "carried", position={"proximity": 0.95})
    report(service, far_bw, "idle", position={"proximity": 0.6})
    report(service, colour, "idle", position={"proximity": 0.3})
    policy_file = tmp_path / "photos.toml"
    policy_file.write_text(PHOTO_POLICY)
    service.set_policy(str(policy_file))

    photos = service.route("holiday photos", images=True)
    text = service.route("plain text")

    assert_routed(photos, mail={"colour"}, prompt={"bw-near", "bw-far"})
    assert photos.mail["colour"]["mail"]["has_images"] is True
    assert (
        'rule "photos": closest among terminals with color+images picked colour'
        in (photos.prompt["bw-near"]["reason"])
    )
    prompt = near_bw.pushes.get(timeout=10)
    assert prompt["kind"] == "prompt"
    assert prompt["delivered_to"] == ["colour"]
    assert_routed(text, mail={"bw-near"}, prompt={"bw-far", "colour"})


def test_bad_policy_keeps_last_good(service, terminals, mosquitto):
    """A third party's invalid policy is rejected by the service; routing follows the good one."""
    notebook = terminals("nb", "laptop")
    desktop = terminals("pc", "desktop")
    report(service, notebook, "idle")
    report(service, desktop, "active", evidence={"input_idle_s": 0.0})
    service.set_policy("--prefer", "laptop")
    intruder = Subscriber(mosquitto.port, f"{BASE}/policy")
    bad = {
        "v": 1,
        "updated": time.time() + 60,
        "set_by": "phone-app",
        "rules": [{"name": "to the desktop", "select": "prefer:fridge"}],
    }
    intruder.publish(f"{BASE}/policy", json.dumps(bad).encode(), retain=True)
    intruder.close()

    service.server.wait_for_log("policy of alice rejected, keeping the last good one")
    routed = service.route("after the bad policy")

    assert "prefer:fridge" in service.server.log()
    assert_routed(routed, mail={"nb"}, prompt={"pc"})
    assert 'rule "prefer laptop"' in routed.mail["nb"]["reason"]


# ---------------------------------------------------------------- report modes


@pytest.mark.parametrize(
    ("report_mode", "probed", "winner"),
    [("both", {"nb"}, "nb"), ("probe", {"nb", "pc"}, "nb"), ("timed", set(), "pc")],
)
def test_report_mode_probes_old_states(tmp_path, mosquitto, terminals, report_mode, probed, winner):
    """An old state is probed before routing unless the mode is timed; the answer decides."""
    service = start_service(tmp_path, mosquitto.port, report_mode)
    try:
        notebook = terminals("nb", "laptop")
        desktop = terminals("pc", "desktop")
        # 100 s old: past probe_after_s (30 s) but not stale (180 s). The user is back at it.
        report(service, notebook, "idle", age_s=100.0, evidence={"input_idle_s": 700.0})
        notebook.probe_answer = {"state": "active", "evidence": {"input_idle_s": 0.0}}
        report(service, desktop, "present", evidence={"presence": True})
        desktop.probe_answer = {"state": "present", "evidence": {"presence": True}}

        routed = service.route("who is there?")
    finally:
        service.server.terminate()
        service.watcher.close()

    assert set(routed.probes) == probed
    assert {sim.terminal for sim in (notebook, desktop) if sim.probes} == probed
    assert set(routed.mail) == {winner}
    if report_mode != "timed":
        assert "most-active picked nb (active" in routed.mail["nb"]["reason"]
