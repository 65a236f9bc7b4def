"""`enrollbench compare`: side by side, with verdicts that mean something.

    enrollbench compare A.json B.json [C.json ...]        # baseline first, one run per side
    enrollbench compare A1.json A2.json A3.json --vs B1.json B2.json B3.json   # repeated runs

Each row is one metric: issued/s (the headline), enrollments/s beside it, the issued share,
end-to-end p50/p90/p99/p99.9 and per-step p50/p99. Its ratio B/A comes with an interval, and the
verdict (faster/slower, better/worse for the issued share) needs all of:

1. the interval excludes 1. Its width comes from run-to-run variation: with two or more runs per
   side, from the runs' own spread (Welch's t on log values); with one run per side, from the
   noise band NOISE measured here in A/A runs (one run's spread, per row kind), plus the
   sampling error of a percentile over the run's histogram.
2. the intervals are simultaneous: Bonferroni over every row of the comparison, so the chance
   that ANY row of an A/A comparison leaves "within noise" is at most FAMILY_ALPHA.
3. the change is at least MIN_EFFECT for its row kind (smaller changes are not worth a verdict).
4. latency rows differ by more than the histogram resolves: values within RESOLUTION_US µs or
   RESOLUTION_BUCKETS buckets of each other are "below resolution" (1 µs -> 2 µs is no 2x).

A change that makes enrollments fail fast shows as fewer issued/s and a worse issued share,
never as a speed-up: issued/s is the headline. Steps that did no work (precomputed) have no row.
Manifest differences that make a comparison meaningless (CPU model, cryptography or OpenSSL
version, workers, Python) and runs whose throughput swung from second to second are warned.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.errors import ResultError, UsageError
from bench.histogram import Histogram, bucket_index, bucket_upper
from bench.results import read_result

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}
STEP_TABLE_PERCENTILES = ("p50", "p99")  # the default table; any pNN can be asked for
FAMILY_ALPHA = 0.05  # chance that an A/A comparison shows any row outside noise
# One run's spread: the standard deviation of log(value) between repeated 5 s
# `enrollbench run p256-auto --duration 5` runs of identical code on this machine kind (2 vCPUs,
# nothing else running), per row kind: 10 runs at ae0e1a7 (2026-11-30), pooled over steps of
# 10 µs or more, rounded up (step p99 and p99.9 from the larger of two sets of 10). On a host
# shared with other work runs differ far more (measured under load: rate 0.48, step p99 0.88);
# compare warns when a run's per-second series is unsteady. results/README.md "How compare
# decides".
NOISE = {
    "rate": 0.10,
    "share": 0.0,  # the issued share is a count: its binomial error is computed per run
    "end_to_end.p50": 0.14,
    "end_to_end.p90": 0.11,
    "end_to_end.p99": 0.12,
    "end_to_end.p99.9": 0.12,
    "step.p50": 0.16,
    "step.p90": 0.12,
    "step.p99": 0.23,
    "step.p99.9": 0.20,
}
# The smallest change worth a verdict, as a fraction of the baseline.
MIN_EFFECT = {
    "rate": 0.03,
    "share": 0.001,
    "p50": 0.05,
    "p90": 0.05,
    "p99": 0.10,
    "p99.9": 0.20,
}
RESOLUTION_US = 5  # timing a step costs ~1 µs and jitters by a few: no verdict below this
RESOLUTION_BUCKETS = 3  # nor within 3 histogram buckets (0.3% above 2,048 µs)
_RATE_FLOOR = 1e-3  # per second: a rate of 0 is compared as this (its log is finite)
_UNSTEADY = 0.15  # per-second issued counts varying more than this: warn
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
    """One metric of one comparison: values, ratio B/A with its interval, and the verdict.

    With several runs per side, baseline and candidate are geometric means over the runs.
    The verdict is one of faster, slower, better, worse, within noise, below resolution.
    """

    metric: str
    baseline: float
    candidate: float
    ratio: float
    low: float
    high: float
    higher_is_better: bool
    verdict: str


@dataclass(frozen=True, slots=True)
class _Sample:
    """One metric in one run: its value and the sampling error of log(value)."""

    value: float
    sampling: float


@dataclass(slots=True)
class _Run:
    """A result with its histograms decoded once."""

    result: Mapping[str, Any]
    histograms: dict[str, Histogram] = field(default_factory=dict)

    def histogram(self, name: str) -> Histogram | None:
        if name not in self.histograms:
            encoded = self.result["histograms"].get(name)
            if encoded is None:
                return None
            self.histograms[name] = Histogram.decode(encoded)
        return self.histograms[name]

    def steps(self) -> dict[str, bool]:
        """Step label -> precomputed."""
        return {label: s["precomputed"] for label, s in self.result["latency"]["steps"].items()}


# ---- one metric in one run ----


def _split(metric: str) -> tuple[str | None, str]:
    """`issue.p99` -> ("issue", "p99"); `p99` -> (None, "p99"); `issued` -> (None, "issued")."""
    for name in PERCENTILES:
        if metric == name:
            return None, name
        if metric.endswith(f".{name}"):
            return metric.removesuffix(f".{name}"), name
    return None, metric


def _kind(metric: str) -> str:
    step, name = _split(metric)
    if name in ("issued", "throughput", "enrollments"):
        return "rate"
    if name == "issued-share":
        return "share"
    return f"{'step' if step else 'end_to_end'}.{name}"


def _effect_kind(metric: str) -> str:
    kind = _kind(metric)
    return kind if kind in ("rate", "share") else _split(metric)[1]


def _sample(run: _Run, metric: str) -> _Sample | None:
    """The metric's value in one run, or None when the run cannot give it."""
    step, name = _split(metric)
    throughput, outcomes = run.result["throughput"], run.result["outcomes"]
    rates = {  # throughput is issued certificates per second (DESIGN.md)
        "issued": throughput["issued_per_s"],
        "throughput": throughput["issued_per_s"],
        "enrollments": throughput["enrollments_per_s"],
    }
    if name in rates:
        return _Sample(max(float(rates[name]), _RATE_FLOOR), 0.0)
    if name == "issued-share":
        return _share(outcomes["issued"], outcomes["started"])
    if name not in PERCENTILES or (step is not None and run.steps().get(step, True)):
        return None  # unknown, or a step absent or precomputed (no work: nothing to compare)
    histogram = run.histogram("end_to_end.latency" if step is None else f"step.{step}")
    if histogram is None or histogram.count == 0:
        return None
    percent = PERCENTILES[name]
    value = max(histogram.percentile(percent), 1)
    return _Sample(float(value), _percentile_error(histogram, percent))


def _share(issued: int, started: int) -> _Sample | None:
    if started == 0:
        return None
    share = max(issued / started, 0.5 / started)
    # binomial standard error of the share, on the log scale
    return _Sample(share, math.sqrt((1.0 - share) / (share * started)))


def _percentile_error(histogram: Histogram, percent: float) -> float:
    """Sampling error of log(percentile): half the log distance between the values one
    binomial standard error of rank below and above it, at least one rank either side (order
    statistics, no resampling; a far tail of a small run is then as wide as its last values)."""
    count = histogram.count
    rank = percent / 100.0 * count
    spread = max(math.sqrt(rank * (1.0 - percent / 100.0)), 1.0)
    below = max(math.floor(rank - spread), 1) / count * 100.0
    above = min(math.ceil(rank + spread), count) / count * 100.0
    low, high = max(histogram.percentile(below), 1), max(histogram.percentile(above), 1)
    return (math.log(high) - math.log(low)) / 2.0


# ---- one row: two groups of runs ----


def _row(metric: str, first: Sequence[_Sample], second: Sequence[_Sample], family: int) -> Row:
    kind = _kind(metric)
    higher = kind in ("rate", "share")
    logs_a = np.log([s.value for s in first])
    logs_b = np.log([s.value for s in second])
    difference = float(logs_b.mean() - logs_a.mean())
    error, critical = _spread(kind, first, second, logs_a, logs_b, family)
    base, cand = math.exp(float(logs_a.mean())), math.exp(float(logs_b.mean()))
    ratio = math.exp(difference)
    low, high = math.exp(difference - critical * error), math.exp(difference + critical * error)
    if not higher and _below_resolution(base, cand):
        verdict = "below resolution"
    elif (low <= 1.0 <= high) or abs(ratio - 1.0) < MIN_EFFECT[_effect_kind(metric)]:
        verdict = "within noise"
    elif kind == "share":
        verdict = "better" if ratio > 1.0 else "worse"
    else:
        verdict = "faster" if (ratio > 1.0) == higher else "slower"
    return Row(metric, base, cand, ratio, low, high, higher, verdict)


def _spread(
    kind: str,
    first: Sequence[_Sample],
    second: Sequence[_Sample],
    logs_a: np.ndarray[Any, np.dtype[np.float64]],
    logs_b: np.ndarray[Any, np.dtype[np.float64]],
    family: int,
) -> tuple[float, float]:
    """Standard error of the log ratio and the simultaneous (Bonferroni) critical value.

    Two or more runs per side: the runs' own spread, Student's t with Welch's degrees of
    freedom (rounded down: conservative). Otherwise: the A/A noise band, normal.
    The percentiles' sampling error is a floor under either.
    """
    alpha = FAMILY_ALPHA / max(family, 1)
    sampling = math.sqrt(
        statistics.fmean(s.sampling**2 for s in first) / len(first)
        + statistics.fmean(s.sampling**2 for s in second) / len(second)
    )
    if len(first) >= 2 and len(second) >= 2:
        var_a = float(logs_a.var(ddof=1)) / len(first)
        var_b = float(logs_b.var(ddof=1)) / len(second)
        error = math.sqrt(var_a + var_b)
        if error == 0.0:
            return sampling, _normal_critical(alpha)
        freedom = (var_a + var_b) ** 2 / (
            var_a**2 / (len(first) - 1) + var_b**2 / (len(second) - 1)
        )
        return max(error, sampling), _t_critical(alpha, math.floor(freedom))
    band = NOISE[kind] ** 2 * (1.0 / len(first) + 1.0 / len(second))
    return math.sqrt(band + sampling**2), _normal_critical(alpha)


def _normal_critical(alpha: float) -> float:
    return statistics.NormalDist().inv_cdf(1.0 - alpha / 2.0)


def _t_critical(alpha: float, freedom: int) -> float:
    """The two-sided critical value of Student's t: bisection on its exact CDF."""
    if freedom > 1000:  # within 0.1% of the normal value
        return _normal_critical(alpha)
    low, high = 0.0, 1e7
    for _ in range(200):
        middle = (low + high) / 2.0
        if _t_central(middle, freedom) < 1.0 - alpha:
            low = middle
        else:
            high = middle
    return high


def _t_central(t: float, freedom: int) -> float:
    """P(|T| < t) for Student's t with integer degrees of freedom (Abramowitz & Stegun
    26.7.3-4: finite sums in cos(theta), theta = atan(t / sqrt(freedom)))."""
    theta = math.atan(t / math.sqrt(freedom))
    cos2 = math.cos(theta) ** 2
    if freedom % 2 == 0:
        term = total = 1.0
        for k in range(1, freedom // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total
    if freedom == 1:
        return 2.0 * theta / math.pi
    term = total = math.cos(theta)
    for k in range(1, (freedom - 1) // 2):
        term *= cos2 * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + math.sin(theta) * total)


def _below_resolution(first: float, second: float) -> bool:
    """Within a few µs, or a few histogram buckets, of each other."""
    index = int(bucket_index(np.array([round(max(first, second))], dtype=np.int64))[0])
    edges = bucket_upper(np.array([max(index - 1, 0), index], dtype=np.int64))
    width = max(int(edges[1] - edges[0]), 1)
    return abs(second - first) <= max(RESOLUTION_US, RESOLUTION_BUCKETS * width)


# ---- comparisons ----


def default_metrics(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The table's rows: headline, rates, end to end, and each measured step's p50/p99."""
    metrics = ["issued", "enrollments", "issued-share", *PERCENTILES]
    labels: dict[str, bool] = {}
    for result in results:
        for label, step in result["latency"]["steps"].items():
            labels[label] = labels.get(label, False) or step["precomputed"]
    for label, precomputed in labels.items():
        if not precomputed:
            metrics += [f"{label}.{p}" for p in STEP_TABLE_PERCENTILES]
    return metrics


def precomputed_steps(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Steps that did no work in at least one of the runs: shown as such, never as 0 ms."""
    labels: dict[str, None] = {}
    for result in results:
        for label, step in result["latency"]["steps"].items():
            if step["precomputed"]:
                labels[label] = None
    return list(labels)


def compare_groups(
    baseline: Sequence[Mapping[str, Any]],
    candidate: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
) -> list[Row]:
    """Rows for the baseline runs against the candidate runs (one or more each).

    `metrics` names rows (issued, throughput (= issued/s), enrollments, issued-share, p50, p90,
    p99, p99.9, <step>.pNN); None gives the default table. A metric the runs cannot give (a
    precomputed or absent step) has no row. The family for the simultaneous intervals is every
    metric asked for.
    """
    if not baseline or not candidate:
        raise UsageError("compare needs at least one run on each side")
    names = list(metrics) if metrics is not None else default_metrics([*baseline, *candidate])
    first, second = [_Run(r) for r in baseline], [_Run(r) for r in candidate]
    rows = []
    for metric in names:
        samples_a = [_sample(run, metric) for run in first]
        samples_b = [_sample(run, metric) for run in second]
        if all(s is not None for s in [*samples_a, *samples_b]):
            rows.append(_row(metric, _present(samples_a), _present(samples_b), max(len(names), 1)))
    return rows


def _present(samples: Sequence[_Sample | None]) -> list[_Sample]:
    return [s for s in samples if s is not None]


def compare_pair(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    seed: int = 0,
    metrics: Sequence[str] | None = None,
) -> list[Row]:
    """Rows for baseline run `a` against candidate run `b` (one run per side: noise band).

    `seed` is accepted for callers of the bootstrap version; verdicts are now deterministic.
    """
    del seed
    return compare_groups([a], [b], metrics)


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
    kinds = [_target_kind(m) for m in (first, second)]
    if kinds[0] != kinds[1]:
        warnings.append(
            f"targets differ ({kinds[0]} vs {kinds[1]}): a step measured in-process, on a "
            f"client or on a server means different work (latency.step_places)"
        )
    return warnings


def _target_kind(manifest: Mapping[str, Any]) -> str:
    """What a run measured: `embedded`, or protocol and transport of its wire target."""
    target = manifest.get("target") or {"kind": "embedded"}
    if target.get("kind", "embedded") == "embedded":
        return "embedded"
    return f"{target['kind']} {target.get('protocol')}{'+tls' if target.get('tls') else ''}"


def unsteady(result: Mapping[str, Any]) -> float | None:
    """The run's second-to-second variation of issued/s (after warm-up, without the last,
    partial second) when it exceeds _UNSTEADY: something else competed for the CPU."""
    series = [float(v) for v in result["throughput"]["series"]["issued"]]
    warmup = float(result["manifest"]["profile_as_run"]["load"]["warmup_seconds"])
    steady = series[math.ceil(warmup) : -1]
    if len(steady) < 2 or statistics.fmean(steady) <= 0:
        return None
    variation = statistics.stdev(steady) / statistics.fmean(steady)
    return variation if variation > _UNSTEADY else None


# ---- the command ----


@dataclass(frozen=True, slots=True)
class Comparison:
    """One table: baseline runs against candidate runs, with its rows and warnings."""

    baseline: tuple[Path, ...]
    candidate: tuple[Path, ...]
    rows: tuple[Row, ...]
    warnings: tuple[str, ...]
    precomputed: tuple[str, ...]

    @property
    def title(self) -> str:
        return f"{_names(self.baseline)} -> {_names(self.candidate)}"

    @property
    def method(self) -> str:
        runs = f"{len(self.baseline)} vs {len(self.candidate)} runs"
        if len(self.baseline) >= 2 and len(self.candidate) >= 2:
            return f"{runs}: intervals from the runs' own spread"
        return f"{runs}: intervals from the A/A noise band (two or more runs a side: from the runs)"


def _names(paths: Sequence[Path]) -> str:
    return " + ".join(p.name for p in paths)


def load_results(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Read run results; refuse a file given twice, or a result of another kind."""
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise UsageError("a result file is compared with itself")
    results = [read_result(p) for p in paths]
    for path, result in zip(paths, results, strict=True):
        if result["kind"] != "run":
            raise ResultError(f"{path}: a {result['kind']!r} result, compare reads run results")
    return results


def build(paths: Sequence[Path], against: Sequence[Path] | None = None) -> list[Comparison]:
    """Without `against`: the first file against each other. With it: one comparison of the
    group `paths` (baseline runs) against the group `against` (candidate runs)."""
    if against is None and len(paths) < 2:
        raise UsageError("compare needs at least two result files (or A.json --vs B.json)")
    results = load_results([*paths, *(against or [])])
    if against is not None:
        groups = [(tuple(paths), tuple(against))]
    else:
        groups = [((paths[0],), (other,)) for other in paths[1:]]
    by_path = dict(zip([*paths, *(against or [])], results, strict=True))
    return [_comparison(a, b, by_path) for a, b in groups]


def _comparison(
    first: tuple[Path, ...], second: tuple[Path, ...], by_path: Mapping[Path, dict[str, Any]]
) -> Comparison:
    baseline, candidate = [by_path[p] for p in first], [by_path[p] for p in second]
    warnings = [
        f"{path.name}: {note}"
        for path in (*first[1:], *second)
        for note in manifest_warnings(baseline[0], by_path[path])
    ]
    for path in (*first, *second):
        variation = unsteady(by_path[path])
        if variation is not None:
            warnings.append(
                f"{path.name}: issued/s varied {variation:.0%} from second to second (another "
                "process competing for the CPU?); its numbers carry more noise than the band"
            )
    return Comparison(
        first,
        second,
        tuple(compare_groups(baseline, candidate)),
        tuple(warnings),
        tuple(precomputed_steps([*baseline, *candidate])),
    )


def _value(row: Row, value: float) -> str:
    if row.metric == "issued-share":
        return f"{value:.2%}"
    if row.higher_is_better:
        return f"{value:,.0f}/s"
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} µs"


def _cells(row: Row) -> list[str]:
    return [
        row.metric,
        _value(row, row.baseline),
        _value(row, row.candidate),
        f"{row.ratio:.3f}",
        f"{row.low:.3f}-{row.high:.3f}",
        row.verdict,
    ]


_HEADER = ["metric", "A", "B", "B/A", "interval", "verdict"]


def render_table(comparisons: Sequence[Comparison], console: Console) -> None:
    for comparison in comparisons:
        for note in comparison.warnings:
            console.print(f"[bold red]WARNING: {note}[/]", highlight=False)
        table = Table(title=comparison.title, caption=_caption(comparison))
        for column in _HEADER:
            table.add_column(column, justify="left" if column in ("metric", "verdict") else "right")
        for row in comparison.rows:
            table.add_row(*_cells(row))
        console.print(table)


def _caption(comparison: Comparison) -> str:
    caption = (
        f"{comparison.method}; intervals hold together for all {len(comparison.rows)} rows "
        f"with {1 - FAMILY_ALPHA:.0%} confidence"
    )
    if comparison.precomputed:
        caption += f"; precomputed (no work, no row): {', '.join(comparison.precomputed)}"
    return caption


def render_markdown(comparisons: Sequence[Comparison]) -> str:
    lines = []
    for comparison in comparisons:
        lines.append(f"### {comparison.title}\n")
        lines += [f"> **Warning:** {note}\n" for note in comparison.warnings]
        lines.append("| " + " | ".join(_HEADER) + " |")
        lines.append("|---|---:|---:|---:|---:|---|")
        lines += ["| " + " | ".join(_cells(row)) + " |" for row in comparison.rows]
        lines.append(f"\n{_caption(comparison)}\n")
    return "\n".join(lines)


def render_json(comparisons: Sequence[Comparison]) -> str:
    return json.dumps(
        {
            "baseline": str(comparisons[0].baseline[0]),
            "comparisons": [
                {
                    "baseline_runs": [str(p) for p in c.baseline],
                    "candidate": str(c.candidate[0]),
                    "candidate_runs": [str(p) for p in c.candidate],
                    "method": c.method,
                    "family_alpha": FAMILY_ALPHA,
                    "warnings": list(c.warnings),
                    "precomputed": list(c.precomputed),
                    "rows": [asdict(r) for r in c.rows],
                }
                for c in comparisons
            ],
        },
        indent=1,
    )


def compare(
    paths: Sequence[Path], output: str, console: Console, against: Sequence[Path] | None = None
) -> None:
    comparisons = build(paths, against)
    if output == "markdown":
        console.print(render_markdown(comparisons), markup=False, highlight=False)
    elif output == "json":
        console.print(render_json(comparisons), markup=False, highlight=False)
    else:
        render_table(comparisons, console)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`enrollbench compare` flags."""
    parser.add_argument(
        "results", nargs="+", type=Path, help="baseline first; with --vs: the baseline runs"
    )
    parser.add_argument(
        "--vs",
        nargs="+",
        type=Path,
        metavar="RESULT",
        help="candidate runs: compare the group before --vs with this group (repeated runs)",
    )
    parser.add_argument("--format", choices=["table", "markdown", "json"], default="table")


def command(args: argparse.Namespace) -> int:
    compare(args.results, args.format, Console(width=max(Console().width, 120)), args.vs)
    return 0
