"""Export to pytest-benchmark's JSON format."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.judge.export import to_pytest_benchmark
from tests.bench.conftest import run_cli

Factory = Callable[..., dict[str, Any]]


def test_export_has_the_fields_chart_tools_read(result_factory: Factory) -> None:
    """Each entry has name, group and stats in seconds; throughput's ops is issued/s."""
    result = result_factory(seed=1, issued_per_s=7000.0, failed=500)
    exported = to_pytest_benchmark(result)
    names = [b["name"] for b in exported["benchmarks"]]
    assert names[0] == "throughput" and "end_to_end" in names and "issue" in names
    throughput = exported["benchmarks"][0]
    assert throughput["stats"]["ops"] == 7000.0
    assert throughput["extra_info"]["enrollments_per_s"] > 7000.0
    end_to_end = next(b for b in exported["benchmarks"] if b["name"] == "end_to_end")["stats"]
    p50 = result["latency"]["end_to_end"]["latency"]["p50_us"] / 1e6
    assert end_to_end["median"] == pytest.approx(p50)
    assert end_to_end["min"] <= end_to_end["median"] <= end_to_end["max"]
    json.dumps(exported)


def test_precomputed_steps_and_timer_error_are_left_out(result_factory: Factory) -> None:
    """Steps that did no work, service time and the generator's timer error are not exported."""
    result = result_factory(seed=1)
    result["histograms"]["timer_error"] = result["histograms"]["step.issue"]
    result["histograms"]["step.generate-key"] = result["histograms"]["step.issue"]
    names = {b["name"] for b in to_pytest_benchmark(result)["benchmarks"]}
    assert not names & {"generate-key", "build-request", "timer_error"}
    assert not names & {"end_to_end.service", "service"}
    assert all(b["stats"]["median"] > 0 for b in to_pytest_benchmark(result)["benchmarks"][1:])


@pytest.mark.parametrize(("commit", "dirty"), [("c0ffee", True), ("c0ffee", False), (None, None)])
def test_provenance_is_the_runs(
    result_factory: Factory, commit: str | None, dirty: bool | None
) -> None:
    """datetime is when the run started; commit and dirty flag are the run's, null if unknown."""
    result = result_factory(seed=1)
    result["manifest"].update(git_commit=commit, git_dirty=dirty, started_at="2026-01-02T03:04:05Z")
    exported = to_pytest_benchmark(result)
    assert exported["datetime"] == "2026-01-02T03:04:05Z"
    assert exported["commit_info"] == {"id": commit, "dirty": dirty}


def test_cli_writes_the_file(result_factory: Factory, tmp_path: Path) -> None:
    """export reads a result and writes pytest-benchmark JSON where asked."""
    source = tmp_path / "r.json"
    source.write_text(json.dumps(result_factory(seed=1)))
    done = run_cli("export", str(source), "--out", str(tmp_path / "out.json"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out.json").read_text())["benchmarks"]
