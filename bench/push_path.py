"""Push path latency: a raw MQTT hop, the same hop through the service, IMAP and Maildir.

Four measurements on a Mosquitto on loopback configured as packaging/mosquitto
does (``set_tcp_nodelay true``), the first two also on one with its defaults.
Each mail is sent only after the previous one was shown, so the figures are
latency, not throughput:

1. raw hop (the reference): a paho publisher to a paho subscriber, QoS 1,
   with a Push payload of the usual size, with and without TCP_NODELAY on
   both clients' sockets, and on a Mosquitto with its defaults;
2. service hop: the mail handed to the service's ``_on_mail`` (summary,
   outbox, routing, publish) until the agent's receiver has shown it;
3. APPEND on a real Dovecot until shown, split at the moment the service
   is handed the mail (after the IDLE response and our FETCH);
4. a Maildir file renamed into ``new/`` until shown.

See bench/pipeline.py for where the service and receiver run.
"""

import os
import random
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.pipeline import TERMINAL, Pipeline, running_pipeline
from bench.runner import Row, Section, Stats, goal_row
from mailpush.protocol.messages import Push, encode
from mailpush.server.summary import summarize

HOP_TIMEOUT_S = 10.0
SHOWN_TIMEOUT_S = 30.0
WARM_UP = 5
WARM_UP_ATTEMPTS = 6
MAILDIR_JITTER_S = 0.25
WARM_UP_WAIT_S = 5.0


def run(broker_url: str, port: int, count: int, tuned_url: str, tuned_port: int) -> Section:
    """Run every measurement with ``count`` samples each and return the section.

    ``tuned_url`` and ``tuned_port`` name a Mosquitto with ``set_tcp_nodelay
    true``, as packaging/mosquitto configures it: the headline figures are
    measured there. ``broker_url`` and ``port`` name one with Mosquitto's
    defaults, for comparison.
    """
    section = Section("push_path", "Push path (Mosquitto on loopback, QoS 1)")
    raw_on = Stats.of(raw_hop(tuned_port, count, nodelay=True))
    raw_off = Stats.of(raw_hop(tuned_port, count, nodelay=False))
    raw_default = Stats.of(raw_hop(port, count, nodelay=True))
    reference = raw_on.p99_ms
    section.rows += [
        Row("raw paho hop (reference)", raw_on),
        Row("raw paho hop, client TCP_NODELAY off", raw_off, reference=reference),
        Row("raw paho hop, broker default", raw_default, reference=reference),
    ]

    with tempfile.TemporaryDirectory(prefix="mailpush-bench-") as folder:
        routed, routing, delivery = (
            Stats.of(samples) for samples in _service_hop(tuned_url, Path(folder), count)
        )
    with tempfile.TemporaryDirectory(prefix="mailpush-bench-") as folder:
        default, _, default_delivery = (
            Stats.of(samples) for samples in _service_hop(broker_url, Path(folder), count)
        )
    overhead = routed.p99_ms - reference
    section.rows += [
        Row("mail handed to service -> shown", routed, reference=reference),
        Row("  handed -> published (summary, routing, outbox)", routing),
        Row("  published -> shown (MQTT, receiver, inbox)", delivery, reference=reference),
        goal_row(Row("overhead over the raw hop at p99", value=overhead), 5.0, what=""),
        Row("mail handed to service -> shown, broker default", default, reference=reference),
        Row("  published -> shown, broker default", default_delivery, reference=reference),
    ]

    with tempfile.TemporaryDirectory(prefix="mailpush-bench-") as folder:
        imap = _dovecot(tuned_url, Path(folder), count)
    total, dovecot_share, ours = (Stats.of(samples) for samples in imap)
    section.rows.append(Row("IMAP APPEND -> shown (total)", total, reference=reference))
    section.rows.append(Row("  APPEND -> service handed the mail (Dovecot)", dovecot_share))
    section.rows.append(goal_row(Row("  service handed the mail -> shown (ours)", ours), 5.0))

    with tempfile.TemporaryDirectory(prefix="mailpush-bench-") as folder:
        maildir, maildir_watcher = (
            Stats.of(samples) for samples in _maildir(tuned_url, Path(folder), count)
        )
    section.rows.append(
        goal_row(Row("Maildir file renamed into new/ -> shown", maildir, reference=reference), 20.0)
    )
    section.rows.append(Row("  renamed -> service handed the mail (watcher)", maildir_watcher))

    section.figures = {
        "raw_hop_nodelay_p50_ms": round(raw_on.median_ms, 3),
        "raw_hop_nodelay_p99_ms": round(raw_on.p99_ms, 3),
        "raw_hop_no_nodelay_p50_ms": round(raw_off.median_ms, 3),
        "raw_hop_no_nodelay_p99_ms": round(raw_off.p99_ms, 3),
        "raw_hop_default_broker_p99_ms": round(raw_default.p99_ms, 3),
        "service_hop_p50_ms": round(routed.median_ms, 3),
        "service_hop_p99_ms": round(routed.p99_ms, 3),
        "push_overhead_p99_ms": round(overhead, 3),
        "service_to_publish_p99_ms": round(routing.p99_ms, 3),
        "publish_to_shown_p99_ms": round(delivery.p99_ms, 3),
        "service_hop_default_broker_p50_ms": round(default.median_ms, 3),
        "service_hop_default_broker_p99_ms": round(default.p99_ms, 3),
        "push_overhead_default_broker_p99_ms": round(default.p99_ms - raw_default.p99_ms, 3),
        "append_to_notify_p50_ms": round(total.median_ms, 1),
        "append_to_notify_p99_ms": round(total.p99_ms, 1),
        "append_dovecot_share_p50_ms": round(dovecot_share.median_ms, 1),
        "append_dovecot_share_p99_ms": round(dovecot_share.p99_ms, 1),
        "append_our_share_p50_ms": round(ours.median_ms, 3),
        "append_our_share_p99_ms": round(ours.p99_ms, 3),
        "maildir_to_notify_p50_ms": round(maildir.median_ms, 1),
        "maildir_to_notify_p99_ms": round(maildir.p99_ms, 1),
        "maildir_watcher_p99_ms": round(maildir_watcher.p99_ms, 3),
        "push_path_samples": count,
    }
    section.notes = [
        "The ratio column divides a row's p99 by the reference's p99.",
        "Rows without 'broker default' run on a Mosquitto with set_tcp_nodelay true, as "
        "packaging/mosquitto configures it. Mosquitto's default leaves Nagle's algorithm on "
        "for the broker's own sockets.",
        "The service, its broker link and the receiver run in one Python process "
        "(bench/pipeline.py); the notifier logs instead of calling D-Bus.",
        "The Dovecot share ends when the service is handed the mail, so it includes "
        "the IDLE notification delay of Dovecot and our FETCH of the message.",
        "The Maildir watcher is woken by inotify; its row ends when the service is handed "
        "the mail.",
    ]
    return section


def raw_hop(port: int, count: int, *, nodelay: bool) -> list[float]:
    """Return ``count`` publish-to-receive times of a QoS 1 paho hop, in milliseconds."""
    payload = _push_payload()
    received = threading.Event()
    topic = f"bench/raw/{uuid.uuid4().hex}"
    subscriber = _paho_client(nodelay)
    subscriber.on_message = lambda client, userdata, message: received.set()
    subscribed = threading.Event()
    subscriber.on_subscribe = lambda *args: subscribed.set()
    publisher = _paho_client(nodelay)
    clients = (subscriber, publisher)
    try:
        for client in clients:
            client.connect("127.0.0.1", port)
            client.loop_start()
        subscriber.subscribe(topic, qos=1)
        if not subscribed.wait(HOP_TIMEOUT_S):
            raise RuntimeError("the raw hop's subscriber was not acknowledged")

        samples = []
        for index in range(count + WARM_UP):
            received.clear()
            started = time.perf_counter()
            publisher.publish(topic, payload, qos=1)
            if not received.wait(HOP_TIMEOUT_S):
                raise RuntimeError(f"raw hop message {index} did not arrive")
            if index >= WARM_UP:
                samples.append((time.perf_counter() - started) * 1000)
        return samples
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()


def _paho_client(nodelay: bool) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)

    def set_nodelay(client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)

    client.on_socket_open = set_nodelay
    return client


def _service_hop(
    broker_url: str, workdir: Path, count: int
) -> tuple[list[float], list[float], list[float]]:
    """Return the total, the service's part (to publish) and the MQTT plus receiver part."""
    mailbox = {"kind": "maildir", "path": str(make_maildir(workdir / "Maildir"))}
    with running_pipeline(broker_url, workdir, mailbox) as pipeline:
        started: dict[str, float] = {}
        for index in range(count + WARM_UP):
            mail_id = f"direct-{index}"
            raw = sample_mail(index)  # built outside the timed span
            started[mail_id] = time.time()
            pipeline.route_now(mail_id, raw)
            pipeline.wait_shown(mail_id, SHOWN_TIMEOUT_S)
        pipeline.collect_sent()

    total, service, delivery = [], [], []
    for mail_id in list(started)[WARM_UP:]:
        begin, sent, shown = started[mail_id], pipeline.sent[mail_id], pipeline.shown[mail_id]
        total.append((shown - begin) * 1000)
        service.append((sent - begin) * 1000)
        delivery.append((shown - sent) * 1000)
    return total, service, delivery


def _dovecot(
    broker_url: str, workdir: Path, count: int
) -> tuple[list[float], list[float], list[float]]:
    # Imported here so that the other benchmarks run where Dovecot's fixture cannot.
    from tests.fixtures.dovecot import DovecotServer

    with DovecotServer() as dovecot, dovecot.client() as appender:
        secret = workdir / "imap-password"
        secret.write_text(dovecot.password, encoding="utf-8")
        secret.chmod(0o600)
        mailbox = {
            "kind": "imap", "host": "127.0.0.1", "port": dovecot.port, "tls": False,
            "username": dovecot.user, "password_file": str(secret),
        }  # fmt: skip
        with running_pipeline(broker_url, workdir, mailbox) as pipeline:

            def append(index: int) -> str:
                response = appender.append("INBOX", sample_mail(index))
                uidvalidity, uid = _appended_uid(response)
                return f"{uidvalidity}-{uid}"

            _warm_up(pipeline, append)
            total, server, ours = [], [], []
            for index in range(count):
                started = time.time()
                mail_id = append(index)
                shown = pipeline.wait_shown(mail_id, SHOWN_TIMEOUT_S)
                learned = pipeline.learned[mail_id]
                total.append((shown - started) * 1000)
                server.append((learned - started) * 1000)
                ours.append((shown - learned) * 1000)
            return total, server, ours


def _maildir(broker_url: str, workdir: Path, count: int) -> tuple[list[float], list[float]]:
    """Return the rename-to-shown times and the rename-to-handed times (the watcher's part)."""
    folder = make_maildir(workdir / "Maildir")
    mailbox = {"kind": "maildir", "path": str(folder)}
    with running_pipeline(broker_url, workdir, mailbox) as pipeline:

        def deliver(index: int) -> str:
            name = f"{int(time.time())}.M{index}P{os.getpid()}.bench"
            draft = folder / "tmp" / name
            draft.write_bytes(sample_mail(index))
            # The Maildir convention: write in tmp/, then rename into new/.
            os.rename(draft, folder / "new" / name)
            return name

        _warm_up(pipeline, deliver)
        shown_ms, handed_ms = [], []
        for index in range(count):
            # A random pause, so that deliveries do not fall at the same point
            # of any periodic work in the watcher or the broker.
            time.sleep(random.uniform(0, MAILDIR_JITTER_S))
            name = deliver(index)
            started = time.time()
            shown = pipeline.wait_shown(name, SHOWN_TIMEOUT_S)
            shown_ms.append((shown - started) * 1000)
            handed_ms.append((pipeline.learned[name] - started) * 1000)
        return shown_ms, handed_ms


def _warm_up(pipeline: Pipeline, deliver: Callable[[int], str]) -> None:
    """Deliver warm-up mails until one is shown.

    The watcher records its baseline on its first pass, and a mail that is
    already there then counts as old mail and is never pushed.
    """
    for attempt in range(WARM_UP_ATTEMPTS):
        mail_id = deliver(-1 - attempt)
        try:
            pipeline.wait_shown(mail_id, WARM_UP_WAIT_S)
        except TimeoutError:
            continue
        return
    raise RuntimeError(f"no warm-up mail was shown after {WARM_UP_ATTEMPTS} attempts")


def _appended_uid(response: bytes) -> tuple[int, int]:
    """Return the UIDVALIDITY and UID of an APPEND response.

    RFC 4315 (UIDPLUS) APPENDUID: "[APPENDUID <uidvalidity> <uid>] Append completed."
    Both come from the response, because INBOX may not exist before the first APPEND.
    """
    text = response.decode() if isinstance(response, bytes) else str(response)
    fields = text.split("APPENDUID", 1)[1].split()
    return int(fields[0]), int(fields[1].rstrip("]"))


def make_maildir(folder: Path) -> Path:
    """Create an empty Maildir (``cur``, ``new``, ``tmp``) and return its path."""
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return folder


def sample_mail(number: int) -> bytes:
    """Return a short plain-text mail with a numbered subject."""
    message = EmailMessage()
    message["From"] = "Bench <bench@example.org>"
    message["To"] = "alice@example.org"
    message["Subject"] = f"latency sample {number}"
    message["Message-ID"] = f"<bench-{number}-{uuid.uuid4().hex}@example.org>"
    message.set_content("A short body of a few words, like most notifications show.\n")
    return bytes(message)


def _push_payload() -> bytes:
    summary = summarize(sample_mail(0), "1-1", False)
    push = Push(
        id=uuid.uuid4().hex, kind="mail", mail=summary, delivered_to=[TERMINAL],
        reason="most-active: laptop is active", ts=round(time.time(), 3),
    )  # fmt: skip
    return encode(push)
