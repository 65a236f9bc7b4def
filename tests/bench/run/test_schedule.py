"""Open-loop arrival schedules."""

from __future__ import annotations

import numpy as np
import pytest

from bench.run.schedule import arrival_offsets, arrivals_until, arrivals_within


def test_constant_rate_spaces_arrivals_evenly() -> None:
    """At 100/s arrivals come every 10 ms, the first at time 0."""
    offsets = arrival_offsets(5, 100.0, "constant", 0.0, 1)
    assert offsets.tolist() == [0, 10_000_000, 20_000_000, 30_000_000, 40_000_000]


def test_poisson_gaps_average_one_over_rate() -> None:
    """Poisson arrivals at 1000/s have a mean gap of 1 ms and vary."""
    offsets = arrival_offsets(20_000, 1000.0, "poisson", 0.0, 7)
    gaps = np.diff(offsets)
    assert gaps.mean() == pytest.approx(1_000_000, rel=0.03)
    assert gaps.std() == pytest.approx(1_000_000, rel=0.05)


def test_poisson_is_reproducible_per_seed() -> None:
    """The same seed draws the same schedule."""
    first = arrival_offsets(50, 10.0, "poisson", 0.0, 3)
    assert np.array_equal(first, arrival_offsets(50, 10.0, "poisson", 0.0, 3))


def test_linear_ramp_reaches_the_rate() -> None:
    """With a 2 s ramp to 100/s, 100 arrivals fall in the ramp, then 100/s."""
    offsets = arrival_offsets(400, 100.0, "constant", 2.0, 1)
    assert arrivals_within(offsets, 2_000_000_000) == 100
    after = np.diff(offsets[150:])
    assert np.allclose(after, 10_000_000, atol=1)
    ramp_gaps = np.diff(offsets[:100])
    assert np.all(np.diff(ramp_gaps) <= 1)  # gaps shrink as the rate rises


def test_arrivals_within_counts_before_the_deadline() -> None:
    """Only arrivals strictly before the duration count; 0 means all."""
    offsets = arrival_offsets(10, 10.0, "constant", 0.0, 1)
    assert arrivals_within(offsets, 500_000_000) == 5
    assert arrivals_within(offsets, 0) == 10


def test_poisson_schedule_runs_to_the_end_of_the_duration() -> None:
    """A Poisson schedule fills the whole duration, whatever the draws (never cut short)."""
    for seed in range(40):
        offsets = arrivals_until(2_000_000_000, 50.0, "poisson", 0.0, seed)
        gaps_after_last = 2_000_000_000 - int(offsets[-1])
        # the next arrival would fall after the end: the gap to it is an exponential draw,
        # so the last arrival lies within a few mean gaps (20 ms) of the end
        assert 0 < gaps_after_last < 400_000_000
        assert np.all(offsets < 2_000_000_000)


def test_arrivals_until_extends_a_short_draw() -> None:
    """Growing the draw keeps the same prefix: the schedule for a seed does not change."""
    short = arrivals_until(1_000_000_000, 100.0, "poisson", 0.0, 5)
    long = arrivals_until(3_000_000_000, 100.0, "poisson", 0.0, 5)
    assert np.array_equal(long[: short.size], short)
