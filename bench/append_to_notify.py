"""Measure the time from IMAP APPEND on a real Dovecot to the agent's notification call.

Runs the real `mailpush-server start` and `mailpush-agent start` against a
real Mosquitto and Dovecot on loopback, appends mails one at a time, and reads
the time each push was shown from the agent's log (millisecond timestamps).
Run as root from the repository root (Dovecot is started by the test fixture):

    python -m bench.append_to_notify [--count 100] [--json FILE]
"""

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path

from tests.fixtures.dovecot import DovecotServer
from tests.fixtures.mosquitto import Mosquitto, free_port
from tests.processes import home_env, start_agent, start_server, write_agent_config

SHOWN = re.compile(r"^(\S+ \S+) INFO mailpush\.agent\.receiver: mail push \S+ for mail (\S+) shown")


def main() -> None:
    """Run the measurement and print median, p99 and max."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="mails to append (default 100)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mailpush-bench-") as folder:
        root = Path(folder)
        samples = measure(root, options.count)

    samples.sort()
    figures = {
        "samples": len(samples),
        "append_to_notify_p50_ms": round(statistics.median(samples), 1),
        "append_to_notify_p99_ms": round(samples[max(0, int(len(samples) * 0.99) - 1)], 1),
        "append_to_notify_max_ms": round(samples[-1], 1),
    }
    print(f"APPEND -> notification over {len(samples)} mails (Dovecot IDLE, Mosquitto, one agent)")
    for key, value in figures.items():
        print(f"  {key:<28} {value}")
    if options.json:
        options.json.write_text(json.dumps(figures, indent=2))


def measure(root: Path, count: int) -> list[float]:
    """Append ``count`` mails and return each one's latency in milliseconds."""
    broker = Mosquitto(port=free_port(), workdir=root)
    broker.start()
    server = agent = None
    try:
        with DovecotServer() as dovecot:
            secret = root / "imap-password"
            secret.write_text(dovecot.password)
            secret.chmod(0o600)
            config = root / "server.toml"
            config.write_text(
                f'[broker]\nurl = "{broker.url}"\n[service]\nstate_dir = "{root / "service"}"\n'
                f'[[users]]\nid = "alice"\nreport_mode = "timed"\n'
                f'mailbox = {{ kind = "imap", host = "127.0.0.1", port = {dovecot.port}, tls = false, '
                f'username = "{dovecot.user}", password_file = "{secret}" }}\n'
            )
            server = start_server(config, home_env(root / "server-home"), root / "server.log")
            agent_home = root / "agent"
            agent_home.mkdir()
            agent_config = write_agent_config(
                agent_home / "agent.toml", "alice", "laptop", broker.url
            )
            agent_config.write_text(
                agent_config.read_text().replace('backend = "pynput"', "enabled = false")
            )
            agent = start_agent(agent_config, home_env(agent_home), root / "agent.log")
            server.wait_for_log("terminal laptop of alice is idle")

            uidvalidity = dovecot.uidvalidity()
            appended: dict[str, float] = {}
            for number in range(count):
                started = time.time()
                uid = dovecot.append(_mail(number))
                mail_id = f"{uidvalidity}-{uid}"
                appended[mail_id] = started
                agent.wait_for_log(f"for mail {mail_id} shown", timeout=30)
            shown = _shown_times(agent.log())
    finally:
        for process in (agent, server):
            if process is not None:
                process.terminate()
        broker.stop()

    return [(shown[mail_id] - appended[mail_id]) * 1000 for mail_id in appended]


def _mail(number: int) -> bytes:
    message = EmailMessage()
    message["From"] = "Bench <bench@example.org>"
    message["To"] = "alice@example.org"
    message["Subject"] = f"latency sample {number}"
    message.set_content("A short body.\n")
    return bytes(message)


def _shown_times(log: str) -> dict[str, float]:
    times = {}
    for line in log.splitlines():
        match = SHOWN.match(line)
        if match:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            times[match.group(2)] = stamp.timestamp()
    return times


if __name__ == "__main__":
    sys.exit(main())
