"""The long fuzz run: the properties of tests/test_fuzz_*.py for a million inputs or more.

    python -m bench.fuzz --inputs 1000000 [--workers 2]

The inputs are split evenly across the targets (payload types, config files,
policy file, MIME), and each target's share into chunks run on a process pool.
Hypothesis draws the inputs with its generate phase only, so a failure is
counted and reported, not shrunk, and the run goes on. The output is one line
per target with its input count, failure count and rate, then the first
failures of each distinct kind. Exit status 1 means some input failed.
"""

import argparse
import multiprocessing
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

CHUNK_INPUTS = 5_000
MAX_EXAMPLES_SHOWN = 3


@dataclass
class ChunkResult:
    """Counts and failures of one chunk of one target."""

    target: str
    inputs: int = 0
    failures: int = 0
    seconds: float = 0.0
    kinds: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)


def _targets() -> dict[str, object]:
    from tests import test_fuzz_configs, test_fuzz_mime, test_fuzz_payloads

    targets = [*test_fuzz_payloads.TARGETS, *test_fuzz_configs.TARGETS, *test_fuzz_mime.TARGETS]
    return {target.name: target for target in targets}


def _failure_kind(error: BaseException) -> str:
    """Return the type and first line of an error, with long inputs cut, as a grouping key."""
    first = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:160]}"


def run_chunk(task: tuple[str, int, int]) -> ChunkResult:
    """Run ``inputs`` inputs of one target under one seed; count inputs and failures."""
    from hypothesis import HealthCheck, Phase, given, seed, settings

    name, inputs, chunk_seed = task
    target = _targets()[name]
    result = ChunkResult(name)

    @seed(chunk_seed)
    @settings(
        max_examples=inputs,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(target.strategy)
    def run(example: object) -> None:
        result.inputs += 1
        try:
            target.check(example)
        except Exception as exc:  # every failure is counted, whatever its type
            result.failures += 1
            kind = _failure_kind(exc)
            result.kinds[kind] += 1
            result.examples.setdefault(kind, repr(example)[:300])

    started = time.perf_counter()
    run()
    result.seconds = time.perf_counter() - started
    return result


def _tasks(names: list[str], total: int) -> list[tuple[str, int, int]]:
    per_target = -(-total // len(names))
    tasks = []
    for index, name in enumerate(names):
        left = per_target
        chunk = 0
        while left > 0:
            size = min(CHUNK_INPUTS, left)
            tasks.append((name, size, index * 1_000_003 + chunk))
            left -= size
            chunk += 1
    return tasks


def _merge(results: list[ChunkResult]) -> dict[str, ChunkResult]:
    merged: dict[str, ChunkResult] = {}
    for result in results:
        total = merged.setdefault(result.target, ChunkResult(result.target))
        total.inputs += result.inputs
        total.failures += result.failures
        total.seconds += result.seconds
        total.kinds.update(result.kinds)
        for kind, example in result.examples.items():
            total.examples.setdefault(kind, example)
    return merged


def _report(merged: dict[str, ChunkResult], wall: float, workers: int) -> int:
    print(f"{'target':28} {'inputs':>10} {'failures':>9} {'inputs/s per worker':>20}")
    for name, result in merged.items():
        rate = result.inputs / result.seconds if result.seconds else 0.0
        print(f"{name:28} {result.inputs:>10} {result.failures:>9} {rate:>20.0f}")
    inputs = sum(result.inputs for result in merged.values())
    failures = sum(result.failures for result in merged.values())
    print(
        f"{'total':28} {inputs:>10} {failures:>9}   "
        f"{inputs / wall:.0f} inputs/s on {workers} workers, wall time {wall:.0f} s"
    )

    for name, result in merged.items():
        for kind, count in result.kinds.most_common(MAX_EXAMPLES_SHOWN):
            print(f"\n{name}: {count} x {kind}\n  input: {result.examples[kind]}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run every chunk on the pool and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="total inputs, all targets")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--target", action="append", help="run only this target (repeatable)")
    options = parser.parse_args(argv)

    names = options.target or list(_targets())
    tasks = _tasks(names, options.inputs)
    print(f"fuzzing {len(names)} targets, {options.inputs} inputs, {options.workers} workers")
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(options.workers) as pool:
        results = list(pool.imap_unordered(run_chunk, tasks))
    return _report(_merge(results), time.perf_counter() - started, options.workers)


if __name__ == "__main__":
    sys.exit(main())
