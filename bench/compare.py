"""`enrollbench compare A.json B.json [...]`: side by side, with ratios you can trust.

The first file is the baseline. For each other file and each row (throughput, CA issues/s,
end-to-end and per-step p50/p99) the ratio B/A comes with a 95% bootstrap interval: throughput
rows resample the per-second series of each run, latency rows resample each run's histogram
(multinomial over its buckets). A row is faster or slower only when its whole interval says so;
otherwise it is within noise. Manifest differences that make a comparison meaningless (CPU
model, cryptography or OpenSSL version, workers, Python) are printed as loud warnings.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

from bench.errors import ResultError, UsageError
from bench.histogram import Histogram, bucket_upper
from bench.results import read_result

RESAMPLES = 1000
_INVALIDATING = (
    "cpu_model",
    "cpu_count",
    "cryptography",
    "openssl",
    "workers",
    "python",
    "der_accelerated",
    "device_crypto",
)


@dataclass(frozen=True, slots=True)
class Row:
    """One metric of one comparison: values, ratio B/A with its interval, and the verdict."""

    metric: str
    baseline: float
    candidate: float
    ratio: float
    low: float
    high: float
    higher_is_better: bool
    verdict: str


def _verdict(low: float, high: float, higher_is_better: bool) -> str:
    if low > 1.0:
        return "faster" if higher_is_better else "slower"
    if high < 1.0:
        return "slower" if higher_is_better else "faster"
    return "within noise"


def _steady_series(result: Mapping[str, Any], name: str) -> npt.NDArray[np.float64]:
    """Per-second counts after warm-up, without the last (partial) second."""
    series = np.asarray(result["throughput"]["series"][name], dtype=np.float64)
    warmup = float(result["manifest"]["profile_as_run"]["load"]["warmup_seconds"])
    steady = series[int(np.ceil(warmup)) : max(int(np.ceil(warmup)) + 1, series.size - 1)]
    return steady if steady.size else series


def _throughput_row(
    metric: str,
    name: str,
    value_key: str,
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    rng: np.random.Generator,
) -> Row:
    first, second = _steady_series(a, name), _steady_series(b, name)
    base = float(a["throughput"][value_key])
    cand = float(b["throughput"][value_key])
    if first.size < 2 or second.size < 2 or not first.mean():
        ratio = cand / base if base else float("nan")
        return Row(metric, base, cand, ratio, float("-inf"), float("inf"), True, "within noise")
    means_a = rng.choice(first, (RESAMPLES, first.size)).mean(axis=1)
    means_b = rng.choice(second, (RESAMPLES, second.size)).mean(axis=1)
    ratio = cand / base if base else float("nan")
    return _row(metric, base, cand, ratio, means_b / np.maximum(means_a, 1e-12), True)


def _row(
    metric: str,
    base: float,
    cand: float,
    ratio: float,
    draws: npt.NDArray[np.float64],
    higher_is_better: bool,
) -> Row:
    """A row from bootstrap draws of the ratio: their central 95% and the verdict."""
    low, high = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
    verdict = _verdict(low, high, higher_is_better)
    return Row(metric, base, cand, ratio, low, high, higher_is_better, verdict)


def _percentile_draws(
    histogram: Histogram, percent: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """Bootstrap draws of a percentile: resample the histogram's counts (multinomial)."""
    nonzero = np.nonzero(histogram.counts)[0]
    counts = histogram.counts[nonzero]
    total = int(counts.sum())
    edges = np.minimum(bucket_upper(nonzero), histogram.max).astype(np.float64)
    samples = rng.multinomial(total, counts / total, size=RESAMPLES)
    cumulative = np.cumsum(samples, axis=1)
    rank = np.ceil(percent / 100.0 * total)
    positions = (cumulative < rank).sum(axis=1)
    draws: npt.NDArray[np.float64] = edges[np.minimum(positions, edges.size - 1)]
    return draws


def _latency_row(
    metric: str,
    name: str,
    percent: float,
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    rng: np.random.Generator,
) -> Row | None:
    if name not in a["histograms"] or name not in b["histograms"]:
        return None
    first = Histogram.decode(a["histograms"][name])
    second = Histogram.decode(b["histograms"][name])
    if first.count == 0 or second.count == 0:
        return None
    base, cand = float(first.percentile(percent)), float(second.percentile(percent))
    # Values are whole microseconds: below 1 µs both sides count as 1 µs (no division by 0).
    ratios = np.maximum(_percentile_draws(second, percent, rng), 1.0) / np.maximum(
        _percentile_draws(first, percent, rng), 1.0
    )
    return _row(metric, base, cand, max(cand, 1.0) / max(base, 1.0), ratios, False)


def compare_pair(a: Mapping[str, Any], b: Mapping[str, Any], seed: int = 0) -> list[Row]:
    """Every row for baseline `a` against candidate `b`."""
    rng = np.random.default_rng(seed)
    rows = [
        _throughput_row("throughput", "completed", "enrollments_per_s", a, b, rng),
        _throughput_row("issued", "issued", "issued_per_s", a, b, rng),
    ]
    names = [("end_to_end.latency", "")] + [
        (f"step.{step}", f"{step}.") for step in a["latency"]["steps"]
    ]
    for histogram, prefix in names:
        for label, percent in (("p50", 50.0), ("p99", 99.0)):
            row = _latency_row(f"{prefix}{label}", histogram, percent, a, b, rng)
            if row is not None:
                rows.append(row)
    return rows


def manifest_warnings(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Differences between two manifests that invalidate a comparison."""
    first, second = a["manifest"], b["manifest"]
    warnings = [
        f"{key} differs: {first.get(key)!r} vs {second.get(key)!r}"
        for key in _INVALIDATING
        if first.get(key) != second.get(key)
    ]
    if first.get("profile_sha256") != second.get("profile_sha256"):
        warnings.append(f"profiles differ ({first.get('profile')} vs {second.get('profile')})")
    return warnings


def load_results(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Read results for comparison; refuse fewer than two, or a file compared with itself."""
    if len(paths) < 2:
        raise UsageError("compare needs at least two result files")
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise UsageError("a result file is compared with itself")
    results = [read_result(p) for p in paths]
    for path, result in zip(paths, results, strict=True):
        if result.get("kind") != "run":
            raise ResultError(f"{path}: a {result.get('kind')!r} result, compare reads run results")
    return results


def render_table(
    paths: Sequence[Path],
    rows: Sequence[Sequence[Row]],
    warnings: Sequence[Sequence[str]],
    console: Console,
) -> None:
    for path, pair, notes in zip(paths[1:], rows, warnings, strict=True):
        for note in notes:
            console.print(f"[bold red]WARNING: {note}: this comparison may not mean anything[/]")
        table = Table(title=f"{paths[0].name} -> {path.name}")
        for column in ("metric", "A", "B", "B/A", "95% CI", "verdict"):
            table.add_column(column, justify="left" if column in ("metric", "verdict") else "right")
        for row in pair:
            table.add_row(
                row.metric,
                _value(row, row.baseline),
                _value(row, row.candidate),
                f"{row.ratio:.3f}",
                f"{row.low:.3f}-{row.high:.3f}",
                row.verdict,
            )
        console.print(table)


def _value(row: Row, value: float) -> str:
    if row.higher_is_better:
        return f"{value:,.0f}/s"
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} µs"


def render_markdown(
    paths: Sequence[Path], rows: Sequence[Sequence[Row]], warnings: Sequence[Sequence[str]]
) -> str:
    lines = []
    for path, pair, notes in zip(paths[1:], rows, warnings, strict=True):
        lines.append(f"### `{paths[0].name}` → `{path.name}`\n")
        lines += [
            f"> **Warning:** {note}: this comparison may not mean anything\n" for note in notes
        ]
        lines.append("| metric | A | B | B/A | 95% CI | verdict |")
        lines.append("|---|---:|---:|---:|---:|---|")
        for row in pair:
            lines.append(
                f"| {row.metric} | {_value(row, row.baseline)} | {_value(row, row.candidate)} | "
                f"{row.ratio:.3f} | {row.low:.3f} to {row.high:.3f} | {row.verdict} |"
            )
        lines.append("")
    return "\n".join(lines)


def render_json(
    paths: Sequence[Path], rows: Sequence[Sequence[Row]], warnings: Sequence[Sequence[str]]
) -> str:
    return json.dumps(
        {
            "baseline": str(paths[0]),
            "comparisons": [
                {"candidate": str(path), "warnings": list(notes), "rows": [asdict(r) for r in pair]}
                for path, pair, notes in zip(paths[1:], rows, warnings, strict=True)
            ],
        },
        indent=1,
    )


def compare(paths: Sequence[Path], output: str, console: Console) -> None:
    results = load_results(paths)
    rows = [compare_pair(results[0], other) for other in results[1:]]
    warnings = [manifest_warnings(results[0], other) for other in results[1:]]
    if output == "markdown":
        console.print(render_markdown(paths, rows, warnings), markup=False, highlight=False)
    elif output == "json":
        console.print(render_json(paths, rows, warnings), markup=False, highlight=False)
    else:
        render_table(paths, rows, warnings, console)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`enrollbench compare` flags."""
    parser.add_argument("results", nargs="+", type=Path, help="baseline first")
    parser.add_argument("--format", choices=["table", "markdown", "json"], default="table")


def command(args: argparse.Namespace) -> int:
    compare(args.results, args.format, Console(width=max(Console().width, 120)))
    return 0
