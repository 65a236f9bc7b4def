"""`enrollbench capacity`: the highest open-loop rate that meets a latency SLO.

Bisection (in log space) over short open-loop runs between a low and a high rate. A trial meets
the SLO when its end-to-end latency percentile (from the intended start, so queueing counts) is
within the limit, no device failed, the share issued is what the profile expects
(outcomes.expected.met: an approval profile's administrators reject some devices by design, and
those rejections do not count against a trial; any beyond its tolerance do), and the generator
kept its schedule; a trial the generator could not drive is reported as such and counts as not
meeting it. Throughput is judged as issued certificates per second.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.errors import UsageError
from bench.profile import Profile, validate
from bench.results import SCHEMA_VERSION
from bench.run.merge import build_result, manifest
from bench.run.runner import RunOptions, execute

_SLO = re.compile(r"^(p50|p90|p99|p99\.9)=(\d+(?:\.\d+)?)(us|µs|ms|s)$")
_UNITS = {"us": 1.0, "µs": 1.0, "ms": 1000.0, "s": 1_000_000.0}
_KEYS = {"p50": "p50_us", "p90": "p90_us", "p99": "p99_us", "p99.9": "p99_9_us"}


def parse_slo(text: str) -> tuple[str, float]:
    """`p99=200ms` -> ("p99_us", 200000.0)."""
    match = _SLO.match(text.strip())
    if match is None:
        raise UsageError(f"--slo {text!r}: expected p50|p90|p99|p99.9=<number><us|ms|s>")
    return _KEYS[match.group(1)], float(match.group(2)) * _UNITS[match.group(3)]


# A trial is shorter than the profile's own run, so its issued share varies more: its tolerance
# covers at least this many binomial standard deviations at the trial's size (z = 4: a correct
# trial falls short with probability about 3e-5), never less than the profile's own.
_SAMPLING_Z = 4.0


def _trial_tolerance(fraction: float, tolerance: float, devices: float) -> float:
    """The profile's tolerance, widened to the sampling error of `devices` started."""
    sampling = _SAMPLING_Z * math.sqrt(fraction * (1 - fraction) / max(devices, 1.0))
    return min(1.0, max(tolerance, sampling))


def _trial_profile(profile: Profile, rate: float, seconds: float) -> Profile:
    values = profile.as_dict()
    load = values["load"]
    load.update(mode="open", rate=rate, duration=seconds, warmup_seconds=min(1.0, seconds / 4))
    expect = values["expect"]
    expect["tolerance"] = _trial_tolerance(
        expect["issued_fraction"], expect["tolerance"], rate * seconds
    )
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
    failed = sum(outcomes["failed"].values())
    expected_met = bool(outcomes["expected"]["met"])
    meets = (
        latency[key] <= limit
        and failed == 0
        and expected_met
        and outcomes["accounted"]
        and not generator["generator_bound"]
    )
    return {
        "rate": round(rate, 2),
        "meets": meets,
        "issued_per_s": result["throughput"]["issued_per_s"],
        "enrollments_per_s": result["throughput"]["enrollments_per_s"],
        "latency": latency,
        "issued": outcomes["issued"],
        "started": outcomes["started"],
        "rejected": sum(outcomes["rejected"].values()),
        "failed": failed,
        "expected": outcomes["expected"],
        "generator_bound": generator["generator_bound"],
        "reasons": generator["reasons"],
    }


def _verdict(point: dict[str, Any], key: str, limit: float) -> str:
    """Why a trial misses (the first reason), or "yes"."""
    if point["meets"]:
        return "yes"
    if point["generator_bound"]:
        return "generator-bound"
    if point["failed"]:
        return f"{point['failed']} failed"
    if not point["expected"]["met"]:
        return "too few issued"
    if point["latency"][key] > limit:
        return "too slow"
    return "no"


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
    if not seconds > 0:
        raise UsageError("--step-seconds must be positive")
    if iterations < 0:
        raise UsageError("--iterations must be 0 or more")
    key, limit = slo
    console = Console(stderr=True, quiet=quiet)
    points: list[dict[str, Any]] = []

    def meets(rate: float) -> bool:
        point = _point(rate, trial(profile, rate, workers, seconds), key, limit)
        points.append(point)
        console.print(
            f"rate {rate:9.1f}/s: {key[:-3]} {point['latency'][key] / 1000:8.2f} ms, "
            f"{point['issued_per_s']:9.1f} issued/s, {point['issued']}/{point['started']} "
            f"issued, {point['failed']} failed  {'meets' if point['meets'] else 'misses'}"
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
        "capacity_issued_per_s": _issued_at(points, capacity),
        "bounds": {"low": low, "high": high, "trial_seconds": seconds},
        "points": sorted(points, key=lambda p: p["rate"]),
    }


def _issued_at(points: list[dict[str, Any]], rate: float | None) -> float | None:
    """Issued certificates/s measured in the trial at the capacity rate."""
    if rate is None:
        return None
    return next((p["issued_per_s"] for p in points if p["rate"] == round(rate, 2)), None)


def print_curve(result: dict[str, Any], out: Path) -> None:
    """The rate/latency curve (issued/s first) and the answer."""
    key, limit = result["slo"]["percentile"], result["slo"]["limit_us"]
    table = Table(title=f"capacity: {key[:-3]} <= {limit / 1000:g} ms")
    columns = ("offered /s", "issued /s", "all /s", f"{key[:-3]} ms", "issued", "failed", "meets")
    for column in columns:
        table.add_column(column, justify="right")
    for point in result["points"]:
        table.add_row(
            f"{point['rate']:.1f}",
            f"{point['issued_per_s']:.1f}",
            f"{point['enrollments_per_s']:.1f}",
            f"{point['latency'][key] / 1000:.2f}",
            f"{point['issued']}/{point['started']}",
            str(point["failed"]),
            _verdict(point, key, limit),
        )
    console = Console(width=max(Console().width, 110))  # room for "generator-bound"
    console.print(table)
    capacity = result["capacity_per_s"]
    if capacity is None:
        answer = "below the lowest rate tried"
    else:
        issued = result.get("capacity_issued_per_s")
        measured = "" if issued is None else f" ({issued:,.1f} issued/s measured)"
        answer = f"{capacity:,.1f} arrivals/s offered{measured}"
    console.print(f"capacity: {answer} -> {out}")
