"""Precise wake-ups for open-loop arrivals, and the generator's own timer error.

libuv (and so uvloop) keeps timers in whole milliseconds, and epoll's timeout is in milliseconds
too: an `asyncio.sleep` wakes up to ~1.6 ms late on an idle shard, and that lateness would pass
as CA latency. On Linux a `timerfd` armed at an absolute CLOCK_MONOTONIC instant (the clock
behind `time.perf_counter_ns`) becomes readable at it; the event loop watches the descriptor
like any socket, so waiting costs no CPU. Waking an idle vCPU still takes ~80 µs on this machine
kind, so the shard arms it a little early and spins the rest, within a CPU budget. Elsewhere the
pacer falls back to `asyncio.sleep` and the larger error shows in the result.

The shard tells the generator's own error apart from queueing behind the CA's work: it knows
when the engine's coroutines ran (bench.run.shard), and lateness outside those spans is the timer's,
the event loop's, the generator's or the OS's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import sys
import time

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1
_PR_SET_TIMERSLACK = 29


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.c_void_p,
        ]
    except (OSError, AttributeError):
        return None
    return libc


class Pacer:
    """Waits until absolute `perf_counter_ns` instants on the running loop (one waiter)."""

    def __init__(self) -> None:
        self._libc = _libc()
        self._fd = -1
        self._spec = _Itimerspec()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fired: asyncio.Future[None] | None = None
        if self._libc is not None:
            self._libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)  # epoll's own slack: 1 ns
            fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            self._fd = fd if fd >= 0 else -1

    @property
    def precise(self) -> bool:
        """True when waits use a timerfd (microsecond wake-ups), False on the fallback."""
        return self._fd >= 0

    async def until(self, instant: int, spin_ns: int = 0) -> int:
        """Wait until `instant` (ns on the perf_counter clock); return when it woke.

        With `spin_ns`, the timer is armed that much early and the rest is spun, handing the
        loop back between checks (other callbacks run; none is held up): waking a sleeping
        vCPU costs tens of microseconds here, a check costs a few. The spin is generator CPU.
        """
        clock = time.perf_counter_ns
        if instant - spin_ns > clock():
            if self._fd >= 0:
                await self._wait_fd(instant - spin_ns)
            else:
                await asyncio.sleep((instant - spin_ns - clock()) / 1e9)
        while clock() < instant:
            await asyncio.sleep(0)
        return clock()

    async def _wait_fd(self, instant: int) -> None:
        assert self._libc is not None
        if self._loop is None:  # watched once, for the pacer's life: no per-wait set-up
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._fd, self._on_readable)
        self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(instant, 1_000_000_000)
        if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, self._spec, None) != 0:
            await asyncio.sleep((instant - time.perf_counter_ns()) / 1e9)
            return
        self._fired = self._loop.create_future()
        await self._fired

    def _on_readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)  # the expiration count; clears readability
        if self._fired is not None and not self._fired.done():
            self._fired.set_result(None)

    def close(self) -> None:
        if self._fd >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
