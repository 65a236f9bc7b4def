"""Capacity search."""

from __future__ import annotations

import pytest

from bench import capacity
from bench.errors import UsageError
from bench.profile import load_profile


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


def test_search_brackets_the_capacity() -> None:
    """Between a rate the engine meets and one it cannot, the answer lies in between."""
    profile = load_profile("smoke", ["load.devices=200"])
    result = capacity.search(profile, ("p99_us", 50_000.0), 2, 1.0, 20.0, 40_000.0, 1, quiet=True)
    assert result["kind"] == "capacity"
    rates = [p["rate"] for p in result["points"]]
    assert rates == sorted(rates) and len(rates) == 3
    assert result["points"][0]["meets"] and not result["points"][-1]["meets"]
    assert 20.0 <= result["capacity_per_s"] < 40_000.0
