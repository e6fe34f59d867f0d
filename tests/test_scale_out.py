"""Several push service instances share the users; a killed one's users move to the others."""

import json

import pytest

from mailpush.protocol.messages import ServiceInstance, encode
from mailpush.server.membership import Membership, owner
from tests.cluster import Cluster, counts
from tests.mqtt_client import Subscriber

USERS = [f"user{index:02d}" for index in range(12)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_owner_ignores_instance_order():
    for user in USERS:
        assert owner(["a", "b", "c"], user) == owner(["c", "a", "b"], user)


def test_owner_moves_users_only_to_joiner():
    users = [f"user{index:03d}" for index in range(300)]
    before = {user: owner(["a", "b"], user) for user in users}
    after = {user: owner(["a", "b", "c"], user) for user in users}
    moved = [user for user in users if before[user] != after[user]]
    assert moved, "a third instance should take some users"
    assert all(after[user] == "c" for user in moved)
    # Each of three instances gets a fair share: no fewer than half the even share.
    for instance in "abc":
        assert sum(1 for user in users if after[user] == instance) > len(users) / 6


def test_membership_waits_after_a_reconnect_then_follows_announcements():
    clock = FakeClock()
    changes = []
    membership = Membership(
        "a", USERS, settle_s=1.0, on_change=lambda: changes.append(1), clock=clock
    )
    assert membership.owned() == frozenset(USERS)  # alone, it owns everyone

    membership.reset()
    membership.heard("b", alive=True)
    assert membership.owned() is None  # still settling
    clock.now += 1.0
    mine = membership.owned()
    assert mine == frozenset(user for user in USERS if owner(["a", "b"], user) == "a")
    assert mine != frozenset(USERS)

    membership.heard("a", alive=False)  # its own removal is not believed
    membership.heard("b", alive=False)
    assert membership.owned() == frozenset(USERS)
    assert len(changes) == 3  # reset, b joined, b left


@pytest.fixture
def cluster(tmp_path, mosquitto):
    running = Cluster(tmp_path, mosquitto.port, USERS)
    yield running
    running.close()


def announced(port: int) -> set[str]:
    """Return the instances whose retained announcement the broker has now."""
    subscriber = Subscriber(port, "mailpush/v1/_service/instances/+")
    try:
        found = set()
        while True:
            try:
                message = subscriber.wait_for(lambda m: m.retain, timeout=0.5)
            except AssertionError:
                return found
            if message.payload:
                found.add(json.loads(message.payload)["instance"])
    finally:
        subscriber.close()


@pytest.mark.integration
def test_two_instances_split_users_and_survive_a_kill(cluster, mosquitto):
    by_instance = {name: [u for u in USERS if owner(["a", "b"], u) == name] for name in "ab"}
    assert by_instance["a"] and by_instance["b"], "the test needs users on both instances"

    first = cluster.start("a")
    second = cluster.start("b")
    first.wait_for_log("routes", timeout=10)
    assert announced(mosquitto.port) == {"a", "b"}
    cluster.warm_up()
    keys = [(user, cluster.deliver(user)) for user in USERS]
    arrived = cluster.arrivals(keys, timeout=20)
    assert len(arrived) == len(USERS)
    assert counts(arrived) == {1: len(USERS)}, "each mail pushed by exactly one instance"
    assert f"routes {len(by_instance['a'])} of {len(USERS)} users" in first.log()

    second.kill()
    # Mails that arrive while b is dying or gone reach their terminals through a.
    keys = [(user, cluster.deliver(user)) for user in USERS]
    arrived = cluster.arrivals(keys, timeout=20)
    missing = sorted(set(keys) - set(arrived))
    assert not missing, f"mails lost after the kill: {missing}"
    assert counts(arrived) == {1: len(USERS)}
    assert announced(mosquitto.port) == {"a"}, "b's last will removes its announcement"
    assert f"routes {len(USERS)} of {len(USERS)} users" in first.log()

    # b comes back and takes its users again; a hands them over.
    cluster.start("b")
    first.wait_for_log(f"handed over {len(by_instance['b'])}", timeout=10)
    keys = [(user, cluster.deliver(user)) for user in USERS]
    arrived = cluster.arrivals(keys, timeout=20)
    assert len(arrived) == len(USERS)
    assert counts(arrived) == {1: len(USERS)}


@pytest.mark.integration
def test_clean_stop_withdraws_announcement(cluster, mosquitto):
    cluster.start("a")
    cluster.start("b").terminate()
    assert announced(mosquitto.port) == {"a"}
    cluster.warm_up()  # a serves every user alone


@pytest.mark.integration
def test_bad_announcements_are_dropped(cluster, mosquitto):
    publisher = Subscriber(mosquitto.port, "unrelated/topic")
    garbage = "mailpush/v1/_service/instances/zz"
    mismatch = "mailpush/v1/_service/instances/yy"
    publisher.publish(garbage, b"not json", retain=True)
    publisher.publish(
        mismatch, encode(ServiceInstance(instance="xx", started=1, ts=1)), retain=True
    )
    publisher.close()

    first = cluster.start("a")
    first.wait_for_log(f"dropped a message on {garbage}", timeout=10)
    first.wait_for_log(f"dropped a message on {mismatch}: ServiceInstance: instance", timeout=10)
    assert "routes" not in first.log(), "no user may move to an instance that was never valid"
    cluster.warm_up()  # a serves every user alone


@pytest.mark.integration
def test_duplicate_instance_id_is_named(cluster):
    first = cluster.start("a")
    second = cluster.start("a")
    try:
        first.wait_for_log("give each instance its own service.instance", timeout=15)
        second.wait_for_log("give each instance its own service.instance", timeout=15)
    finally:
        second.terminate()
        first.terminate()  # the cluster keeps only the second under the name "a"
