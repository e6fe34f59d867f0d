"""A load generator of terminal states: many terminals, few MQTT connections.

The protocol lets any client publish a terminal's state, so one connection
publishes for many terminals. :func:`state_payloads` builds the UsageState
payloads, and :class:`LoadGenerator` publishes them to a broker at the
heartbeat rate or all at once (a burst).

Run by hand against a broker on this machine::

    python -m bench.loadgen --port 1883 --terminals 1000 --seconds 120
"""

import argparse
import itertools
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mailpush.protocol.messages import UsageState, encode
from mailpush.protocol.topics import Topics

TERMINALS_PER_USER = 4
HEARTBEAT_S = 60.0
STATES = ("active", "idle", "away", "present")


def terminal_ids(count: int) -> Iterator[tuple[str, str]]:
    """Yield ``count`` (user, terminal) pairs, four terminals per user."""
    for index in range(count):
        yield f"user{index // TERMINALS_PER_USER:06d}", f"term{index % TERMINALS_PER_USER}"


def user_ids(count: int) -> list[str]:
    """Return the users that ``count`` terminals belong to."""
    return sorted({user for user, _ in terminal_ids(count)})


def state_payloads(count: int, seq: int = 1) -> list[tuple[str, bytes]]:
    """Return (topic, payload) of one UsageState per terminal, states spread evenly."""
    topics = Topics()
    now = time.time()
    messages = []
    for index, (user, terminal) in enumerate(terminal_ids(count)):
        state = UsageState(
            user=user, terminal=terminal, state=STATES[index % len(STATES)],
            since=now - 60, ts=now, seq=seq, confidence=0.8,
        )  # fmt: skip
        messages.append((topics.state(user, terminal), encode(state)))
    return messages


class LoadGenerator:
    """Publishes terminal states over ``connections`` paho clients, round robin.

    Args:
        port: the broker's port on 127.0.0.1.
        connections: how many MQTT connections to spread the terminals over.
    """

    def __init__(self, port: int, connections: int = 4) -> None:
        self._clients = []
        for _ in range(connections):
            client = mqtt.Client(CallbackAPIVersion.VERSION2)
            # paho's default of 20 messages in flight would pace a burst by
            # the round trip of each PUBACK.
            client.max_inflight_messages_set(1000)
            client.max_queued_messages_set(0)
            client.connect("127.0.0.1", port)
            client.loop_start()
            self._clients.append(client)

    def burst(self, messages: list[tuple[str, bytes]]) -> list[mqtt.MQTTMessageInfo]:
        """Publish every message at once, retained at QoS 1, and return the message infos."""
        clients = itertools.cycle(self._clients)
        return [
            next(clients).publish(topic, payload, qos=1, retain=True) for topic, payload in messages
        ]

    def heartbeat(self, count: int, seconds: float, period_s: float = HEARTBEAT_S) -> int:
        """Publish each terminal's state once per ``period_s``, spread evenly; return messages sent."""
        rate = count / period_s
        start = time.monotonic()
        sent = 0
        seq = 1
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate)
            if due > sent:
                batch = state_payloads(count, seq)[sent % count : sent % count + due - sent]
                self.burst(batch)
                sent = due
                seq += 1
            time.sleep(0.05)
        return sent

    def close(self) -> None:
        """Disconnect every client and stop their network threads."""
        for client in self._clients:
            client.disconnect()
            client.loop_stop()


def main() -> None:
    """Publish states for ``--terminals`` terminals at the heartbeat rate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="broker port on 127.0.0.1")
    parser.add_argument("--terminals", type=int, default=1000, help="terminals to simulate")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to run")
    args = parser.parse_args()
    generator = LoadGenerator(args.port)
    try:
        sent = generator.heartbeat(args.terminals, args.seconds)
    finally:
        generator.close()
    print(f"published {sent} states in {args.seconds:.0f} s")


if __name__ == "__main__":
    main()
