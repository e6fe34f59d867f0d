"""`mailpush-agent start` as a subprocess: real X input, a real broker, a third-party subscriber."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.mqtt_client import Subscriber

pytestmark = pytest.mark.integration

STATE_TOPIC = "mailpush/v1/alice/terminals/desk/state"
ATTRIBUTES_TOPIC = "mailpush/v1/alice/terminals/desk/attributes"
AGENT = shutil.which("mailpush-agent") or "mailpush-agent"


def state_of(message):
    return json.loads(message.payload)


@pytest.fixture
def agent_env(tmp_path, mosquitto, xvfb_display):
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
user = "alice"
terminal = "desk"
[broker]
url = "{mosquitto.url}"
[fusion]
active_window_s = 3
away_after_s = 600
heartbeat_s = 60
[sensors.input]
backend = "pynput"
"""
    )
    env = {
        **os.environ,
        "DISPLAY": xvfb_display,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    env.pop("WAYLAND_DISPLAY", None)
    return {"config": config, "env": env}


def start_agent(agent_env, tmp_path, name="agent.log"):
    log = (tmp_path / name).open("wb")
    process = subprocess.Popen(
        [AGENT, "start", "--config", str(agent_env["config"]), "--log-level", "debug"],
        env=agent_env["env"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process


def move_pointer(env, times=4):
    for step in range(times):
        subprocess.run(
            ["xdotool", "mousemove", str(100 + 37 * step), str(200 + 11 * step)],
            env=env,
            check=True,
        )
        time.sleep(0.3)


def stop(process):
    if process.poll() is None:
        process.kill()
    process.wait(10)


def test_agent_states_over_mqtt(agent_env, mosquitto, tmp_path):
    subscriber = Subscriber(mosquitto.port, "mailpush/v1/alice/#")
    agent = start_agent(agent_env, tmp_path)
    try:
        attributes = subscriber.wait_for(lambda m: m.topic == ATTRIBUTES_TOPIC, timeout=15)
        assert json.loads(attributes.payload)["agent"]["name"] == "mailpush-agent"
        first = subscriber.wait_for(lambda m: m.topic == STATE_TOPIC, timeout=15)
        assert state_of(first)["state"] == "idle"

        move_pointer(agent_env["env"])
        active = subscriber.wait_for(
            lambda m: m.topic == STATE_TOPIC and state_of(m)["state"] == "active", timeout=10
        )
        assert state_of(active)["evidence"]["input_idle_s"] < 3
        assert state_of(active)["seq"] > state_of(first)["seq"]

        idle = subscriber.wait_for(
            lambda m: m.topic == STATE_TOPIC and state_of(m)["state"] == "idle", timeout=15
        )
        assert state_of(idle)["evidence"]["input_idle_s"] >= 3

        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        will = subscriber.wait_for(
            lambda m: m.topic == STATE_TOPIC and state_of(m)["state"] == "off", timeout=15
        )
        assert state_of(will)["reason"] == "connection-lost"
        assert state_of(will)["session"] == state_of(idle)["session"]
    finally:
        stop(agent)
        subscriber.close()


def test_agent_sigterm_publishes_stopped(agent_env, mosquitto, tmp_path):
    subscriber = Subscriber(mosquitto.port, STATE_TOPIC)
    agent = start_agent(agent_env, tmp_path)
    try:
        subscriber.wait_for(lambda m: state_of(m)["state"] == "idle", timeout=15)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
        off = subscriber.wait_for(lambda m: state_of(m)["state"] == "off", timeout=10)
        assert state_of(off)["reason"] == "stopped"
    finally:
        stop(agent)
        subscriber.close()

    # The retained state a late subscriber sees is the final one.
    late = Subscriber(mosquitto.port, STATE_TOPIC)
    try:
        retained = late.wait_for(lambda m: True, timeout=10)
        assert retained.retain
        assert state_of(retained)["reason"] == "stopped"
    finally:
        late.close()


def test_agent_answers_probe(agent_env, mosquitto, tmp_path):
    subscriber = Subscriber(mosquitto.port, STATE_TOPIC)
    agent = start_agent(agent_env, tmp_path)
    try:
        subscriber.wait_for(lambda m: state_of(m)["state"] == "idle", timeout=15)
        probe = json.dumps({"v": 1, "id": "probe-42", "ts": time.time()}).encode()
        sent = time.monotonic()
        subscriber.publish("mailpush/v1/alice/terminals/desk/probe", probe)
        answer = subscriber.wait_for(lambda m: state_of(m).get("probe") == "probe-42", timeout=5)
        assert time.monotonic() - sent < 5
        assert state_of(answer)["state"] == "idle"

        subscriber.publish("mailpush/v1/alice/terminals/desk/probe", b"not json")
        subscriber.publish("mailpush/v1/alice/terminals/desk/probe", probe.replace(b"42", b"43"))
        subscriber.wait_for(lambda m: state_of(m).get("probe") == "probe-43", timeout=5)
        assert agent.poll() is None
    finally:
        agent.send_signal(signal.SIGTERM)
        stop(agent)
        subscriber.close()
    log = (tmp_path / "agent.log").read_text()
    assert "dropped a probe" in log
    assert "Traceback" not in log


def test_status_shows_published_state(agent_env, mosquitto, tmp_path):
    subscriber = Subscriber(mosquitto.port, STATE_TOPIC)
    agent = start_agent(agent_env, tmp_path)
    try:
        subscriber.wait_for(lambda m: state_of(m)["state"] == "idle", timeout=15)
        result = subprocess.run(
            [AGENT, "status", "--config", str(agent_env["config"])],
            env=agent_env["env"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert f"running (pid {agent.pid})" in result.stdout
        assert "published  idle" in result.stdout
        assert "input" in result.stdout
        assert "power" in result.stdout
    finally:
        agent.send_signal(signal.SIGTERM)
        stop(agent)
        subscriber.close()


def test_python_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "mailpush.agent", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "mailpush-agent" in result.stdout
