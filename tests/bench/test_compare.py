"""Comparing results: rows with intervals, verdicts, warnings, formats, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compare import compare_pair, load_results, manifest_warnings
from bench.errors import ResultError, UsageError
from bench.results import read_result
from tests.bench.conftest import ROOT, run_cli


def test_rows_cover_throughput_and_every_step(two_results: tuple[Path, Path]) -> None:
    """Throughput, CA issues, end-to-end and per-step p50/p99, each with an interval."""
    a, b = (read_result(p) for p in two_results)
    rows = {row.metric: row for row in compare_pair(a, b)}
    assert {"throughput", "issued", "p50", "p99", "issue.p50", "install.p99"} <= set(rows)
    for row in rows.values():
        assert row.low <= row.high
        assert row.verdict in {"faster", "slower", "within noise"}


def test_a_result_against_a_copy_is_within_noise(two_results: tuple[Path, Path]) -> None:
    """Identical data gives ratio 1 and 'within noise' on every row."""
    a = read_result(two_results[0])
    rows = compare_pair(a, json.loads(json.dumps(a)))
    assert all(row.verdict == "within noise" for row in rows)
    assert all(row.ratio == pytest.approx(1.0) for row in rows)


def test_halved_throughput_is_slower(two_results: tuple[Path, Path]) -> None:
    """Half the per-second completions is 'slower', with an interval below 1."""
    a = read_result(two_results[0])
    a["throughput"]["series"]["completed"] = [1000 + (7 * i) % 40 for i in range(12)]
    b = json.loads(json.dumps(a))
    b["throughput"]["series"]["completed"] = [
        v // 2 for v in a["throughput"]["series"]["completed"]
    ]
    b["throughput"]["enrollments_per_s"] /= 2
    row = next(r for r in compare_pair(a, b) if r.metric == "throughput")
    assert row.verdict == "slower" and row.high < 1.0


def test_manifest_differences_are_warned(two_results: tuple[Path, Path]) -> None:
    """Another OpenSSL or worker count is named in a warning."""
    a = read_result(two_results[0])
    b = json.loads(json.dumps(a))
    b["manifest"]["openssl"] = "OpenSSL 9.9"
    b["manifest"]["workers"] = 16
    warnings = " ".join(manifest_warnings(a, b))
    assert "openssl differs" in warnings and "workers differs" in warnings


def test_itself_and_single_files_are_refused(two_results: tuple[Path, Path]) -> None:
    """A file compared with itself, or alone, is a usage error."""
    with pytest.raises(UsageError, match="itself"):
        load_results([two_results[0], two_results[0]])
    with pytest.raises(UsageError, match="at least two"):
        load_results([two_results[0]])


def test_other_schema_versions_are_refused(two_results: tuple[Path, Path], tmp_path: Path) -> None:
    """A result of another schema version is a ResultError naming the version."""
    other = tmp_path / "old.json"
    data = json.loads(two_results[0].read_text())
    data["schema_version"] = 0
    other.write_text(json.dumps(data))
    with pytest.raises(ResultError, match="schema version 0"):
        load_results([two_results[0], other])


@pytest.mark.parametrize("output", ["table", "markdown", "json"])
def test_cli_formats(two_results: tuple[Path, Path], output: str) -> None:
    """compare prints a table, Markdown or JSON and exits 0."""
    done = run_cli("compare", *map(str, two_results), "--format", output)
    assert done.returncode == 0, done.stderr
    if output == "json":
        assert json.loads(done.stdout)["comparisons"][0]["rows"]
    elif output == "markdown":
        assert "| metric | A | B | B/A | 95% CI | verdict |" in done.stdout
    else:
        assert "throughput" in done.stdout


def test_cli_missing_or_corrupt_files_are_exit_2(tmp_path: Path) -> None:
    """Missing and corrupt result files are one-line errors with exit code 2."""
    corrupt = tmp_path / "c.json"
    corrupt.write_text("{")
    for files in ([str(tmp_path / "none.json"), str(corrupt)], [str(corrupt), str(corrupt)]):
        done = run_cli("compare", *files)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_too_short_a_run_cannot_be_judged(two_results: tuple[Path, Path]) -> None:
    """With fewer than two steady seconds, throughput is 'within noise', never a verdict."""
    a = read_result(two_results[0])
    a["throughput"]["series"]["completed"] = [900, 40]
    b = json.loads(json.dumps(a))
    b["throughput"]["series"]["completed"] = [450, 20]
    row = next(r for r in compare_pair(a, b) if r.metric == "throughput")
    assert row.verdict == "within noise"


def test_readers_never_import_the_engine() -> None:
    """compare, report and export read result files only (DESIGN.md): no engine module loads."""
    code = (
        "import sys, bench.compare, bench.report, bench.export;"
        "print([m for m in sys.modules if m == 'engine' or m.startswith('engine.')])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "[]"
