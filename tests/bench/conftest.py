"""The command line as the tests run it, and result files made once per session by real runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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
            "timer_error": None,
            "generator_bound": generator_bound,
            "reasons": ["timer error p99 2.0 ms"] if generator_bound else [],
        },
    }


@pytest.fixture(scope="session")
def two_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("results")
    return make_result(folder, "a"), make_result(folder, "b")
