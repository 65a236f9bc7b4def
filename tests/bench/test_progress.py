"""The end-of-run summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.progress import print_summary
from bench.results import read_result


def test_quiet_summary_is_one_line(
    two_results: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """--quiet prints a single line with outcomes, rates, p99 and the result path."""
    result = read_result(two_results[0])
    print_summary(result, two_results[0], quiet=True)
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "issued" in out and "enrollments/s" in out and str(two_results[0].name) in out


def test_full_summary_has_every_step(
    two_results: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The table lists end-to-end rows and every step, then the generator's self-check."""
    result = read_result(two_results[0])
    print_summary(result, two_results[0], quiet=False)
    out = capsys.readouterr().out
    for step in result["latency"]["steps"]:
        assert step in out
    assert "generator CPU share" in out
