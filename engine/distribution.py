"""Delay distributions for simulated waits (administrator approval, wireless link latency)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

DistributionKind = Literal["fixed", "uniform", "exponential", "lognormal"]


@dataclass(frozen=True, slots=True)
class Distribution:
    """A delay distribution in seconds.

    fixed: always `mean`; uniform: between `low` and `high`; exponential: mean `mean`;
    lognormal: median `mean`, shape `sigma`.
    """

    kind: DistributionKind
    mean: float = 0.0
    low: float = 0.0
    high: float = 0.0
    sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.mean < 0 or self.low < 0 or self.high < self.low or self.sigma < 0:
            raise ValueError(f"invalid delay distribution: {self}")

    def sampler(self, rng: random.Random) -> Callable[[], float]:
        """A function drawing one delay per call from `rng`."""
        if self.kind == "fixed":
            mean = self.mean
            return lambda: mean
        if self.kind == "uniform":
            return lambda: rng.uniform(self.low, self.high)
        if self.mean == 0:
            return lambda: 0.0
        if self.kind == "exponential":
            rate = 1.0 / self.mean
            return lambda: rng.expovariate(rate)
        mu = math.log(self.mean)
        sigma = self.sigma
        return lambda: rng.lognormvariate(mu, sigma)
