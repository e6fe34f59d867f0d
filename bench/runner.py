"""Figures, tables, JSON and the rewrite of docs/performance.md for ``python -m bench``.

Each benchmark returns a :class:`Section`: a title, rows of figures and the
flat JSON keys it fills. This module prints the sections, writes the JSON and
replaces the generated blocks of docs/performance.md, which are delimited by
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` comments so that the prose
around them survives a rewrite.
"""

import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._procstat import describe_machine

DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


@dataclass(frozen=True)
class Stats:
    """Summary of a latency sample, in milliseconds.

    Attributes:
        count: the number of samples.
        median_ms: the 50th percentile.
        p99_ms: the 99th percentile, by the nearest-rank method.
        max_ms: the largest sample.
    """

    count: int
    median_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> "Stats":
        """Summarize ``samples_ms``; raises ValueError on an empty sample."""
        if not samples_ms:
            raise ValueError("no samples to summarize")
        ordered = sorted(samples_ms)
        return cls(
            count=len(ordered),
            median_ms=percentile(ordered, 50),
            p99_ms=percentile(ordered, 99),
            max_ms=ordered[-1],
        )


def percentile(ordered: Sequence[float], percent: float) -> float:
    """Return the nearest-rank percentile of an ascending, non-empty sequence."""
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Row:
    """One line of a table: a latency sample, or a single figure with its unit.

    Attributes:
        name: what was measured.
        stats: the latency summary, for a latency row.
        value: the single figure, for a figure row.
        unit: the unit of ``value``.
        reference: the figure of the reference in the same run, to compare
            against (the p99 for latency rows); None when there is none.
        goal: the goal in words, such as ``p99 <= 5 ms``, or empty.
        met: whether the goal was met; None when there is no goal.
    """

    name: str
    stats: Stats | None = None
    value: float | None = None
    unit: str = "ms"
    reference: float | None = None
    goal: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        """This row's figure divided by the reference's, or None."""
        mine = self.stats.p99_ms if self.stats is not None else self.value
        if self.reference is None or mine is None or self.reference == 0:
            return None
        return mine / self.reference


@dataclass
class Section:
    """The outcome of one benchmark.

    Attributes:
        name: the short name used in the docs markers and on the command line.
        title: the table's heading.
        rows: the table.
        figures: flat JSON keys and their values.
        notes: sentences printed and written under the table.
    """

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def goal_row(row: Row, limit: float, *, above: bool = False, what: str = "p99") -> Row:
    """Set ``row.goal`` and ``row.met`` for a limit on its p99 (or its value)."""
    mine = row.stats.p99_ms if row.stats is not None else row.value
    sign = ">=" if above else "<="
    row.goal = f"{what} {sign} {limit:g} {row.unit}".strip()
    if mine is not None:
        row.met = mine >= limit if above else mine <= limit
    return row


def markdown_table(section: Section) -> str:
    """Render a section as a Markdown table with its notes below."""
    lines = [
        "| measure | n | median | p99 | max | unit | ratio to reference | goal |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for row in section.rows:
        lines.append("| " + " | ".join(_cells(row)) + " |")
    text = "\n".join(lines)
    if section.notes:
        text += "\n\n" + "\n".join(f"- {note}" for note in section.notes)
    return text


def print_section(section: Section) -> None:
    """Print a section as a plain-text table."""
    header = ("measure", "n", "median", "p99", "max", "unit", "ratio", "goal")
    table = [header] + [tuple(_cells(row)) for row in section.rows]
    widths = [max(len(line[index]) for line in table) for index in range(len(header))]
    print(f"\n== {section.title}")
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    for note in section.notes:
        print(f"  * {note}")


def machine_text(shared: bool) -> str:
    """Describe the machine and when the run happened, in one Markdown paragraph."""
    machine = describe_machine()
    text = (
        f"Measured on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {machine.cpu_model}, "
        f"{machine.cores} logical CPUs, {machine.python}, 1-minute load average "
        f"{machine.load_average:.2f} at the start."
    )
    if shared:
        text += (
            " The machine was shared with other test runs while this ran, so the tails "
            "(p99, max) include interference from them."
        )
    return text


def write_json(path: Path, sections: Iterable[Section], machine: str) -> None:
    """Write every section's figures as one flat JSON object, plus ``machine``."""
    merged: dict[str, Any] = {"machine": machine}
    for section in sections:
        merged.update(section.figures)
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def rewrite_docs(sections: Iterable[Section], machine: str, path: Path = DOCS_PATH) -> None:
    """Replace the generated blocks of ``path``; add a block that is missing at the end."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Performance\n"
    blocks = {"machine": machine}
    blocks.update({section.name: markdown_table(section) for section in sections})
    for name, body in blocks.items():
        pattern = re.compile(
            rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.DOTALL
        )
        block = f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->"
        if pattern.search(text):
            text = pattern.sub(lambda _match, block=block: block, text)
        else:
            text = text.rstrip("\n") + f"\n\n{block}\n"
    path.write_text(text, encoding="utf-8")


def _cells(row: Row) -> list[str]:
    if row.stats is not None:
        stats = row.stats
        numbers = [str(stats.count), _number(stats.median_ms), _number(stats.p99_ms)]
        numbers.append(_number(stats.max_ms))
    else:
        numbers = ["1", "", _number(row.value) if row.value is not None else "absent", ""]
    ratio = row.ratio
    goal = row.goal
    if row.met is not None:
        goal += " met" if row.met else " MISSED"
    return [row.name, *numbers, row.unit, f"{ratio:.2f}" if ratio is not None else "", goal]


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
