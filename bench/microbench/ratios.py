"""Interleaved, paired ratios for the engine's performance targets (issue: engine).

    python -m bench.microbench.ratios [--blocks N] [--per-block N] [--json PATH]

Each row times two callables in alternating blocks (random order per pair) and reports the
median of the per-block ratios with a 95% bootstrap interval, plus each side's median time per
operation with its interquartile range.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from bench.judge.paired import PairedTiming, time_paired
from bench.microbench.workloads import CaWorkload


@dataclass(frozen=True, slots=True)
class Comparison:
    """One row: B/A, and the target B/A must stay under (or A/B must reach)."""

    name: str
    baseline: str
    subject: str
    target: str
    meets: Callable[[float], bool]


COMPARISONS: dict[str, list[Comparison]] = {
    "p256": [
        Comparison("CA side / raw bound", "raw_bound", "ca_side", "<= 1.25", lambda r: r <= 1.25),
        Comparison("naive / raw bound", "raw_bound", "naive", "(reference)", lambda _: True),
        Comparison(
            "request builder / template",
            "request_template",
            "request_builder",
            ">= 2.0",
            lambda r: r >= 2.0,
        ),
        Comparison(
            "certificate builder / template",
            "certificate_template",
            "certificate_builder",
            ">= 2.0",
            lambda r: r >= 2.0,
        ),
    ],
    "rsa2048": [
        Comparison("CA side / raw bound", "raw_bound", "ca_side", "<= 1.10", lambda r: r <= 1.10),
        Comparison("naive / raw bound", "raw_bound", "naive", "(reference)", lambda _: True),
    ],
}


def measure(blocks: int, per_block: int) -> list[tuple[str, Comparison, PairedTiming]]:
    """Run every comparison, workload by workload."""
    rows = []
    for key, comparisons in COMPARISONS.items():
        workload = CaWorkload(key, key, "sha256")
        try:
            for comparison in comparisons:
                timing = time_paired(
                    getattr(workload, comparison.baseline),
                    getattr(workload, comparison.subject),
                    blocks=blocks,
                    per_block=per_block if key == "p256" else max(per_block // 4, 10),
                )
                rows.append((key, comparison, timing))
        finally:
            workload.close()
    return rows


def _spread(timing: PairedTiming, side: str) -> str:
    low, high = timing.spread(side)
    median = timing.a_median_ns if side == "a" else timing.b_median_ns
    return f"{median / 1000:.1f} µs [{low / 1000:.1f}-{high / 1000:.1f}]"


def render(rows: Sequence[tuple[str, Comparison, PairedTiming]], console: Console) -> None:
    table = Table(title="engine ratios (interleaved blocks; 95% bootstrap CI of the median)")
    for column in (
        "keys",
        "comparison",
        "ratio",
        "95% CI",
        "A: median [IQR]",
        "B: median [IQR]",
        "target",
        "met",
    ):
        table.add_column(column)
    for key, comparison, timing in rows:
        ratio = timing.ratio
        table.add_row(
            key,
            comparison.name,
            f"{ratio.estimate:.3f}",
            f"{ratio.low:.3f}-{ratio.high:.3f}",
            _spread(timing, "a"),
            _spread(timing, "b"),
            comparison.target,
            "yes" if comparison.meets(ratio.estimate) else "NO",
        )
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.microbench.ratios")
    parser.add_argument("--blocks", type=int, default=41)
    parser.add_argument("--per-block", type=int, default=100)
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    rows = measure(args.blocks, args.per_block)
    render(rows, Console(width=max(Console().width, 150)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(
                [
                    {
                        "keys": key,
                        "comparison": comparison.name,
                        "ratio": timing.ratio.estimate,
                        "ci": [timing.ratio.low, timing.ratio.high],
                        "a_median_ns": timing.a_median_ns,
                        "b_median_ns": timing.b_median_ns,
                        "target": comparison.target,
                    }
                    for key, comparison, timing in rows
                ],
                handle,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
