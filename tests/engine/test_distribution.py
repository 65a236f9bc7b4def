"""Delay distributions."""

from __future__ import annotations

import math
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


def test_lognormal_mean_is_its_mean() -> None:
    """A lognormal's `mean` is the mean of its draws, not its median.

    sigma 0.6: the sample mean of 100,000 draws has a standard error of 0.2% of the mean, so a
    1% tolerance is five standard errors; the median, mean * exp(-0.18) = 0.835 * mean, lies
    far outside it.
    """
    draw = Distribution("lognormal", mean=0.2, sigma=0.6).sampler(random.Random(5))
    sample = [draw() for _ in range(100_000)]
    assert statistics.fmean(sample) == pytest.approx(0.2, rel=0.01)
    assert statistics.median(sample) == pytest.approx(0.2 * math.exp(-0.18), rel=0.01)


def test_zero_mean_never_waits() -> None:
    """Every kind whose parameters allow only 0 draws 0 and says so."""
    for distribution in (
        Distribution("fixed", mean=0.0),
        Distribution("uniform", low=0.0, high=0.0),
        Distribution("exponential", mean=0.0),
        Distribution("lognormal", mean=0.0, sigma=1.0),
    ):
        assert distribution.never_waits
        assert distribution.sampler(random.Random(1))() == 0.0
    assert not Distribution("uniform", low=0.0, high=0.1).never_waits


def test_same_seed_same_draws() -> None:
    """Draws are reproducible from the seed."""
    first = Distribution("exponential", mean=1).sampler(random.Random(9))
    second = Distribution("exponential", mean=1).sampler(random.Random(9))
    assert [first() for _ in range(5)] == [second() for _ in range(5)]


@pytest.mark.parametrize(
    ("kind", "given", "message"),
    [
        ("uniform", {"low": 0.0, "high": 1.0, "mean": 0.5}, "uniform distribution takes no 'mean'"),
        ("uniform", {"low": 0.0, "high": 1.0, "sigma": 0.5}, "uniform .* no 'sigma'"),
        ("fixed", {"mean": 0.1, "sigma": 0.5}, "fixed distribution takes no 'sigma'"),
        ("fixed", {"mean": 0.1, "low": 0.0}, "fixed .* no 'low'"),
        ("exponential", {"mean": 0.1, "high": 1.0}, "exponential .* no 'high'"),
        ("lognormal", {"mean": 0.1, "sigma": 0.5, "low": 0.0}, "lognormal .* no 'low'"),
    ],
)
def test_ignored_parameters_refused(kind: str, given: dict[str, float], message: str) -> None:
    """A parameter the kind would ignore is refused, naming the kind and the parameter."""
    with pytest.raises(ValueError, match=message):
        Distribution(kind, **given)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "given", "message"),
    [
        ("fixed", {}, "fixed distribution needs 'mean'"),
        ("uniform", {"high": 1.0}, "uniform distribution needs 'low'"),
        ("uniform", {"low": 0.0}, "uniform distribution needs 'high'"),
        ("exponential", {}, "exponential distribution needs 'mean'"),
        ("lognormal", {"sigma": 0.5}, "lognormal distribution needs 'mean'"),
        ("lognormal", {"mean": 0.2}, "lognormal distribution needs 'sigma'"),
    ],
)
def test_missing_parameters_refused(kind: str, given: dict[str, float], message: str) -> None:
    """A parameter the kind needs must be given."""
    with pytest.raises(ValueError, match=message):
        Distribution(kind, **given)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "given", "message"),
    [
        ("fixed", {"mean": -1.0}, "fixed distribution: 'mean' must be a finite number >= 0"),
        ("exponential", {"mean": math.inf}, "exponential .* 'mean' must be a finite"),
        ("lognormal", {"mean": 0.1, "sigma": math.nan}, "lognormal .* 'sigma' must be a finite"),
        ("uniform", {"low": 2.0, "high": 1.0}, "uniform distribution: 'low' 2.0 exceeds 'high'"),
    ],
)
def test_bad_values_refused(kind: str, given: dict[str, float], message: str) -> None:
    """Negative, infinite or NaN parameters and an inverted range are refused."""
    with pytest.raises(ValueError, match=message):
        Distribution(kind, **given)  # type: ignore[arg-type]


def test_unknown_kind_refused() -> None:
    """An unknown kind is refused by name."""
    with pytest.raises(ValueError, match="unknown distribution kind 'gamma'"):
        Distribution("gamma", mean=1.0)  # type: ignore[arg-type]
