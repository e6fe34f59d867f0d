"""Run the benchmark suite: ``python -m bench [--quick] [--json FILE]`` from the repository root.

Starts two Mosquittos on loopback (one with its defaults, one with
``set_tcp_nodelay true``), runs each benchmark, prints a table per benchmark,
writes the figures under fixed JSON keys if asked, and rewrites the generated
tables of docs/performance.md. Benchmarks are never part of the test suite.
"""

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from bench import push_path, reaction, runner, scale, scaleout
from bench.footprint_section import footprint_section
from tests.fixtures.mosquitto import Mosquitto, free_port

BENCHMARKS = ("push_path", "reaction", "footprint", "scale", "scaleout")
# (push path samples, reaction samples, scale sizes, footprint idle s, storm s)
QUICK = (50, 10, [1_000, 10_000], 10.0, 5.0)
FULL = (1_000, 100, [1_000, 10_000, 100_000], 60.0, 30.0)
# (scale-out users, mails per burst, failovers)
SCALEOUT_QUICK = (20, 400, 2)
SCALEOUT_FULL = (40, 4_000, 5)


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and return the exit status."""
    args = _parse_args(argv)
    samples, reactions, sizes, idle_s, storm_s = QUICK if args.quick else FULL
    selected = args.only or list(BENCHMARKS)
    machine = runner.machine_text(shared=not args.not_shared)
    print(machine)

    sections = []
    with contextlib.ExitStack() as stack:
        default = _start_broker(stack, "")
        tuned = _start_broker(stack, "set_tcp_nodelay true\n")
        for name in selected:
            print(f"\nrunning {name} ...", flush=True)
            if name == "push_path":
                section = push_path.run(default.url, default.port, samples, tuned.url, tuned.port)
            elif name == "reaction":
                section = reaction.run(default.url, default.port, reactions)
            elif name == "footprint":
                section = footprint_section(idle_s, storm_s, args.aw_venv, args.lnxlink_venv)
            elif name == "scale":
                section = scale.run(default.url, default.port, sizes)
            else:
                section = scaleout.run(*(SCALEOUT_QUICK if args.quick else SCALEOUT_FULL))
            runner.print_section(section)
            sections.append(section)

    if args.json is not None:
        runner.write_json(args.json, sections, machine)
        print(f"\nwrote {args.json}")
    if not args.no_docs:
        runner.rewrite_docs(sections, machine)
        print(f"rewrote the tables in {runner.DOCS_PATH}")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small samples, for a smoke run")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures to FILE")
    parser.add_argument(
        "--only", action="append", choices=BENCHMARKS, help="run only this benchmark (repeatable)"
    )
    parser.add_argument(
        "--aw-venv", type=Path, metavar="PATH",
        help="virtual environment with aw-watcher-afk and aw-server installed",
    )  # fmt: skip
    parser.add_argument(
        "--lnxlink-venv", type=Path, metavar="PATH", help="virtual environment with lnxlink"
    )
    parser.add_argument(
        "--no-docs", action="store_true", help="leave docs/performance.md unchanged"
    )
    parser.add_argument(
        "--not-shared",
        action="store_true",
        help="leave out the note that other work shared the machine during the run",
    )
    return parser.parse_args(argv)


def _start_broker(stack: contextlib.ExitStack, extra_config: str) -> Mosquitto:
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mailpush-bench-mq-")))
    broker = Mosquitto(port=free_port(), workdir=folder, extra_config=extra_config)
    stack.callback(broker.stop)
    broker.start()
    return broker


if __name__ == "__main__":
    sys.exit(main())
