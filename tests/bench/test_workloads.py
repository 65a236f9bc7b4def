"""The micro-benchmark workloads do the work they claim, and the paired timer's statistics."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from bench.paired import bootstrap_median, time_paired
from bench.workloads import CaWorkload, run_ready


@pytest.fixture(scope="module")
def workload() -> CaWorkload:
    return CaWorkload("p256", "p256", "sha256")


def test_ca_side_issues_and_publishes(workload: CaWorkload) -> None:
    """Each CA-side call issues one certificate through the engine."""
    before = workload.system.authority.issued
    for _ in range(5):
        workload.ca_side()
    assert workload.system.authority.issued == before + 5


@pytest.mark.parametrize(
    "path",
    [
        "raw_bound",
        "naive",
        "request_template",
        "request_builder",
        "certificate_template",
        "certificate_builder",
    ],
)
def test_every_path_runs(workload: CaWorkload, path: str) -> None:
    """Every benchmarked path completes on the workload's requests."""
    for _ in range(3):
        getattr(workload, path)()


def test_run_ready_refuses_a_waiting_coroutine() -> None:
    """A coroutine that suspends is an error, not a silent partial run."""

    class _Wait:
        def __await__(self) -> Generator[None, None, None]:
            yield None

    async def waits() -> None:
        await _Wait()

    with pytest.raises(RuntimeError, match="suspended"):
        run_ready(waits())


def test_bootstrap_interval_brackets_the_median() -> None:
    """The interval contains the sample median and narrows with more data."""
    small = bootstrap_median([1.0, 2.0, 3.0, 4.0, 5.0])
    large = bootstrap_median([1.0, 2.0, 3.0, 4.0, 5.0] * 40)
    assert small.low <= small.estimate == 3.0 <= small.high
    assert large.high - large.low <= small.high - small.low


def test_paired_timing_has_one_ratio_per_block() -> None:
    """Each block yields one time for each side; the ratio's interval brackets its estimate."""
    timing = time_paired(lambda: None, lambda: sum(range(50)), blocks=7, per_block=5, warmup=1)
    assert len(timing.a_ns) == len(timing.b_ns) == 7
    assert timing.ratio.low <= timing.ratio.estimate <= timing.ratio.high
