"""Delay distributions for simulated waits (administrator approval, wireless link latency)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

DistributionKind = Literal["fixed", "uniform", "exponential", "lognormal"]

# The parameters each kind takes, all required; any other parameter given is refused, so a
# profile never carries a number that silently does nothing.
_PARAMETERS: dict[str, tuple[str, ...]] = {
    "fixed": ("mean",),
    "uniform": ("low", "high"),
    "exponential": ("mean",),
    "lognormal": ("mean", "sigma"),
}
_ALL = ("mean", "low", "high", "sigma")


@dataclass(frozen=True, slots=True)
class Distribution:
    """A delay distribution in seconds; a parameter left as None was not given.

    - fixed: always `mean`.
    - uniform: uniform between `low` and `high` (low <= high); its mean is (low + high) / 2.
    - exponential: mean `mean` (rate 1 / mean).
    - lognormal: mean `mean` and shape `sigma` (the standard deviation of the log of a draw):
      mu = ln(mean) - sigma**2 / 2, so the median is mean * exp(-sigma**2 / 2), below the mean.

    Every parameter is a finite number >= 0. A kind requires exactly its parameters: a missing
    one or one the kind would ignore (`uniform` with `mean`) raises ValueError naming both.
    A `mean` of 0 (or a uniform `high` of 0) never waits.
    """

    kind: DistributionKind
    mean: float | None = None
    low: float | None = None
    high: float | None = None
    sigma: float | None = None

    def __post_init__(self) -> None:
        wanted = _PARAMETERS.get(self.kind)
        if wanted is None:
            known = ", ".join(_PARAMETERS)
            raise ValueError(f"unknown distribution kind {self.kind!r} (known: {known})")
        for name in _ALL:
            value = getattr(self, name)
            if name in wanted and value is None:
                raise ValueError(f"{self.kind} distribution needs {name!r}")
            if name not in wanted and value is not None:
                takes = ", ".join(wanted)
                raise ValueError(f"{self.kind} distribution takes no {name!r} (it takes {takes})")
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"{self.kind} distribution: {name!r} must be a finite number >= 0, "
                    f"got {value!r}"
                )
        if self.kind == "uniform" and self._value("low") > self._value("high"):
            raise ValueError(f"uniform distribution: 'low' {self.low} exceeds 'high' {self.high}")

    def _value(self, name: str) -> float:
        value: float | None = getattr(self, name)
        assert value is not None  # __post_init__ required it for this kind
        return value

    @property
    def never_waits(self) -> bool:
        """True when every draw is 0."""
        if self.kind == "uniform":
            return self._value("high") == 0
        return self._value("mean") == 0

    def sampler(self, rng: random.Random) -> Callable[[], float]:
        """A function drawing one delay per call from `rng`."""
        if self.never_waits:
            return lambda: 0.0
        if self.kind == "fixed":
            mean = self._value("mean")
            return lambda: mean
        if self.kind == "uniform":
            low, high = self._value("low"), self._value("high")
            return lambda: rng.uniform(low, high)
        if self.kind == "exponential":
            rate = 1.0 / self._value("mean")
            return lambda: rng.expovariate(rate)
        sigma = self._value("sigma")
        mu = math.log(self._value("mean")) - sigma * sigma / 2  # E[exp(N(mu, s^2))] = mean
        return lambda: rng.lognormvariate(mu, sigma)
