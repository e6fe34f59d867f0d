"""A short fault-injection run: every mail reaches exactly one terminal, shown once.

The whole system runs for real (Mosquitto, Dovecot, ``mailpush-server``, three
``mailpush-agent`` processes) while the broker, the service, the IMAP
connection, Dovecot and the agents fail in turn. The engine is in ``tests/faults.py``.
"""

import pytest

from tests.faults import FAULT_KINDS, FaultRun, Scenario

pytestmark = pytest.mark.integration


def test_faults_lose_and_repeat_nothing(tmp_path):
    scenario = Scenario(mails=40, faults=len(FAULT_KINDS), persistence=False, seed=7)
    with FaultRun(scenario, tmp_path) as run:
        report = run.run()
    print(report.summary())

    detail = "\n".join(report.problems()) + "\n" + report.evidence()
    assert report.faults == dict.fromkeys(FAULT_KINDS, 1)
    assert len(report.expected) >= scenario.mails
    assert report.settled, detail
    assert report.lost == [], detail
    assert report.duplicated == [], detail
    assert report.unexpected == [], detail
    assert report.misrouted == [], detail
    assert report.shown_twice == [], detail
    assert report.unshown == [], detail


def test_broker_stop_mail_pushed_once(tmp_path):
    # Mosquitto 2.0 publishes the wills of its clients when it shuts down
    # cleanly, so the service sees every agent go off just before it loses
    # the broker itself. A mail that arrives then waits in the mailbox until
    # the broker and the agents are back, and then reaches one terminal.
    scenario = Scenario(mails=1, faults=0, persistence=True)
    with FaultRun(scenario, tmp_path) as run:
        assert run.server is not None
        run.broker.stop()
        run.server.wait_for_log("connection to mqtt://")
        mail_id = run.append(0)
        run.server.wait_for_log(f"mail {mail_id} deferred: the broker is not connected")
        run.broker.start()
        run.server.wait_for_log(f"mail {mail_id} of alice:", timeout=60)
        report = run.finish()
    print(report.summary())

    detail = "\n".join(report.problems()) + "\n" + report.evidence()
    assert report.expected == [mail_id]
    assert report.settled, detail
    assert report.lost == [], detail
    assert report.duplicated == [], detail
    assert report.misrouted == [], detail
