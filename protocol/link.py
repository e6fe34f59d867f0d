"""An MQTT connection for the agent and the service: session, last will, reconnects.

One :class:`Link` owns one paho-mqtt 2.x client (callback API version 2) and
runs its network loop in a named thread. It connects with MQTT 5, a persistent
session and a 7-day session expiry, and falls back to MQTT 3.1.1 with
``clean_session=false`` when the broker does not speak 5 (amqtt, the embedded
broker, speaks 3.1.1 only).

Retained messages are kept as "latest value per topic" and published again on
every connect, so after a long outage the broker keeps the newest state and no
stale one is replayed. Other messages sent while offline wait in a bounded queue.
"""

import logging
import random
import secrets
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mailpush.errors import AuthenticationError, BrokerError
from mailpush.protocol.broker_url import BrokerAddress

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
OFFLINE_QUEUE_MAX = 1000
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 60.0
CONNACK_TIMEOUT_S = 5.0

# CONNACK reason codes (MQTT 5.0 section 3.2.2.2); paho maps the 3.1.1 return
# codes 1, 4 and 5 onto these.
_UNSUPPORTED_PROTOCOL = 0x84
_BAD_CREDENTIALS = 0x86
_NOT_AUTHORIZED = 0x87
# DISCONNECT reason code (MQTT 5.0 section 3.14.2.1): a client with the same id connected.
_SESSION_TAKEN_OVER = 0x8E
# How often a connection taken over again and again is logged.
TAKEN_OVER_LOG_S = 60.0

MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class LinkOptions:
    """How to reach the broker and who we are there."""

    address: BrokerAddress
    client_id: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    protocol: str = "auto"
    keepalive_s: int = 60


@dataclass(frozen=True)
class Will:
    """The last will: published by the broker when the connection drops unannounced."""

    topic: str
    payload_factory: Callable[[], bytes]


def backoff_delay(attempt: int, low: float = BACKOFF_MIN_S, high: float = BACKOFF_MAX_S) -> float:
    """Return the wait before reconnect ``attempt`` (0-based): capped exponential, full jitter."""
    ceiling = min(high, low * (2**attempt))
    return random.uniform(low, max(low, ceiling))


class Link:
    """A persistent MQTT connection that keeps itself up until :meth:`stop`.

    Args:
        options: broker address, credentials and client id.
        will: the last will, built afresh on every connect.
        on_connected: called in the network thread after each successful connect.
    """

    def __init__(
        self,
        options: LinkOptions,
        will: Will | None = None,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self._options = options
        self._will = will
        self._on_connected = on_connected
        self._protocol = (
            MQTTProtocolVersion.MQTTv311
            if options.protocol == "3.1.1"
            else MQTTProtocolVersion.MQTTv5
        )
        self._lock = threading.Lock()
        self._retained: dict[str, bytes] = {}
        self._queue: deque[tuple[str, bytes, bool]] = deque(maxlen=OFFLINE_QUEUE_MAX)
        self._handlers: dict[str, MessageHandler] = {}
        self._connected = threading.Event()
        self._settled = threading.Event()  # set on connect or on a fatal error
        self._subscribed = threading.Event()
        self._pending_subacks: set[int] = set()
        self._stopping = threading.Event()
        self._fatal: BrokerError | None = None
        self._taken_over_at = float("-inf")
        self._thread: threading.Thread | None = None
        self._client = self._make_client()
        self.session = secrets.token_hex(4)
        """The id of the current (or next) connection; the last will carries it."""

    # Public API

    @property
    def connected(self) -> bool:
        """Whether the broker accepted our last connect and the connection is up."""
        return self._connected.is_set()

    @property
    def fatal_error(self) -> BrokerError | None:
        """The error that stopped the link for good (refused credentials, bad certificate)."""
        return self._fatal

    @property
    def protocol_name(self) -> str:
        """The MQTT version in use: ``5`` or ``3.1.1``."""
        return "5" if self._protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1"

    def subscribe(self, topic: str, handler: MessageHandler) -> None:
        """Subscribe at QoS 1 now and after every reconnect; ``handler(topic, payload)``."""
        with self._lock:
            self._handlers[topic] = handler
            if self.connected:
                self._client.subscribe(topic, qos=1)

    def publish_retained(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo | None:
        """Publish the latest retained value of ``topic``; offline, keep it for the next connect."""
        with self._lock:
            self._retained[topic] = payload
            if not self.connected:
                return None
            return self._client.publish(topic, payload, qos=1, retain=True)

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> mqtt.MQTTMessageInfo | None:
        """Publish a QoS 1 message once; offline, queue it (oldest dropped past 1,000).

        Unlike :meth:`publish_retained`, a retained message sent here is not
        sent again on later connects, so it cannot overwrite a newer value
        that another client publishes meanwhile.
        """
        with self._lock:
            if not self.connected:
                self._queue.append((topic, payload, retain))
                return None
            return self._client.publish(topic, payload, qos=1, retain=retain)

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until the broker has acknowledged every subscription of the current connection.

        A broker sends the retained messages of a subscription right after
        acknowledging it, so a caller that needs them (the service's
        registry) waits here first.
        """
        return self._subscribed.wait(timeout)

    def start(self) -> None:
        """Start connecting in the background; returns at once."""
        self._thread = threading.Thread(target=self._run, name="mailpush-mqtt", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected, the link failed for good, or ``timeout`` seconds pass.

        Returns:
            Whether the link is connected; check :attr:`fatal_error` when it is not.
        """
        self._settled.wait(timeout)
        return self.connected

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly, so the broker does not publish the will, and end the thread."""
        self._stopping.set()
        try:
            self._client.disconnect()
        except OSError as exc:
            log.debug("disconnect failed: %s", exc)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("MQTT thread did not stop within %.0f s", timeout)

    # Connection loop

    def _make_client(self) -> mqtt.Client:
        options = self._options
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=options.client_id,
            clean_session=None if v5 else False,
            protocol=self._protocol,
            reconnect_on_failure=False,
        )
        client.suppress_exceptions = True
        if options.username is not None:
            client.username_pw_set(options.username, options.password)
        if options.address.tls:
            # Strict verification: CERT_REQUIRED and host name checking; there
            # is deliberately no option to turn either off.
            client.tls_set(ca_certs=options.ca_file, cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(False)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.on_publish = self._handle_publish
        client.on_socket_open = self._handle_socket_open
        return client

    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._set_will()
            outcome = self._connect_once()
            if self._stopping.is_set() or self._fatal is not None:
                break
            if outcome == "retry-now":
                continue
            if outcome == "was-connected":
                attempt = 0
            delay = backoff_delay(attempt)
            attempt += 1
            log.info("reconnecting to %s in %.1f s", self._options.address, delay)
            self._stopping.wait(delay)

    def _connect_once(self) -> str:
        address = self._options.address
        extra: dict[str, object] = {}
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
            extra = {"clean_start": False, "properties": properties}
        try:
            self._client.connect(
                address.host, address.port, keepalive=self._options.keepalive_s, **extra
            )
        except ssl.SSLCertVerificationError as exc:
            self._fail(
                BrokerError(
                    f"broker {address}: TLS certificate verification failed: {exc.verify_message.rstrip('.')}; check broker.ca_file and the host name in broker.url"
                )
            )
            return "failed"
        except (OSError, ValueError) as exc:
            # The first failure in a row is worth a person's attention; the
            # retries that follow are not, until the link connects again.
            level = logging.WARNING if self._failures_in_row == 0 else logging.INFO
            log.log(level, "cannot reach broker %s: %s; retrying", address, exc)
            self._failures_in_row += 1
            return "failed"

        if not self._await_connack():
            return "retry-now" if self._downgrade_requested else "failed"
        self._client.loop_forever()
        was_connected = self._ever_connected_in_round
        self._connected.clear()
        if self._downgrade_requested:
            return "retry-now"
        return "was-connected" if was_connected else "failed"

    def _await_connack(self) -> bool:
        """Run the network loop until CONNACK; False when the connection ended without one.

        amqtt 0.12 neither answers nor closes an MQTT 5 CONNECT (seen here), so
        a CONNACK that does not come within CONNACK_TIMEOUT_S counts as "MQTT 5
        not supported" and, with ``protocol = "auto"``, the link retries with 3.1.1.
        """
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while not self._ever_connected_in_round and not self._stopping.is_set():
            if self._client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                return self._ever_connected_in_round
            if time.monotonic() > deadline:
                log.info(
                    "no CONNACK from %s within %.0f s",
                    self._options.address,
                    CONNACK_TIMEOUT_S,
                )
                self._client.disconnect()
                self._client.loop(timeout=0.1)
                if (
                    self._protocol == MQTTProtocolVersion.MQTTv5
                    and self._options.protocol == "auto"
                ):
                    self._downgrade()
                return False
        return self._ever_connected_in_round

    def _downgrade(self) -> None:
        log.info("broker %s does not accept MQTT 5; using MQTT 3.1.1", self._options.address)
        self._protocol = MQTTProtocolVersion.MQTTv311
        self._client = self._make_client()
        self._downgrade_requested = True

    _failures_in_row = 0
    _publish_refused = False
    _ever_connected_in_round = False
    _downgrade_requested = False

    def _set_will(self) -> None:
        self._ever_connected_in_round = False
        self._downgrade_requested = False
        self.session = secrets.token_hex(4)
        if self._will is not None:
            self._client.will_set(
                self._will.topic, self._will.payload_factory(), qos=1, retain=True
            )

    def _fail(self, error: BrokerError) -> None:
        self._fatal = error
        self._stopping.set()
        self._settled.set()

    # paho callbacks, run in the network thread; none may raise into paho.

    def _handle_socket_open(self, client, userdata, sock) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):  # TLS-wrapped or non-TCP sockets
            pass

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if reason_code.is_failure:
                self._handle_refusal(reason_code)
                client.disconnect()
                return

            self._ever_connected_in_round = True
            self._failures_in_row = 0
            self._publish_refused = False
            log.info(
                "connected to %s (MQTT %s, session %s)",
                self._options.address,
                self.protocol_name,
                "resumed" if flags.session_present else "new",
            )
            with self._lock:
                self._subscribed.clear()
                self._pending_subacks.clear()
                for topic in self._handlers:
                    _, mid = client.subscribe(topic, qos=1)
                    if mid is not None:
                        self._pending_subacks.add(mid)
                if not self._pending_subacks:
                    self._subscribed.set()
                for topic, payload in self._retained.items():
                    client.publish(topic, payload, qos=1, retain=True)
                while self._queue:
                    topic, payload, retain = self._queue.popleft()
                    client.publish(topic, payload, qos=1, retain=retain)
                self._connected.set()
                self._settled.set()
            if self._on_connected is not None:
                self._on_connected()
        except Exception:
            log.exception("error in the MQTT connect handler")

    def _handle_refusal(self, reason_code) -> None:
        address = self._options.address
        code = reason_code.value
        if (
            code == _UNSUPPORTED_PROTOCOL
            and self._protocol == MQTTProtocolVersion.MQTTv5
            and self._options.protocol == "auto"
        ):
            self._downgrade()
            return
        if code in (_BAD_CREDENTIALS, _NOT_AUTHORIZED):
            self._fail(
                AuthenticationError(
                    f"broker {address} rejected the login ({reason_code}); check broker.username and the password source"
                )
            )
            return
        log.warning("broker %s refused the connection: %s", address, reason_code)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # An MQTT 5 broker puts a failure reason code in the PUBACK of a message
        # it drops, such as Mosquitto's 0x87 for a topic the account's ACL denies.
        if reason_code.is_failure and not self._publish_refused:
            self._publish_refused = True
            log.warning(
                "broker %s rejected a message from this client: %s; check the account's "
                "access rights (once per connection)",
                self._options.address,
                reason_code,
            )

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for code in reason_codes:
            if code.is_failure:
                log.warning("broker %s rejected a subscription: %s", self._options.address, code)
        with self._lock:
            self._pending_subacks.discard(mid)
            if not self._pending_subacks:
                self._subscribed.set()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        now = time.monotonic()
        if reason_code == _SESSION_TAKEN_OVER and now - self._taken_over_at >= TAKEN_OVER_LOG_S:
            self._taken_over_at = now
            log.warning(
                "broker %s closed this connection because another client connected with the "
                "client id %s; give each agent its own terminal id and each service its own "
                "service.instance",
                self._options.address,
                self._options.client_id,
            )
        if self._connected.is_set() and not self._stopping.is_set():
            log.info("connection to %s lost: %s", self._options.address, reason_code)
        self._connected.clear()
        self._subscribed.clear()
        if self._fatal is None:
            self._settled.clear()

    def _handle_message(self, client, userdata, message) -> None:
        handler = self._handlers.get(message.topic)
        if handler is None:
            for pattern, candidate in self._handlers.items():
                if mqtt.topic_matches_sub(pattern, message.topic):
                    handler = candidate
                    break
        if handler is None:
            return
        try:
            handler(message.topic, message.payload)
        except Exception:
            log.exception("error handling a message on %s", message.topic)
