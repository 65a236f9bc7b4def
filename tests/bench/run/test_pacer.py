"""The open-loop pacer: absolute wake-ups on a timerfd."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
import uvloop

from bench.run.pacer import Pacer


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_pacer_never_wakes_before_the_instant(loop_factory: object) -> None:
    """Each wait returns at or after the instant asked for, on asyncio's loop and uvloop's."""

    async def waits() -> list[tuple[int, int]]:
        pacer = Pacer()
        try:
            base = time.perf_counter_ns()
            instants = [base + k * 700_000 for k in range(1, 30)]
            return [(instant, await pacer.until(instant)) for instant in instants]
        finally:
            pacer.close()

    loop = loop_factory()  # type: ignore[operator]
    try:
        for instant, woke in loop.run_until_complete(waits()):
            assert woke >= instant
    finally:
        loop.close()


def test_an_instant_already_past_returns_at_once() -> None:
    """Waiting for an instant in the past does not wait (the arrival is already due)."""

    async def wait() -> tuple[int, int]:
        pacer = Pacer()
        try:
            past = time.perf_counter_ns() - 1_000_000
            return past, await pacer.until(past)
        finally:
            pacer.close()

    past, woke = asyncio.run(wait())
    assert woke > past


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")
def test_pacer_uses_a_timerfd_on_linux() -> None:
    """On Linux waits are armed on a timerfd (microsecond wake-ups, no spinning)."""
    pacer = Pacer()
    try:
        assert pacer.precise
    finally:
        pacer.close()
