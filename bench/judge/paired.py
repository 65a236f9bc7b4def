"""Interleaved, paired timing of two callables, and bootstrap confidence intervals.

Shared 2-core machines drift by tens of percent within a minute, so two things are only compared
side by side: short blocks of A and B alternate in random order, each block pair gives one ratio,
and the verdict rests on the distribution of those paired ratios (DESIGN.md).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate with a two-sided confidence interval."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class PairedTiming:
    """Per-operation times of A and B (ns, one per block) and the paired ratios B/A."""

    a_ns: tuple[float, ...]
    b_ns: tuple[float, ...]
    ratio: Interval

    @property
    def a_median_ns(self) -> float:
        return float(np.median(self.a_ns))

    @property
    def b_median_ns(self) -> float:
        return float(np.median(self.b_ns))

    def spread(self, which: str) -> tuple[float, float]:
        """The interquartile range of A's or B's per-block times, in ns."""
        values = self.a_ns if which == "a" else self.b_ns
        low, high = np.percentile(values, [25, 75])
        return float(low), float(high)


def bootstrap_median(
    values: Sequence[float], *, resamples: int = 4000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Median with a percentile-bootstrap confidence interval (numpy)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("no values to bootstrap")
    generator = np.random.default_rng(seed)
    samples = generator.choice(data, size=(resamples, data.size), replace=True)
    medians = np.median(samples, axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(medians, [tail, 100.0 - tail])
    return Interval(float(np.median(data)), float(low), float(high))


def _time_block(operation: Callable[[], object], count: int) -> float:
    clock = time.perf_counter_ns
    started = clock()
    for _ in range(count):
        operation()
    return (clock() - started) / count


def time_paired(
    a: Callable[[], object],
    b: Callable[[], object],
    *,
    blocks: int = 31,
    per_block: int = 200,
    warmup: int = 100,
    seed: int = 0,
) -> PairedTiming:
    """Time A and B in alternating blocks (random order per pair); ratios are B/A."""
    order = random.Random(seed)
    _time_block(a, warmup)
    _time_block(b, warmup)
    a_ns: list[float] = []
    b_ns: list[float] = []
    for _ in range(blocks):
        if order.random() < 0.5:
            a_ns.append(_time_block(a, per_block))
            b_ns.append(_time_block(b, per_block))
        else:
            b_ns.append(_time_block(b, per_block))
            a_ns.append(_time_block(a, per_block))
    ratios = [bn / an for an, bn in zip(a_ns, b_ns, strict=True)]
    return PairedTiming(tuple(a_ns), tuple(b_ns), bootstrap_median(ratios, seed=seed))
