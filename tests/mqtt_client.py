"""A plain paho-mqtt subscriber, used as a third-party client would use the broker."""

import queue
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


@dataclass(frozen=True)
class Received:
    """One message as the subscriber got it."""

    topic: str
    payload: bytes
    retain: bool


class Subscriber:
    """Subscribes to one filter and queues what arrives."""

    def __init__(self, port: int, topic: str = "mailpush/#", client_id: str = "") -> None:
        self.messages: queue.Queue[Received] = queue.Queue()
        self._subscribed = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.put(True)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        self._subscribed.get(timeout=10)

    def _on_message(self, client, userdata, message) -> None:
        self.messages.put(Received(message.topic, message.payload, bool(message.retain)))

    def wait_for(self, predicate, timeout: float = 10.0) -> Received:
        """Return the first message for which ``predicate`` holds, or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching message within {timeout} s; saw {seen[-10:]}")
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            seen.append((message.topic, message.payload[:200]))
            if predicate(message):
                return message

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish at QoS 1 and wait until the broker has it."""
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
