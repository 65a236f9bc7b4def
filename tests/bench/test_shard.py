"""The shard's collector: steps from boundaries, warm-up exclusion, outcome keys."""

from __future__ import annotations

from bench.shard import _Collector, _Times
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
    assert collector.measured == 1
    assert collector.histograms["end_to_end.latency"].count == 1


def test_failures_are_keyed_by_error_type() -> None:
    """Failed outcomes are counted by error type, rejected ones by reason."""
    collector = _Collector(start_ns=0, warmup_ns=0)
    failed = Outcome(
        "d", Status.FAILED, Step.RETRIEVE, "certificate-not-found", "CertificateNotFoundError"
    )
    collector.add(_times(0, 1, [1, 2], 0), failed)
    assert collector.outcomes == {"failed:CertificateNotFoundError": 1}
