"""The engine's pytest-benchmark suite.

Run: python -m pytest bench/microbench --benchmark-enable --benchmark-group-by=group
Each group puts a fast path beside its reference (the raw crypto bound, or cryptography's
builders). Sequential benchmarks drift on shared machines; for ratios you can trust, use the
interleaved report: python -m bench.microbench.ratios
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.microbench.workloads import CaWorkload

pytestmark = pytest.mark.benchmark(min_rounds=200, warmup=True)


@pytest.mark.benchmark(group="ca-side-p256")
@pytest.mark.parametrize("path", ["raw_bound", "ca_side", "naive"])
def test_ca_side_p256(benchmark: Any, p256: CaWorkload, path: str) -> None:
    """CA side of one P-256 enrollment, beside the raw crypto bound and the naive builder loop."""
    benchmark(getattr(p256, path))


@pytest.mark.benchmark(group="ca-side-rsa2048")
@pytest.mark.parametrize("path", ["raw_bound", "ca_side", "naive"])
def test_ca_side_rsa2048(benchmark: Any, rsa2048: CaWorkload, path: str) -> None:
    """CA side of one RSA-2048 enrollment, beside the raw bound and the naive builder loop."""
    benchmark(getattr(rsa2048, path))


@pytest.mark.benchmark(group="request-p256")
@pytest.mark.parametrize("path", ["request_template", "request_builder"])
def test_request_p256(benchmark: Any, p256: CaWorkload, path: str) -> None:
    """Building one P-256 PKCS #10 request: template against cryptography's builder."""
    benchmark(getattr(p256, path))


@pytest.mark.benchmark(group="certificate-p256")
@pytest.mark.parametrize("path", ["certificate_template", "certificate_builder"])
def test_certificate_p256(benchmark: Any, p256: CaWorkload, path: str) -> None:
    """Issuing one certificate for a P-256 key: template against `CertificateBuilder`."""
    benchmark(getattr(p256, path))
