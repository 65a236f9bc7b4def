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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from bench.corpus import CorpusSpec, read_corpus
from bench.histogram import Histogram
from bench.profile import Profile
from bench.schedule import arrival_offsets, arrivals_within
from bench.workloads import run_ready
from engine.device import DeviceIdentity
from engine.flow import Outcome, Status, Step
from engine.population import device_identity, directory_entry, simulated_enrollee
from engine.system import CAMaterial, EnrollmentSystem

STEPS = tuple(Step)
# slot 0: intended start; slots 1-14: the start of each step (by step number);
# slot 15: the end of the last step; slot 16: the actual start
_SLOTS = 3 + len(STEPS)
_FINISH = len(STEPS) + 1
_STARTED = len(STEPS) + 2
TICK_SECONDS = 0.25
YIELD_NS = 2_000_000  # a closed-loop worker hands the loop back at least every 2 ms


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


@dataclass(slots=True)
class ShardResult:
    """What a shard measured, in plain types (it crosses a process boundary)."""

    index: int
    outcomes: dict[str, int]
    started: int
    measured: int
    measured_issued: int
    histograms: dict[str, str]
    completed_per_second: list[int]
    issued_per_second: list[int]
    approvals_pending: list[int]
    cache: dict[str, int]
    process_cpu_s: float
    elapsed_s: float
    generator_cpu_s: float
    offered: int
    window_ns: tuple[int, int]
    interrupted: bool
    samples: list[tuple[str, bytes]]


class _Times:
    """The recorder the engine reports step boundaries to: one slot per boundary."""

    __slots__ = ("t",)

    def __init__(self, intended: int, started: int) -> None:
        self.t = [0] * _SLOTS
        self.t[0] = intended
        self.t[_STARTED] = started

    def start(self, step: Step, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.t[step] = clock()

    def finish(self, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.t[_FINISH] = clock()


_STATUS_CODE = {Status.ISSUED: 0, Status.REJECTED: 1, Status.FAILED: 2}


class _Collector:
    """Accumulates raw rows and folds them into histograms and per-second series on each tick."""

    def __init__(self, start_ns: int, warmup_ns: int) -> None:
        self.start_ns = start_ns
        self.warmup_end = start_ns + warmup_ns
        self.rows: list[list[int]] = []
        self.outcomes: Counter[str] = Counter()
        self.histograms: dict[str, Histogram] = {}
        self.completed = np.zeros(0, dtype=np.int64)
        self.issued = np.zeros(0, dtype=np.int64)
        self.measured = 0
        self.measured_issued = 0
        self.last_end = start_ns

    def add(self, times: _Times, outcome: Outcome) -> None:
        row = times.t
        row.append(time.perf_counter_ns())
        row.append(_STATUS_CODE[outcome.status])
        self.rows.append(row)
        key = outcome.status.value
        if outcome.status is not Status.ISSUED:
            key += ":" + (outcome.reason if outcome.status is Status.REJECTED else outcome.error)
        self.outcomes[key] += 1

    def fold(self) -> None:
        """Turn the buffered rows into histogram counts and series (vectorized)."""
        if not self.rows:
            return
        rows = np.array(self.rows, dtype=np.int64)
        self.rows = []
        intended, started = rows[:, 0], rows[:, _STARTED]
        ends, status = rows[:, -2], rows[:, -1]
        self.last_end = max(self.last_end, int(ends.max()))
        self._count_series(ends, status, rows[:, Step.RETRIEVE])  # the CA's issue ended there
        measured = intended >= self.warmup_end
        self.measured += int(measured.sum())
        issued = measured & (status == 0)
        self.measured_issued += int(issued.sum())
        self._record("end_to_end.latency", (ends - intended)[issued])
        self._record("end_to_end.service", (ends - started)[issued])
        for step in STEPS:  # a step ends where the next one starts
            begin, finish = rows[:, step], rows[:, step + 1]
            done = measured & (begin > 0) & (finish > 0)
            self._record(f"step.{step.label}", (finish - begin)[done])
        self._record("schedule_lag", (started - intended)[measured])

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


class Shard:
    """Runs one shard's share of the load on the current event loop."""

    def __init__(self, plan: ShardPlan, directory: str) -> None:
        self.plan = plan
        profile = plan.profile
        seed = profile.get("", "seed")
        database = ":memory:"
        if profile.get("storage", "database") == "file":
            database = str(Path(directory) / f"shard{plan.index}.sqlite")
        self.config = profile.engine_config(database)
        enrollees = [simulated_enrollee(i, seed) for i in plan.device_indices]
        iterations = profile.get("auth", "iterations")
        self.system = EnrollmentSystem(
            self.config, plan.material, [directory_entry(e, seed, iterations) for e in enrollees]
        )
        corpus = None if plan.corpus is None else read_corpus(plan.corpus, plan.device_indices)
        self.identities = [
            device_identity(e, self.config.profile_id)
            if corpus is None
            else device_identity(e, self.config.profile_id, *corpus[n])
            for n, e in enumerate(enrollees)
        ]
        self.stop = False
        self.in_flight = 0
        self.started = 0
        self.offered = 0
        self.samples: list[tuple[str, int]] = []
        self.approval_depth: list[int] = []
        self.per_enrollment_cost_ns = _calibrate(self)
        self.tick_cpu_ns = 0

    async def enroll(self, identity: DeviceIdentity, intended: int, sink: _Collector) -> None:
        times = _Times(intended, time.perf_counter_ns())
        self.started += 1
        self.in_flight += 1
        try:
            outcome = await self.system.enroll(identity, times)
        finally:
            self.in_flight -= 1
        sink.add(times, outcome)
        if outcome.serial is not None and len(self.samples) < self.plan.artifacts_sample:
            self.samples.append((identity.user_id, outcome.serial))

    async def closed_loop(self, sink: _Collector, concurrency: int, deadline: int) -> None:
        """`concurrency` devices in flight; each worker takes the next device when one ends."""
        limit = len(self.identities) if deadline == 0 else None
        counter = iter(range(10**15))

        async def worker() -> None:
            yielded = time.perf_counter_ns()
            while not self.stop:
                n = next(counter)
                if limit is not None and n >= limit:
                    return
                now = time.perf_counter_ns()
                if deadline and now >= deadline:
                    return
                if now - yielded >= YIELD_NS:
                    # An enrollment that never waits never gives the loop back: yield now and
                    # then, so the other workers and the ticker run.
                    await asyncio.sleep(0)
                    yielded = now = time.perf_counter_ns()
                self.offered += 1
                await self.enroll(self.identities[n % len(self.identities)], now, sink)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def open_loop(self, sink: _Collector, start: int, deadline: int) -> None:
        """Start each device at its intended time; lateness is recorded, never hidden."""
        load = self.plan.profile.values["load"]
        workers = self.plan.workers
        rate = float(load["rate"]) / workers
        duration = deadline - start if deadline else 0
        count = int(rate * duration / 1e9) + 16 if deadline else len(self.identities)
        seed = self.plan.profile.get("", "seed") * 1024 + self.plan.index
        offsets = arrival_offsets(count, rate, load["arrival"], float(load["ramp_seconds"]), seed)
        if load["arrival"] == "constant":  # interleave the shards' arrivals evenly
            offsets = offsets + int(self.plan.index * 1e9 / float(load["rate"]))
        count = arrivals_within(offsets, duration)
        tasks: set[asyncio.Task[None]] = set()
        n = 0
        while n < count and not self.stop:
            now = time.perf_counter_ns()
            intended = start + int(offsets[n])
            if intended > now:
                await asyncio.sleep((intended - now) / 1e9)
                continue
            while n < count and start + int(offsets[n]) <= now:
                identity = self.identities[n % len(self.identities)]
                task = asyncio.ensure_future(self.enroll(identity, start + int(offsets[n]), sink))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
                self.offered += 1
        if tasks:
            await asyncio.gather(*tasks)

    async def ticker(self, sink: _Collector, progress: Callable[[dict[str, int]], None]) -> None:
        """Fold buffered rows, sample the approval queue, report progress."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self.tick(sink, progress)

    def tick(self, sink: _Collector, progress: Callable[[dict[str, int]], None]) -> None:
        before = time.thread_time_ns()
        sink.fold()
        self.approval_depth.append(self.system.approvals_pending)
        progress(
            {
                "started": self.started,
                "done": sum(sink.outcomes.values()),
                "errors": sum(v for k, v in sink.outcomes.items() if k != "issued"),
                "pending": self.system.approvals_pending,
                "in_flight": self.in_flight,
            }
        )
        self.tick_cpu_ns += time.thread_time_ns() - before

    async def run(
        self, start: int, progress: Callable[[dict[str, int]], None]
    ) -> tuple[_Collector, bool]:
        load = self.plan.profile.values["load"]
        warmup = int(float(load["warmup_seconds"]) * 1e9)
        deadline = start + int(float(load["duration"]) * 1e9) if load["duration"] else 0
        sink = _Collector(start, warmup)
        now = time.perf_counter_ns()
        if start > now:
            await asyncio.sleep((start - now) / 1e9)
        ticker = asyncio.ensure_future(self.ticker(sink, progress))
        try:
            if load["mode"] == "open":
                await self.open_loop(sink, start, deadline)
            else:
                share = _share(int(load["concurrency"]), self.plan.workers, self.plan.index)
                await self.closed_loop(sink, share, deadline)
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
        generator_ns = self.tick_cpu_ns + self.per_enrollment_cost_ns * self.started
        return ShardResult(
            index=self.plan.index,
            outcomes=dict(sink.outcomes),
            started=self.started,
            measured=sink.measured,
            measured_issued=sink.measured_issued,
            histograms={name: h.encode() for name, h in sink.histograms.items()},
            completed_per_second=[int(v) for v in sink.completed],
            issued_per_second=[int(v) for v in sink.issued],
            approvals_pending=per_second,
            cache=dataclasses.asdict(self.system.connection.cache.counts),
            process_cpu_s=cpu_s,
            elapsed_s=elapsed_s,
            generator_cpu_s=generator_ns / 1e9,
            offered=self.offered,
            window_ns=(sink.warmup_end, sink.last_end),
            interrupted=interrupted,
            samples=self._sample_certificates(),
        )

    def _sample_certificates(self) -> list[tuple[str, bytes]]:
        found = []
        for user_id, serial in self.samples:
            user = run_ready(self.system.directory.lookup_user(user_id))
            found.append((user_id, run_ready(self.system.directory.retrieve(user.dn.text, serial))))
        return found


def _share(total: int, workers: int, index: int) -> int:
    """This shard's part of `total`, spreading the remainder over the first shards."""
    return total // workers + (1 if index < total % workers else 0)


class _NullSystem:
    """Stands in for the engine while the generator's own cost is measured."""

    approvals_pending = 0

    async def enroll(self, identity: DeviceIdentity, recorder: _Times) -> Outcome:
        for step in STEPS:
            recorder.start(step)
        recorder.finish()
        return Outcome(identity.device_id, Status.ISSUED, Step.INSTALL)


def _calibrate(shard: Shard, rounds: int = 2000) -> int:
    """The generator's own CPU per enrollment, in ns: `Shard.enroll` (timestamps, counters,
    outcome bookkeeping) and the fold into histograms, around an engine that does nothing.

    The stand-in's own coroutine and outcome are counted too, so the estimate errs high.
    """
    engine, shard.system = shard.system, _NullSystem()  # type: ignore[assignment]
    sink = _Collector(time.perf_counter_ns(), 0)
    identity = shard.identities[0]
    began = time.thread_time_ns()
    try:
        for _ in range(rounds):
            run_ready(shard.enroll(identity, 0, sink))
        sink.fold()
    finally:
        shard.system = engine
        shard.started = shard.in_flight = 0
    return (time.thread_time_ns() - began) // rounds


def shard_main(channel: Connection, use_uvloop: bool) -> None:
    """Entry point of a shard process: its plan arrives first on the channel."""
    plan: ShardPlan = channel.recv()
    with tempfile.TemporaryDirectory(prefix="enrollbench-shard-") as directory:
        shard = Shard(plan, directory)
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
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        try:
            sink, interrupted = loop.run_until_complete(shard.run(start, progress))
        finally:
            loop.close()
        cpu = time.process_time() - cpu_before
        elapsed = time.perf_counter() - wall_before
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
