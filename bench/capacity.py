"""`enrollbench capacity`: the highest open-loop rate that meets a latency SLO.

Bisection (in log space) over short open-loop runs between a low and a high rate. A trial meets
the SLO when its end-to-end latency percentile (from the intended start, so queueing counts) is
within the limit, every device was issued, and the generator kept its schedule; a trial the
generator could not drive is reported as such and counts as not meeting it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.errors import UsageError
from bench.merge import build_result, manifest
from bench.profile import Profile, validate
from bench.results import SCHEMA_VERSION
from bench.runner import RunOptions, execute

_SLO = re.compile(r"^(p50|p90|p99|p99\.9)=(\d+(?:\.\d+)?)(us|µs|ms|s)$")
_UNITS = {"us": 1.0, "µs": 1.0, "ms": 1000.0, "s": 1_000_000.0}
_KEYS = {"p50": "p50_us", "p90": "p90_us", "p99": "p99_us", "p99.9": "p99_9_us"}


def parse_slo(text: str) -> tuple[str, float]:
    """`p99=200ms` -> ("p99_us", 200000.0)."""
    match = _SLO.match(text.strip())
    if match is None:
        raise UsageError(f"--slo {text!r}: expected p50|p90|p99|p99.9=<number><us|ms|s>")
    return _KEYS[match.group(1)], float(match.group(2)) * _UNITS[match.group(3)]


def _trial_profile(profile: Profile, rate: float, seconds: float) -> Profile:
    values = profile.as_dict()
    load = values["load"]
    load.update(mode="open", rate=rate, duration=seconds, warmup_seconds=min(1.0, seconds / 4))
    raw: dict[str, Any] = {k: v for k, v in values.items() if k}
    raw.update(values[""])
    return validate(raw, profile.name, profile.source)


def trial(profile: Profile, rate: float, workers: int, seconds: float) -> dict[str, Any]:
    """One short open-loop run at `rate`."""
    trial_profile = _trial_profile(profile, rate, seconds)
    output = execute(trial_profile, workers, RunOptions(workers), None)
    return build_result(trial_profile, workers, output)


def _point(rate: float, result: dict[str, Any], key: str, limit: float) -> dict[str, Any]:
    outcomes = result["outcomes"]
    latency = result["latency"]["end_to_end"]["latency"]
    generator = result["generator"]
    all_issued = outcomes["issued"] == outcomes["started"] and outcomes["started"] > 0
    meets = latency[key] <= limit and all_issued and not generator["generator_bound"]
    return {
        "rate": round(rate, 2),
        "meets": meets,
        "enrollments_per_s": result["throughput"]["enrollments_per_s"],
        "latency": latency,
        "issued": outcomes["issued"],
        "started": outcomes["started"],
        "generator_bound": generator["generator_bound"],
        "reasons": generator["reasons"],
    }


def search(
    profile: Profile,
    slo: tuple[str, float],
    workers: int,
    seconds: float,
    low: float,
    high: float,
    iterations: int,
    *,
    quiet: bool,
) -> dict[str, Any]:
    """Bisect between `low` and `high`; return a capacity result document."""
    if not 0 < low < high:
        raise UsageError("--low must be positive and below --high")
    key, limit = slo
    console = Console(stderr=True, quiet=quiet)
    points: list[dict[str, Any]] = []

    def meets(rate: float) -> bool:
        point = _point(rate, trial(profile, rate, workers, seconds), key, limit)
        points.append(point)
        console.print(
            f"rate {rate:9.1f}/s: {key[:-3]} {point['latency'][key] / 1000:8.2f} ms, "
            f"{point['enrollments_per_s']:9.1f}/s  {'meets' if point['meets'] else 'misses'}"
        )
        return bool(point["meets"])

    capacity: float | None
    if not meets(low):
        capacity = None
    elif meets(high):
        capacity = high
    else:
        below, above = low, high
        for _ in range(iterations):
            middle = math.sqrt(below * above)
            below, above = (middle, above) if meets(middle) else (below, middle)
        capacity = below
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "capacity",
        "manifest": manifest(profile, workers, profile.get("", "seed")),
        "slo": {"percentile": key, "limit_us": limit},
        "capacity_per_s": None if capacity is None else round(capacity, 2),
        "bounds": {"low": low, "high": high, "trial_seconds": seconds},
        "points": sorted(points, key=lambda p: p["rate"]),
    }


def print_curve(result: dict[str, Any], out: Path) -> None:
    """The rate/latency curve and the answer."""
    key = result["slo"]["percentile"]
    table = Table(title=f"capacity: {key[:-3]} <= {result['slo']['limit_us'] / 1000:g} ms")
    for column in ("rate /s", "achieved /s", f"{key[:-3]} ms", "issued", "meets"):
        table.add_column(column, justify="right")
    for point in result["points"]:
        table.add_row(
            f"{point['rate']:.1f}",
            f"{point['enrollments_per_s']:.1f}",
            f"{point['latency'][key] / 1000:.2f}",
            f"{point['issued']}/{point['started']}",
            "yes" if point["meets"] else ("generator-bound" if point["generator_bound"] else "no"),
        )
    console = Console()
    console.print(table)
    capacity = result["capacity_per_s"]
    answer = "below the lowest rate tried" if capacity is None else f"{capacity:,.1f} enrollments/s"
    console.print(f"capacity: {answer} -> {out}")
