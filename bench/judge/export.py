"""Export a run result in pytest-benchmark's JSON format, for CI charting that reads it.

Each histogram becomes one benchmark (`end_to_end`, then one per measured step, grouped under
the profile), its statistics in seconds as pytest-benchmark writes them; `ops` is issued/s for
the `throughput` entry (enrollments/s in its extra_info) and 1/mean for latencies, as
pytest-benchmark defines it. Steps that did no work in the run (precomputed) are left out, and
so is the generator's own timer error: neither is a latency of the system under test.
Provenance is the run's, never the export's: `datetime` is when the run started and
`commit_info` its commit and dirty flag (null when the run did not know them).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import ResultError
from bench.histogram import Histogram, bucket_upper
from bench.results import check_writable, read_result, write_result


def _quartiles(histogram: Histogram) -> tuple[float, float, float]:
    return tuple(histogram.percentile(p) / 1e6 for p in (25.0, 50.0, 75.0))  # type: ignore[return-value]


def _stddev(histogram: Histogram) -> float:
    nonzero = np.nonzero(histogram.counts)[0]
    if nonzero.size == 0:
        return 0.0
    values = np.minimum(bucket_upper(nonzero), histogram.max).astype(np.float64)
    weights = histogram.counts[nonzero].astype(np.float64)
    mean = float(np.average(values, weights=weights))
    return float(np.sqrt(np.average((values - mean) ** 2, weights=weights))) / 1e6


def _stats(histogram: Histogram) -> dict[str, Any]:
    count = histogram.count
    mean = histogram.total / count / 1e6 if count else 0.0
    q1, median, q3 = _quartiles(histogram)
    iqr = q3 - q1
    return {
        "min": histogram.min / 1e6 if count else 0.0,
        "max": histogram.max / 1e6,
        "mean": mean,
        "stddev": _stddev(histogram),
        "rounds": count,
        "median": median,
        "iqr": iqr,
        "q1": q1,
        "q3": q3,
        "iqr_outliers": 0,
        "stddev_outliers": 0,
        "outliers": "0;0",
        "ld15iqr": max(q1 - 1.5 * iqr, histogram.min / 1e6),
        "hd15iqr": min(q3 + 1.5 * iqr, histogram.max / 1e6),
        "ops": 1.0 / mean if mean else 0.0,
        "total": histogram.total / 1e6,
        "iterations": 1,
    }


def _entry(group: str, name: str, stats: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "group": group,
        "name": name,
        "fullname": f"enrollbench::{group}::{name}",
        "params": None,
        "param": None,
        "extra_info": {},
        "options": {
            "disable_gc": False,
            "timer": "perf_counter_ns",
            "min_rounds": 1,
            "max_time": 0,
            "min_time": 0,
            "warmup": False,
        },
        "stats": dict(stats),
    }


def _latency_entries(result: Mapping[str, Any], group: str) -> list[dict[str, Any]]:
    """One entry per measured latency histogram: end to end, then the steps that did work."""
    precomputed = {
        label for label, step in result["latency"]["steps"].items() if step["precomputed"]
    }
    entries = []
    for name, encoded in result["histograms"].items():
        label = "end_to_end" if name == "end_to_end.latency" else name.removeprefix("step.")
        if not (name == "end_to_end.latency" or name.startswith("step.")) or label in precomputed:
            continue  # service time, the generator's timer error, steps that did no work
        histogram = Histogram.decode(encoded)
        if histogram.count:
            entries.append(_entry(group, label, _stats(histogram)))
    return entries


def to_pytest_benchmark(result: Mapping[str, Any]) -> dict[str, Any]:
    """The result as a pytest-benchmark JSON document."""
    manifest = result["manifest"]
    group = manifest["profile"]
    throughput = _entry(
        group,
        "throughput",
        {
            **_stats(Histogram()),
            "ops": float(result["throughput"]["issued_per_s"]),
            "rounds": result["outcomes"]["issued"],
        },
    )
    throughput["extra_info"] = {
        "issued_per_s": result["throughput"]["issued_per_s"],
        "enrollments_per_s": result["throughput"]["enrollments_per_s"],
    }
    return {
        "machine_info": {
            "node": "",
            "processor": manifest["cpu_model"],
            "machine": "",
            "python_implementation": manifest["python_implementation"],
            "python_version": manifest["python"],
            "cpu": {"brand_raw": manifest["cpu_model"], "count": manifest["cpu_count"]},
        },
        "commit_info": {"id": manifest["git_commit"], "dirty": manifest["git_dirty"]},
        "benchmarks": [throughput, *_latency_entries(result, group)],
        "datetime": manifest["started_at"],
        "version": "5.2.3",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`enrollbench export` flags."""
    parser.add_argument("result", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--format", choices=["pytest-benchmark"], default="pytest-benchmark")


def command(args: argparse.Namespace) -> int:
    result = read_result(args.result)
    if result["kind"] != "run":
        raise ResultError(f"{args.result}: export reads run results")
    check_writable(args.out)
    write_result(args.out, to_pytest_benchmark(result))
    print(args.out)
    return 0
