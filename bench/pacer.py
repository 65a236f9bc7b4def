"""Precise wake-ups for open-loop arrivals, and the generator's own timer error.

libuv (and so uvloop) keeps timers in whole milliseconds, and epoll's timeout is in milliseconds
too: an `asyncio.sleep` wakes up to ~1.6 ms late on an idle shard, and that lateness would pass
as CA latency. On Linux a `timerfd` armed at an absolute CLOCK_MONOTONIC instant (the clock
behind `time.perf_counter_ns`) becomes readable within microseconds of it; the event loop watches
the descriptor like any socket, so waiting costs no CPU and needs no spinning. Elsewhere the
pacer falls back to `asyncio.sleep` and the larger error shows in the result.

Timer error is told apart from queueing behind the CA's work by CPU time. While the generator
waits, whatever CPU this thread uses goes to other callbacks (the CA's work, in an embedded run);
an arrival delayed by that work is real queueing. The part of an arrival's lateness that CPU
work cannot explain (lateness minus the thread's CPU time during the wait) was spent off the
CPU: the timer, or the OS running something else. That part is the generator's own error. It
is a lower bound (CPU work done before the intended instant also counts against it), exact on
an idle shard, where the question matters most.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import sys
import time
from dataclasses import dataclass

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1
_PR_SET_TIMERSLACK = 29


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


@dataclass(frozen=True, slots=True)
class Wake:
    """When the generator ran again, and how much of its lateness it was off the CPU."""

    now: int  # perf_counter_ns at wake-up
    cpu_ns: int  # this thread's CPU time while it waited (other callbacks' work)


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

    async def until(self, instant: int) -> Wake:
        """Wait until `instant` (ns on the perf_counter clock); report the wake-up."""
        cpu0 = time.thread_time_ns()
        if instant > time.perf_counter_ns():
            if self._fd >= 0:
                await self._wait_fd(instant)
            else:
                await asyncio.sleep((instant - time.perf_counter_ns()) / 1e9)
        return Wake(time.perf_counter_ns(), time.thread_time_ns() - cpu0)

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


def timer_error_ns(intended: int, wake: Wake) -> int:
    """The generator's own part of an arrival's lateness: what the CPU work done while it
    waited cannot explain (never negative)."""
    return max(0, wake.now - intended - wake.cpu_ns)
