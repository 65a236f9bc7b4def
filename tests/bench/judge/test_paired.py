"""Paired interleaved timing and bootstrap intervals."""

from __future__ import annotations

from bench.judge.paired import bootstrap_median, time_paired


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
