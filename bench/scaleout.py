"""Scale-out: routing throughput of one and two service instances, and failover after a kill.

Each measurement runs real ``mailpush-server start`` processes on a Mosquitto
of its own, with Maildir users whose two simulated terminals the harness
publishes (tests/cluster.py). The instances share one state folder.

- Throughput: the mails of a burst (written to ``tmp/`` of every user's
  Maildir, then renamed into ``new/`` all at once) divided by the time from
  the first rename to the last mail push seen on the broker.
- Failover: with two instances running, one is killed with SIGKILL, and a
  mail is delivered to each of its users at once. The figure is the time
  until the survivor has pushed the last of them. Mails are also delivered
  to those users just before the kill, so some are in flight when it dies.
  The table counts the mails lost and the mails pushed twice.
"""

import os
import signal
import tempfile
import time
from pathlib import Path

import psutil

from bench.runner import Row, Section, Stats, goal_row
from mailpush.server.membership import owner
from tests.cluster import Cluster, counts
from tests.fixtures.mosquitto import Mosquitto, free_port
from tests.processes import Running

ARRIVAL_TIMEOUT_S = 120.0
# The default; the harness reads the "ready" and "handed over" lines.
LOG_LEVEL = "info"


def run(users: int, mails: int, failovers: int) -> Section:
    """Measure throughput with 1 and 2 instances and ``failovers`` kills; return the section."""
    section = Section("scaleout", "Scale-out (service instances sharing the users)")
    user_ids = [f"user{index:03d}" for index in range(users)]
    rates = {}
    for count in (1, 2):
        with _cluster(user_ids) as cluster:
            for instance in "ab"[:count]:
                cluster.start(instance, log_level=LOG_LEVEL)
            cluster.warm_up()
            rates[count], cores = _burst(cluster, user_ids, mails)
        label = f"{count} instance{'s' * (count > 1)}"
        section.rows.append(Row(f"{label}: mails routed", value=rates[count], unit="mails/s"))
        for part, used in cores.items():
            section.rows.append(Row(f"  CPU of {part}", value=used, unit="cores"))
            section.figures[f"scaleout_{count}_{part.replace(' ', '_')}_cores"] = round(used, 3)
    unsynced = {}
    for count in (1, 2):
        with _cluster(user_ids, ("sync_every_commit = false",)) as cluster:
            for instance in "ab"[:count]:
                cluster.start(instance, log_level=LOG_LEVEL)
            cluster.warm_up()
            unsynced[count], _ = _burst(cluster, user_ids, mails)
        label = f"{count} instance{'s' * (count > 1)}, sync_every_commit = false"
        section.rows.append(Row(f"{label}: mails routed", value=unsynced[count], unit="mails/s"))
    section.rows.append(
        Row("2 instances / 1 instance, sync_every_commit = false", value=unsynced[2] / unsynced[1],
            unit="x")
    )  # fmt: skip
    section.figures["scaleout_unsynced_2x_ratio"] = round(unsynced[2] / unsynced[1], 3)
    ratio = Row("2 instances / 1 instance", value=rates[2] / rates[1], unit="x")
    section.rows.append(goal_row(ratio, 1.6, above=True, what=""))
    section.figures["scaleout_1_mails_per_s"] = round(rates[1], 1)
    section.figures["scaleout_2_mails_per_s"] = round(rates[2], 1)
    section.figures["scaleout_2x_ratio"] = round(rates[2] / rates[1], 3)

    with _cluster(user_ids) as cluster:
        times, lost, duplicated = _failovers(cluster, user_ids, failovers)
    failover = Row("killed instance -> its users' mails pushed", Stats.of(times))
    section.rows.append(goal_row(failover, 10_000.0))
    section.rows.append(Row("mails lost over the kills", value=lost, unit="mails"))
    section.rows.append(Row("mails pushed twice over the kills", value=duplicated, unit="mails"))
    section.figures["failover_s"] = round(max(times) / 1000, 3)
    section.figures["failover_lost"] = lost
    section.figures["failover_duplicated"] = duplicated
    section.notes = [
        f"{users} users with two terminals each, {mails} mails per burst, one Mosquitto, "
        "every process on this machine (the instances, Mosquitto and the harness share its cores).",
        "The instances share one state folder (outbox, mailbox positions, policies) on local disk.",
        "failover_s is the largest time from SIGKILL to the last of the killed instance's mails "
        "being pushed; the broker publishes the instance's will as soon as its socket closes.",
    ]
    return section


class _cluster:  # noqa: N801 - used like a function in a with statement
    def __init__(self, user_ids: list[str], service_lines: tuple[str, ...] = ()) -> None:
        self._users = user_ids
        self._service_lines = service_lines

    def __enter__(self) -> Cluster:
        self._folder = tempfile.TemporaryDirectory(prefix="mailpush-bench-scaleout-")
        workdir = Path(self._folder.name)
        (workdir / "mosquitto").mkdir()
        self._broker = Mosquitto(
            port=free_port(), workdir=workdir / "mosquitto", extra_config="set_tcp_nodelay true\n"
        )
        self._broker.start()
        self._cluster = Cluster(workdir, self._broker.port, self._users, self._service_lines)
        assert self._broker.process is not None
        self._cluster.broker_pid = self._broker.process.pid
        return self._cluster

    def __exit__(self, *_exc: object) -> None:
        self._cluster.close()
        self._broker.stop()
        self._folder.cleanup()


def _burst(cluster: Cluster, user_ids: list[str], mails: int) -> tuple[float, dict[str, float]]:
    """Deliver ``mails`` spread over the users at once.

    Returns:
        Mails routed per second, and the CPU each part used meanwhile, in cores.
    """
    drafts = [(user_ids[index % len(user_ids)], cluster.write_draft(user_ids[index % len(user_ids)]))
              for index in range(mails)]  # fmt: skip
    parts = {
        "instances": [
            psutil.Process(running.process.pid) for running in cluster.instances.values()
        ],
        "broker": [psutil.Process(cluster.broker_pid)],
        "harness": [psutil.Process()],
    }
    before = {part: _cpu_seconds(processes) for part, processes in parts.items()}
    started = time.monotonic()
    keys = [(user, cluster.publish_draft(user, name)) for user, name in drafts]
    arrived = cluster.arrivals(keys, ARRIVAL_TIMEOUT_S)
    if len(arrived) < len(keys):
        raise RuntimeError(f"{len(keys) - len(arrived)} of {len(keys)} mails were not pushed")
    last = max(arrival.first for arrival in arrived.values())
    elapsed = time.monotonic() - started
    cores = {
        part: (_cpu_seconds(processes) - before[part]) / elapsed
        for part, processes in parts.items()
    }
    return mails / (last - started), cores


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def _failovers(cluster: Cluster, user_ids: list[str], rounds: int) -> tuple[list[float], int, int]:
    """Kill instance b ``rounds`` times; return failover times (ms), lost and duplicated mails."""
    theirs = [user for user in user_ids if owner(["a", "b"], user) == "b"]
    cluster.start("a", log_level=LOG_LEVEL)
    times, all_keys = [], []
    for number in range(1, rounds + 1):
        victim = cluster.start("b", log_level=LOG_LEVEL)
        _wait_for_count(cluster.instances["a"], "handed over", number)
        cluster.warm_up()
        # In flight: delivered just before the kill.
        all_keys += [(user, cluster.deliver(user)) for user in theirs]
        os.kill(victim.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        victim.process.wait()
        keys = [(user, cluster.deliver(user)) for user in theirs]
        all_keys += keys
        arrived = cluster.arrivals(keys, ARRIVAL_TIMEOUT_S)
        if len(arrived) == len(keys):
            times.append((max(arrival.first for arrival in arrived.values()) - killed) * 1000)
    arrived = cluster.arrivals(all_keys, ARRIVAL_TIMEOUT_S)
    lost = len(all_keys) - len(arrived)
    duplicated = sum(number for pushes, number in counts(arrived).items() if pushes > 1)
    if not times:
        raise RuntimeError("no failover completed: the survivor pushed none of the mails")
    return times, lost, duplicated


def _wait_for_count(running: Running, text: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while running.log().count(text) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} not logged {count} times after {timeout} s")
        time.sleep(0.05)
