"""Short MQTT sessions for CLI commands: read retained messages, publish a message.

:class:`BrokerSession` is a short-lived MQTT connection with a clean session
and the client id ``mailpush-{command}.{user}.{terminal}.{random}``. Ids cannot
contain a dot, so it never takes over the session of an agent
(``mailpush-{user}-{terminal}``) or of the service (``mailpush-service-{instance}``).
"""

import secrets
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from mailpush.agent.config import AgentConfig
from mailpush.errors import AuthenticationError, BrokerError

CONNECT_TIMEOUT_S = 5.0
PUBACK_TIMEOUT_S = 5.0

# CONNACK reason codes of MQTT 5.0 section 3.2.2.2; paho maps the 3.1.1 return codes onto them.
_REFUSED_LOGIN = (0x86, 0x87)


def cli_client_id(command: str, user: str, terminal: str) -> str:
    """Return a client id for one run of ``command``, distinct from every agent and service id."""
    return f"mailpush-{command}.{user}.{terminal}.{secrets.token_hex(4)}"


class BrokerSession:
    """A short-lived MQTT connection: read retained messages, publish messages.

    It uses MQTT 3.1.1 with a clean session unless the config sets ``protocol = "5"``,
    because every broker speaks 3.1.1 and a one-off command needs no session.

    Args:
        config: The broker, credentials, user and terminal.
        command: The CLI command, such as ``policy``; it names the client id.
    """

    def __init__(self, config: AgentConfig, command: str) -> None:
        self.address = config.address
        v5 = config.broker.protocol == "5"
        self._v5 = v5
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cli_client_id(command, config.user, config.terminal),
            clean_session=None if v5 else True,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
        if config.broker.username is not None:
            self._client.username_pw_set(config.broker.username, config.broker.password())
        if self.address.tls:
            self._client.tls_set(ca_certs=config.broker.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        self._connack: Any = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._changed = threading.Condition()
        self.messages: dict[str, bytes] = {}
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_message = self._on_message

    def __enter__(self) -> "BrokerSession":
        where = f"broker {self.address}"
        extra: dict[str, Any] = {"clean_start": True} if self._v5 else {}
        try:
            self._client.connect(self.address.host, self.address.port, keepalive=30, **extra)
        except ssl.SSLCertVerificationError as exc:
            msg = (
                f"{where}: TLS certificate verification failed: {exc.verify_message.rstrip('.')}; "
                "check broker.ca_file and the host name in broker.url"
            )
            raise BrokerError(msg) from None
        except OSError as exc:
            msg = f"{where}: cannot connect: {exc.strerror or exc}; check broker.url and that the broker is running"
            raise BrokerError(msg) from None

        self._client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S):
            self.__exit__()
            msg = (
                f"{where}: no answer to CONNECT within {CONNECT_TIMEOUT_S:.0f} s; check broker.url"
            )
            raise BrokerError(msg)
        if self._connack.is_failure:
            self.__exit__()
            if self._connack.value in _REFUSED_LOGIN:
                msg = f"{where} rejected the login ({self._connack}); check broker.username and the password source"
                raise AuthenticationError(msg)
            msg = f"{where} refused the connection: {self._connack}"
            raise BrokerError(msg)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def collect(
        self, filters: list[str], wait_s: float, enough: Callable[[], bool] | None = None
    ) -> dict[str, bytes]:
        """Subscribe to ``filters`` and return the latest payload per topic after ``wait_s``.

        Mosquitto and amqtt send the retained messages right after the SUBACK. The wait ends
        early once ``enough()`` holds. A cleared retained topic is left out.
        """
        self._subscribed.clear()
        self._client.subscribe([(topic, 1) for topic in filters])
        if not self._subscribed.wait(CONNECT_TIMEOUT_S):
            msg = f"broker {self.address}: no SUBACK within {CONNECT_TIMEOUT_S:.0f} s"
            raise BrokerError(msg)

        deadline = time.monotonic() + wait_s
        with self._changed:
            while not (enough is not None and enough()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return {topic: payload for topic, payload in self.messages.items() if payload}

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK.

        Raises:
            BrokerError: the PUBACK did not arrive within ``PUBACK_TIMEOUT_S``.
        """
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        try:
            info.wait_for_publish(PUBACK_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:
            msg = f"broker {self.address}: publishing to {topic} failed: {exc}"
            raise BrokerError(msg) from None
        if not info.is_published():
            msg = f"broker {self.address}: no PUBACK for {topic} within {PUBACK_TIMEOUT_S:.0f} s, so the message may not have arrived; run the command again"
            raise BrokerError(msg)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = reason_code
        self._connected.set()

    def _on_message(self, client, userdata, message) -> None:
        with self._changed:
            self.messages[message.topic] = message.payload
            self._changed.notify_all()
