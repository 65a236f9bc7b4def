"""Open-loop arrival schedules: when each device is intended to start.

Offsets are nanoseconds from the run's start. A constant schedule spaces arrivals 1/rate apart; a
Poisson schedule draws exponential gaps. A linear ramp raises the rate from 0 to the target over
`ramp_seconds`: arrival times then follow the inverse of the cumulative rate.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def arrival_offsets(
    count: int, rate: float, arrival: str, ramp_seconds: float, seed: int
) -> npt.NDArray[np.int64]:
    """Intended start offsets (ns) of `count` arrivals at `rate` per second."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if arrival == "poisson":
        gaps = np.random.default_rng(seed).exponential(1.0, count)
        work = np.cumsum(gaps) - gaps[0]  # the first arrival at time 0
    else:
        work = np.arange(count, dtype=np.float64)
    return _seconds_to_ns(work, rate, ramp_seconds)


def arrivals_until(
    duration_ns: int, rate: float, arrival: str, ramp_seconds: float, seed: int
) -> npt.NDArray[np.int64]:
    """Every arrival intended before `duration_ns`: a Poisson schedule is drawn until the
    duration ends, never cut short by a guessed count."""
    expected = rate * (duration_ns / 1e9 - ramp_seconds / 2.0)
    count = max(16, int(expected + 6.0 * np.sqrt(max(expected, 1.0))) + 16)
    while True:
        offsets = arrival_offsets(count, rate, arrival, ramp_seconds, seed)
        if offsets[-1] >= duration_ns:
            return offsets[: arrivals_within(offsets, duration_ns)]
        count *= 2  # the same seed draws the same prefix, so the schedule only grows


def _seconds_to_ns(
    work: npt.NDArray[np.float64], rate: float, ramp_seconds: float
) -> npt.NDArray[np.int64]:
    # `work` counts arrivals; time t has seen rate*t arrivals, or rate*t^2/(2R) during a ramp R.
    ramp_arrivals = rate * ramp_seconds / 2.0
    seconds = np.where(
        work < ramp_arrivals,
        np.sqrt(2.0 * work * ramp_seconds / rate) if ramp_seconds > 0 else 0.0,
        ramp_seconds + (work - ramp_arrivals) / rate,
    )
    return np.round(seconds * 1e9).astype(np.int64)


def arrivals_within(offsets: npt.NDArray[np.int64], duration_ns: int) -> int:
    """How many arrivals fall before `duration_ns` (all of them when it is 0)."""
    if duration_ns <= 0:
        return int(offsets.size)
    return int(np.searchsorted(offsets, duration_ns, side="left"))
