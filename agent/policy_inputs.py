"""What the ``policy`` commands read: the broker's retained messages, terminals, mail traits.

:class:`BrokerSession` is a short-lived MQTT connection with a clean session
and the client id ``mailpush-policy.{user}.{terminal}.{random}``. Ids cannot
contain a dot, so it never takes over the session of an agent
(``mailpush-{user}-{terminal}``) or of the service (``mailpush-service-{instance}``).

The agent must not import the service, so this module also rebuilds two
things the service computes. The first is the router's view of each terminal
from its retained state and attributes, as server/registry.py builds it. The
second is the traits of a mail that a policy matches on, as server/summary.py
reads them. Keep both in step with those modules; tests/test_policy_cli.py
checks the mail traits against the service's summary.
"""

import dataclasses
import email
import email.policy
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from mailpush.agent.config import AgentConfig
from mailpush.errors import AuthenticationError, BrokerError, ConfigError, PayloadError
from mailpush.protocol.messages import (
    Attachment,
    DeviceAttributes,
    MailSummary,
    UsageState,
    decode,
)
from mailpush.protocol.policy import TerminalView
from mailpush.protocol.topics import TopicKind, Topics

CONNECT_TIMEOUT_S = 5.0
PUBACK_TIMEOUT_S = 5.0

# CONNACK reason codes of MQTT 5.0 section 3.2.2.2; paho maps the 3.1.1 return codes onto them.
_REFUSED_LOGIN = (0x86, 0x87)


def cli_client_id(user: str, terminal: str) -> str:
    """Return a client id for one policy command, distinct from every agent and service id."""
    return f"mailpush-policy.{user}.{terminal}.{secrets.token_hex(4)}"


class BrokerSession:
    """A short-lived MQTT connection: read retained messages, publish one retained message.

    It uses MQTT 3.1.1 with a clean session unless the config sets ``protocol = "5"``,
    because every broker speaks 3.1.1 and a one-off command needs no session.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.address = config.address
        v5 = config.broker.protocol == "5"
        self._v5 = v5
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cli_client_id(config.user, config.terminal),
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
        extra = {"clean_start": True} if self._v5 else {}
        try:
            self._client.connect(self.address.host, self.address.port, keepalive=30, **extra)
        except ssl.SSLCertVerificationError as exc:
            msg = f"{where}: TLS certificate verification failed: {exc.verify_message}; check broker.ca_file"
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

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish retained at QoS 1 and wait for the broker's PUBACK.

        Raises:
            BrokerError: the PUBACK did not arrive within ``PUBACK_TIMEOUT_S``.
        """
        info = self._client.publish(topic, payload, qos=1, retain=True)
        try:
            info.wait_for_publish(PUBACK_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:
            msg = f"broker {self.address}: publishing the policy failed: {exc}"
            raise BrokerError(msg) from None
        if not info.is_published():
            msg = f"broker {self.address}: no PUBACK within {PUBACK_TIMEOUT_S:.0f} s; the policy may not be in force, run the command again"
            raise BrokerError(msg)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = reason_code
        self._connected.set()

    def _on_message(self, client, userdata, message) -> None:
        with self._changed:
            self.messages[message.topic] = message.payload
            self._changed.notify_all()


# The service's guard against a crafted mail whose MIME parts nest deeply enough to exhaust the stack.
MAX_DEPTH = 30


def terminal_views(
    topics: Topics, user: str, retained: dict[str, bytes], now: float, stale_after_s: float
) -> tuple[list[TerminalView], list[str]]:
    """Build the router's view of each terminal from its retained state and attributes.

    This follows the service's registry: a state older than ``stale_after_s``
    is unknown unless it is ``off``, a payload whose ids do not match its topic
    is dropped, and ``input_idle_s`` grows by the state's age.

    Returns:
        The views sorted by terminal id, and one line per payload that was dropped.
    """
    states: dict[str, UsageState] = {}
    attributes: dict[str, DeviceAttributes] = {}
    dropped: list[str] = []
    for topic, payload in retained.items():
        ref = topics.parse(topic)
        if ref is None or ref.user != user or ref.terminal is None:
            continue
        try:
            if ref.kind is TopicKind.STATE:
                state = decode(payload, UsageState)
                if (state.user, state.terminal) != (user, ref.terminal):
                    dropped.append(f"{topic}: the user or terminal does not match the topic")
                    continue
                states[ref.terminal] = state
            elif ref.kind is TopicKind.ATTRIBUTES:
                attributes[ref.terminal] = decode(payload, DeviceAttributes)
        except PayloadError as exc:
            dropped.append(f"{topic}: {exc}")

    views = []
    for terminal in sorted(set(states) | set(attributes)):
        views.append(
            _view(terminal, states.get(terminal), attributes.get(terminal), now, stale_after_s)
        )
    return views, dropped


def _view(
    terminal: str,
    state: UsageState | None,
    attributes: DeviceAttributes | None,
    now: float,
    stale_after_s: float,
) -> TerminalView:
    known = state is not None and (state.state == "off" or now - state.ts <= stale_after_s)
    position = state.position if state is not None else None
    idle_s = None
    if known and state is not None and state.evidence.input_idle_s is not None:
        idle_s = state.evidence.input_idle_s + max(0.0, now - state.ts)
    return TerminalView(
        terminal=terminal,
        state=state.state if known and state is not None else None,
        kind=attributes.kind if attributes is not None else None,
        capabilities=frozenset(attributes.capabilities) if attributes is not None else frozenset(),
        proximity=position.proximity if position is not None else None,
        zone=position.zone if position is not None else None,
        input_idle_s=idle_s,
        ts=state.ts if state is not None else None,
    )


def describe_view(view: TerminalView, now: float) -> str:
    """Return one line for a person: the terminal, its state and what routing reads of it."""
    if view.state is not None:
        state = view.state
    elif view.ts is None:
        state = "unknown (no state published)"
    else:
        state = f"unknown (state {now - view.ts:.0f} s old)"
    words = [f"{view.terminal}: {state}", f"kind {view.kind or 'unknown'}"]
    words.append("capabilities " + ("+".join(sorted(view.capabilities)) or "none"))
    if view.input_idle_s is not None:
        words.append(f"input {view.input_idle_s:.0f} s ago")
    if view.proximity is not None:
        words.append(f"proximity {view.proximity:.2f}")
    if view.zone is not None:
        words.append(f"zone {view.zone}")
    return ", ".join(words)


def view_to_dict(view: TerminalView) -> dict[str, Any]:
    """Return ``view`` as plain values for JSON output."""
    shown = dataclasses.asdict(view)
    shown["capabilities"] = sorted(view.capabilities)
    return shown


# ---------------------------------------------------------------- mail traits


def mail_traits_from_eml(path: Path) -> MailSummary:
    """Read the traits a policy matches on from an RFC 5322 file.

    The rules follow the service's mail summary (server/summary.py): a mail has
    images when any non-multipart part is ``image/*``; an attachment is a part
    with ``Content-Disposition: attachment``, or a named part without a
    disposition; an attached message counts as one part and is not opened.

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        msg = f"--eml: cannot read {path}: {exc.strerror or exc}"
        raise ConfigError(msg) from None

    message = email.message_from_bytes(raw, policy=email.policy.default)
    parts = list(_leaf_parts(message, 0))
    attachments = [
        Attachment(name=part.get_filename() or "", type=_content_type(part), size=0)
        for part in parts
        if _is_attachment(part)
    ]
    return MailSummary(
        id="explain",
        sender=_header(message, "from"),
        subject=_header(message, "subject"),
        size=len(raw),
        has_images=any(_content_type(part).startswith("image/") for part in parts),
        attachments=attachments,
    )


def _leaf_parts(part: Message, depth: int) -> Iterator[Message]:
    if depth > MAX_DEPTH:
        return
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        for child in part.get_payload():
            if isinstance(child, Message):
                yield from _leaf_parts(child, depth + 1)
    else:
        yield part


def _is_attachment(part: Message) -> bool:
    disposition = part.get_content_disposition()
    if disposition == "attachment":
        return True
    return disposition is None and part.get_filename() is not None and not part.is_multipart()


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:  # malformed MIME headers; the service treats them the same way
        return "application/octet-stream"


def _header(message: Message, name: str) -> str:
    try:
        value = message.get(name)
    except Exception:  # a header that policy.default cannot decode is left empty
        return ""
    return " ".join(str(value).split()) if value is not None else ""
