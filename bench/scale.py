"""Service scale: memory, state updates absorbed per second and routing time at 1k to 100k terminals.

The service's config takes one mailbox per user, and 25,000 Maildir watchers
(one thread each) would measure the watchers, not the registry. So each size
runs in a fresh Python process of its own that holds a :class:`PushService`
built from a config of ``terminals / 4`` users, without starting its broker
link or watchers, and feeds its MQTT message handler directly:

- RSS: the process's resident set size with every terminal registered, and
  its growth from before the first state divided by the terminals;
- updates/s: UsageState payloads through the service's state handler (topic
  check, decode, registry update), first all terminals at once (the burst),
  then each terminal again with a newer state;
- routing: ``Router.route`` for random users, the policy decision alone
  (no probes: report mode ``timed``).

At 1,000 terminals the burst also goes through a real Mosquitto: the load
generator publishes every state at once to a running service, and the time
until its registry holds them all gives the rate absorbed over MQTT.
"""

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._procstat import read_memory
from bench.loadgen import HEARTBEAT_S, LoadGenerator, state_payloads, user_ids
from bench.push_path import make_maildir, sample_mail
from bench.runner import Row, Section, Stats, goal_row

ROUTES = 2000
MQTT_BURST_TIMEOUT_S = 120.0


def run(broker_url: str, port: int, sizes: list[int]) -> Section:
    """Measure every size in ``sizes`` and the MQTT burst at the smallest; return the section."""
    section = Section("scale", "Service scale (registry and router, one process per size)")
    for size in sizes:
        result = _in_subprocess(size)
        label = f"{size:,} terminals"
        rss = Row(f"{label}: service RSS", value=result["rss_mb"], unit="MiB")
        per = Row(f"{label}: RSS per terminal", value=result["per_terminal_kib"], unit="KiB")
        burst = Row(f"{label}: burst absorbed", value=result["burst_per_s"], unit="updates/s")
        update = Row(f"{label}: updates absorbed", value=result["updates_per_s"], unit="updates/s")
        routing = Row(f"{label}: routing decision", Stats(**result["routing"]))
        heartbeat = Row(f"{label}: heartbeat load", value=size / HEARTBEAT_S, unit="updates/s")
        if size == 100_000:
            goal_row(rss, 500.0, what="")
            goal_row(update, 20_000.0, above=True, what="")
            goal_row(routing, 1.0)
            section.figures["service_100k_rss_mb"] = result["rss_mb"]
            section.figures["service_updates_per_s"] = result["updates_per_s"]
            section.figures["routing_p99_ms"] = round(result["routing"]["p99_ms"], 4)
        section.rows += [rss, per, heartbeat, burst, update, routing]
        section.figures[f"scale_{size}_rss_mb"] = result["rss_mb"]
        section.figures[f"scale_{size}_updates_per_s"] = result["updates_per_s"]
        section.figures[f"scale_{size}_routing_p99_ms"] = round(result["routing"]["p99_ms"], 4)

    smallest = min(sizes)
    with tempfile.TemporaryDirectory(prefix="mailpush-bench-") as folder:
        over_mqtt = mqtt_burst(broker_url, port, smallest, Path(folder))
    section.rows.append(
        Row(f"{smallest:,} terminals: burst over Mosquitto", value=over_mqtt, unit="updates/s")
    )
    section.figures["scale_mqtt_burst_per_s"] = over_mqtt
    section.notes = [
        "In-process: the service's state handler is called directly, without the broker "
        "and paho's network thread, which cost more per message than the handler.",
        "The heartbeat load is one state per terminal per 60 s (the agent's default).",
    ]
    return section


def measure_size(size: int) -> dict[str, Any]:
    """Measure one size in this process; meant for a fresh process, see :func:`run`."""
    from mailpush.protocol.topics import TopicKind
    from mailpush.server.config import build_config
    from mailpush.server.outbox import Outbox
    from mailpush.server.router import Router
    from mailpush.server.service import PushService
    from mailpush.server.summary import summarize

    workdir = Path(tempfile.mkdtemp(prefix="mailpush-bench-scale-"))
    users = [
        {"id": user, "report_mode": "timed", "mailbox": {"kind": "maildir", "path": str(workdir)}}
        for user in user_ids(size)
    ]
    config = build_config(
        {
            "broker": {"url": "mqtt://127.0.0.1:1"},
            "service": {"state_dir": str(workdir / "state")},
            "users": users,
        }
    )
    service = PushService(config)
    (workdir / "state").mkdir()
    # The state handler looks up unacknowledged pushes when a terminal comes on.
    service.outbox = Outbox(workdir / "state" / "outbox.sqlite3", 30.0, 86400.0).__enter__()
    handle = service._on_state
    baseline_mb = read_memory_self()

    def absorb(messages: list[tuple[str, bytes]]) -> float:
        started = time.perf_counter()
        for topic, payload in messages:
            service._dispatch(TopicKind.STATE, handle, topic, payload)
        return len(messages) / (time.perf_counter() - started)

    burst_per_s = absorb(state_payloads(size, seq=1))
    updates_per_s = absorb(state_payloads(size, seq=2))
    rss_mb = read_memory_self()
    assert service.registry.count() == size, service.registry.count()

    router = Router(config.service, service.registry, service.policies, lambda *args: None)
    summary = summarize(sample_mail(0), "1-1", False)
    chosen = random.Random(1)
    samples = []
    for _ in range(ROUTES):
        user = config.users[chosen.randrange(len(config.users))]
        started = time.perf_counter()
        router.route(user, summary)
        samples.append((time.perf_counter() - started) * 1000)
    stats = Stats.of(samples)
    return {
        "rss_mb": round(rss_mb, 1),
        "per_terminal_kib": round((rss_mb - baseline_mb) * 1024 / size, 2),
        "burst_per_s": round(burst_per_s),
        "updates_per_s": round(updates_per_s),
        "routing": stats.__dict__,
    }


def read_memory_self() -> float:
    """Return this process's RSS in MiB."""
    import os

    return read_memory(os.getpid()).rss_mib


def mqtt_burst(broker_url: str, port: int, size: int, workdir: Path) -> float:
    """Publish ``size`` states at once to a running service and return the updates/s absorbed."""
    import threading

    from mailpush.server.config import build_config
    from mailpush.server.service import PushService

    entries = [
        {
            "id": user,
            "report_mode": "timed",
            "mailbox": {"kind": "maildir", "path": str(make_maildir(workdir / user))},
        }
        for user in user_ids(size)
    ]
    config = build_config(
        {
            "broker": {"url": broker_url},
            "service": {"state_dir": str(workdir / "state"), "instance": "scale"},
            "users": entries,
        }
    )
    service = PushService(config)
    thread = threading.Thread(target=service.run, name="bench-scale-service", daemon=True)
    thread.start()
    generator = None
    try:
        if not service.ready.wait(60):
            raise RuntimeError("the push service for the MQTT burst was not ready within 60 s")
        generator = LoadGenerator(port)
        messages = state_payloads(size, seq=int(time.time()))
        started = time.perf_counter()
        generator.burst(messages)
        deadline = time.monotonic() + MQTT_BURST_TIMEOUT_S
        while service.registry.count() < size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the registry held {service.registry.count()} of {size} states")
            time.sleep(0.001)
        return round(size / (time.perf_counter() - started))
    finally:
        if generator is not None:
            generator.close()
        service.stop()
        thread.join(15)


def _in_subprocess(size: int) -> dict[str, Any]:
    code = f"import json; from bench.scale import measure_size; print(json.dumps(measure_size({size})))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"scale measurement of {size} terminals failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
