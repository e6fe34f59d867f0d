"""Push service instances sharing one broker and one state folder, with simulated terminals.

Used by the scale-out tests and by ``bench/scaleout.py``. Each user has a
Maildir and two terminals whose retained states the harness publishes: one
``active``, one ``idle``, so that every mail push goes to the active one. A
collector subscribes to every inbox and records each ``mail`` push with the
time it arrived.
"""

import json
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mailpush.protocol.messages import UsageState, encode
from mailpush.protocol.topics import Topics
from tests.processes import SERVER, Running, home_env, start

TERMINALS = (("desk", "active"), ("pi", "idle"))


@dataclass
class Arrival:
    """The first ``mail`` push of one mail, and how many distinct pushes carried it."""

    first: float
    push_ids: set[str] = field(default_factory=set)


class Cluster:
    """Writes one config per instance, starts instances, delivers mail, collects pushes.

    Args:
        workdir: an empty folder for Maildirs, state, configs and logs.
        port: a running Mosquitto's port on 127.0.0.1.
        users: the user ids every instance is configured with.
        service_lines: more lines for the ``[service]`` table of every instance.
    """

    def __init__(
        self, workdir: Path, port: int, users: list[str], service_lines: tuple[str, ...] = ()
    ) -> None:
        self.workdir = workdir
        self.service_lines = service_lines
        self.port = port
        self.users = users
        self.topics = Topics()
        self.instances: dict[str, Running] = {}
        self.broker_pid: int | None = None
        """The broker's process id, where the caller started it; read by the benchmark."""
        self._lock = threading.Lock()
        self._arrivals: dict[tuple[str, str], Arrival] = {}
        self._counter = 0
        for user in users:
            for sub in ("cur", "new", "tmp"):
                (self.maildir(user) / sub).mkdir(parents=True, exist_ok=True)
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cluster-harness")
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        self._client.subscribe(f"{self.topics.root}/+/terminals/+/inbox", qos=1)
        self._publish_states()

    def maildir(self, user: str) -> Path:
        """Return the Maildir of ``user``."""
        return self.workdir / "mail" / user

    def start(self, instance: str, log_level: str = "debug") -> Running:
        """Start ``mailpush-server start`` as ``instance`` and wait until it is ready."""
        config = self._write_config(instance)
        home = self.workdir / f"home-{instance}"
        running = start(
            [SERVER, "start", "--config", str(config), "--log-level", log_level],
            home_env(home),
            self.workdir / f"{instance}.log",
        )
        running.wait_for_log("ready:", timeout=30)
        self.instances[instance] = running
        return running

    def deliver(self, user: str) -> str:
        """Deliver one new mail to ``user``'s Maildir; return its mail id."""
        return self.publish_draft(user, self.write_draft(user))

    def write_draft(self, user: str) -> str:
        """Write a new mail into ``tmp/`` of ``user``'s Maildir; return its name."""
        with self._lock:
            self._counter += 1
            number = self._counter
        name = f"{int(time.time())}.M{number}P{os.getpid()}.cluster"
        (self.maildir(user) / "tmp" / name).write_bytes(_mail(number))
        return name

    def publish_draft(self, user: str, name: str) -> str:
        """Move a draft into ``new/``, the Maildir way of delivering it; return its mail id."""
        folder = self.maildir(user)
        os.rename(folder / "tmp" / name, folder / "new" / name)
        return name

    def arrivals(
        self, keys: list[tuple[str, str]], timeout: float
    ) -> dict[tuple[str, str], Arrival]:
        """Wait until each (user, mail id) in ``keys`` was pushed; return what arrived by then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(key in self._arrivals for key in keys):
                    break
            time.sleep(0.02)
        with self._lock:
            return {key: self._arrivals[key] for key in keys if key in self._arrivals}

    def warm_up(self, timeout: float = 20.0) -> None:
        """Push one mail per user, so that every watcher has recorded its baseline.

        A watcher's first pass takes the mails it finds as old ones, so a mail
        delivered before that pass is never pushed. This delivers again until
        one is.
        """
        waiting = set(self.users)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            keys = [(user, self.deliver(user)) for user in sorted(waiting)]
            arrived = self.arrivals(keys, timeout=2.0)
            waiting -= {user for user, _ in arrived}
        if waiting:
            raise AssertionError(f"no push for users {sorted(waiting)} after {timeout} s")

    def close(self) -> None:
        """Stop every instance and the collector."""
        for running in self.instances.values():
            running.terminate()
        self._client.disconnect()
        self._client.loop_stop()

    def _publish_states(self) -> None:
        now = time.time()
        for user in self.users:
            for terminal, state in TERMINALS:
                payload = UsageState(
                    user=user, terminal=terminal, state=state, since=now - 60, ts=now, seq=1,
                    confidence=0.9,
                )  # fmt: skip
                topic = self.topics.state(user, terminal)
                self._client.publish(topic, encode(payload), qos=1, retain=True).wait_for_publish(
                    10
                )

    def _on_message(self, client, userdata, message) -> None:
        push = json.loads(message.payload)
        if push.get("kind") != "mail":
            return
        user = message.topic.split("/")[-4]
        key = (user, push["mail"]["id"])
        with self._lock:
            arrival = self._arrivals.setdefault(key, Arrival(time.monotonic()))
            arrival.push_ids.add(push["id"])

    def _write_config(self, instance: str) -> Path:
        lines = [
            "[broker]",
            f'url = "mqtt://127.0.0.1:{self.port}"',
            "[service]",
            f'instance = "{instance}"',
            f'state_dir = "{self.workdir / "state"}"',
            "resend_after_s = 2",
            *self.service_lines,
        ]
        for user in self.users:
            lines += [
                "[[users]]",
                f'id = "{user}"',
                f'mailbox = {{ kind = "maildir", path = "{self.maildir(user)}" }}',
            ]
        path = self.workdir / f"server-{instance}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path


def _mail(number: int) -> bytes:
    message = EmailMessage()
    message["From"] = "Cluster <cluster@example.org>"
    message["To"] = "someone@example.org"
    message["Subject"] = f"cluster mail {number}"
    message["Message-ID"] = f"<cluster-{number}-{time.time_ns()}@example.org>"
    message.set_content("A short body.\n")
    return bytes(message)


def counts(arrivals: dict[tuple[str, str], Arrival]) -> dict[int, int]:
    """Return how many mails were carried by 1, 2, ... distinct pushes."""
    histogram: dict[int, int] = defaultdict(int)
    for arrival in arrivals.values():
        histogram[len(arrival.push_ids)] += 1
    return dict(histogram)
