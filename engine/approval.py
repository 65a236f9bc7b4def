"""Simulated CA administrators who approve or reject pending requests (the seed's main flow).

The administrators are one pool for the whole run, however many processes send them requests:
their calendar, a `ReviewBoard`, holds when each administrator is next free. A request arriving
at time t takes the administrator free soonest: its review starts at max(t, free) and ends a
delay later (drawn from the profile's distribution), which becomes that administrator's next
free time. That is first-come-first-served M/G/c, the discipline of a semaphore over c
administrators, computed at arrival so that processes need share only c numbers and a lock.
The request then waits for the end of its review with `asyncio.sleep` (no CPU), and the
administrator approves with the profile's approval rate, drawn from the process's seeded rng.

A board shared by processes lives in a small memory-mapped file (in /dev/shm when there is one)
guarded by `flock`; pickling a handle sends the file's path, so a handle travels in any pickle
(a shard plan sent over a pipe), which a `multiprocessing.Lock` cannot. Times on a shared board
are `time.monotonic()`: CLOCK_MONOTONIC, one clock for every process on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import mmap
import os
import random
import re
import secrets
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from engine.distribution import Distribution
from engine.errors import ApprovalDeniedError, EnrollmentError

_MAGIC = int.from_bytes(b"ENRBRD01", "little")
_HEADER = struct.Struct("<qqqq")  # magic, administrators, run-wide pending, reserved
_PENDING = 2  # index of the run-wide pending count in the header
_PREFIX = "enrollbench-board-"
_NAME = re.compile(re.escape(_PREFIX) + r"(\d+)-[0-9a-f]+\Z")


class ReviewBoardError(EnrollmentError):
    """A review board could not be created or attached (its file is gone or is not a board)."""


@dataclass(frozen=True, slots=True)
class ApprovalPolicy:
    """How administrators behave: how many, how long a review takes, how often they approve."""

    administrators: int
    delay: Distribution
    approval_rate: float

    def __post_init__(self) -> None:
        if self.administrators < 1:
            raise ValueError("at least one administrator is needed")
        if not 0.0 <= self.approval_rate <= 1.0:
            raise ValueError("approval_rate must lie in [0, 1]")


class Reservation(NamedTuple):
    """One request's place on the board: who reviews it, from when until when (board clock).

    A named tuple, not a dataclass: one is made per request, and it builds 5x faster.
    """

    administrator: int
    arrival: float
    start: float
    finish: float


class ReviewBoard:
    """The administrators' calendar: each one's next free time, and requests pending run-wide.

    `ReviewBoard.private(n)`: for one process (an anonymous mapping; cannot be pickled).
    `ReviewBoard.shared(n)`: for a run of several processes. The creating handle owns the file
    and unlinks it on `close()` (or when the owner is collected or exits normally); a pickled
    copy attaches to the same board in whichever process unpickles it, and its `close()` only
    unmaps. Both kinds run the same `reserve` on the same layout; only the lock differs.
    """

    def __init__(
        self, buffer: mmap.mmap, fd: int | None, path: Path | None, owner: bool = False
    ) -> None:
        """Use `private`, `shared`, `attach` or unpickling; this wraps an initialised mapping."""
        magic, administrators = (
            (0, 0) if len(buffer) < _HEADER.size else _HEADER.unpack_from(buffer)[:2]
        )
        if magic != _MAGIC or administrators < 1 or len(buffer) < _size(administrators):
            raise ReviewBoardError(f"{path or 'the mapping'} is not a review board")
        self.administrators: int = administrators
        self.path = path
        self._buffer = buffer
        self._header = memoryview(buffer)[: _HEADER.size].cast("q")
        self._free = memoryview(buffer)[_HEADER.size : _size(administrators)].cast("d")
        self._fd = fd
        self._pid = os.getpid()
        self._thread_lock = threading.Lock()  # flock does not exclude threads sharing one fd
        self._finalizer: weakref.finalize[..., ReviewBoard] | None = None
        if owner and path is not None:
            self._finalizer = weakref.finalize(self, _remove, path, os.getpid())

    @classmethod
    def private(cls, administrators: int) -> ReviewBoard:
        """A board for this process alone."""
        buffer = mmap.mmap(-1, _size(administrators))
        _initialise(buffer, administrators)
        return cls(buffer, None, None)

    @classmethod
    def shared(cls, administrators: int, directory: str | Path | None = None) -> ReviewBoard:
        """A board that processes share through pickled handles; this handle owns it."""
        folder = Path(directory) if directory is not None else _default_directory()
        _remove_stale(folder)
        path = folder / f"{_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, _size(administrators))
            buffer = mmap.mmap(fd, _size(administrators))
        except BaseException:
            os.close(fd)
            path.unlink()
            raise
        _initialise(buffer, administrators)
        return cls(buffer, fd, path, owner=True)

    @classmethod
    def attach(cls, path: str | Path) -> ReviewBoard:
        """Another handle on the shared board at `path` (what unpickling a handle does)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError as exc:
            raise ReviewBoardError(f"review board {path} is gone (its owner closed it)") from exc
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER.size:
                raise ReviewBoardError(f"{path} is not a review board")
            return cls(mmap.mmap(fd, size), fd, Path(path))
        except BaseException:
            os.close(fd)
            raise

    def __reduce__(self) -> tuple[Callable[[str], ReviewBoard], tuple[str]]:
        if self.path is None:
            raise TypeError("a private review board cannot cross processes: use ReviewBoard.shared")
        return (ReviewBoard.attach, (str(self.path),))

    @property
    def owner(self) -> bool:
        """True for the handle that created a shared board (and will unlink it)."""
        return self._finalizer is not None

    @property
    def pending(self) -> int:
        """Requests reserved and not yet released, over every process on this board."""
        return int(self._header[_PENDING])

    def reserve(self, delay: float, clock: Callable[[], float]) -> Reservation:
        """Book the administrator free soonest for `delay` seconds from max(now, their free time).

        `clock` is read under the lock, so the order of arrival is the order of booking.
        """
        self._lock()
        try:
            arrival = clock()
            free = self._free.tolist()
            administrator = free.index(min(free))
            start = max(arrival, free[administrator])
            finish = start + delay
            self._free[administrator] = finish
            self._header[_PENDING] += 1
        finally:
            self._unlock()
        return Reservation(administrator, arrival, start, finish)

    def release(self) -> None:
        """A reserved request is done (reviewed, or abandoned): it is no longer pending."""
        self._lock()
        try:
            self._header[_PENDING] -= 1
        finally:
            self._unlock()

    # Plain methods, not a context manager: the generator machinery cost more than the lock.
    def _lock(self) -> None:
        if self._pid != os.getpid():
            self._after_fork()
        self._thread_lock.acquire()
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._thread_lock.release()
                raise

    def _unlock(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def _after_fork(self) -> None:
        """In a forked child: a thread lock and a file descriptor of its own.

        The inherited thread lock may have been copied while held, and flock does not exclude
        processes that share one open file description. The mapping itself stays shared.
        """
        self._thread_lock = threading.Lock()
        if self._fd is not None:
            assert self.path is not None
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError as exc:
                raise ReviewBoardError(
                    f"review board {self.path} is gone (its owner closed it)"
                ) from exc
            os.close(self._fd)
            self._fd = fd
        self._pid = os.getpid()

    def close(self) -> None:
        """Unmap this handle; the owner of a shared board also removes its file."""
        if self._buffer.closed:
            return
        self._header.release()
        self._free.release()
        self._buffer.close()
        if self._fd is not None:
            os.close(self._fd)
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> ReviewBoard:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _size(administrators: int) -> int:
    if administrators < 1:
        raise ValueError("at least one administrator is needed")
    return _HEADER.size + 8 * administrators


def _initialise(buffer: mmap.mmap, administrators: int) -> None:
    _HEADER.pack_into(buffer, 0, _MAGIC, administrators, 0, 0)
    struct.pack_into(f"<{administrators}d", buffer, _HEADER.size, *[-math.inf] * administrators)


def _default_directory() -> Path:
    """In memory, like POSIX shared memory, where there is a /dev/shm; else the temp directory."""
    shm = Path("/dev/shm")  # noqa: S108 (created O_EXCL, mode 0600, with a random name)
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def _remove(path: Path, creator: int) -> None:
    if os.getpid() == creator:  # a forked child inherits the finalizer, not the board
        path.unlink(missing_ok=True)


def _remove_stale(folder: Path) -> None:
    """Remove boards left by owners that died without closing them (killed, crashed)."""
    for entry in folder.glob(f"{_PREFIX}*"):
        match = _NAME.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class AdministratorPool:
    """This process's window on the administrators; `review` waits for one and returns or raises.

    `board`: the administrators' calendar, shared across processes (`ReviewBoard.shared`) or,
    when None, a private board for this pool alone. `clock` must be `time.monotonic` for a
    shared board (the one clock all processes agree on); tests inject a fake with `sleep`.
    `pending`, `approved` and `denied` count this process's requests; `board.pending` counts
    the run's.
    """

    def __init__(
        self,
        policy: ApprovalPolicy,
        rng: random.Random,
        board: ReviewBoard | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if board is not None and board.administrators != policy.administrators:
            raise ValueError(
                f"the review board has {board.administrators} administrators, "
                f"the approval policy {policy.administrators}"
            )
        self._owns_board = board is None
        self.board = board if board is not None else ReviewBoard.private(policy.administrators)
        self._rate = policy.approval_rate
        self._rng = rng
        self._draw_delay: Callable[[], float] = policy.delay.sampler(rng)
        self._clock = clock
        self._sleep = sleep
        self.pending = 0
        self.approved = 0
        self.denied = 0

    async def review(self, device_id: str) -> None:
        """Wait until an administrator has reviewed the request; raise if they reject it."""
        booked = self.board.reserve(self._draw_delay(), self._clock)
        self.pending += 1
        try:
            # sleep even when the wait is 0, so a review always hands the loop back once
            await self._sleep(max(0.0, booked.finish - self._clock()))
            approve = self._rng.random() < self._rate
        finally:
            self.pending -= 1
            self.board.release()
        if not approve:
            self.denied += 1
            raise ApprovalDeniedError(device_id, booked.administrator)
        self.approved += 1

    def close(self) -> None:
        """Close the board if this pool made it (a board passed in belongs to its creator)."""
        if self._owns_board:
            self.board.close()
