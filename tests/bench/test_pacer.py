"""The open-loop pacer: absolute wake-ups and the generator's own timer error."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
import uvloop

from bench.pacer import Pacer, Wake, timer_error_ns


def test_lateness_on_an_idle_thread_is_all_timer_error() -> None:
    """Woken 300 µs late having used no CPU: all 300 µs are the generator's own error."""
    assert timer_error_ns(1_000_000, Wake(now=1_300_000, cpu_ns=0)) == 300_000


def test_lateness_explained_by_cpu_work_is_queueing() -> None:
    """Woken late because other callbacks held the CPU: none of it is timer error."""
    assert timer_error_ns(1_000_000, Wake(now=1_300_000, cpu_ns=450_000)) == 0
    assert timer_error_ns(1_000_000, Wake(now=1_300_000, cpu_ns=100_000)) == 200_000


def test_an_early_or_on_time_wake_has_no_error() -> None:
    """An arrival started at or before its instant has no timer error (never negative)."""
    assert timer_error_ns(1_000_000, Wake(now=1_000_000, cpu_ns=0)) == 0
    assert timer_error_ns(1_000_000, Wake(now=900_000, cpu_ns=0)) == 0


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_pacer_never_wakes_before_the_instant(loop_factory: object) -> None:
    """Each wait returns at or after the instant asked for, on asyncio's loop and uvloop's."""

    async def waits() -> list[tuple[int, Wake]]:
        pacer = Pacer()
        try:
            base = time.perf_counter_ns()
            instants = [base + k * 700_000 for k in range(1, 30)]
            return [(instant, await pacer.until(instant)) for instant in instants]
        finally:
            pacer.close()

    loop = loop_factory()  # type: ignore[operator]
    try:
        for instant, wake in loop.run_until_complete(waits()):
            assert wake.now >= instant
    finally:
        loop.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")
def test_pacer_uses_a_timerfd_on_linux() -> None:
    """On Linux waits are armed on a timerfd (microsecond wake-ups, no spinning)."""
    pacer = Pacer()
    try:
        assert pacer.precise
    finally:
        pacer.close()
