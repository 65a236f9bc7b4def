"""One shard: a worker process with its own uvloop event loop and its own engine replica.

The parent sends a `ShardPlan`; the shard builds its replica off the clock, reports ready, waits
for the common start time, drives its devices (closed or open loop), and sends back a
`ShardResult`. Timing is read here and only here (`time.perf_counter_ns`, CLOCK_MONOTONIC, so
all shards share one time base). The hot path appends raw timestamps to a list; a once-a-second
tick turns them into histograms and time series with numpy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import signal
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Generator, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from bench.histogram import Histogram
from bench.microbench.workloads import run_ready
from bench.profile import Profile
from bench.run.components import Components
from bench.run.corpus import CorpusSpec, read_corpus
from bench.run.pacer import Pacer
from bench.run.schedule import arrival_offsets, arrivals_until, arrivals_within
from bench.run.targets import WireSystem, WireTarget
from engine.approval import ReviewBoard
from engine.device import DeviceIdentity
from engine.flow import Outcome, Status, Step
from engine.hsm import HsmSigner
from engine.population import device_identity, directory_entry, simulated_enrollee
from engine.system import CAMaterial, EnrollmentSystem

STEPS = tuple(Step)
# slot 0: intended start; slots 1-14: the start of each step (by step number);
# slot 15: the end of the last step; slot 16: the actual start; slot 17: the generator's own
# timer error in starting it (open loop)
_SLOTS = 4 + len(STEPS)
_FINISH = len(STEPS) + 1
_STARTED = len(STEPS) + 2
_TIMER_ERROR = len(STEPS) + 3
_NEVER = np.iinfo(np.int64).max
TICK_SECONDS = 0.25
# Open loop: wake this early and spin to the instant (a vCPU takes ~80 µs to wake here), but
# never more than 5% of the gap between arrivals: the spin is generator CPU.
SPIN_NS = 150_000


@dataclass(frozen=True, slots=True)
class HsmKey:
    """Where the issuing CA's key is: a PKCS #11 module, the key's URI, the token's PIN (it
    reaches a shard through its plan's pipe, never a file or a flag)."""

    module: str
    uri: str
    pin: str = dataclasses.field(repr=False)


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Everything a shard needs, built by the parent before the clock starts."""

    index: int
    workers: int
    profile: Profile
    material: CAMaterial
    device_indices: tuple[int, ...]
    corpus: CorpusSpec | None  # precomputed device crypto: the shard reads its part
    artifacts_sample: int = 0
    review_board: ReviewBoard | None = None  # the run's one pool of administrators
    target: WireTarget | None = None  # None: the embedded engine; else the CA on the wire
    hsm: HsmKey | None = None  # the issuing CA's key in a PKCS #11 token
    components: Components = dataclasses.field(default_factory=Components)  # real servers


@dataclass(slots=True)
class ShardResult:
    """What a shard measured, in plain types (it crosses a process boundary)."""

    index: int
    outcomes: dict[str, int]
    started: int
    histograms: dict[str, str]
    completed_per_second: list[int]
    issued_per_second: list[int]
    approvals_pending: list[int]
    cache: dict[str, int]
    process_cpu_s: float
    elapsed_s: float
    engine_cpu_s: float
    window_ns: tuple[int, int]
    completed_in_window: int
    issued_in_window: int
    interrupted: bool
    samples: list[tuple[str, bytes]]
    serials: list[int] = dataclasses.field(default_factory=list)  # issued by a wire target
    chain: tuple[bytes, ...] = ()  # a wire target's CA certificates (DER), as fetched
    phases: dict[str, int] = dataclasses.field(default_factory=dict)  # a wire client's, summed


class _Times:
    """The recorder the engine reports step boundaries to: one slot per boundary."""

    __slots__ = ("t",)

    def __init__(self, intended: int, started: int, timer_error: int = 0) -> None:
        self.t = [0] * _SLOTS
        self.t[0] = intended
        self.t[_STARTED] = started
        self.t[_TIMER_ERROR] = timer_error

    def start(self, step: Step, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.t[step] = clock()

    def finish(self, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.t[_FINISH] = clock()


_STATUS_CODE = {Status.ISSUED: 0, Status.REJECTED: 1, Status.FAILED: 2}


class _Collector:
    """Accumulates raw rows and folds them into histograms and per-second series on each tick.

    Throughput counts completions inside the window in which load was offered: from the end of
    warm-up to `window_end` (the last scheduled arrival in an open loop, the end of the load in
    a closed one; None: until the last completion). Latency samples are the enrollments
    intended to start after warm-up.
    """

    def __init__(self, start_ns: int, warmup_ns: int, window_end: int | None = None) -> None:
        self.start_ns = start_ns
        self.warmup_end = start_ns + warmup_ns
        self.window_end = window_end
        self.rows: list[list[int]] = []
        self.outcomes: Counter[str] = Counter()
        self.histograms: dict[str, Histogram] = {}
        self.completed = np.zeros(0, dtype=np.int64)
        self.issued = np.zeros(0, dtype=np.int64)
        self.completed_in_window = 0
        self.issued_in_window = 0
        self.last_end = start_ns

    def add(self, times: _Times, outcome: Outcome) -> int:
        """Record one finished enrollment; return the instant it ended."""
        row = times.t
        end = time.perf_counter_ns()
        row.append(end)
        row.append(_STATUS_CODE[outcome.status])
        self.rows.append(row)
        key = outcome.status.value
        if outcome.status is not Status.ISSUED:
            key += ":" + (outcome.reason if outcome.status is Status.REJECTED else outcome.error)
        self.outcomes[key] += 1
        return end

    def fold(self) -> None:
        """Turn the buffered rows into histogram counts and series, all at once."""
        for _ in self.fold_in_pieces():
            pass

    def fold_in_pieces(self) -> Iterator[None]:
        """The same fold, pausing after each histogram, so a ticker can hand the loop back in
        between: no arrival waits behind a whole fold (about a millisecond)."""
        if not self.rows:
            return
        rows = np.array(self.rows, dtype=np.int64)
        self.rows = []
        intended, started = rows[:, 0], rows[:, _STARTED]
        ends, status = rows[:, -2], rows[:, -1]
        self.last_end = max(self.last_end, int(ends.max()))
        # the CA's issue ended where retrieval began (embedded) or the match began (wire)
        issued_at = np.where(
            rows[:, Step.RETRIEVE] > 0, rows[:, Step.RETRIEVE], rows[:, Step.MATCH_AND_DELIVER]
        )
        self._count_series(ends, status, issued_at)
        in_window = ends >= self.warmup_end
        if self.window_end is not None:
            in_window &= ends <= self.window_end
        self.completed_in_window += int(in_window.sum())
        self.issued_in_window += int((in_window & (status == 0)).sum())
        measured = intended >= self.warmup_end
        issued = measured & (status == 0)
        self._record("end_to_end.latency", (ends - intended)[issued])
        self._record("end_to_end.service", (ends - started)[issued])
        yield
        # A step ends where the next step the enrollment ran starts (over the wire the steps
        # run in another order), or where the enrollment ended.
        boundaries = np.where(rows[:, 1:_STARTED] > 0, rows[:, 1:_STARTED], _NEVER)
        for step in STEPS:
            begin = rows[:, step]
            later = np.where(boundaries > begin[:, None], boundaries, _NEVER)
            finish = later.min(axis=1)
            done = measured & (begin > 0) & (finish < _NEVER)
            self._record(f"step.{step.label}", (finish - begin)[done])
            yield
        self._record("timer_error", rows[:, _TIMER_ERROR][measured])

    def window(self) -> tuple[int, int]:
        end = self.last_end if self.window_end is None else self.window_end
        return self.warmup_end, max(self.warmup_end, end)

    def _record(self, name: str, nanoseconds: np.ndarray[Any, np.dtype[np.int64]]) -> None:
        histogram = self.histograms.get(name)
        if histogram is None:
            histogram = self.histograms[name] = Histogram()
        histogram.record_many(nanoseconds // 1000)

    def _count_series(
        self,
        ends: np.ndarray[Any, np.dtype[np.int64]],
        status: np.ndarray[Any, np.dtype[np.int64]],
        issued_at: np.ndarray[Any, np.dtype[np.int64]],
    ) -> None:
        seconds = (ends - self.start_ns) // 1_000_000_000
        self.completed = _add_counts(self.completed, seconds[seconds >= 0])
        issued = (status == 0) & (issued_at > 0)
        issued_seconds = (issued_at[issued] - self.start_ns) // 1_000_000_000
        self.issued = _add_counts(self.issued, issued_seconds[issued_seconds >= 0])


def _add_counts(
    series: np.ndarray[Any, np.dtype[np.int64]], seconds: np.ndarray[Any, np.dtype[np.int64]]
) -> np.ndarray[Any, np.dtype[np.int64]]:
    if seconds.size == 0:
        return series
    counts = np.bincount(seconds)
    if counts.size > series.size:
        series = np.pad(series, (0, counts.size - series.size))
    series[: counts.size] += counts
    return series


class System(Protocol):
    """What a shard drives: the engine replica (or a test double of known cost)."""

    @property
    def approvals_pending(self) -> int: ...

    async def enroll(self, identity: DeviceIdentity, recorder: _Times) -> Outcome: ...

    def close(self) -> None: ...


class _EngineMeter:
    """What the engine's coroutines cost this thread: CPU time of every resumption, and the
    wall-clock spans of the recent ones (to tell queueing behind the engine from timer error)."""

    __slots__ = ("ns", "spans")

    def __init__(self) -> None:
        self.ns = 0
        self.spans: deque[tuple[int, int]] = deque(maxlen=256)

    def busy_between(self, begin: int, end: int) -> int:
        """Wall time (ns) the engine's coroutines ran within [begin, end]."""
        busy = 0
        for first, last in reversed(self.spans):
            if last <= begin:
                break
            busy += max(0, min(last, end) - max(first, begin))
        return busy


class _Metered:
    """Drives a coroutine on behalf of the awaiting task, timing each resumption.

    Everything else the shard's thread does (event loop, task creation, timers, the
    generator's bookkeeping, folding) is the generator's own cost: process CPU minus this.
    """

    __slots__ = ("_coroutine", "_meter")

    def __init__(self, coroutine: Coroutine[Any, Any, Outcome], meter: _EngineMeter) -> None:
        self._coroutine = coroutine
        self._meter = meter

    def __await__(self) -> Generator[Any, Any, Outcome]:
        cpu, wall, meter = time.thread_time_ns, time.perf_counter_ns, self._meter
        send, throw, spans = self._coroutine.send, self._coroutine.throw, meter.spans
        value: Any = None
        error: BaseException | None = None
        while True:
            began, began_wall = cpu(), wall()
            try:
                yielded = send(value) if error is None else throw(error)
            except StopIteration as done:
                meter.ns += cpu() - began
                spans.append((began_wall, wall()))
                return cast(Outcome, done.value)
            except BaseException:
                meter.ns += cpu() - began
                spans.append((began_wall, wall()))
                raise
            meter.ns += cpu() - began
            spans.append((began_wall, wall()))
            value, error = None, None
            try:
                value = yield yielded
            except BaseException as exc:  # handed on to the coroutine
                error = exc


def engine_system(plan: ShardPlan, directory: str) -> tuple[System, list[DeviceIdentity]]:
    """The shard's engine replica and its devices' identities, built before the clock."""
    profile = plan.profile
    seed = profile.get("", "seed")
    database = ":memory:"
    if profile.get("storage", "database") == "file":
        database = str(Path(directory) / f"shard{plan.index}.sqlite")
    config = profile.engine_config(database)
    enrollees = [simulated_enrollee(i, seed) for i in plan.device_indices]
    iterations = profile.get("auth", "iterations")
    signer = None
    if plan.hsm is not None:  # this process's own session on the token
        signer = HsmSigner.open(plan.hsm.module, plan.hsm.uri, plan.hsm.pin, config.hash_name)
    components = plan.components
    system = EnrollmentSystem(
        config,
        plan.material,
        [] if components.ldap else [directory_entry(e, seed, iterations) for e in enrollees],
        review_board=plan.review_board,
        ca_signer=signer,
        **components.stores(),
    )
    corpus = None if plan.corpus is None else read_corpus(plan.corpus, plan.device_indices)
    identities = [
        device_identity(e, config.profile_id)
        if corpus is None
        else device_identity(e, config.profile_id, *corpus[n])
        for n, e in enumerate(enrollees)
    ]
    return system, identities


def plan_system(plan: ShardPlan, directory: str) -> tuple[System, list[DeviceIdentity]]:
    """The embedded engine, or the device side against the plan's wire target."""
    if plan.target is None:
        return engine_system(plan, directory)
    system = WireSystem(plan, directory, plan.target)
    return system, system.identities


SystemFactory = Callable[[ShardPlan, str], tuple[System, list[DeviceIdentity]]]


class Shard:
    """Runs one shard's share of the load on the current event loop."""

    def __init__(
        self, plan: ShardPlan, directory: str, factory: SystemFactory = plan_system
    ) -> None:
        self.plan = plan
        self.system, self.identities = factory(plan, directory)
        # Against a wire target the whole process is the generator: every late send is its
        # own error, and no CA work runs here to queue behind.
        self.wire = plan.target is not None
        self.serials: list[int] = []
        self.stop = False
        self.in_flight = 0
        self.started = 0
        self.samples: list[tuple[str, int]] = []
        self.approval_depth: list[int] = []
        self.engine = _EngineMeter()

    async def enroll(
        self, identity: DeviceIdentity, intended: int, sink: _Collector, timer_error: int = 0
    ) -> int:
        """One device's enrollment; returns the instant it ended."""
        times = _Times(intended, time.perf_counter_ns(), timer_error)
        self.started += 1
        self.in_flight += 1
        try:
            enrollment = self.system.enroll(identity, times)
            # the engine's resumptions are metered only where an engine runs in this process
            outcome = await (enrollment if self.wire else _Metered(enrollment, self.engine))
        finally:
            self.in_flight -= 1
        if outcome.serial is not None:
            if self.wire:
                self.serials.append(outcome.serial)
            if len(self.samples) < self.plan.artifacts_sample:
                self.samples.append((identity.user_id, outcome.serial))
        return sink.add(times, outcome)

    async def closed_loop(
        self, sink: _Collector, concurrency: int, start: int, deadline: int
    ) -> None:
        """`concurrency` devices in flight; each worker takes the next device when one ends.

        A device's intended start is the instant its previous enrollment ended (the run's start
        for the first): time spent waiting for a busy shard counts as latency. Workers hand the
        loop back after each enrollment, so devices are served in turn (first come, first
        served), as they would queue at a CA.
        """
        limit = len(self.identities) if deadline == 0 else None
        counter = iter(range(10**15))
        hand_back = concurrency > 1

        async def worker() -> None:
            intended = start
            while not self.stop:
                n = next(counter)
                if (limit is not None and n >= limit) or (deadline and intended >= deadline):
                    return
                identity = self.identities[n % len(self.identities)]
                intended = await self.enroll(identity, intended, sink)
                if hand_back:
                    await asyncio.sleep(0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def open_loop(self, sink: _Collector, offsets: npt.NDArray[np.int64], start: int) -> None:
        """Start each device at its intended time; lateness is recorded, never hidden.

        The pacer wakes the generator at each arrival's instant; every arrival already due
        then starts at once. Lateness spent while the engine ran (its coroutines' wall time
        after the instant) is queueing behind the CA's work; the rest (the timer, the event
        loop, the generator's own work, the OS running something else) is the generator's
        timer error, recorded beside it and never subtracted.
        """
        pacer = Pacer()
        tasks: set[asyncio.Task[int]] = set()
        count, n = int(offsets.size), 0
        try:
            while n < count and not self.stop:
                gap = int(offsets[n] - offsets[n - 1]) if n else SPIN_NS * 20
                now = await pacer.until(start + int(offsets[n]), min(SPIN_NS, gap // 20))
                while n < count and start + int(offsets[n]) <= now:
                    intended = start + int(offsets[n])
                    error = now - intended
                    if not self.wire:
                        error -= self.engine.busy_between(intended, now)
                    identity = self.identities[n % len(self.identities)]
                    task = asyncio.ensure_future(self.enroll(identity, intended, sink, error))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    n += 1
        finally:
            pacer.close()
        if tasks:
            await asyncio.gather(*tasks)

    def schedule(self, start: int, deadline: int) -> npt.NDArray[np.int64]:
        """This shard's arrival offsets (ns from the start): its share of the profile's rate."""
        load = self.plan.profile.values["load"]
        rate = float(load["rate"]) / self.plan.workers
        seed = self.plan.profile.get("", "seed") * 1024 + self.plan.index
        ramp = float(load["ramp_seconds"])
        if deadline:
            offsets = arrivals_until(deadline - start, rate, load["arrival"], ramp, seed)
        else:
            offsets = arrival_offsets(len(self.identities), rate, load["arrival"], ramp, seed)
        if load["arrival"] == "constant":  # interleave the shards' arrivals evenly
            offsets = offsets + int(self.plan.index * 1e9 / float(load["rate"]))
            if deadline:
                offsets = offsets[: arrivals_within(offsets, deadline - start)]
        return offsets

    async def ticker(self, sink: _Collector, progress: Callable[[dict[str, int]], None]) -> None:
        """Fold buffered rows, sample the approval queue, report progress."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            for _ in sink.fold_in_pieces():
                await asyncio.sleep(0)
            self.tick(sink, progress)

    def tick(self, sink: _Collector, progress: Callable[[dict[str, int]], None]) -> None:
        sink.fold()
        self.approval_depth.append(self.system.approvals_pending)
        progress(
            {
                "started": self.started,
                "done": sum(sink.outcomes.values()),
                "issued": sink.outcomes.get("issued", 0),
                "errors": sum(v for k, v in sink.outcomes.items() if k != "issued"),
                "pending": self.system.approvals_pending,
                "in_flight": self.in_flight,
            }
        )

    async def run(
        self, start: int, progress: Callable[[dict[str, int]], None]
    ) -> tuple[_Collector, bool]:
        load = self.plan.profile.values["load"]
        warmup = int(float(load["warmup_seconds"]) * 1e9)
        deadline = start + int(float(load["duration"]) * 1e9) if load["duration"] else 0
        offsets = self.schedule(start, deadline) if load["mode"] == "open" else None
        if offsets is not None:  # load is offered until the last scheduled arrival
            window_end: int | None = start + int(offsets[-1]) if offsets.size else start
        else:
            window_end = deadline or None
        sink = _Collector(start, warmup, window_end)
        now = time.perf_counter_ns()
        if start > now:
            await asyncio.sleep((start - now) / 1e9)
        ticker = asyncio.ensure_future(self.ticker(sink, progress))
        try:
            if offsets is not None:
                await self.open_loop(sink, offsets, start)
            else:
                share = _share(int(load["concurrency"]), self.plan.workers, self.plan.index)
                await self.closed_loop(sink, share, start, deadline)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        self.tick(sink, progress)
        return sink, self.stop

    def result(
        self, sink: _Collector, interrupted: bool, cpu_s: float, elapsed_s: float
    ) -> ShardResult:
        per_second = self.approval_depth[:: max(1, round(1 / TICK_SECONDS))]
        return ShardResult(
            index=self.plan.index,
            outcomes=dict(sink.outcomes),
            started=self.started,
            histograms={name: h.encode() for name, h in sink.histograms.items()},
            completed_per_second=[int(v) for v in sink.completed],
            issued_per_second=[int(v) for v in sink.issued],
            approvals_pending=per_second,
            cache=self._cache_counts(),
            process_cpu_s=cpu_s,
            elapsed_s=elapsed_s,
            engine_cpu_s=0.0 if self.wire else self.engine.ns / 1e9,
            window_ns=sink.window(),
            completed_in_window=sink.completed_in_window,
            issued_in_window=sink.issued_in_window,
            interrupted=interrupted,
            samples=self._sample_certificates(),
            serials=self.serials,
            chain=self.system.cache.peek() if isinstance(self.system, WireSystem) else (),
            phases=self.system.phases() if isinstance(self.system, WireSystem) else {},
        )

    def _cache_counts(self) -> dict[str, int]:
        connection = getattr(self.system, "connection", None)
        cache = getattr(connection or self.system, "cache", None)
        return {} if cache is None else dataclasses.asdict(cache.counts)

    def _sample_certificates(self) -> list[tuple[str, bytes]]:
        if not self.samples:
            return []
        if isinstance(self.system, WireSystem):
            return self.system.installed(self.samples)
        system = cast(EnrollmentSystem, self.system)
        found = []
        for user_id, serial in self.samples:
            user = run_ready(system.directory.lookup_user(user_id))
            found.append((user_id, run_ready(system.directory.retrieve(user.dn.text, serial))))
        return found


def _share(total: int, workers: int, index: int) -> int:
    """This shard's part of `total`, spreading the remainder over the first shards."""
    return total // workers + (1 if index < total % workers else 0)


def shard_main(channel: Connection, use_uvloop: bool, factory: SystemFactory = plan_system) -> None:
    """Entry point of a shard process: its plan arrives first on the channel."""
    plan: ShardPlan = channel.recv()
    with tempfile.TemporaryDirectory(prefix="enrollbench-shard-") as directory:
        shard = Shard(plan, directory, factory)
        # The replica and corpus live for the whole run: move them out of the collector's way,
        # and collect young objects less often (the hot path makes few reference cycles).
        gc.collect()
        gc.freeze()
        gc.set_threshold(100_000, 50, 1000)
        signal.signal(signal.SIGINT, lambda *_: setattr(shard, "stop", True))
        channel.send(("ready", plan.index))
        message = channel.recv()
        start = int(message[1])

        def progress(snapshot: dict[str, int]) -> None:
            channel.send(("progress", plan.index, snapshot))

        loop = _new_loop(use_uvloop)
        cpu_before = time.process_time()
        try:
            sink, interrupted = loop.run_until_complete(shard.run(start, progress))
        finally:
            loop.close()
        cpu = time.process_time() - cpu_before
        elapsed = (time.perf_counter_ns() - start) / 1e9  # from the common start (idle before)
        channel.send(("result", plan.index, shard.result(sink, interrupted, cpu, elapsed)))
        shard.system.close()


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop  # noqa: PLC0415 (optional at import time: not on every platform)
        except ImportError:  # pragma: no cover
            return asyncio.new_event_loop()
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()
