"""The shard's collector: steps from boundaries, warm-up exclusion, outcome keys."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any

import pytest

from bench.profile import load_profile
from bench.run.merge import build_result
from bench.run.runner import RunOptions, execute
from bench.run.shard import ShardPlan, _Collector, _EngineMeter, _Times, shard_main
from engine.device import DeviceIdentity
from engine.flow import Outcome, Status, Step


def _times(intended: int, started: int, boundaries: list[int], finish: int) -> _Times:
    times = _Times(intended, started)
    for step, at in zip(Step, boundaries, strict=False):
        times.t[step] = at
    if finish:
        times.t[len(Step) + 1] = finish
    return times


def test_steps_are_measured_between_boundaries() -> None:
    """Step k lasts from its start to the next step's start; the last to the finish."""
    collector = _Collector(start_ns=0, warmup_ns=0)
    boundaries = [1_000 * (k + 1) * 1_000 for k in range(14)]  # 1 ms apart
    collector.add(_times(0, 1, boundaries, 15_000_000), Outcome("d", Status.ISSUED, Step.INSTALL))
    collector.fold()
    for step in Step:
        summary = collector.histograms[f"step.{step.label}"].summary()
        assert summary.count == 1
        assert summary.max == 1000


def test_failed_enrollment_records_only_completed_steps() -> None:
    """A device rejected at step 11 has steps 1-10 measured, no end-to-end latency."""
    collector = _Collector(start_ns=0, warmup_ns=0)
    boundaries = [1_000_000 * (k + 1) for k in range(11)]
    outcome = Outcome("d", Status.REJECTED, Step.ISSUE, "bad-signature", "SignatureInvalidError")
    collector.add(_times(0, 1, boundaries, 0), outcome)
    collector.fold()
    assert "step.issue" not in collector.histograms or not collector.histograms["step.issue"].count
    assert collector.histograms["step.submit"].count == 1
    assert collector.histograms["end_to_end.latency"].count == 0
    assert collector.outcomes == {"rejected:bad-signature": 1}


def test_warmup_enrollments_are_counted_not_measured() -> None:
    """An enrollment intended before the warm-up ends is an outcome but not a sample."""
    collector = _Collector(start_ns=0, warmup_ns=10_000_000)
    boundaries = [20_000_000 + k for k in range(14)]
    outcome = Outcome("d", Status.ISSUED, Step.INSTALL)
    collector.add(_times(5_000_000, 5_000_000, boundaries, 30_000_000), outcome)
    collector.add(_times(15_000_000, 15_000_000, boundaries, 30_000_000), outcome)
    collector.fold()
    assert collector.outcomes == {"issued": 2}
    assert collector.histograms["end_to_end.latency"].count == 1


def test_failures_are_keyed_by_error_type() -> None:
    """Failed outcomes are counted by error type, rejected ones by reason."""
    collector = _Collector(start_ns=0, warmup_ns=0)
    failed = Outcome(
        "d", Status.FAILED, Step.RETRIEVE, "certificate-not-found", "CertificateNotFoundError"
    )
    collector.add(_times(0, 1, [1, 2], 0), failed)
    assert collector.outcomes == {"failed:CertificateNotFoundError": 1}


# ---- the whole path (runner -> shard processes -> merge) against engines of known cost ----


class _FixedCost:
    """A test double engine: each enrollment uses exactly `busy_ns` of the shard's CPU (a spin
    on the thread's CPU clock, so its cost is known whatever else the host runs), never waits,
    and does nothing else (0: a do-nothing engine)."""

    approvals_pending = 0

    def __init__(self, busy_ns: int) -> None:
        self.busy_ns = busy_ns

    async def enroll(self, identity: DeviceIdentity, recorder: _Times) -> Outcome:
        if self.busy_ns:
            until = time.thread_time_ns() + self.busy_ns
            while time.thread_time_ns() < until:
                pass
        return Outcome(identity.device_id, Status.ISSUED, Step.INSTALL)

    def close(self) -> None:
        pass


def _factory(plan: ShardPlan, directory: str) -> tuple[_FixedCost, list[DeviceIdentity]]:
    busy_ns = int(plan.profile.get("", "description").split("busy_ns=")[1])
    identities = [DeviceIdentity(f"d{i}", f"u{i}", "pw", "p", b"s") for i in plan.device_indices]
    return _FixedCost(busy_ns), identities


def _double_shard(channel: Connection, use_uvloop: bool) -> None:
    shard_main(channel, use_uvloop, _factory)


def _run_double(busy_ns: int, overrides: list[str], workers: int) -> dict[str, Any]:
    profile = load_profile("smoke", [f"description='double busy_ns={busy_ns}'", *overrides])
    output = execute(profile, workers, RunOptions(workers), None, shard_entry=_double_shard)
    return build_result(profile, workers, output)


@pytest.mark.parametrize(("concurrency", "workers"), [(1, 1), (8, 2), (12, 1)])
def test_closed_loop_obeys_littles_law(concurrency: int, workers: int) -> None:
    """Mean latency from the intended start is N/X (Little's law), and max(S, N*S/shards)
    for an engine of service time S that never waits: devices queue for the shard's CPU."""
    result = _run_double(
        1_000_000,
        [
            f"load.concurrency={concurrency}",
            "load.duration=1.5",
            "load.warmup_seconds=0.3",
            "load.devices=50",
        ],
        workers,
    )
    latency = result["latency"]["end_to_end"]
    throughput = result["throughput"]["issued_per_s"]
    assert latency["latency"]["mean_us"] == pytest.approx(concurrency / throughput * 1e6, rel=0.10)
    # S as this run saw it (a busy host stretches a CPU millisecond), then max(S, N*S/shards)
    service_us = latency["service"]["mean_us"]
    expected_us = max(1.0, concurrency / workers) * service_us
    assert latency["latency"]["mean_us"] == pytest.approx(expected_us, rel=0.10)


def test_generator_cpu_is_measured_against_engines_of_known_cost() -> None:
    """Against a do-nothing engine the generator is (nearly) all of the process CPU; an engine
    of known CPU cost takes its share away from it, as much as it costs."""
    overrides = ["load.concurrency=4", "load.duration=1.0", "load.warmup_seconds=0.0"]
    idle = _run_double(0, overrides, 1)["generator"]
    assert idle["generator_cpu_s"] == pytest.approx(idle["process_cpu_s"], rel=0.20)
    costly = _run_double(200_000, overrides, 1)
    generator = costly["generator"]
    enrollments = costly["outcomes"]["started"]
    engine_cpu_s = generator["process_cpu_s"] - generator["generator_cpu_s"]
    # the double spins 200 µs of wall time per enrollment: at most that much CPU, at least
    # most of it (other processes on this host may take the CPU during a spin)
    assert 0.5 * enrollments * 200e-6 <= engine_cpu_s <= 1.05 * enrollments * 200e-6
    assert generator["generator_cpu_share"] < idle["generator_cpu_share"]


def test_open_loop_throughput_is_the_offered_rate() -> None:
    """A constant 200/s load that the shards keep up with reports 200 issued/s, not less
    (the drain after the last arrival is outside the window)."""
    result = _run_double(
        100_000,
        ["load.mode='open'", "load.rate=200", "load.duration=2.0", "load.warmup_seconds=0.5"],
        2,
    )
    assert result["throughput"]["issued_per_s"] == pytest.approx(200, rel=0.02)
    assert result["generator"]["timer_error"]["count"] > 0


def test_open_loop_queueing_is_latency_not_timer_error() -> None:
    """Arrivals that wait behind the engine's CPU work show it as latency; the generator's
    own timer error stays apart and small."""
    result = _run_double(
        4_000_000,  # 4 ms of CPU per enrollment, Poisson at 200/s on one shard: 80% busy
        [
            "load.mode='open'",
            "load.arrival='poisson'",
            "load.rate=200",
            "load.duration=3.0",
            "load.warmup_seconds=0.5",
        ],
        1,
    )
    latency = result["latency"]["end_to_end"]
    error = result["generator"]["timer_error"]
    # M/D/1 at 80%: the mean wait is 2 service times; waits are in the latency, not the service
    assert latency["latency"]["mean_us"] > 1.5 * latency["service"]["mean_us"]
    assert error["p90_us"] < latency["latency"]["p50_us"] / 10


def test_engine_busy_time_is_counted_only_after_the_instant() -> None:
    """Queueing is the engine's wall time within [intended, woke]; the rest is timer error."""
    meter = _EngineMeter()
    meter.spans.extend([(0, 400), (500, 900), (950, 1_200)])
    assert meter.busy_between(600, 1_000) == 300 + 50  # the end of one span, part of the next
    assert meter.busy_between(1_200, 1_500) == 0  # nothing ran: all lateness is the timer's
    assert meter.busy_between(0, 2_000) == 400 + 400 + 250
