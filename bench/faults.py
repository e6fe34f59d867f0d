"""Run the full fault-injection scenario and print what was lost or repeated.

Starts a real Mosquitto and Dovecot, the real ``mailpush-server`` and three
real ``mailpush-agent`` processes, appends mails at a steady rate while the
broker, the service, the IMAP connection, Dovecot and the agents fail, then
prints the counts. With ``--persistence both`` (the default) the mails and
faults are split over two runs, the first with Mosquitto persistence on, the
second with it off. Run as root from the repository root (Dovecot is started
as root by the test fixture):

    python -m bench.faults [--mails 1000] [--faults 50] [--persistence both] [--keep DIR]

The exit code is 1 when a check failed.
"""

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from tests.faults import FaultRun, Report, Scenario


def main() -> int:
    """Run the scenario (or the two of ``--persistence both``) and print the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=1000, help="mails to append (default 1000)")
    parser.add_argument("--faults", type=int, default=50, help="faults to inject (default 50)")
    parser.add_argument(
        "--persistence",
        choices=("on", "off", "both"),
        default="both",
        help="Mosquitto persistence; both makes two runs of half the mails each (default both)",
    )
    parser.add_argument(
        "--interval", type=float, default=0.25, help="seconds between appends (default 0.25)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    parser.add_argument("--keep", type=Path, help="keep the logs in this folder")
    options = parser.parse_args()
    if options.keep is not None and options.keep.exists() and any(options.keep.iterdir()):
        parser.error(f"--keep {options.keep}: the folder is not empty; give a new or empty folder")

    modes = [True, False] if options.persistence == "both" else [options.persistence == "on"]
    reports = []
    started = time.monotonic()
    for index, persistence in enumerate(modes):
        scenario = Scenario(
            mails=_share(options.mails, len(modes), index),
            faults=_share(options.faults, len(modes), index),
            persistence=persistence,
            mail_interval_s=options.interval,
            settle_timeout_s=180.0,
            seed=options.seed + index,
        )
        mode = "on" if persistence else "off"
        print(
            f"run {index + 1}/{len(modes)}: {scenario.mails} mails, {scenario.faults} faults, "
            f"persistence {mode}"
        )
        reports.append(_run(scenario, options.keep, index + 1))

    _print_totals(reports, time.monotonic() - started)
    return 1 if any(report.problems() for report in reports) else 0


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def _run(scenario: Scenario, keep: Path | None, number: int) -> Report:
    with ExitStack() as stack:
        if keep is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mailpush-faults-")))
        else:
            root = keep / f"run-{number}"
            root.mkdir(parents=True)
        with FaultRun(scenario, root) as run:
            report = run.run()
        print(report.summary())
        for line in report.problems():
            print(f"  FAILED {line}")
        if report.problems():
            print(report.evidence())  # before a temporary folder and its logs are removed
    return report


def _print_totals(reports: list[Report], elapsed_s: float) -> None:
    faults: dict[str, int] = {}
    for report in reports:
        for kind, count in report.faults.items():
            faults[kind] = faults.get(kind, 0) + count
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(faults.items()))
    print("total:")
    print(f"  mails {sum(len(r.expected) for r in reports)}")
    print(f"  faults {sum(faults.values())} ({kinds})")
    for label, attribute in (
        ("lost", "lost"),
        ("duplicated", "duplicated"),
        ("shown twice", "shown_twice"),
        ("stored but not shown", "unshown"),
        ("misrouted", "misrouted"),
        ("routed by the fallback", "by_fallback"),
    ):
        print(f"  {label} {sum(len(getattr(r, attribute)) for r in reports)}")
    print(f"  wall time {elapsed_s:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
