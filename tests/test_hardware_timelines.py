"""Scripted hardware timelines through the real agent and a real Mosquitto.

The agent (:class:`mailpush.agent.runner.Agent`) runs in a thread of this
process, because the hardware fakes live here: gpiozero's MockFactory pins
for the PIR and the ``fake_smbus`` register maps for the temperature chips.
A plain paho subscriber watches the retained state topic as a third-party
client would. The fusion windows are shortened to seconds, so each timeline
takes well under 15 s; every wait polls with a deadline.
"""

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mailpush.agent.config import build_config
from mailpush.agent.runner import Agent, status_path
from mailpush.sensors.registry import discover
from mailpush.sensors.temperature.plugin import TemperatureSensor
from tests.fixtures.smbus import FakeI2C, FakeLM75, FakeTMP102
from tests.mqtt_client import Received, Subscriber

pytestmark = pytest.mark.integration

USER, TERMINAL = "alice", "pi"
STATE_TOPIC = f"mailpush/v1/{USER}/terminals/{TERMINAL}/state"
PROBE_TOPIC = f"mailpush/v1/{USER}/terminals/{TERMINAL}/probe"
PIN = 17
# Allowed lag between a scripted event and the state it causes: the agent
# fuses at least once a second, and gpiozero samples the pin at 10 Hz.
LAG_S = 1.5


def agent_config(broker_url: str, fusion: dict[str, Any], sensors: dict[str, Any]) -> Any:
    """Build an agent config the way ``mailpush-agent start`` does, from a parsed TOML dict."""
    data = {
        "user": USER,
        "terminal": TERMINAL,
        "broker": {"url": broker_url},
        "fusion": {"heartbeat_s": 60, **fusion},
        "receiver": {"notify": False},
        "sensors": {"input": {"enabled": False}, "power": {"enabled": False}, **sensors},
    }
    return build_config(data, discover())


@contextmanager
def running_agent(config: Any, tmp_path: Path) -> Iterator[Agent]:
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


def state_of(message: Received) -> dict[str, Any]:
    return json.loads(message.payload)


def wait_state(subscriber: Subscriber, state: str, timeout: float = 10.0) -> dict[str, Any]:
    message = subscriber.wait_for(lambda m: state_of(m)["state"] == state, timeout=timeout)
    return state_of(message)


def probe(subscriber: Subscriber) -> dict[str, Any]:
    """Send a probe and return the state the agent publishes in reply."""
    probe_id = uuid.uuid4().hex
    payload = json.dumps({"v": 1, "id": probe_id, "ts": time.time()}).encode()
    subscriber.publish(PROBE_TOPIC, payload)
    answer = subscriber.wait_for(lambda m: state_of(m).get("probe") == probe_id, timeout=10)
    return state_of(answer)


def sensor_status(tmp_path: Path, name: str) -> dict[str, Any]:
    """Return what the agent last recorded about one sensor in its status file."""
    path = status_path(tmp_path / "state", USER, TERMINAL)
    return json.loads(path.read_text())["sensors"][name]


def pir_sensors(**options: Any) -> dict[str, Any]:
    return {"pir": {"pin": PIN, "episode_gap_s": 0.5, **options}}


def test_walk_in_sit_still_leave(mosquitto, mock_pins, tmp_path) -> None:
    config = agent_config(
        mosquitto.url,
        {"active_window_s": 1, "presence_window_s": 2, "away_after_s": 4},
        pir_sensors(max_high_s=30, zone="study"),
    )
    subscriber = Subscriber(mosquitto.port, STATE_TOPIC)
    pin = mock_pins.pin(PIN)
    try:
        with running_agent(config, tmp_path):
            first = wait_state(subscriber, "idle")
            assert first["confidence"] == pytest.approx(0.5)  # a PIR alone watches

            # Someone walks in: a burst of motion pulses, as a PIR in
            # single-trigger mode gives while a person moves.
            walked_in = time.time()
            for high_s in (0.4, 0.4):
                pin.drive_high()
                time.sleep(high_s)
                pin.drive_low()
                time.sleep(0.2)
            sat_still = time.time()

            present = wait_state(subscriber, "present")
            assert walked_in - 0.5 <= present["since"] <= walked_in + LAG_S
            assert present["seq"] > first["seq"]
            assert present["confidence"] == pytest.approx(0.75, abs=0.1)
            assert present["position"]["zone"] == "study"
            assert 0.3 <= present["position"]["proximity"] <= 0.7

            # Sitting still makes no edges: present lasts the presence window.
            idle = wait_state(subscriber, "idle")
            assert sat_still + 2 - LAG_S <= idle["since"] <= sat_still + 2 + LAG_S
            assert idle["evidence"]["presence"] is False
            assert idle["evidence"]["presence_age_s"] >= 1.5

            away = wait_state(subscriber, "away")
            assert sat_still + 4 - LAG_S <= away["since"] <= sat_still + 4 + LAG_S
            assert away["seq"] > idle["seq"] > present["seq"]

            pir = sensor_status(tmp_path, "pir")
            assert pir["health"] == "ok"
            assert pir["details"]["episodes"] == 1
            assert pir["details"]["rising_edges"] == 2
    finally:
        subscriber.close()


def test_stuck_line_not_present_forever(mosquitto, mock_pins, tmp_path) -> None:
    config = agent_config(
        mosquitto.url,
        {"active_window_s": 1, "presence_window_s": 2, "away_after_s": 6},
        pir_sensors(max_high_s=1.5),
    )
    subscriber = Subscriber(mosquitto.port, STATE_TOPIC)
    pin = mock_pins.pin(PIN)
    try:
        with running_agent(config, tmp_path):
            wait_state(subscriber, "idle")

            pin.drive_high()  # and it stays high
            stuck_at = time.time()
            wait_state(subscriber, "present")

            # Once the line is high for longer than max_high_s, it is suspect
            # and its presence no longer counts.
            dropped = wait_state(subscriber, "idle")
            assert dropped["since"] >= stuck_at + 1.5 - 0.2
            assert "presence" not in dropped["evidence"]
            assert dropped["confidence"] == pytest.approx(0.3)

            answer = probe(subscriber)
            assert answer["state"] == "idle"
            pir = sensor_status(tmp_path, "pir")
            assert pir["health"] == "degraded"
            assert "has been high for" in pir["reason"]
            assert pir["details"]["suspect"] is True

            # The stuck line finally drops: that is no sign of motion.
            pin.drive_low()
            deadline = time.monotonic() + 10
            while sensor_status(tmp_path, "pir")["details"]["line"] != "low":
                assert time.monotonic() < deadline, "the agent never saw the line go low"
                answer = probe(subscriber)
            assert answer["state"] in ("idle", "away")
            assert sensor_status(tmp_path, "pir")["health"] == "ok"
    finally:
        subscriber.close()


def test_phone_picked_up_carried_put_down(
    mosquitto, fake_smbus: FakeI2C, tmp_path, monkeypatch
) -> None:
    # The default 3 s poll would stretch this timeline past 15 s.
    monkeypatch.setattr(TemperatureSensor, "poll_interval_s", 0.5)
    bus = fake_smbus.add_bus(1)
    skin = bus.attach(0x48, FakeTMP102(22.0))
    bus.attach(0x49, FakeLM75(21.0))
    config = agent_config(
        mosquitto.url,
        {"active_window_s": 1, "away_after_s": 60, "carry_hold_s": 1, "carry_release_s": 2},
        {"temperature": {"bus": 1, "chip": "tmp102", "ambient": {"chip": "lm75", "address": 0x49}}},
    )
    subscriber = Subscriber(mosquitto.port, STATE_TOPIC)
    try:
        with running_agent(config, tmp_path):
            lying = wait_state(subscriber, "idle")
            assert lying["evidence"]["skin_contact"] is False

            picked_up = time.time()
            skin.temp_c = 33.5
            carried = wait_state(subscriber, "carried")
            assert carried["since"] >= picked_up
            assert carried["since"] <= picked_up + LAG_S
            assert carried["confidence"] == pytest.approx(0.85)  # skin well above the room
            assert carried["evidence"]["skin_contact"] is True
            assert carried["evidence"]["temperature_c"] == pytest.approx(33.5, abs=0.1)

            # A reading just below the band stays within the release margin.
            skin.temp_c = 29.75
            answer = probe(subscriber)
            deadline = time.monotonic() + 10
            while answer["evidence"]["temperature_c"] > 30:
                assert time.monotonic() < deadline, "the agent never read the new temperature"
                answer = probe(subscriber)
            assert answer["state"] == "carried"
            assert answer["evidence"]["skin_contact"] is True

            put_down = time.time()
            skin.temp_c = 24.0
            idle = wait_state(subscriber, "idle")
            # Contact must stay lost for carry_release_s before carried ends.
            assert idle["since"] >= put_down + 2 - 0.2
            assert idle["since"] <= put_down + 2 + LAG_S
            assert idle["evidence"]["skin_contact"] is False
    finally:
        subscriber.close()
