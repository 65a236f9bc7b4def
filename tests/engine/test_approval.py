"""Simulated administrators: one first-come-first-served pool, shared across processes."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import pickle
import random
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from engine.approval import (
    AdministratorPool,
    ApprovalPolicy,
    Reservation,
    ReviewBoard,
    ReviewBoardError,
)
from engine.distribution import Distribution
from engine.errors import ApprovalDeniedError

NO_DELAY = Distribution("fixed", mean=0.0)


class FakeTime:
    """A clock that stands still unless moved, and a sleep that records instead of waiting."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def _review_all(pool: AdministratorPool, count: int) -> list[BaseException | None]:
    async def all_of() -> list[BaseException | None]:
        return list(
            await asyncio.gather(
                *(pool.review(f"d{i}") for i in range(count)), return_exceptions=True
            )
        )

    return asyncio.run(all_of())


def _at(moment: float) -> Callable[[], float]:
    return lambda: moment


def _fixed_pool(
    administrators: int, delay: float, fake: FakeTime, board: ReviewBoard | None = None
) -> AdministratorPool:
    policy = ApprovalPolicy(administrators, Distribution("fixed", mean=delay), 1.0)
    return AdministratorPool(policy, random.Random(1), board, fake.clock, fake.sleep)


def test_rate_one_approves_all() -> None:
    """An approval rate of 1 approves every request."""
    pool = AdministratorPool(ApprovalPolicy(3, NO_DELAY, 1.0), random.Random(1))
    assert _review_all(pool, 10) == [None] * 10
    assert (pool.approved, pool.denied, pool.pending, pool.board.pending) == (10, 0, 0, 0)


def test_rate_zero_rejects_all_with_the_administrator() -> None:
    """An approval rate of 0 rejects every request, naming the device and the administrator."""
    pool = AdministratorPool(ApprovalPolicy(2, NO_DELAY, 0.0), random.Random(1))
    results = _review_all(pool, 4)
    assert all(isinstance(r, ApprovalDeniedError) for r in results)
    first = results[0]
    assert isinstance(first, ApprovalDeniedError)
    assert first.device_id == "d0" and first.administrator in (0, 1)
    assert pool.denied == 4


def test_board_books_the_administrator_free_soonest() -> None:
    """Two administrators, 1 s reviews: each arrival starts at max(arrival, earliest free)."""
    board = ReviewBoard.private(2)
    booked = [board.reserve(1.0, _at(t)) for t in (0.0, 0.0, 0.0, 0.5, 1.2, 5.0)]
    assert booked == [
        Reservation(0, 0.0, 0.0, 1.0),
        Reservation(1, 0.0, 0.0, 1.0),
        Reservation(0, 0.0, 1.0, 2.0),  # both busy: waits for the first to finish
        Reservation(1, 0.5, 1.0, 2.0),
        Reservation(0, 1.2, 2.0, 3.0),
        Reservation(1, 5.0, 5.0, 6.0),  # both idle again: no wait
    ]
    assert board.pending == 6


def test_pool_waits_are_those_of_m_d_c_fcfs() -> None:
    """Six requests at once on two administrators with 1 s reviews wait 1, 1, 2, 2, 3, 3 s."""
    fake = FakeTime()
    pool = _fixed_pool(2, 1.0, fake)
    assert _review_all(pool, 6) == [None] * 6
    assert fake.slept == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert (pool.pending, pool.board.pending) == (0, 0)


def test_pending_counts_requests_under_review() -> None:
    """While reviews sleep, this pool and the board both count them pending; after, neither."""
    fake = FakeTime()
    gate = asyncio.Event()
    seen: list[tuple[int, int]] = []

    async def held(seconds: float) -> None:
        await gate.wait()

    pool = AdministratorPool(
        ApprovalPolicy(2, Distribution("fixed", mean=1.0), 1.0),
        random.Random(1),
        clock=fake.clock,
        sleep=held,
    )

    async def scenario() -> None:
        tasks = [asyncio.ensure_future(pool.review(f"d{i}")) for i in range(5)]
        await asyncio.sleep(0)
        seen.append((pool.pending, pool.board.pending))
        gate.set()
        await asyncio.gather(*tasks)
        seen.append((pool.pending, pool.board.pending))

    asyncio.run(scenario())
    assert seen == [(5, 5), (0, 0)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_load_is_first_come_first_served_on_c_administrators(seed: int) -> None:
    """Poisson arrivals, exponential reviews: never more than c at once, FCFS, no idle waiting."""
    rng = random.Random(seed)
    board = ReviewBoard.private(3)
    arrival = 0.0
    booked: list[Reservation] = []
    for _ in range(300):
        arrival += rng.expovariate(25.0)  # 25/s against 3 x 10/s: loaded, with queues
        booked.append(board.reserve(rng.expovariate(10.0), _at(arrival)))

    def busy(at: float) -> int:
        return sum(r.start <= at < r.finish for r in booked)

    edges = sorted({r.start for r in booked} | {r.finish for r in booked})
    assert max(busy(t) for t in edges) <= 3
    assert all(a.start <= b.start for a, b in itertools.pairwise(booked))
    waited = [r for r in booked if r.start > r.arrival]
    assert waited, "the load should make some requests wait"
    # a request waits only while every administrator is busy
    assert all(busy(r.arrival) == 3 and busy(r.start - 1e-9) == 3 for r in waited)


def test_board_must_match_the_policy() -> None:
    """A board with a different number of administrators than the policy is refused."""
    with pytest.raises(ValueError, match="board has 3 administrators, the approval policy 2"):
        AdministratorPool(
            ApprovalPolicy(2, NO_DELAY, 1.0), random.Random(1), ReviewBoard.private(3)
        )


def test_private_board_refuses_to_cross_processes() -> None:
    """Pickling a private board fails instead of silently splitting the pool."""
    with pytest.raises(TypeError, match="private review board cannot cross processes"):
        pickle.dumps(ReviewBoard.private(2))


def test_pickled_handle_books_on_the_same_board(tmp_path: Path) -> None:
    """A handle unpickled from the owner's sees and takes the same administrators."""
    with ReviewBoard.shared(1, tmp_path) as owner:
        copy = pickle.loads(pickle.dumps(owner))
        assert (copy.administrators, copy.owner, owner.owner) == (1, False, True)
        assert owner.reserve(2.0, lambda: 10.0).finish == 12.0
        assert copy.reserve(2.0, lambda: 10.0) == Reservation(0, 10.0, 12.0, 14.0)
        assert owner.pending == 2
        copy.close()


def test_owner_close_removes_the_board_and_attached_close_does_not(tmp_path: Path) -> None:
    """Only the owner's close unlinks the file; attaching afterwards names the missing board."""
    owner = ReviewBoard.shared(2, tmp_path)
    path = owner.path
    assert path is not None and path.exists()
    ReviewBoard.attach(path).close()
    assert path.exists()
    owner.close()
    owner.close()  # closing twice is harmless
    assert not path.exists()
    with pytest.raises(ReviewBoardError, match="is gone"):
        ReviewBoard.attach(path)


def test_boards_of_dead_owners_are_swept(tmp_path: Path) -> None:
    """Creating a board removes boards whose owning process no longer exists."""
    beyond_any_pid = 2**22 + 1  # above Linux's PID_MAX_LIMIT (and macOS's 99998)
    stale = tmp_path / f"enrollbench-board-{beyond_any_pid}-00ff"
    stale.write_bytes(b"")
    mine = ReviewBoard.shared(1, tmp_path)
    assert not stale.exists()
    assert mine.path is not None and mine.path.exists()
    mine.close()


def _reserve_in_forked_child(board: ReviewBoard) -> None:
    board.reserve(1.0, _at(0.0))


def test_a_forked_child_is_excluded_by_the_lock(tmp_path: Path) -> None:
    """A child forked with the handle cannot book while the parent holds the board's lock."""
    with ReviewBoard.shared(1, tmp_path) as board:
        board._lock()
        child = multiprocessing.get_context("fork").Process(
            target=_reserve_in_forked_child, args=(board,)
        )
        try:
            child.start()
            child.join(0.5)
            assert child.is_alive(), "the child booked while the parent held the lock"
        finally:
            board._unlock()
        child.join(30)
        assert (child.exitcode, board.pending) == (0, 1)


@pytest.mark.parametrize("content", [b"", bytes(8), bytes(64), b"ENRBRD01" + bytes(24)])
def test_a_file_that_is_not_a_board_is_refused(tmp_path: Path, content: bytes) -> None:
    """Attaching to a file that is not a board (empty, short, zeroes) fails with a typed error."""
    other = tmp_path / "other"
    other.write_bytes(content)
    with pytest.raises(ReviewBoardError, match="is not a review board"):
        ReviewBoard.attach(other)


@pytest.mark.parametrize(("count", "rate"), [(0, 0.5), (1, 1.5), (1, -0.1)])
def test_bad_policies_are_refused(count: int, rate: float) -> None:
    """No administrators, or a rate outside [0, 1], is refused."""
    with pytest.raises(ValueError, match=r"administrator|approval_rate"):
        ApprovalPolicy(count, NO_DELAY, rate)


# Two processes, one board ------------------------------------------------------------------

REVIEW_S = 1.0  # reviews are booked, never slept: the test takes no wall time per review
PER_PROCESS = 20


def _requests_in_child(channel: Connection, barrier: Barrier) -> None:
    """A shard's part: get the board through a pipe (as a plan travels), send 20 requests."""
    board: ReviewBoard = channel.recv()
    recorded: list[tuple[float, float]] = []  # (finish, wait before the review began)

    async def book(seconds: float) -> None:
        recorded.append((time.monotonic() + seconds, seconds - REVIEW_S))

    pool = AdministratorPool(
        ApprovalPolicy(2, Distribution("fixed", mean=REVIEW_S), 1.0),
        random.Random(1),
        board,
        sleep=book,
    )
    barrier.wait()
    _review_all(pool, PER_PROCESS)
    channel.send(recorded)
    board.close()


def test_two_processes_wait_as_one_pool(tmp_path: Path) -> None:
    """Two processes x 20 requests on one board of 2 administrators queue as 40 on one pool.

    Everyone arrives within milliseconds (a barrier) and reviews take 1 s, so one pool books
    the finishes at 1, 1, 2, 2, ..., 20, 20 s after the first arrival, and waits average 9.5 s;
    two separate pools would finish by 10 s and wait 4.5 s on average. The tolerances (50 ms
    on each finish, 1 s on the mean wait) absorb a late barrier and still separate the two.
    """
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    with ReviewBoard.shared(2, tmp_path) as board:
        channels, processes = [], []
        for _ in range(2):
            parent, child = context.Pipe()
            process = context.Process(target=_requests_in_child, args=(child, barrier))
            process.start()
            parent.send(board)
            channels.append(parent)
            processes.append(process)
        recorded = [row for channel in channels for row in channel.recv()]
        for process in processes:
            process.join(30)
        assert board.pending == 0
    finishes = sorted(finish for finish, _ in recorded)
    relative = [finish - finishes[0] + REVIEW_S for finish in finishes]
    expected = [float(k) for k in range(1, PER_PROCESS + 1) for _ in range(2)]
    assert relative == pytest.approx(expected, abs=0.05)
    one_pool = FakeTime()
    _review_all(_fixed_pool(2, REVIEW_S, one_pool), 2 * PER_PROCESS)  # one process, 40 requests
    single = statistics.fmean(s - REVIEW_S for s in one_pool.slept)
    assert single == pytest.approx(9.5)
    assert statistics.fmean(wait for _, wait in recorded) == pytest.approx(single, abs=1.0)
