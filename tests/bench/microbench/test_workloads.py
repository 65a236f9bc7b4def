"""The micro-benchmark workloads do the work they claim, and the paired timer's statistics."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from bench.microbench.workloads import CaWorkload, run_ready


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
