"""Delay distributions."""

from __future__ import annotations

import random
import statistics

import pytest

from engine.distribution import Distribution


@pytest.mark.parametrize(
    ("distribution", "expected_mean"),
    [
        (Distribution("fixed", mean=0.5), 0.5),
        (Distribution("uniform", low=1.0, high=3.0), 2.0),
        (Distribution("exponential", mean=0.2), 0.2),
    ],
)
def test_sample_means(distribution: Distribution, expected_mean: float) -> None:
    """Sample means land near the distribution's mean."""
    draw = distribution.sampler(random.Random(5))
    assert statistics.fmean(draw() for _ in range(20_000)) == pytest.approx(expected_mean, rel=0.05)


def test_lognormal_median() -> None:
    """The lognormal's `mean` parameter is its median."""
    draw = Distribution("lognormal", mean=0.1, sigma=1.0).sampler(random.Random(5))
    assert statistics.median(draw() for _ in range(20_000)) == pytest.approx(0.1, rel=0.05)


def test_zero_mean_never_waits() -> None:
    """Exponential and lognormal with mean 0 draw 0."""
    assert Distribution("exponential").sampler(random.Random(1))() == 0.0
    assert Distribution("lognormal").sampler(random.Random(1))() == 0.0


def test_same_seed_same_draws() -> None:
    """Draws are reproducible from the seed."""
    first = Distribution("exponential", mean=1).sampler(random.Random(9))
    second = Distribution("exponential", mean=1).sampler(random.Random(9))
    assert [first() for _ in range(5)] == [second() for _ in range(5)]


def test_negative_values_refused() -> None:
    """A negative mean or an inverted range is refused."""
    with pytest.raises(ValueError, match="invalid"):
        Distribution("uniform", low=2.0, high=1.0)
