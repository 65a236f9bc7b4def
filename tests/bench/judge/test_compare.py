"""Comparing results: rows, noise band, resolution, repeated runs, family-wise control, CLI."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.errors import ResultError, UsageError
from bench.histogram import Histogram, bucket_upper
from bench.judge import compare
from bench.judge.compare import (
    NOISE,
    build,
    compare_groups,
    compare_pair,
    load_results,
    manifest_warnings,
    precomputed_steps,
)
from tests.bench.conftest import ROOT, run_cli

Factory = Callable[..., dict[str, Any]]
GATE_METRICS = ["throughput", "issued", "p50", "p90", "p99", "p99.9"] + [
    f"issue.{p}" for p in ("p50", "p90", "p99", "p99.9")
]


def _rows(a: dict[str, Any], b: dict[str, Any], **kwargs: Any) -> dict[str, compare.Row]:
    return {row.metric: row for row in compare_pair(a, b, **kwargs)}


def _scaled(result: dict[str, Any], name: str, factor: float) -> dict[str, Any]:
    """The result with one histogram's values multiplied by `factor` (noise kept)."""
    copied = copy.deepcopy(result)
    histogram = Histogram.decode(copied["histograms"][name])
    nonzero = np.nonzero(histogram.counts)[0]
    values = np.repeat(np.minimum(bucket_upper(nonzero), histogram.max), histogram.counts[nonzero])
    scaled = Histogram()
    scaled.record_many(np.round(values * factor).astype(np.int64))
    copied["histograms"][name] = scaled.encode()
    return copied


def _written(folder: Path, name: str, result: dict[str, Any]) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result))
    return path


def test_default_rows_lead_with_issued_and_skip_precomputed(result_factory: Factory) -> None:
    """issued first, enrollments and issued share beside it, end to end, measured steps only."""
    a, b = result_factory(seed=1), result_factory(seed=2)
    metrics = [row.metric for row in compare_pair(a, b)]
    assert metrics[:3] == ["issued", "enrollments", "issued-share"]
    assert {"p50", "p90", "p99", "p99.9", "issue.p50", "install.p99"} <= set(metrics)
    assert not [m for m in metrics if m.startswith(("generate-key", "build-request"))]
    assert precomputed_steps([a, b]) == ["generate-key", "build-request"]


def test_every_metric_the_gate_names_has_a_row(result_factory: Factory) -> None:
    """throughput, issued, end-to-end and step percentiles: one row each, in that order."""
    a, b = result_factory(seed=1), result_factory(seed=2, issued_per_s=7000.0)
    rows = compare_pair(a, b, seed=0, metrics=GATE_METRICS)
    assert [row.metric for row in rows] == GATE_METRICS
    by_name = {row.metric: row for row in rows}
    assert by_name["throughput"].ratio == pytest.approx(7000.0 / 8000.0)
    assert by_name["throughput"].ratio == by_name["issued"].ratio
    assert by_name["throughput"].higher_is_better and not by_name["p99"].higher_is_better


def test_a_precomputed_step_has_no_row_even_when_asked(result_factory: Factory) -> None:
    """A step that did no work is never a 0 ms row: asking for it gives no row."""
    a, b = result_factory(seed=1), result_factory(seed=2)
    assert compare_pair(a, b, metrics=["generate-key.p50", "issue.p50"])[0].metric == "issue.p50"


def test_a_result_against_itself_is_within_noise(result_factory: Factory) -> None:
    """Identical data: ratio 1 and no verdict on any row."""
    a = result_factory(seed=1)
    rows = compare_pair(a, copy.deepcopy(a))
    assert {row.verdict for row in rows} <= {"within noise", "below resolution"}
    assert all(row.ratio == pytest.approx(1.0) for row in rows)


def test_microsecond_steps_are_below_resolution(result_factory: Factory) -> None:
    """lookup-dn 2 µs -> 1 µs is 'below resolution', never a 2x speed-up."""
    a = result_factory(seed=1)
    b = _scaled(a, "step.lookup-dn", 0.5)
    row = _rows(a, b)["lookup-dn.p50"]
    assert row.ratio == pytest.approx(0.5) and row.verdict == "below resolution"


def test_failing_fast_is_a_regression(result_factory: Factory) -> None:
    """Requests that fail fast: fewer issued/s and a worse share, never faster, though
    latency and all enrollments/s look better."""
    a = result_factory(seed=1)
    collapse = result_factory(seed=2, issued_per_s=400.0, failed=600_000, scale={"issue": 0.2})
    rows = _rows(a, collapse)
    assert rows["issued"].verdict == "slower" and rows["issued-share"].verdict == "worse"
    assert rows["enrollments"].ratio > 1.0
    some = _rows(a, result_factory(seed=2, issued_per_s=6000.0, failed=2000))
    assert some["issued-share"].verdict == "worse"
    assert "faster" not in {row.verdict for row in some.values()}


def test_one_run_per_side_uses_the_noise_band(result_factory: Factory) -> None:
    """A change inside the A/A band is within noise; one well beyond it is slower."""
    a = result_factory(seed=1)
    band = NOISE["step.p50"] * math.sqrt(2)
    inside = _rows(a, _scaled(result_factory(seed=2), "step.issue", math.exp(band)))
    beyond = _rows(a, _scaled(result_factory(seed=2), "step.issue", math.exp(5 * band)))
    assert inside["issue.p50"].verdict == "within noise"
    assert beyond["issue.p50"].verdict == "slower"
    assert inside["issue.p50"].low < 1.0 < inside["issue.p50"].high


def test_repeated_runs_take_their_interval_from_the_runs(result_factory: Factory) -> None:
    """Three runs a side with little spread: a 10% slower issue step reads slower."""
    baseline = [result_factory(seed=s) for s in (1, 2, 3)]
    candidate = [_scaled(result_factory(seed=s), "step.issue", 1.1) for s in (4, 5, 6)]
    rows = {row.metric: row for row in compare_groups(baseline, candidate)}
    assert rows["issue.p50"].verdict == "slower"
    assert rows["issue.p50"].ratio == pytest.approx(1.1, rel=0.02)
    same = compare_groups(baseline, [result_factory(seed=s) for s in (4, 5, 6)])
    assert {row.verdict for row in same} <= {"within noise", "below resolution"}


def test_repeated_runs_that_disagree_are_within_noise(result_factory: Factory) -> None:
    """Two runs a side whose own spread is wide give no verdict for a 10% change."""
    baseline = [result_factory(seed=1), _scaled(result_factory(seed=2), "step.issue", 1.5)]
    candidate = [
        _scaled(result_factory(seed=s), "step.issue", 1.1 * f) for s, f in ((3, 1), (4, 1.5))
    ]
    rows = {row.metric: row for row in compare_groups(baseline, candidate)}
    assert rows["issue.p50"].verdict == "within noise"


def test_more_rows_widen_every_interval(result_factory: Factory) -> None:
    """Bonferroni: the same row's interval is wider in a larger family."""
    a, b = result_factory(seed=1), result_factory(seed=2)
    alone = compare_pair(a, b, metrics=["issue.p50"])[0]
    among = _rows(a, b)["issue.p50"]
    assert among.high / among.low > alone.high / alone.low


@pytest.mark.parametrize(
    ("alpha", "freedom", "expected"),
    [(0.05, 1, 12.706), (0.05, 2, 4.303), (0.05, 10, 2.228), (0.01, 5, 4.032), (0.05, 400, 1.966)],
)
def test_student_t_critical_values(alpha: float, freedom: int, expected: float) -> None:
    """Two-sided Student's t critical values match the published tables."""
    assert compare._t_critical(alpha, freedom) == pytest.approx(expected, abs=2e-3)


def test_aa_false_alarms_stay_under_the_family_rate(result_factory: Factory) -> None:
    """Simulated A/A pairs whose runs vary as much as the band says: at most 10% with any
    row outside noise (the design rate is 5%; fixed seed, so the count is deterministic)."""
    rng = np.random.default_rng(7)
    alarms = 0
    for trial in range(20):
        pair = []
        for side in range(2):
            shift = math.exp(rng.normal(0.0, NOISE["step.p50"]))
            run = _scaled(result_factory(seed=100 * trial + side, count=2000), "step.issue", shift)
            run["throughput"]["issued_per_s"] *= math.exp(rng.normal(0.0, NOISE["rate"]))
            pair.append(run)
        rows = compare_pair(pair[0], pair[1])
        alarms += any(row.verdict not in ("within noise", "below resolution") for row in rows)
    assert alarms <= 2


def test_manifest_differences_are_warned(result_factory: Factory) -> None:
    """Another OpenSSL or worker count is named in a warning."""
    a = result_factory(seed=1)
    b = copy.deepcopy(a)
    b["manifest"]["openssl"] = "OpenSSL 9.9"
    b["manifest"]["workers"] = 16
    warnings = " ".join(manifest_warnings(a, b))
    assert "openssl differs" in warnings and "workers differs" in warnings


def test_different_targets_are_warned(result_factory: Factory) -> None:
    """Embedded against a served EST CA: the step rows mean different work, and it says so."""
    a = result_factory(seed=1)
    b = copy.deepcopy(a)
    assert not any("targets differ" in w for w in manifest_warnings(a, b))
    b["manifest"]["target"] = {
        "url": "est+https://x",
        "kind": "served",
        "protocol": "est",
        "tls": True,
    }
    warnings = " ".join(manifest_warnings(a, b))
    assert "targets differ (embedded vs served est+tls)" in warnings


def test_an_unsteady_run_is_warned(result_factory: Factory, tmp_path: Path) -> None:
    """A run whose issued/s swung from second to second is named in a warning."""
    a = result_factory(seed=1)
    b = copy.deepcopy(a)
    b["throughput"]["series"]["issued"] = [8000.0, 9000.0, 3000.0, 8000.0, 2000.0, 50.0]
    paths = [_written(tmp_path, "a", a), _written(tmp_path, "b", b)]
    (comparison,) = build(paths)
    assert any(w.startswith("b.json: issued/s varied") for w in comparison.warnings)


def test_itself_single_files_and_empty_sides_are_refused(
    result_factory: Factory, tmp_path: Path
) -> None:
    """A file compared with itself, or alone, or a side without runs, is a usage error."""
    path = _written(tmp_path, "a", result_factory(seed=1))
    with pytest.raises(UsageError, match="itself"):
        load_results([path, path])
    with pytest.raises(UsageError, match="at least two"):
        build([path])
    with pytest.raises(UsageError, match="each side"):
        compare_groups([result_factory(seed=1)], [])


def test_other_kinds_are_refused(result_factory: Factory, tmp_path: Path) -> None:
    """A capacity result is a ResultError naming its kind."""
    run = result_factory(seed=1)
    capacity = {**{k: run[k] for k in ("schema_version", "manifest")}, "kind": "capacity"}
    capacity["points"] = []
    paths = [_written(tmp_path, "a", run), _written(tmp_path, "c", capacity)]
    with pytest.raises(ResultError, match="'capacity' result"):
        load_results(paths)


@pytest.mark.parametrize("output", ["table", "markdown", "json"])
def test_cli_formats(result_factory: Factory, tmp_path: Path, output: str) -> None:
    """compare prints a table, Markdown or JSON and exits 0; precomputed steps are named."""
    a = _written(tmp_path, "a", result_factory(seed=1))
    b = _written(tmp_path, "b", result_factory(seed=2))
    done = run_cli("compare", str(a), str(b), "--format", output)
    assert done.returncode == 0, done.stderr
    if output == "json":
        comparison = json.loads(done.stdout)["comparisons"][0]
        assert comparison["rows"][0]["metric"] == "issued"
        assert comparison["precomputed"] == ["generate-key", "build-request"]
    elif output == "markdown":
        assert "| metric | A | B | B/A | interval | verdict |" in done.stdout
    else:
        assert "issued" in done.stdout and "precomputed" in done.stdout
    assert "0.00 ms" not in done.stdout


def test_cli_groups_with_vs(result_factory: Factory, tmp_path: Path) -> None:
    """`compare A1 A2 --vs B1 B2` is one comparison of two groups of runs."""
    a = [_written(tmp_path, f"a{s}", result_factory(seed=s)) for s in (1, 2)]
    b = [_written(tmp_path, f"b{s}", result_factory(seed=s)) for s in (3, 4)]
    done = run_cli("compare", *map(str, a), "--vs", *map(str, b), "--format", "json")
    assert done.returncode == 0, done.stderr
    (comparison,) = json.loads(done.stdout)["comparisons"]
    assert comparison["candidate_runs"] == [str(p) for p in b]
    assert comparison["method"].startswith("2 vs 2 runs")


def test_cli_missing_or_corrupt_files_are_exit_2(tmp_path: Path) -> None:
    """Missing and corrupt result files are one-line errors with exit code 2."""
    corrupt = tmp_path / "c.json"
    corrupt.write_text("{")
    for files in ([str(tmp_path / "none.json"), str(corrupt)], [str(corrupt), str(corrupt)]):
        done = run_cli("compare", *files)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_readers_never_import_the_engine() -> None:
    """compare, report and export read result files only (DESIGN.md): no engine module loads."""
    code = (
        "import sys, bench.judge.compare, bench.judge.report, bench.judge.export;"
        "print([m for m in sys.modules if m == 'engine' or m.startswith('engine.')])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("first", "second", "below"),
    [
        (1, 2, True),
        (20, 25, True),
        (20, 26, False),
        (10_000, 10_024, True),
        (10_000, 10_040, False),
    ],
)
def test_resolution_is_a_few_microseconds_or_buckets(first: int, second: int, below: bool) -> None:
    """Within 5 µs, or 3 buckets (8 µs wide at 10 ms), is below what the histogram resolves."""
    assert compare._below_resolution(first, second) is below


def test_a_tail_percentile_of_few_samples_has_a_wider_interval(result_factory: Factory) -> None:
    """The sampling error of a percentile grows as its histogram holds fewer values."""
    few = compare_pair(result_factory(seed=1, count=200), result_factory(seed=2, count=200))
    many = compare_pair(result_factory(seed=1), result_factory(seed=2))
    width = {row.metric: row.high / row.low for row in many}
    assert all(row.high / row.low > width[row.metric] for row in few if row.metric == "p99.9")
