"""bench.microbench.http_stack: the HTTP stack comparison's arithmetic and a tiny live run."""

from __future__ import annotations

import os

import pytest

from bench.microbench.http_stack import Block, machine_busy, main, process_cpu, summarize


def test_process_cpu_reads_this_process() -> None:
    """/proc utime+stime of this process is a non-negative number of seconds."""
    assert process_cpu(os.getpid()) >= 0.0


def test_machine_busy_is_positive() -> None:
    """The machine has been busy for some CPU time since boot."""
    assert machine_busy() > 0.0


def test_summarize_gives_medians_and_paired_ratios() -> None:
    """Ratios pair blocks of the same round, first side over each other side."""
    rounds = [
        [Block("a", 100, 1.0, 0.01, 0.02), Block("b", 100, 2.0, 0.02, 0.02)],
        [Block("a", 100, 1.0, 0.01, 0.02), Block("b", 100, 4.0, 0.04, 0.02)],
        [Block("a", 100, 2.0, 0.01, 0.02), Block("b", 100, 2.0, 0.02, 0.02)],
    ]
    lines = summarize(rounds)
    assert summarize([[Block("a", 1, 1.0, 0.0, 0.0), Block("b", 1, 1.0, 0.0, 0.0)]])[-1] == (
        "ratio a/b total CPU µs/request: n/a (blocks too short to measure)"
    )
    assert "median a: requests/s 100.0, client CPU µs/request 100.0" in lines[0]
    assert lines[2] == "ratio a/b requests/s: median 2.000 (min 1.000, max 4.000, 3 rounds)"
    assert (
        lines[3] == "ratio a/b client CPU µs/request: median 0.500 (min 0.250, max 0.500, 3 rounds)"
    )


@pytest.mark.parametrize("fleet", [False, True])
def test_tiny_live_run(capsys: pytest.CaptureFixture[str], fleet: bool) -> None:
    """One small round against real child servers prints every side and the ratios."""
    argv = ["--rounds", "1", "--requests", "60", "--concurrency", "4", "--warmup", "20"]
    argv += ["--quiet", "100"]  # never discards: the path runs, the test stays deterministic
    assert main([*argv, "--fleet", "--fleet-requests", "30"] if fleet else argv) == 0
    output = capsys.readouterr().out
    if fleet:
        assert "ratio keep-alive/tls-per-request requests/s: median" in output
        assert "ratio keep-alive/keep-alive' requests/s" in output
        assert "tls-per-request client phases per request" in output
    else:
        assert "ratio ours/ours' requests/s: median" in output
        assert "ratio ours/aiohttp" in output or "aiohttp is not installed" in output
