"""Short MQTT sessions for CLI commands: publish one message, or read retained ones.

The commands connect as ``mailpush-{user}-{terminal}-cli``, a client id apart
from the running agent's, so a command never takes over the agent's session.
"""

import threading
import time
from collections.abc import Callable

from mailpush.agent.config import AgentConfig
from mailpush.errors import BrokerError
from mailpush.protocol.ids import agent_client_id
from mailpush.protocol.link import Link, LinkOptions

CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0


def cli_client_id(config: AgentConfig) -> str:
    """Return the MQTT client id the CLI commands of this terminal use."""
    return agent_client_id(config.user, config.terminal) + "-cli"


def open_link(
    config: AgentConfig, subscriptions: dict[str, Callable[[str, bytes], None]] | None = None
) -> Link:
    """Connect a link for one command, or raise :class:`BrokerError` in one line.

    Subscriptions are made as part of the connect, so :meth:`Link.wait_subscribed`
    tells when their retained messages are on the way.
    """
    link = Link(
        LinkOptions(
            address=config.address,
            client_id=cli_client_id(config),
            username=config.broker.username,
            password=config.broker.password(),
            ca_file=config.broker.ca_file,
            protocol=config.broker.protocol,
            keepalive_s=config.broker.keepalive_s,
        )
    )
    for topic_filter, handler in (subscriptions or {}).items():
        link.subscribe(topic_filter, handler)
    link.start()
    if not link.wait_connected(CONNECT_TIMEOUT_S):
        link.stop()
        if link.fatal_error is not None:
            raise link.fatal_error
        msg = f"broker {config.address} not reachable within {CONNECT_TIMEOUT_S:.0f} s; is it running?"
        raise BrokerError(msg)
    return link


def publish_once(config: AgentConfig, topic: str, payload: bytes, *, retain: bool = False) -> None:
    """Publish one QoS 1 message and wait until the broker has acknowledged it."""
    link = open_link(config)
    try:
        info = link.publish_retained(topic, payload) if retain else link.publish(topic, payload)
        if info is None or not _wait_published(info):
            msg = f"broker {config.address} did not acknowledge the message within {PUBLISH_TIMEOUT_S:.0f} s"
            raise BrokerError(msg)
    finally:
        link.stop()


def read_retained(
    config: AgentConfig, topic_filter: str, quiet_s: float = 0.5, limit_s: float = 3.0
) -> dict[str, bytes]:
    """Return the retained messages under ``topic_filter``, by topic.

    Retained messages arrive right after the subscription is acknowledged;
    the read ends once none has arrived for ``quiet_s`` or after ``limit_s``.
    """
    received: dict[str, bytes] = {}
    arrived = threading.Event()

    def collect(topic: str, payload: bytes) -> None:
        received[topic] = payload
        arrived.set()

    link = open_link(config, {topic_filter: collect})
    try:
        link.wait_subscribed(limit_s)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            arrived.clear()
            if not arrived.wait(min(quiet_s, max(0.0, deadline - time.monotonic()))):
                break
    finally:
        link.stop()
    return dict(received)


def _wait_published(info: Callable[..., object] | object) -> bool:
    try:
        info.wait_for_publish(PUBLISH_TIMEOUT_S)  # type: ignore[attr-defined]
    except (RuntimeError, ValueError):
        return False
    return bool(info.is_published())  # type: ignore[attr-defined]
