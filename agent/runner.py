"""The agent's main loop: read sensors, fuse, publish, respond to probes.

Sensors run on their own schedule: event plugins (input, PIR) wake the loop,
polled plugins (power, temperature) are read when due. The loop publishes a
UsageState when the state changes, when a probe asks, after a resume from
suspend, and on every heartbeat.
"""

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import msgspec

import mailpush
from mailpush.agent.config import AgentConfig
from mailpush.agent.fusion import Fused, fuse, merge_readings
from mailpush.agent.inbox import Inbox
from mailpush.agent.notify import Notifier
from mailpush.agent.plugins import PluginHost
from mailpush.agent.receiver import Receiver
from mailpush.agent.suspend import detect_suspend, discount_suspend
from mailpush.errors import PayloadError
from mailpush.protocol.ids import agent_client_id
from mailpush.protocol.link import Link, LinkOptions, Will
from mailpush.protocol.messages import (
    AgentInfo,
    DeviceAttributes,
    Display,
    MailStatus,
    Probe,
    UsageState,
    decode,
    encode,
)
from mailpush.protocol.topics import Topics
from mailpush.sensors.base import clock
from mailpush.sensors.registry import PluginEntry

log = logging.getLogger(__name__)

AGENT_NAME = "mailpush-agent"
MAX_WAIT_S = 1.0
STOP_PUBLISH_TIMEOUT_S = 3.0


def status_path(state_dir: Path, user: str, terminal: str) -> Path:
    """Return the file where a running agent records what it last published."""
    return state_dir / f"agent-{user}-{terminal}.json"


def inbox_path(data_dir: Path, user: str, terminal: str) -> Path:
    """Return the inbox file of one terminal; one per terminal, so several agents can share a home."""
    return data_dir / f"inbox-{user}-{terminal}.sqlite3"


class Agent:
    """One terminal's agent: plugins, fusion and the MQTT link, run until stopped."""

    def __init__(
        self,
        config: AgentConfig,
        plugins: Mapping[str, PluginEntry],
        state_dir: Path,
        data_dir: Path,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.topics = Topics(config.broker.topic_root)
        self.state_dir = state_dir
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._probes: list[str] = []
        self._probes_lock = threading.Lock()
        self._host = PluginHost(config.sensors, plugins, self._wake.set)
        self._seq = 0
        self._started_wall = time.time()
        self._fused: Fused | None = None
        self._last_published: UsageState | None = None
        self._link = Link(
            LinkOptions(
                address=config.address,
                client_id=agent_client_id(config.user, config.terminal),
                username=config.broker.username,
                password=config.broker.password(),
                ca_file=config.broker.ca_file,
                protocol=config.broker.protocol,
                keepalive_s=config.broker.keepalive_s,
            ),
            will=Will(self.topics.state(config.user, config.terminal), self._will_payload),
            on_connected=self._on_connected,
        )
        self._reconnected = False

    def stop(self) -> None:
        """Ask the loop to stop; safe from a signal handler or another thread."""
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        """Run until :meth:`stop`; publish ``off`` (reason ``stopped``) on the way out.

        Raises:
            MailpushError: when the broker rejects the credentials or certificate.
        """
        user, terminal = self.config.user, self.config.terminal
        inbox = Inbox(inbox_path(self.data_dir, user, terminal))
        notifier = Notifier(
            on_mail=self.config.receiver.on_mail,
            desktop=self.config.receiver.notify,
            on_mark_read=lambda mail_id: self._mark_read(inbox, mail_id),
        )
        ack_topic = self.topics.ack(user, terminal)
        receiver = Receiver(inbox, notifier, lambda payload: self._link.publish(ack_topic, payload))
        receiver.start()

        self._host.start()
        self._link.subscribe(self.topics.probe(user, terminal), self._on_probe)
        self._link.subscribe(self.topics.inbox(user, terminal), receiver.on_message)
        self._link.publish_retained(
            self.topics.attributes(user, terminal), encode(self._attributes())
        )
        self._link.start()
        log.info("agent %s/%s started; broker %s", user, terminal, self.config.address)

        try:
            self._loop()
        finally:
            self._shutdown()
            receiver.stop()
            inbox.close()

        if self._link.fatal_error is not None:
            raise self._link.fatal_error

    def _mark_read(self, inbox: Inbox, mail_id: str) -> None:
        """Mark a mail read from its notification's button, here and through the service.

        Like ``mailpush-agent inbox read``, it publishes a MailStatus, so the
        service marks the mail seen in the mailbox and tells the other terminals.
        Runs on the notifier's thread. Offline, the link queues the
        MailStatus until the connection is back.
        """
        changed = inbox.mark_read(mail_id)

        status = MailStatus(
            mail=mail_id, seen=True, by=self.config.terminal, ts=round(time.time(), 3)
        )
        self._link.publish(self.topics.mailstatus(self.config.user), encode(status))
        log.info(
            "mail %s marked read from its notification%s",
            mail_id,
            "" if changed else " (already read here)",
        )

    def _loop(self) -> None:
        heartbeat_due = 0.0
        last_mono, last_boot = time.monotonic(), clock()
        while not self._stop.is_set():
            if self._link.fatal_error is not None:
                return

            now = clock()
            slept = detect_suspend(last_boot, last_mono, now, time.monotonic(), MAX_WAIT_S * 2)
            last_mono, last_boot = time.monotonic(), now
            if slept:
                log.info("resumed after %.0f s in suspend", slept)

            reading = merge_readings(self._host.read_all(now))
            previous = self._fused
            if slept:
                # Start the fusion afresh: the hysteresis memory is from before
                # the sleep. Where clock() stops in suspend (macOS, Windows),
                # times from before the sleep are moved back by its length.
                previous = None
                if not sys.platform.startswith("linux"):
                    reading = discount_suspend(reading, now, slept)
            self._fused = fuse(
                reading,
                self.config.fusion,
                previous,
                now,
                input_since=self._host.input_since,
                zone=self.config.zone,
            )
            probes = self._take_probes()

            changed = previous is None or previous.state != self._fused.state
            reconnected, self._reconnected = self._reconnected, False
            if changed or probes or slept or reconnected or now >= heartbeat_due:
                answers: list[str | None] = list(probes) or [None]
                for probe in answers:
                    self._publish_state(self._fused, now, probe)
                heartbeat_due = now + self.config.heartbeat_s

            self._wait(now, heartbeat_due)

    def _wait(self, now: float, heartbeat_due: float) -> None:
        deadlines = [heartbeat_due, now + MAX_WAIT_S, self._host.next_poll()]
        if self._fused is not None and self._fused.recheck_at is not None:
            deadlines.append(self._fused.recheck_at)
        timeout = max(0.0, min(deadlines) - now)
        self._wake.wait(timeout)
        self._wake.clear()

    def _publish_state(self, fused: Fused, now: float, probe: str | None) -> None:
        wall = time.time()
        self._seq += 1
        message = UsageState(
            user=self.config.user,
            terminal=self.config.terminal,
            state=fused.state,
            since=round(wall - (now - fused.since), 3),
            ts=round(wall, 3),
            seq=self._seq,
            confidence=fused.confidence,
            evidence=fused.evidence,
            power=fused.power,
            position=fused.position,
            probe=probe,
            session=self._link.session,
        )
        self._link.publish_retained(
            self.topics.state(self.config.user, self.config.terminal), encode(message)
        )
        if self._last_published is None or self._last_published.state != message.state:
            log.info("state %s (confidence %.2f)", message.state, message.confidence)
        else:
            log.debug("state %s republished (seq %d)", message.state, message.seq)
        self._last_published = message
        self._write_status(message)

    def _off_state(self, reason: str) -> UsageState:
        wall = time.time()
        self._seq += 1
        return UsageState(
            user=self.config.user,
            terminal=self.config.terminal,
            state="off",
            since=round(wall, 3),
            ts=round(wall, 3),
            seq=self._seq,
            confidence=1.0,
            reason=reason,  # type: ignore[arg-type]
            session=self._link.session,
        )

    def _will_payload(self) -> bytes:
        return encode(self._off_state("connection-lost"))

    def _shutdown(self) -> None:
        if self._link.fatal_error is None and self._link.connected:
            message = self._off_state("stopped")
            info = self._link.publish_retained(
                self.topics.state(self.config.user, self.config.terminal), encode(message)
            )
            if info is not None:
                try:
                    info.wait_for_publish(STOP_PUBLISH_TIMEOUT_S)
                except (RuntimeError, ValueError) as exc:
                    log.warning("could not publish the off state: %s", exc)
            self._write_status(message)
        self._link.stop()
        self._host.stop()
        log.info("agent stopped")

    def _on_connected(self) -> None:
        # Publish a state stamped with the new connection's session at once,
        # so the registry can match it to this connection's last will.
        self._reconnected = True
        self._wake.set()

    def _on_probe(self, topic: str, payload: bytes) -> None:
        try:
            probe = decode(payload, Probe)
        except PayloadError as exc:
            log.warning("dropped a probe on %s: %s", topic, exc)
            return
        with self._probes_lock:
            self._probes.append(probe.id)
        self._wake.set()

    def _take_probes(self) -> list[str]:
        with self._probes_lock:
            probes, self._probes = self._probes, []
        return probes

    def _attributes(self) -> DeviceAttributes:
        facts = self._host.attributes()
        display = facts.get("display")
        return DeviceAttributes(
            kind=facts.get("kind", "other"),  # type: ignore[arg-type]
            name=str(facts.get("name", "")),
            capabilities=list(facts.get("capabilities", [])),  # type: ignore[arg-type]
            display=msgspec.convert(display, Display) if isinstance(display, dict) else display,  # type: ignore[arg-type]
            wakeable=bool(facts.get("wakeable", False)),
            agent=AgentInfo(name=AGENT_NAME, version=mailpush.__version__),
        )

    def _write_status(self, message: UsageState) -> None:
        status = {
            "pid": os.getpid(),
            "broker": str(self.config.address),
            "connected": self._link.connected,
            "published": msgspec.to_builtins(message),
            "sensors": self._host.describe(),
        }
        path = status_path(self.state_dir, self.config.user, self.config.terminal)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_bytes(msgspec.json.encode(status))
            os.replace(temporary, path)
        except OSError as exc:
            log.debug("could not write %s: %s", path, exc)
