"""Simulated administrators."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine.approval import AdministratorPool, ApprovalPolicy
from engine.distribution import Distribution
from engine.errors import ApprovalDeniedError


def _review_all(pool: AdministratorPool, count: int) -> list[BaseException | None]:
    async def all_of() -> list[BaseException | None]:
        return list(
            await asyncio.gather(
                *(pool.review(f"d{i}") for i in range(count)), return_exceptions=True
            )
        )

    return asyncio.run(all_of())


def test_rate_one_approves_all() -> None:
    """An approval rate of 1 approves every request."""
    pool = AdministratorPool(ApprovalPolicy(3, Distribution("fixed"), 1.0), random.Random(1))
    assert _review_all(pool, 10) == [None] * 10
    assert (pool.approved, pool.denied, pool.pending) == (10, 0, 0)


def test_rate_zero_rejects_all_with_the_administrator() -> None:
    """An approval rate of 0 rejects every request, naming the device and the administrator."""
    pool = AdministratorPool(ApprovalPolicy(2, Distribution("fixed"), 0.0), random.Random(1))
    results = _review_all(pool, 4)
    assert all(isinstance(r, ApprovalDeniedError) for r in results)
    first = results[0]
    assert isinstance(first, ApprovalDeniedError)
    assert first.device_id == "d0" and first.administrator in (0, 1)


def test_reviews_never_exceed_the_administrators() -> None:
    """With two administrators, at most two reviews run at once, and two do."""
    pool = AdministratorPool(
        ApprovalPolicy(2, Distribution("fixed", mean=0.001), 1.0), random.Random(1)
    )
    busy: list[int] = []
    original = pool._draw_delay

    def tracked() -> float:
        busy.append(2 - len(pool._free))  # administrators reviewing now
        return original()

    pool._draw_delay = tracked
    _review_all(pool, 6)
    assert max(busy) == 2 and len(busy) == 6


@pytest.mark.parametrize(("count", "rate"), [(0, 0.5), (1, 1.5), (1, -0.1)])
def test_bad_policies_are_refused(count: int, rate: float) -> None:
    """No administrators, or a rate outside [0, 1], is refused."""
    with pytest.raises(ValueError, match=r"administrator|approval_rate"):
        ApprovalPolicy(count, Distribution("fixed"), rate)
