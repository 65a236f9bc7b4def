"""Fixtures for the engine micro-benchmarks: one workload per key type, built once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.microbench.workloads import CaWorkload


@pytest.fixture(scope="session")
def p256() -> Iterator[CaWorkload]:
    workload = CaWorkload("p256", "p256", "sha256")
    yield workload
    workload.close()


@pytest.fixture(scope="session")
def rsa2048() -> Iterator[CaWorkload]:
    workload = CaWorkload("rsa2048", "rsa2048", "sha256")
    yield workload
    workload.close()
