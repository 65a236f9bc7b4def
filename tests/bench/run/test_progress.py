"""The end-of-run summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.profile import load_profile
from bench.results import read_result
from bench.run.progress import LiveProgress, print_summary
from tests.bench.conftest import synthetic_result


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
    assert "of each shard's core" in out


def test_summary_line_leads_with_issued_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    """Issued certificates/s come first, all enrollments/s beside them, never the other way."""
    result = synthetic_result(issued=200, rejected=200, seconds=4.0)
    print_summary(result, Path("r.json"), quiet=True)
    out = capsys.readouterr().out
    assert out.startswith("synthetic: 50 issued/s (100 enrollments/s);"), out


def test_precomputed_steps_say_so(capsys: pytest.CaptureFixture[str]) -> None:
    """A step that did no work in the run reads "precomputed", never 0.00 ms."""
    print_summary(synthetic_result(), Path("r.json"), quiet=False)
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if "│" in line}
    assert "precomputed" in rows["generate-key"] and "0.00" not in rows["generate-key"]
    assert "precomputed" not in rows["issue"] and "0.17" in rows["issue"]


def test_live_line_leads_with_issued_per_second() -> None:
    """The live line shows issued/s first and all enrollments/s beside it."""
    display = LiveProgress(load_profile("smoke"), enabled=False)
    display.line({0: {"done": 0, "errors": 0}}, now=10.0)
    line = display.line({0: {"done": 300, "errors": 100}, 1: {"done": 100}}, now=12.0)
    assert "150 issued/s[/] (all 200/s)" in line
    assert line.index("issued/s") < line.index("in flight")
