"""Measure APPEND to on_mail latency of the IMAP watcher against a local Dovecot.

Run as root (Dovecot is started by the test fixture code):
    cd /work/main && python bench/imap_latency.py [COUNT]

Each mail is appended over a second connection only after the previous one
reached on_mail, so the figures are per-mail latency, not throughput.
"""

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailpush.server.mailbox import ImapConfig, ImapWatcher, NewMail, StateStore  # noqa: E402
from tests.fixtures.dovecot import DovecotServer  # noqa: E402


def main(count: int) -> None:
    arrived = threading.Event()

    def on_mail(mail: NewMail) -> None:
        arrived.set()

    with DovecotServer() as server, tempfile.TemporaryDirectory() as folder:
        store = StateStore(Path(folder) / "state.sqlite3")
        config = ImapConfig(
            host=server.host,
            port=server.port,
            tls=False,
            username=server.user,
            password=server.password,
        )
        watcher = ImapWatcher(config, store)
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(on_mail, stop), name="imap-watcher")
        thread.start()
        while store.imap_position(watcher.mailbox_key) is None:
            time.sleep(0.01)

        latencies = []
        with server.client() as client:
            for index in range(count):
                arrived.clear()
                started = time.perf_counter()
                client.append("INBOX", f"Subject: bench {index}\r\n\r\nbody\r\n".encode())
                if not arrived.wait(30):
                    raise SystemExit(f"mail {index} did not arrive within 30 s")
                latencies.append(time.perf_counter() - started)

        stop.set()
        thread.join()
        store.close()

    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * len(latencies)) - 1)]
    print(f"mails: {count}")
    print(f"median: {statistics.median(latencies) * 1000:.0f} ms")
    print(f"p99: {p99 * 1000:.0f} ms")
    print(f"min: {latencies[0] * 1000:.0f} ms, max: {latencies[-1] * 1000:.0f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
