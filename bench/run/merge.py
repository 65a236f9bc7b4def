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
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import cryptography
from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend

from bench.histogram import Histogram, merged
from bench.profile import Profile
from bench.results import SCHEMA_VERSION
from bench.run.runner import RunOutput
from bench.run.shard import STEPS, ShardResult
from engine import _der
from engine.flow import Step
from engine.wire.flow import ROUND_TRIP_STEPS

GENERATOR_CORE_LIMIT = 0.10  # the generator may not take more than this share of a shard's core
# Against a wire target the shard is all generator: it limits the run when its cores are near busy.
WIRE_CORE_LIMIT = 0.80
# Open loop: a reported latency percentile may be off by the generator's timer error at about
# the same percentile; above 10% of it, the percentile is not the CA's.
TIMER_ERROR_LIMIT = 0.10
# Steps that do no work when the device's crypto comes from the corpus (step 5 still stores).
PRECOMPUTED_STEPS = frozenset({Step.GENERATE_KEY.label, Step.BUILD_REQUEST.label})


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    """Ask git about the source tree enrollbench runs from (None outside a checkout)."""
    source = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(  # noqa: S603 (fixed arguments, no user input)
            ["git", "-C", str(source), *args],  # noqa: S607 (git from PATH)
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git_dirty() -> bool | None:
    """Whether the checkout has uncommitted changes to tracked files (None: not a checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _version() -> str:
    try:
        return metadata.version("enrollbench")
    except metadata.PackageNotFoundError:
        return "unknown"


def manifest(
    profile: Profile, workers: int, seed: int, started_at: str | None = None
) -> dict[str, Any]:
    """What ran and on what: enough to tell whether two results may be compared."""
    return {
        "started_at": started_at or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "profile": profile.name,
        "profile_as_run": profile.as_dict(),
        "profile_sha256": profile.digest(),
        "seed": seed,
        "enrollbench_version": _version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": _git_dirty(),
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


def _expectation(profile: Profile, issued: int, started: int) -> dict[str, Any]:
    """Did the run issue the share of devices its profile expects (expect.*)?"""
    expect = profile.values.get("expect", {})
    fraction = float(expect.get("issued_fraction", 1.0))
    tolerance = float(expect.get("tolerance", 0.0))
    share = issued / started if started else 0.0
    return {
        "issued_fraction": fraction,
        "tolerance": tolerance,
        "issued_share": round(share, 6),
        "met": started > 0 and share >= fraction - tolerance - 1e-12,
    }


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
    precomputed = PRECOMPUTED_STEPS if profile.get("device", "crypto") == "precomputed" else ()
    histograms = {
        name: histogram
        for name, histogram in merge_shards(shards).items()
        if name.removeprefix("step.") not in precomputed
        and (name != "timer_error" or profile.get("load", "mode") == "open")
    }
    window = _window(shards)
    completed = _merge_counts([s.completed_per_second for s in shards])
    issued = _merge_counts([s.issued_per_second for s in shards])
    enrollment_rate, issue_rate = _rates(shards)
    block = _outcome_block(outcomes, started)
    block["expected"] = _expectation(profile, block["issued"], started)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "run",
        "interrupted": output.interrupted,
        "manifest": {
            **manifest(profile, workers, profile.get("", "seed"), output.started_at),
            "target": _target_block(output),
            "components": {
                "directory": "sqlite",
                "database": "sqlite",
                **(output.components or {}),
            },
        },
        "timing": {**{k: round(v, 3) for k, v in timings.items()}, "window_s": round(window, 3)},
        "outcomes": block,
        "workers_died": {str(k): v for k, v in died.items()},
        "throughput": {
            "issued_per_s": round(issue_rate, 2),
            "enrollments_per_s": round(enrollment_rate, 2),
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
            "steps": _steps(histograms, precomputed, wire=output.target is not None),
            "step_places": step_places(output.target is not None, precomputed),
            **(
                {}
                if output.server_steps is None
                else {
                    "server_steps": {
                        label: h.summary().as_dict() for label, h in output.server_steps.items()
                    }
                }
            ),
        },
        "cache": {
            key: sum(s.cache.get(key, 0) for s in shards)
            for key in ("hits", "misses", "fetches", "joined")
        },
        "generator": _generator_block(profile, shards, histograms, wire=output.target is not None),
        "memory": {
            "peak_rss_mb_all_processes": round(output.peak_rss_bytes / 2**20, 1),
            "rss_mb_per_second": [round(b / 2**20, 1) for b in output.rss_per_second],
        },
        "histograms": {name: h.encode() for name, h in histograms.items()},
    }


def _steps(
    histograms: Mapping[str, Histogram], precomputed: Collection[str], *, wire: bool = False
) -> dict[str, dict[str, Any]]:
    """Each step's summary; a step that did no work in this run says so instead of 0 ms.
    Against a wire target the steps the server does inside the round trip have no client
    time of their own (`step_places` says where they went)."""
    steps: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        if wire and step in ROUND_TRIP_STEPS:
            continue
        if step.label in precomputed:
            steps[step.label] = {"precomputed": True}
        elif f"step.{step.label}" in histograms:
            summary = histograms[f"step.{step.label}"].summary().as_dict()
            steps[step.label] = {**summary, "precomputed": False}
    return steps


def per_enrollment(cpu: float, shards: Sequence[ShardResult]) -> float:
    """The generator's CPU per enrollment started (the device side against a wire target)."""
    started = sum(s.started for s in shards)
    return round(cpu / started * 1e6, 1) if started else 0.0


def _target_block(output: RunOutput) -> dict[str, Any]:
    """The target as recorded, with a served CA's CPU per enrollment started."""
    if output.target is None:
        return {"url": "embedded", "kind": "embedded"}
    block = dict(output.target)
    if "server_cpu_s" in block:
        block["server_cpu_us_per_enrollment"] = per_enrollment(block["server_cpu_s"], output.shards)
    return block


def _phases(shards: Sequence[ShardResult]) -> dict[str, float]:
    """The wire client's phases per enrollment started, in microseconds (connect, TLS handshake,
    request written to first byte), and the connections it opened per enrollment. Poll waits
    are the client's `issue` step."""
    started = max(1, sum(s.started for s in shards))
    total = {key: sum(s.phases.get(key, 0) for s in shards) for key in _PHASE_KEYS}
    return {
        "connect_us_per_enrollment": round(total["connect_ns"] / started / 1000, 1),
        "tls_us_per_enrollment": round(total["tls_ns"] / started / 1000, 1),
        "wait_us_per_enrollment": round(total["wait_ns"] / started / 1000, 1),
        "connections_per_enrollment": round(total["connections"] / started, 3),
    }


_PHASE_KEYS = ("connect_ns", "tls_ns", "wait_ns", "connections")


def step_places(wire: bool, precomputed: Collection[str]) -> dict[str, str]:
    """Where each step's time was measured: "in-process" (embedded: the whole flow in the
    shard), "client" (the generator, against a wire target), "round-trip" (done by the server
    inside send-request's round trip), or "precomputed" (no work in this run)."""
    places = {}
    for step in STEPS:
        if step.label in precomputed:
            places[step.label] = "precomputed"
        elif not wire:
            places[step.label] = "in-process"
        else:
            places[step.label] = "round-trip" if step in ROUND_TRIP_STEPS else "client"
    return places


def _summary(histograms: Mapping[str, Histogram], name: str) -> dict[str, float | int]:
    return histograms.get(name, Histogram()).summary().as_dict()


def _rates(shards: Sequence[ShardResult]) -> tuple[float, float]:
    """Enrollments completed and certificates issued per second within the window in which
    load was offered (end of warm-up to the last scheduled arrival, or to the end of the load):
    each shard's rate over its own window, summed, so a shard that finishes early does not
    dilute the others. The drain after the last arrival is not in it."""
    enrollments = issued = 0.0
    for shard in shards:
        seconds = (shard.window_ns[1] - shard.window_ns[0]) / 1e9
        if seconds > 0:
            enrollments += shard.completed_in_window / seconds
            issued += shard.issued_in_window / seconds
    return enrollments, issued


def _window(shards: Sequence[ShardResult]) -> float:
    """Seconds in which load was offered, over all shards (throughput's window)."""
    if not shards:
        return 0.0
    begin = min(s.window_ns[0] for s in shards)
    end = max(s.window_ns[1] for s in shards)
    return max(0.0, (end - begin) / 1e9)


def _generator_block(
    profile: Profile,
    shards: Sequence[ShardResult],
    histograms: Mapping[str, Histogram],
    *,
    wire: bool = False,
) -> dict[str, Any]:
    """The generator's own cost and error, measured in the run, and whether it limited it.

    Against a wire target the whole shard is the generator (the devices' side: their crypto,
    the protocol client, HTTP): it limits the run when it keeps its cores nearly busy
    (WIRE_CORE_LIMIT), so that its own queueing would show as the CA's latency.

    Generator CPU is each shard's process CPU minus the CPU spent inside the engine's
    coroutines (every resumption timed): the event loop, task creation, timers, the
    generator's bookkeeping and folding are all in it. It is judged as the share of each
    shard's core it took, whatever the shard's utilisation: that core time was not the CA's.
    """
    cpu = sum(s.process_cpu_s for s in shards)
    generator_cpu = max(0.0, cpu - sum(s.engine_cpu_s for s in shards))
    elapsed = sum(s.elapsed_s for s in shards)
    core_share = generator_cpu / elapsed if elapsed else 0.0
    reasons = []
    limit = WIRE_CORE_LIMIT if wire else GENERATOR_CORE_LIMIT
    if core_share > limit:
        reasons.append(f"generator used {core_share:.0%} of each shard's core (limit {limit:.0%})")
    timer_error = None
    if profile.get("load", "mode") == "open":
        error = histograms.get("timer_error", Histogram()).summary()
        latency = histograms.get("end_to_end.latency", Histogram()).summary()
        timer_error = error.as_dict()
        for label, own, seen in (("p50", error.p50, latency.p50), ("p99", error.p99, latency.p99)):
            if error.count and own > TIMER_ERROR_LIMIT * max(seen, 1):
                reasons.append(
                    f"timer error {label} {own} µs is over {TIMER_ERROR_LIMIT:.0%} of the "
                    f"latency {label} ({seen} µs)"
                )
    return {
        "process_cpu_s": round(cpu, 3),
        "generator_cpu_s": round(generator_cpu, 3),
        "generator_cpu_share": round(generator_cpu / cpu if cpu else 0.0, 4),
        "generator_core_share": round(core_share, 4),
        "shard_cpu_utilization": round(cpu / elapsed if elapsed else 0.0, 3),
        "timer_error": timer_error,
        **(
            {
                "client_cpu_us_per_enrollment": per_enrollment(cpu, shards),
                "client_phases": _phases(shards),
            }
            if wire
            else {}
        ),
        "generator_bound": bool(reasons),
        "reasons": reasons,
    }
