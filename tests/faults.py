"""Fault injection against the whole system: mail keeps arriving while parts of it fail.

One run starts a real Mosquitto, a real Dovecot, the real ``mailpush-server``
watching the Dovecot folder over IMAP and three real ``mailpush-agent``
processes (input sensor disabled, one XDG home each). The policy has one
``terminal:ID`` rule per terminal in a fixed order, so exactly one terminal
is right for each mail: the first in that order that is on. The run keeps at
least one agent up, so the policy's fallback is never needed. Mails are
appended at a steady rate while a schedule of faults runs. Then the run waits
(bounded) until every mail was shown and the service's outbox contains no
unacknowledged push, stops the agents and checks what they stored and showed.

Used by ``tests/test_faults.py`` (a short run) and ``bench/faults.py`` (the full run).
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import subprocess
import threading
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import psutil
from imapclient.exceptions import IMAPClientError

from tests.fixtures.dovecot import DovecotServer
from tests.fixtures.mosquitto import Mosquitto, free_port
from tests.processes import AGENT, Running, home_env, start_agent, start_server, write_agent_config

USER = "alice"
FAULT_KINDS = (
    "broker-restart",
    "service-kill",
    "imap-cut",
    "agent-stop",
    "agent-kill",
    "dovecot-restart",
)
APPEND_TIMEOUT_S = 60.0
AGENT_READY_S = 30.0
SHOWN = re.compile(r"mailpush\.agent\.receiver: (mail|prompt) push \S+ for mail (\S+) shown")


@dataclass(frozen=True)
class Scenario:
    """What one run does.

    Attributes:
        mails: how many mails to append.
        faults: how many faults to inject, spread evenly over the appending.
        terminals: the agents, in the policy's order of preference.
        persistence: whether Mosquitto keeps sessions and retained messages across a restart.
        mail_interval_s: seconds between two appends.
        offline_s: the range of seconds an agent stays offline.
        settle_timeout_s: how long to wait after the last append for every push to be acknowledged.
        resend_after_s: the service's resend interval for unacknowledged pushes.
        seed: the seed of the fault schedule.
    """

    mails: int = 40
    faults: int = 6
    terminals: tuple[str, ...] = ("alpha", "beta", "gamma")
    persistence: bool = False
    mail_interval_s: float = 0.3
    offline_s: tuple[float, float] = (1.0, 4.0)
    settle_timeout_s: float = 60.0
    resend_after_s: float = 3.0
    seed: int = 1


def fault_schedule(scenario: Scenario) -> list[str]:
    """Return the fault kinds in order. Each group of len(FAULT_KINDS) faults has every kind once."""
    rng = random.Random(scenario.seed)
    kinds: list[str] = []
    while len(kinds) < scenario.faults:
        kinds.extend(rng.sample(FAULT_KINDS, len(FAULT_KINDS)))
    return kinds[: scenario.faults]


def policy_text(terminals: tuple[str, ...]) -> str:
    """Return a policy file with one ``terminal:ID`` rule per terminal, in order."""
    rules = [
        f'[[rules]]\nname = "to-{name}"\nselect = "terminal:{name}"\nprompt_others = true\n'
        for name in terminals
    ]
    return 'fallback = "all"\n\n' + "\n".join(rules)


def make_mail(number: int) -> bytes:
    """Return a small RFC 5322 message with a numbered subject."""
    message = EmailMessage()
    message["From"] = "Fault Run <faults@example.org>"
    message["To"] = f"{USER}@example.org"
    message["Subject"] = f"fault run mail {number}"
    message["Message-ID"] = f"<fault-run-{number}@example.org>"
    message.set_content("A short body.\n")
    return bytes(message)


@dataclass
class _Agent:
    name: str
    home: Path
    runs: int = 0
    process: Running | None = None
    back_at: float | None = None  # when an offline agent is started again

    @property
    def config(self) -> Path:
        return self.home / "agent.toml"

    def log_paths(self) -> list[Path]:
        return [self.home.parent / f"{self.name}-{run}.log" for run in range(1, self.runs + 1)]


@dataclass
class _Appended:
    uids: list[int] = field(default_factory=list)
    retries: int = 0
    error: BaseException | None = None


class FaultRun:
    """One fault-injection run in the folder ``root``, used as a context manager.

    Every process it starts is stopped on every path when the ``with`` block
    ends. :meth:`run` is the whole scenario. A test of one fault calls
    :meth:`append`, drives ``broker``, ``dovecot`` or ``server`` itself, then
    calls :meth:`finish`.
    """

    def __init__(self, scenario: Scenario, root: Path, log=print) -> None:
        self.scenario = scenario
        self.root = root
        self._log = log
        self._rng = random.Random(scenario.seed + 1)
        (root / "mosquitto").mkdir(parents=True, exist_ok=True)
        self.broker = Mosquitto(
            port=free_port(),
            workdir=root / "mosquitto",
            extra_config=f"persistence {'true' if scenario.persistence else 'false'}\n",
        )
        self.dovecot: DovecotServer | None = None
        self.server: Running | None = None
        self.server_runs = 0
        self.agents = {name: _Agent(name, root / name) for name in scenario.terminals}
        self.faults: dict[str, int] = {}
        self.appended = _Appended()
        self.started = time.monotonic()
        self.uidvalidity = 0
        self._halt = threading.Event()

    # Start and stop

    def __enter__(self) -> FaultRun:
        try:
            self._start_all()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process this run started; every stop runs even if another fails."""
        with ExitStack() as stack:
            if self.dovecot is not None:
                stack.callback(self.dovecot.remove)
            stack.callback(self.broker.stop)
            if self.server is not None:
                stack.callback(self.server.terminate)
            for agent in self.agents.values():
                if agent.process is not None:
                    stack.callback(agent.process.terminate)
                agent.process = None
            self.server = self.dovecot = None

    def _start_all(self) -> None:
        self.broker.start()
        self.dovecot = DovecotServer()
        self.dovecot.start()
        self.uidvalidity = self.dovecot.uidvalidity()
        secret = self.root / "imap-password"
        secret.write_text(self.dovecot.password)
        secret.chmod(0o600)
        self.server_config = self.root / "server.toml"
        self.server_config.write_text(
            f'[broker]\nurl = "{self.broker.url}"\n'
            f'[service]\nstate_dir = "{self.root / "service"}"\n'
            f"resend_after_s = {self.scenario.resend_after_s}\n"
            f'[[users]]\nid = "{USER}"\n'
            f'mailbox = {{ kind = "imap", host = "127.0.0.1", port = {self.dovecot.port}, '
            f'tls = false, username = "{self.dovecot.user}", password_file = "{secret}" }}\n'
        )
        self._start_server()

        for agent in self.agents.values():
            agent.home.mkdir(parents=True, exist_ok=True)
            write_agent_config(agent.config, USER, agent.name, self.broker.url)
            text = agent.config.read_text().replace('backend = "pynput"', "enabled = false")
            agent.config.write_text(text)
            self._start_agent(agent)
        assert self.server is not None
        for name in self.agents:
            self.server.wait_for_log(f"terminal {name} of {USER} is idle", timeout=30)
        self._set_policy()

    def _set_policy(self) -> None:
        first = next(iter(self.agents.values()))
        policy = self.root / "policy.toml"
        policy.write_text(policy_text(self.scenario.terminals))
        done = subprocess.run(
            [AGENT, "policy", "set", str(policy), "--config", str(first.config)],
            env=home_env(first.home),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert self.server is not None
        self.server.wait_for_log(f"policy of {USER} set by {first.name}", timeout=30)

    def _start_server(self) -> None:
        self.server_runs += 1
        log_path = self.root / f"server-{self.server_runs}.log"
        self.server = start_server(self.server_config, home_env(self.root / "server"), log_path)

    def _start_agent(self, agent: _Agent) -> None:
        agent.runs += 1
        log_path = self.root / f"{agent.name}-{agent.runs}.log"
        agent.process = start_agent(agent.config, home_env(agent.home), log_path)
        agent.back_at = None

    # The run

    def run(self) -> Report:
        """Append the mails while the faults run, then settle and check."""
        self.started = time.monotonic()
        appender = threading.Thread(target=self._append_all, name="appender", daemon=True)
        appender.start()
        try:
            self._run_faults()
        except BaseException:
            self._halt.set()
            raise
        finally:
            appender.join(self.scenario.mails * self.scenario.mail_interval_s + APPEND_TIMEOUT_S)
        if appender.is_alive():
            raise AssertionError("the mail appender did not finish")
        if self.appended.error is not None:
            raise self.appended.error
        for agent in self.agents.values():
            if agent.process is None:
                self._bring_back(agent)
        return self.finish()

    def append(self, number: int) -> str:
        """Append mail ``number`` and return its mail id, retrying while Dovecot restarts."""
        assert self.dovecot is not None
        deadline = time.monotonic() + APPEND_TIMEOUT_S
        while True:
            try:
                uid = self.dovecot.append(make_mail(number))
                break
            except (OSError, IMAPClientError) as exc:
                # A retried APPEND may store the mail twice; finish() counts
                # every UID in the folder, so such a copy is expected too.
                if time.monotonic() > deadline or self._halt.is_set():
                    raise AssertionError(f"appending mail {number} failed: {exc}") from exc
                self.appended.retries += 1
                time.sleep(0.2)
        self.appended.uids.append(uid)
        return f"{self.uidvalidity}-{uid}"

    def finish(self) -> Report:
        """Wait for the system to settle, stop the agents, collect what they got and check it."""
        first = min(self.appended.uids, default=1)
        expected = [f"{self.uidvalidity}-{uid}" for uid in self._folder_uids(first)]
        settled = self._settle(expected)
        for agent in self.agents.values():
            if agent.process is not None:
                agent.process.terminate()
                agent.process = None
        inbox = {
            name: collect_inbox(agent.config, home_env(agent.home))
            for name, agent in self.agents.items()
        }
        return Report(
            scenario=self.scenario,
            expected=expected,
            appended=len(self.appended.uids),
            append_retries=self.appended.retries,
            faults=dict(self.faults),
            inbox=inbox,
            shown=collect_shown(self._agent_logs()),
            settled=settled,
            elapsed_s=time.monotonic() - self.started,
            logs=sorted(self.root.glob("*.log")),
        )

    def _append_all(self) -> None:
        try:
            for number in range(self.scenario.mails):
                if self._halt.is_set():
                    return
                moment = self.started + number * self.scenario.mail_interval_s
                time.sleep(max(0.0, moment - time.monotonic()))
                self.append(number)
        except BaseException as exc:  # run() raises it again in the main thread
            self.appended.error = exc

    def _folder_uids(self, first: int) -> list[int]:
        assert self.dovecot is not None
        with self.dovecot.client() as client:
            client.select_folder("INBOX", readonly=True)
            return sorted(uid for uid in client.search(["UID", f"{first}:*"]) if uid >= first)

    def _run_faults(self) -> None:
        duration = self.scenario.mails * self.scenario.mail_interval_s
        kinds = fault_schedule(self.scenario)
        for index, kind in enumerate(kinds):
            self._wait_until(self.started + (index + 0.5) * duration / len(kinds))
            began = time.monotonic()
            self._inject(kind)
            self.faults[kind] = self.faults.get(kind, 0) + 1
            self._log(
                f"  {began - self.started:6.1f} s  fault {index + 1}/{len(kinds)}: "
                f"{kind} ({time.monotonic() - began:.1f} s)"
            )
        self._wait_until(self.started + duration)

    def _wait_until(self, moment: float) -> None:
        """Sleep until ``moment``, bringing offline agents back when their time comes."""
        while True:
            now = time.monotonic()
            for agent in self.agents.values():
                if agent.back_at is not None and agent.back_at <= now:
                    self._bring_back(agent)
            if now >= moment:
                return
            time.sleep(min(0.1, moment - now))

    def _inject(self, kind: str) -> None:
        assert self.dovecot is not None and self.server is not None
        if kind == "broker-restart":
            self.broker.restart()
        elif kind == "service-kill":
            self.server.kill()
            self._start_server()
        elif kind == "imap-cut":
            self._cut_imap()
        elif kind == "dovecot-restart":
            self.dovecot.restart()
        else:
            self._take_agent_offline(kill=kind == "agent-kill")

    def _cut_imap(self) -> None:
        assert self.dovecot is not None
        deadline = time.monotonic() + 10
        while True:
            try:
                self.dovecot.kill_imap_sessions()
                return
            except (psutil.NoSuchProcess, ProcessLookupError):
                # A session ended by itself between listing and killing it.
                if time.monotonic() > deadline:
                    raise

    def _take_agent_offline(self, kill: bool) -> None:
        online = [agent for agent in self.agents.values() if agent.process is not None]
        if len(online) <= 1:
            # One terminal stays on, so the fallback, which reaches every terminal, is never right.
            offline = [agent for agent in self.agents.values() if agent.process is None]
            waiting = min(offline, key=lambda agent: agent.back_at or 0.0)
            self._bring_back(waiting)
            online.append(waiting)
        agent = self._rng.choice(online)
        assert agent.process is not None
        if kill:
            agent.process.kill()
        else:
            agent.process.terminate()
        agent.process = None
        agent.back_at = time.monotonic() + self._rng.uniform(*self.scenario.offline_s)

    def _bring_back(self, agent: _Agent) -> None:
        self._start_agent(agent)
        assert agent.process is not None
        agent.process.wait_for_log("state idle", timeout=AGENT_READY_S)

    def _settle(self, expected: list[str]) -> bool:
        """Wait until every mail was shown somewhere and no push is unacknowledged."""
        deadline = time.monotonic() + self.scenario.settle_timeout_s
        while time.monotonic() < deadline:
            shown = collect_shown(self._agent_logs())
            mails = {
                mail_id
                for per_mail in shown.values()
                for mail_id, kinds in per_mail.items()
                if "mail" in kinds
            }
            if mails.issuperset(expected) and self._unacknowledged() == 0:
                return True
            time.sleep(0.5)
        return False

    def _unacknowledged(self) -> int:
        """Return how many pushes the service's outbox has unacknowledged (read-only), or -1."""
        uri = f"file:{self.root / 'service' / 'outbox.sqlite3'}?mode=ro"
        try:
            with closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
                query = "SELECT COUNT(*) FROM pushes WHERE acked IS NULL"
                return conn.execute(query).fetchone()[0]
        except sqlite3.Error:
            return -1

    def _agent_logs(self) -> dict[str, list[Path]]:
        return {name: agent.log_paths() for name, agent in self.agents.items()}


# Collecting and checking


def collect_shown(logs: dict[str, list[Path]]) -> dict[str, dict[str, list[str]]]:
    """Return, per terminal and mail id, the kinds of the pushes its agent logs show."""
    shown: dict[str, dict[str, list[str]]] = {}
    for terminal, paths in logs.items():
        per_mail = shown.setdefault(terminal, {})
        for path in paths:
            text = path.read_text(errors="replace") if path.exists() else ""
            for match in SHOWN.finditer(text):
                per_mail.setdefault(match.group(2), []).append(match.group(1))
    return shown


def collect_inbox(config: Path, env: dict[str, str]) -> list[dict]:
    """Return every push the terminal stored, as ``mailpush-agent inbox --json`` prints it."""
    done = subprocess.run(
        [AGENT, "inbox", "--json", "--limit", "100000", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@dataclass
class Report:
    """The outcome of one run: what the agents stored (``inbox``) and showed (``shown``)."""

    scenario: Scenario
    expected: list[str]
    appended: int
    append_retries: int
    faults: dict[str, int]
    inbox: dict[str, list[dict]]
    shown: dict[str, dict[str, list[str]]]
    settled: bool
    elapsed_s: float
    logs: list[Path]

    def _mail_pushes(self) -> list[tuple[str, dict]]:
        return [
            (terminal, push)
            for terminal, pushes in self.inbox.items()
            for push in pushes
            if push["kind"] == "mail"
        ]

    def holders(self) -> dict[str, list[str]]:
        """Return, per mail id, the terminals that stored a ``mail`` push for it (repeats kept)."""
        holders: dict[str, list[str]] = {mail_id: [] for mail_id in self.expected}
        for terminal, push in self._mail_pushes():
            holders.setdefault(push["mail"]["id"], []).append(terminal)
        return holders

    @property
    def lost(self) -> list[str]:
        """The mails that no terminal stored a ``mail`` push for."""
        return [mail_id for mail_id, terminals in self.holders().items() if not terminals]

    @property
    def duplicated(self) -> list[str]:
        """The mails stored as a ``mail`` push more than once, on one terminal or several."""
        return [mail_id for mail_id, terminals in self.holders().items() if len(terminals) > 1]

    @property
    def unexpected(self) -> list[str]:
        """The mail ids pushed that are not in the folder."""
        return sorted(set(self.holders()) - set(self.expected))

    @property
    def misrouted(self) -> list[str]:
        """The ``mail`` pushes whose deciding rule is not the one naming their terminal."""
        # NOTE: this trusts the reason the service wrote into the push. It does
        # not check from outside that every earlier terminal in the order was off.
        return [
            f"{push['mail']['id']} on {terminal}: {push['reason']}"
            for terminal, push in self._mail_pushes()
            if not push["reason"].startswith(f'rule "to-{terminal}"')
            or push["delivered_to"] != [terminal]
        ]

    @property
    def by_fallback(self) -> list[str]:
        """The mails routed by the policy's fallback instead of a rule."""
        pushes = self._mail_pushes()
        return sorted({p["mail"]["id"] for _, p in pushes if p["reason"].startswith("fallback")})

    @property
    def shown_twice(self) -> list[str]:
        """The mails that one terminal showed more than once (as a mail or prompt push)."""
        return [
            f"{mail_id} on {terminal}: {'+'.join(kinds)}"
            for terminal, per_mail in self.shown.items()
            for mail_id, kinds in per_mail.items()
            if len(kinds) > 1
        ]

    @property
    def unshown(self) -> list[str]:
        """The ``mail`` pushes a terminal stored, and so acknowledged, but never showed."""
        return [
            f"{push['mail']['id']} on {terminal}"
            for terminal, push in self._mail_pushes()
            if "mail" not in self.shown.get(terminal, {}).get(push["mail"]["id"], [])
        ]

    def problems(self) -> list[str]:
        """Return one line per failed check, or an empty list when every check passed."""
        checks = {
            "lost (no mail push stored)": self.lost,
            "duplicated (more than one mail push)": self.duplicated,
            "pushed but not in the folder": self.unexpected,
            "not routed by the rule naming the terminal": self.misrouted,
            "shown twice on one terminal": self.shown_twice,
            "stored but never shown": self.unshown,
        }
        lines = [
            f"{what}: {len(items)}: {'; '.join(items[:10])}"
            for what, items in checks.items()
            if items
        ]
        if not self.settled:
            lines.append(f"not settled within {self.scenario.settle_timeout_s:g} s")
        return lines

    def summary(self) -> str:
        """Return the counts as a few lines for a person."""
        faults = ", ".join(f"{kind} {count}" for kind, count in sorted(self.faults.items()))
        stored = ", ".join(
            f"{t} {sum(p['kind'] == 'mail' for p in pushes)}" for t, pushes in self.inbox.items()
        )
        return (
            f"persistence {'on' if self.scenario.persistence else 'off'}, "
            f"seed {self.scenario.seed}, {self.elapsed_s:.1f} s\n"
            f"mails: {len(self.expected)} in the folder ({self.appended} appends, "
            f"{self.append_retries} append retries)\n"
            f"faults: {sum(self.faults.values())} ({faults})\n"
            f"mail pushes stored per terminal: {stored}\n"
            f"lost {len(self.lost)}, duplicated {len(self.duplicated)}, "
            f"shown twice {len(self.shown_twice)}, stored but not shown {len(self.unshown)}, "
            f"misrouted {len(self.misrouted)} (routed by the fallback {len(self.by_fallback)}), "
            f"settled {'yes' if self.settled else 'no'}"
        )

    def evidence(self, limit: int = 5) -> str:
        """Return every log line about the first few mails with a problem, for diagnosis."""
        suspects = (self.lost + self.duplicated + self.unexpected)[:limit]
        suspects += [line.split()[0] for line in self.shown_twice + self.unshown][:limit]
        lines = []
        for mail_id in dict.fromkeys(suspects):
            pattern = re.compile(rf"\b{re.escape(mail_id)}\b")
            lines.append(f"--- {mail_id}")
            for path in self.logs:
                text = path.read_text(errors="replace").splitlines()
                lines.extend(f"{path.name}: {line}" for line in text if pattern.search(line))
        return "\n".join(lines)
