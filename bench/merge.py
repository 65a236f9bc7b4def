"""Merging shard results into one run document, with its manifest (results/README.md).

A result holds the manifest (what ran, where, with which versions), the outcomes, throughput and
its per-second series, latency summaries per step and end to end with their encoded histograms
(so results merge and recompute later), and the generator's self-check. Nothing in it names the
host, and no key or secret is ever written.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import cryptography
from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend

from bench.histogram import Histogram, merged
from bench.profile import Profile
from bench.results import SCHEMA_VERSION
from bench.runner import RunOutput
from bench.shard import STEPS, ShardResult
from engine import _der

GENERATOR_CPU_LIMIT = 0.10  # above this share of a busy shard, the generator may be the limit
BUSY = 0.8  # a shard using this share of a core or more is CPU-bound
LAG_LIMIT_US = 10_000  # open loop: p99 schedule lag above 10 ms means the schedule slipped
RATE_SHORTFALL = 0.95  # open loop: starting under 95% of the target rate means the same


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    source = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(  # noqa: S603 (fixed arguments, no user input)
            ["git", "-C", str(source), "rev-parse", "HEAD"],  # noqa: S607 (git from PATH)
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version() -> str:
    try:
        return metadata.version("enrollbench")
    except metadata.PackageNotFoundError:
        return "unknown"


def manifest(profile: Profile, workers: int, seed: int) -> dict[str, Any]:
    """What ran and on what: enough to tell whether two results may be compared."""
    return {
        "profile": profile.name,
        "profile_as_run": profile.as_dict(),
        "profile_sha256": profile.digest(),
        "seed": seed,
        "enrollbench_version": _version(),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "cryptography": cryptography.__version__,
        "openssl": openssl_backend.openssl_version_text(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "workers": workers,
        "device_crypto": profile.get("device", "crypto"),
        "der_accelerated": _der.ACCELERATED,
    }


def _merge_counts(series: Sequence[Sequence[int]]) -> list[int]:
    length = max((len(s) for s in series), default=0)
    return [sum(s[i] for s in series if i < len(s)) for i in range(length)]


def _outcome_block(outcomes: Mapping[str, int], started: int) -> dict[str, Any]:
    rejected: dict[str, int] = {}
    failed: dict[str, int] = {}
    for key, count in outcomes.items():
        status, _, detail = key.partition(":")
        if status == "rejected":
            rejected[detail] = rejected.get(detail, 0) + count
        elif status == "failed":
            failed[detail] = failed.get(detail, 0) + count
    issued = outcomes.get("issued", 0)
    total = issued + sum(rejected.values()) + sum(failed.values())
    return {
        "started": started,
        "issued": issued,
        "rejected": dict(sorted(rejected.items())),
        "failed": dict(sorted(failed.items())),
        "accounted": total == started,
    }


def merge_shards(shards: Sequence[ShardResult]) -> dict[str, Histogram]:
    names = sorted({name for shard in shards for name in shard.histograms})
    return {
        name: merged(Histogram.decode(s.histograms[name]) for s in shards if name in s.histograms)
        for name in names
    }


def build_result(profile: Profile, workers: int, output: RunOutput) -> dict[str, Any]:
    """Merge a run's shard results into one result document."""
    shards, died, timings = output.shards, output.died, output.timings
    outcomes: dict[str, int] = {}
    for shard in shards:
        for key, count in shard.outcomes.items():
            outcomes[key] = outcomes.get(key, 0) + count
    if died:
        outcomes["failed:WorkerDied"] = outcomes.get("failed:WorkerDied", 0) + sum(died.values())
    started = sum(s.started for s in shards) + sum(died.values())
    histograms = merge_shards(shards)
    window = _window(shards)
    completed = _merge_counts([s.completed_per_second for s in shards])
    issued = _merge_counts([s.issued_per_second for s in shards])
    enrollment_rate, issue_rate = _rates(shards)
    generator = _generator_block(profile, shards, histograms, window)
    steps = {
        step.label: histograms[f"step.{step.label}"].summary().as_dict()
        for step in STEPS
        if f"step.{step.label}" in histograms
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "run",
        "interrupted": output.interrupted,
        "manifest": manifest(profile, workers, profile.get("", "seed")),
        "timing": {**{k: round(v, 3) for k, v in timings.items()}, "window_s": round(window, 3)},
        "outcomes": _outcome_block(outcomes, started),
        "workers_died": {str(k): v for k, v in died.items()},
        "throughput": {
            "enrollments_per_s": round(enrollment_rate, 2),
            "issued_per_s": round(issue_rate, 2),
            "series": {
                "second": list(range(max(len(completed), len(issued)))),
                "completed": completed,
                "issued": issued,
                "approvals_pending": _merge_counts([s.approvals_pending for s in shards]),
            },
        },
        "latency": {
            "end_to_end": {
                "latency": _summary(histograms, "end_to_end.latency"),
                "service": _summary(histograms, "end_to_end.service"),
            },
            "steps": steps,
        },
        "cache": {
            key: sum(s.cache.get(key, 0) for s in shards)
            for key in ("hits", "misses", "fetches", "joined")
        },
        "generator": generator,
        "memory": {"peak_rss_mb_all_processes": round(output.peak_rss_bytes / 2**20, 1)},
        "histograms": {name: h.encode() for name, h in histograms.items()},
    }


def _summary(histograms: Mapping[str, Histogram], name: str) -> dict[str, float | int]:
    return histograms.get(name, Histogram()).summary().as_dict()


def _rates(shards: Sequence[ShardResult]) -> tuple[float, float]:
    """Enrollments and issued certificates per second: each shard's rate over its own measured
    window, summed, so a shard that finishes early does not dilute the others."""
    enrollments = issued = 0.0
    for shard in shards:
        seconds = (shard.window_ns[1] - shard.window_ns[0]) / 1e9
        if seconds > 0:
            enrollments += shard.measured / seconds
            issued += shard.measured_issued / seconds
    return enrollments, issued


def _window(shards: Sequence[ShardResult]) -> float:
    """Seconds from the end of warm-up to the last completion, over all shards."""
    if not shards:
        return 0.0
    begin = min(s.window_ns[0] for s in shards)
    end = max(s.window_ns[1] for s in shards)
    return max(0.0, (end - begin) / 1e9)


def _generator_block(
    profile: Profile,
    shards: Sequence[ShardResult],
    histograms: Mapping[str, Histogram],
    window: float,
) -> dict[str, Any]:
    cpu = sum(s.process_cpu_s for s in shards)
    generator_cpu = sum(s.generator_cpu_s for s in shards)
    share = generator_cpu / cpu if cpu else 0.0
    elapsed = sum(s.elapsed_s for s in shards)
    busy = cpu / elapsed if elapsed else 0.0
    lag = histograms.get("schedule_lag", Histogram()).summary()
    reasons = []
    if share > GENERATOR_CPU_LIMIT and busy >= BUSY:
        reasons.append(
            f"generator used {share:.0%} of busy shards' CPU (limit {GENERATOR_CPU_LIMIT:.0%})"
        )
    if profile.get("load", "mode") == "open" and window > 0:
        target = float(profile.get("load", "rate"))
        achieved = sum(s.offered for s in shards) / max(window, 1e-9)
        if lag.p99 > LAG_LIMIT_US:
            reasons.append(f"p99 schedule lag {lag.p99 / 1000:.1f} ms (limit 10 ms)")
        if profile.get("load", "ramp_seconds") == 0 and achieved < RATE_SHORTFALL * target:
            reasons.append(f"started {achieved:.0f}/s of the {target:.0f}/s asked")
    return {
        "process_cpu_s": round(cpu, 3),
        "generator_cpu_s": round(generator_cpu, 3),
        "generator_cpu_share": round(share, 4),
        "shard_cpu_utilization": round(busy, 3),
        "schedule_lag": lag.as_dict(),
        "generator_bound": bool(reasons),
        "reasons": reasons,
    }
