"""Capacity search."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench.errors import UsageError
from bench.profile import load_profile
from bench.run import capacity
from tests.bench.conftest import synthetic_result


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("p99=200ms", ("p99_us", 200_000.0)),
        ("p50=750us", ("p50_us", 750.0)),
        ("p99.9=1.5s", ("p99_9_us", 1_500_000.0)),
    ],
)
def test_slo_parsing(text: str, expected: tuple[str, float]) -> None:
    """Percentile and limit with units are understood."""
    assert capacity.parse_slo(text) == expected


@pytest.mark.parametrize("text", ["p98=1ms", "p99<1ms", "p99=fast", "p99=1h"])
def test_bad_slo_is_a_usage_error(text: str) -> None:
    """Anything else is refused with the accepted form."""
    with pytest.raises(UsageError, match="expected"):
        capacity.parse_slo(text)


def _fake_trials(monkeypatch: pytest.MonkeyPatch, rejected_share: float = 0.0) -> None:
    """Trials without runs: p99 is 10 µs per arrival/s (5 ms at 500/s), a share rejected."""

    def fake_trial(_profile: object, rate: float, _workers: int, seconds: float) -> dict[str, Any]:
        started = round(rate * seconds)
        rejected = round(started * rejected_share)
        return synthetic_result(
            started - rejected,
            rejected,
            issued_fraction=1.0 - rejected_share,
            tolerance=0.02 if rejected_share else 0.0,
            p99_us=round(10 * rate),
            seconds=seconds,
        )

    monkeypatch.setattr(capacity, "trial", fake_trial)


def test_search_brackets_the_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between a rate that meets the SLO and one that cannot, the answer lies in between."""
    _fake_trials(monkeypatch)
    profile = load_profile("smoke")
    result = capacity.search(profile, ("p99_us", 5_000.0), 2, 1.0, 20.0, 40_000.0, 1, quiet=True)
    assert result["kind"] == "capacity"
    rates = [p["rate"] for p in result["points"]]
    assert rates == sorted(rates) and len(rates) == 3
    assert result["points"][0]["meets"] and not result["points"][-1]["meets"]
    assert 20.0 <= result["capacity_per_s"] < 40_000.0


def _judge(result: dict[str, Any]) -> dict[str, Any]:
    return capacity._point(100.0, result, "p99_us", 50_000.0)


def test_expected_rejections_do_not_count_against_a_trial() -> None:
    """An approval profile's expected rejections (within tolerance) still meet the SLO."""
    result = synthetic_result(issued=97, rejected=3, issued_fraction=0.98, tolerance=0.02)
    point = _judge(result)
    assert point["meets"]
    assert point["issued_per_s"] == result["throughput"]["issued_per_s"]


@pytest.mark.parametrize(
    ("result", "why"),
    [
        (synthetic_result(issued=99, failed=1), "1 failed"),
        (synthetic_result(issued=90, rejected=10, issued_fraction=0.98, tolerance=0.02), "few"),
        (synthetic_result(issued=100, generator_bound=True), "generator-bound"),
        (synthetic_result(issued=100, p99_us=60_000), "too slow"),
    ],
)
def test_failures_unexpected_rejections_slowness_and_generator_miss(
    result: dict[str, Any], why: str
) -> None:
    """A failed device, rejections beyond the tolerance, a slow p99 or a bound generator miss."""
    point = _judge(result)
    assert not point["meets"]
    assert why in capacity._verdict(point, "p99_us", 50_000.0)


def test_trial_tolerance_covers_sampling_error_at_the_trial_size() -> None:
    """A short trial widens an approval profile's tolerance; auto-issue keeps zero."""
    profile = load_profile("p256-admin-approval")
    trial = capacity._trial_profile(profile, 80.0, 2.0)  # about 160 devices
    assert trial.get("expect", "tolerance") == pytest.approx(4 * math.sqrt(0.98 * 0.02 / 160))
    long_trial = capacity._trial_profile(profile, 1000.0, 20.0)
    assert long_trial.get("expect", "tolerance") == 0.02  # the profile's own, never less
    assert capacity._trial_profile(load_profile("smoke"), 80.0, 2.0).get("expect", "tolerance") == 0


def test_curve_shows_issued_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    """The printed curve has an issued/s column and states the answer with its issued/s."""
    point = _judge(synthetic_result(issued=392, rejected=8, issued_fraction=0.98, tolerance=0.02))
    document = {
        "slo": {"percentile": "p99_us", "limit_us": 50_000.0},
        "capacity_per_s": 100.0,
        "capacity_issued_per_s": point["issued_per_s"],
        "points": [point],
    }
    capacity.print_curve(document, Path("c.json"))
    out = capsys.readouterr().out
    assert "issued /s" in out and "98.0" in out
    assert "100.0 arrivals/s offered (98.0 issued/s measured)" in out


def test_search_finds_the_rate_where_approval_latency_crosses_the_slo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With 2% rejected by design at every rate, the answer is where p99 crosses the limit."""
    _fake_trials(monkeypatch, rejected_share=0.02)
    profile = load_profile("p256-admin-approval")
    result = capacity.search(profile, ("p99_us", 5_000.0), 2, 4.0, 50.0, 5000.0, 12, quiet=True)
    assert result["capacity_per_s"] == pytest.approx(500.0, rel=0.01)
    assert result["capacity_issued_per_s"] == pytest.approx(0.98 * 500.0, rel=0.02)


def test_search_on_a_small_approval_profile_counts_only_unexpected_outcomes() -> None:
    """Real trials of a small approval profile: rejections by design never make a trial miss."""
    profile = load_profile(
        "p256-admin-approval",
        [
            "approval.approval_rate=0.9",
            "approval.administrators=50",
            "approval.delay={kind='fixed', mean=0.002}",
            "expect.issued_fraction=0.9",
            "expect.tolerance=0.1",
            "load.devices=400",
        ],
    )
    limit = 1_000_000.0
    result = capacity.search(profile, ("p99_us", limit), 2, 1.5, 100.0, 200.0, 0, quiet=True)
    points = result["points"]
    assert all(p["issued"] < p["started"] for p in points)  # administrators said no to some
    for point in points:
        assert point["failed"] == 0 and point["expected"]["met"]
        assert point["meets"] == (
            point["latency"]["p99_us"] <= limit and not point["generator_bound"]
        )


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ((0.0, 10.0, 1.0, 1), "--low"),
        ((5.0, 10.0, 0.0, 1), "--step-seconds"),
        ((5.0, 10.0, 1.0, -1), "--iterations"),
    ],
)
def test_bad_search_bounds_are_usage_errors(
    bounds: tuple[float, float, float, int], message: str
) -> None:
    """A zero rate, a zero-length trial or negative iterations are refused before any run."""
    low, high, seconds, iterations = bounds
    with pytest.raises(UsageError, match=message):
        capacity.search(
            load_profile("smoke"), ("p99_us", 1.0), 1, seconds, low, high, iterations, quiet=True
        )
