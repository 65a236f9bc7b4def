"""The command line as the tests run it, and result files made once per session by real runs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.histogram import Histogram
from bench.results import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "bench.cli"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`enrollbench ARGS` from the repository root, output captured, exit code not checked."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, check=False, cwd=ROOT, timeout=timeout
    )


def make_result(folder: Path, name: str, *extra: str) -> Path:
    path = folder / f"{name}.json"
    done = run_cli("run", "smoke", "--quiet", "--duration", "1.5", "--out", str(path), *extra)
    assert done.returncode == 0, done.stderr
    return path


def latency_summary(p50_us: int = 400, count: int = 100) -> dict[str, Any]:
    """A histogram summary as results carry it (bench.histogram.Summary.as_dict)."""
    return {
        "count": count,
        "min_us": p50_us // 2,
        "mean_us": float(p50_us),
        "p50_us": p50_us,
        "p90_us": p50_us * 2,
        "p99_us": p50_us * 4,
        "p99_9_us": p50_us * 5,
        "max_us": p50_us * 6,
    }


def synthetic_result(
    issued: int = 100,
    rejected: int = 0,
    failed: int = 0,
    *,
    issued_fraction: float = 1.0,
    tolerance: float = 0.0,
    p99_us: int = 1600,
    seconds: float = 4.0,
    generator_bound: bool = False,
) -> dict[str, Any]:
    """A schema-2 run result with the given outcomes, for code that reads results (no run)."""
    started = issued + rejected + failed
    share = issued / started if started else 0.0
    end_to_end = {**latency_summary(p99_us // 4), "p99_us": p99_us}
    return {
        "schema_version": 2,
        "kind": "run",
        "interrupted": False,
        "manifest": {"profile": "synthetic", "workers": 1},
        "timing": {"startup_s": 1.0, "corpus_s": 0.0, "window_s": seconds},
        "outcomes": {
            "started": started,
            "issued": issued,
            "rejected": {"administrator-rejected": rejected} if rejected else {},
            "failed": {"MalformedDerError": failed} if failed else {},
            "accounted": True,
            "expected": {
                "issued_fraction": issued_fraction,
                "tolerance": tolerance,
                "issued_share": round(share, 6),
                "met": started > 0 and share >= issued_fraction - tolerance,
            },
        },
        "throughput": {
            "issued_per_s": round(issued / seconds, 2),
            "enrollments_per_s": round(started / seconds, 2),
        },
        "latency": {
            "end_to_end": {"latency": end_to_end, "service": latency_summary()},
            "steps": {
                "generate-key": {"precomputed": True},
                "authenticate": {**latency_summary(30), "precomputed": False},
                "issue": {**latency_summary(170), "precomputed": False},
            },
        },
        "generator": {
            "generator_cpu_share": 0.02,
            "generator_core_share": 0.01,
            "timer_error": None,
            "generator_bound": generator_bound,
            "reasons": ["timer error p99 2.0 ms"] if generator_bound else [],
        },
    }


@pytest.fixture(scope="session")
def two_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("results")
    return make_result(folder, "a"), make_result(folder, "b")


# ---- synthetic schema-2 run results, built in memory (no run, no clock) ----

MEASURED_STEPS = {  # label -> median µs; None: precomputed (did no work in the run)
    "generate-key": None,
    "authenticate": 3.0,
    "request-dn": 6.0,
    "lookup-dn": 2.0,
    "store-key-pair": 2.0,
    "build-request": None,
    "send-request": 8.0,
    "fetch-chain": 4.0,
    "deliver-chain": 3.0,
    "submit": 20.0,
    "issue": 150.0,
    "retrieve": 10.0,
    "match-and-deliver": 40.0,
    "install": 15.0,
}


def measured_result(
    seed: int = 0,
    scale: Mapping[str, float] | None = None,
    issued_per_s: float = 8000.0,
    failed: int = 0,
    count: int = 5000,
) -> dict[str, Any]:
    """A valid schema-2 run result whose histograms are seeded lognormal samples.

    `scale` multiplies a step's samples (and end to end by the step's share of it); `failed`
    enrollments count as started but not issued.
    """
    rng = np.random.default_rng(seed)
    scale = dict(scale or {})
    histograms: dict[str, str] = {}
    steps: dict[str, Any] = {}
    end_to_end = np.zeros(count)
    for label, median in MEASURED_STEPS.items():
        if median is None:
            steps[label] = {"precomputed": True}
            continue
        values = median * scale.get(label, 1.0) * rng.lognormal(0.0, 0.3, count)
        end_to_end += values
        histograms[f"step.{label}"] = _encoded(values, steps, label)
    histograms["end_to_end.latency"] = _encoded(end_to_end, None, "")
    histograms["end_to_end.service"] = histograms["end_to_end.latency"]
    summary = Histogram.decode(histograms["end_to_end.latency"]).summary().as_dict()
    seconds = [float(v) for v in rng.normal(issued_per_s, issued_per_s * 0.02, 6).round()]
    issued = int(sum(seconds[1:5]))
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "run",
        "interrupted": False,
        "manifest": {
            "profile": "synthetic",
            "profile_as_run": {"load": {"mode": "closed", "warmup_seconds": 1.0}},
            "profile_sha256": "0" * 64,
            "seed": seed,
            "enrollbench_version": "0",
            "git_commit": "c0ffee",
            "git_dirty": False,
            "started_at": "2026-11-30T08:15:00Z",
            "python": "3.11.2",
            "python_implementation": "CPython",
            "cryptography": "50.0.2",
            "openssl": "OpenSSL 3",
            "cpu_model": "test CPU",
            "cpu_count": 2,
            "workers": 2,
            "device_crypto": "precomputed",
            "der_accelerated": True,
        },
        "timing": {"corpus_s": 0.1, "startup_s": 0.1, "window_s": 4.0},
        "outcomes": {
            "started": issued + failed,
            "issued": issued,
            "rejected": {},
            "failed": {"DeviceTimeout": failed} if failed else {},
            "accounted": True,
            "expected": {
                "issued_fraction": 1.0,
                "tolerance": 0.0,
                "issued_share": issued / (issued + failed),
                "met": failed == 0,
            },
        },
        "workers_died": {},
        "throughput": {
            "enrollments_per_s": round(issued_per_s * (issued + failed) / issued, 2),
            "issued_per_s": issued_per_s,
            "series": {
                "second": list(range(6)),
                "completed": [v * (issued + failed) / issued for v in seconds],
                "issued": seconds,
                "approvals_pending": [0] * 6,
            },
        },
        "latency": {"end_to_end": {"latency": summary, "service": summary}, "steps": steps},
        "cache": {"hits": issued, "misses": 1, "fetches": 1, "joined": 0},
        "generator": {
            "generator_cpu_share": 0.05,
            "generator_core_share": 0.04,
            "timer_error": None,
            "generator_bound": False,
            "reasons": [],
        },
        "memory": {"peak_rss_mb_all_processes": 100.0},
        "histograms": histograms,
    }


def _encoded(values: Any, steps: dict[str, Any] | None, label: str) -> str:
    histogram = Histogram()
    histogram.record_many(np.round(values).astype(np.int64))
    if steps is not None:
        steps[label] = {**histogram.summary().as_dict(), "precomputed": False}
    return histogram.encode()


@pytest.fixture
def result_factory() -> Callable[..., dict[str, Any]]:
    """Build synthetic schema-2 run results: `result_factory(seed=1, scale={"issue": 1.1})`."""
    return measured_result
