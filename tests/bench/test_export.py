"""Export to pytest-benchmark's JSON format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.export import to_pytest_benchmark
from bench.results import read_result


def test_pytest_benchmark_export_has_the_fields_chart_tools_read(
    two_results: tuple[Path, Path],
) -> None:
    """Each entry has name, group and stats in seconds; throughput's ops is enrollments/s."""
    result = read_result(two_results[0])
    exported = to_pytest_benchmark(result)
    names = [b["name"] for b in exported["benchmarks"]]
    assert names[0] == "throughput" and "end_to_end" in names and "issue" in names
    throughput = exported["benchmarks"][0]["stats"]["ops"]
    assert throughput == result["throughput"]["enrollments_per_s"]
    end_to_end = next(b for b in exported["benchmarks"] if b["name"] == "end_to_end")["stats"]
    p50 = result["latency"]["end_to_end"]["latency"]["p50_us"] / 1e6
    assert end_to_end["median"] == pytest.approx(p50)
    assert end_to_end["min"] <= end_to_end["median"] <= end_to_end["max"]
    json.dumps(exported)
