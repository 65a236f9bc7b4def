"""Merging shard results: rates per shard, accounting, the generator-bound verdict."""

from __future__ import annotations

from bench.merge import _generator_block, _outcome_block, _rates
from bench.profile import load_profile
from bench.shard import ShardResult


def _shard(
    index: int,
    measured: int,
    window_s: float,
    cpu: float,
    generator: float,
    elapsed: float,
    offered: int = 0,
) -> ShardResult:
    return ShardResult(
        index=index,
        outcomes={"issued": measured},
        started=measured,
        measured=measured,
        measured_issued=measured,
        histograms={},
        completed_per_second=[],
        issued_per_second=[],
        approvals_pending=[],
        cache={},
        process_cpu_s=cpu,
        elapsed_s=elapsed,
        generator_cpu_s=generator,
        offered=offered,
        window_ns=(0, int(window_s * 1e9)),
        interrupted=False,
        samples=[],
    )


def test_rates_sum_each_shards_own_rate() -> None:
    """A shard that finished early does not dilute the other's rate."""
    rate, issued = _rates([_shard(0, 1000, 1.0, 1, 0, 1), _shard(1, 1000, 2.0, 1, 0, 1)])
    assert rate == issued == 1500.0


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


def test_busy_generator_is_flagged_but_an_idle_one_is_not() -> None:
    """Generator share above 10% counts only when the shards were CPU-bound."""
    profile = load_profile("smoke")
    busy = _generator_block(
        profile, [_shard(0, 10, 1, cpu=1.0, generator=0.2, elapsed=1.0)], {}, 1.0
    )
    idle = _generator_block(
        profile, [_shard(0, 10, 1, cpu=0.1, generator=0.05, elapsed=1.0)], {}, 1.0
    )
    assert busy["generator_bound"] and "20%" in busy["reasons"][0]
    assert not idle["generator_bound"]


def test_open_loop_shortfall_is_flagged() -> None:
    """Starting far fewer arrivals than asked is a generator-bound open-loop run."""
    profile = load_profile("smoke", ["load.mode='open'", "load.rate=1000"])
    block = _generator_block(
        profile, [_shard(0, 10, 1, cpu=0.2, generator=0.01, elapsed=1.0, offered=400)], {}, 1.0
    )
    assert block["generator_bound"] and "started 400/s of the 1000/s asked" in block["reasons"]
