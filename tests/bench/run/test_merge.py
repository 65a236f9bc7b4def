"""Merging shard results: rates per shard, accounting, the generator-bound verdict."""

from __future__ import annotations

import numpy as np

from bench.histogram import Histogram
from bench.profile import load_profile
from bench.run.merge import _expectation, _generator_block, _outcome_block, _rates
from bench.run.shard import ShardResult


def _shard(
    index: int,
    measured: int,
    window_s: float,
    cpu: float,
    generator: float,
    elapsed: float,
    issued: int | None = None,
) -> ShardResult:
    return ShardResult(
        index=index,
        outcomes={"issued": measured},
        started=measured,
        histograms={},
        completed_per_second=[],
        issued_per_second=[],
        approvals_pending=[],
        cache={},
        process_cpu_s=cpu,
        elapsed_s=elapsed,
        engine_cpu_s=cpu - generator,
        window_ns=(0, int(window_s * 1e9)),
        completed_in_window=measured,
        issued_in_window=measured if issued is None else issued,
        interrupted=False,
        samples=[],
    )


def test_rates_sum_each_shards_own_rate() -> None:
    """A shard that finished early does not dilute the other's rate."""
    rate, issued = _rates([_shard(0, 1000, 1.0, 1, 0, 1), _shard(1, 1000, 2.0, 1, 0, 1)])
    assert rate == issued == 1500.0


def test_issued_rate_counts_only_issued_certificates() -> None:
    """Rejected and failed enrollments are beside the issued rate, never in it."""
    rate, issued = _rates([_shard(0, 1000, 1.0, 1, 0, 1, issued=250)])
    assert (rate, issued) == (1000.0, 250.0)


def test_outcomes_must_add_up() -> None:
    """Outcomes are grouped by kind; `accounted` says whether they add up to the started."""
    block = _outcome_block({"issued": 5, "rejected:weak-key": 2, "failed:WorkerDied": 1}, 8)
    assert block == {
        "started": 8,
        "issued": 5,
        "rejected": {"weak-key": 2},
        "failed": {"WorkerDied": 1},
        "accounted": True,
    }
    assert not _outcome_block({"issued": 5}, 6)["accounted"]


def test_generator_core_share_is_judged_at_every_utilisation() -> None:
    """A generator that takes over 10% of a shard's core is flagged, busy shard or idle one;
    a small share of a mostly idle shard's CPU is not a limit."""
    profile = load_profile("smoke")
    busy = _generator_block(profile, [_shard(0, 10, 1, cpu=1.0, generator=0.2, elapsed=1.0)], {})
    idle = _generator_block(profile, [_shard(0, 10, 1, cpu=0.3, generator=0.15, elapsed=1.0)], {})
    light = _generator_block(
        profile, [_shard(0, 10, 1, cpu=0.02, generator=0.012, elapsed=1.0)], {}
    )
    assert busy["generator_bound"] and "20% of each shard's core" in busy["reasons"][0]
    assert idle["generator_bound"] and "15%" in idle["reasons"][0]
    assert not light["generator_bound"]
    assert light["generator_cpu_share"] == 0.6 and light["generator_core_share"] == 0.012


def _latency_histograms(latency_us: int, timer_error_us: int) -> dict[str, Histogram]:
    latency, error = Histogram(), Histogram()
    latency.record_many(np.full(100, latency_us, dtype=np.int64))
    error.record_many(np.full(100, timer_error_us, dtype=np.int64))
    return {"end_to_end.latency": latency, "timer_error": error}


def test_timer_error_large_against_latency_flags_the_run() -> None:
    """An open-loop run whose timer error is over 10% of the latency it reports is flagged."""
    profile = load_profile("smoke", ["load.mode='open'", "load.rate=10"])
    shards = [_shard(0, 10, 1, cpu=1.0, generator=0.01, elapsed=1.0)]
    small = _generator_block(profile, shards, _latency_histograms(1000, 50))
    large = _generator_block(profile, shards, _latency_histograms(1000, 300))
    assert not small["generator_bound"] and small["timer_error"]["p99_us"] == 50
    assert large["generator_bound"]
    assert any("timer error p99 300 µs" in reason for reason in large["reasons"])


def test_expectation_compares_the_issued_share_with_the_profile() -> None:
    """All rejected is not what an auto-issue profile expects; a 98% approval within 3% is."""
    auto = load_profile("smoke")
    assert not _expectation(auto, 0, 300)["met"]
    assert _expectation(auto, 300, 300)["met"]
    assert not _expectation(auto, 0, 0)["met"]  # nothing started is never a pass
    approval = load_profile("smoke", ["expect.issued_fraction=0.98", "expect.tolerance=0.03"])
    assert _expectation(approval, 960, 1000)["met"]
    assert not _expectation(approval, 940, 1000)["met"]
