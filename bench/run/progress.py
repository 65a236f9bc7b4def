"""Live progress while a run is under way, and the summary table when it ends (rich)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from bench.profile import Profile


class LiveProgress:
    """Issued/s first, then all enrollments/s, done, in flight, rejected or failed, approvals
    pending; redrawn a few times a second."""

    def __init__(self, profile: Profile, *, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = int(profile.get("load", "devices"))
        self.duration = float(profile.get("load", "duration"))
        self.console = Console(stderr=True)
        self.live: Live | None = None
        self.began = 0.0
        self.last: tuple[float, int, int] = (0.0, 0, 0)
        self.rates = (0.0, 0.0)  # issued/s, enrollments/s over the last second or so

    def __enter__(self) -> LiveProgress:
        if self.enabled:
            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.__enter__()
        self.began = time.monotonic()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.live is not None:
            self.live.__exit__(kind, error, trace)

    def update(self, snapshots: Mapping[int, Mapping[str, int]]) -> None:
        if self.live is None:
            return
        now = time.monotonic()
        if not snapshots:
            self.began = now  # the clock of the display starts with the run, not the set-up
        self.live.update(self.line(snapshots, now))

    def line(self, snapshots: Mapping[int, Mapping[str, int]], now: float) -> str:
        """The live line for the shards' latest snapshots at monotonic time `now`."""
        done = sum(s.get("done", 0) for s in snapshots.values())
        errors = sum(s.get("errors", 0) for s in snapshots.values())
        issued = done - errors  # a snapshot's errors are its rejected and failed outcomes
        if now - self.last[0] >= 1.0:
            if self.last[0]:
                seconds = now - self.last[0]
                self.rates = ((issued - self.last[2]) / seconds, (done - self.last[1]) / seconds)
            self.last = (now, done, issued)
        pending = sum(s.get("pending", 0) for s in snapshots.values())
        in_flight = sum(s.get("in_flight", 0) for s in snapshots.values())
        elapsed = now - self.began
        goal = f"{elapsed:.0f}/{self.duration:.0f} s" if self.duration else f"{done}/{self.total}"
        return (
            f"[bold]enrolling[/] {goal}  [bold]{self.rates[0]:,.0f} issued/s[/] "
            f"(all {self.rates[1]:,.0f}/s)  issued {issued}  done {done}  in flight {in_flight}  "
            f"rejected or failed {errors}  approvals pending {pending}"
        )


_COLUMNS = ("p50_us", "p90_us", "p99_us", "p99_9_us", "max_us")


def _row(name: str, stats: Mapping[str, Any]) -> list[str]:
    """A table row; a step that did no work in the run says so instead of showing 0.00 ms."""
    if stats.get("precomputed"):
        return [name, "-", "precomputed", *("" for _ in _COLUMNS[1:])]
    return [name, str(stats.get("count", 0)), *(f"{stats.get(k, 0) / 1000:.2f}" for k in _COLUMNS)]


def summary_line(result: Mapping[str, Any], out: Path) -> str:
    """Issued certificates/s first, all enrollments/s beside it, then outcomes, p99, the file."""
    outcomes = result["outcomes"]
    throughput = result["throughput"]
    return (
        f"{result['manifest']['profile']}: {throughput['issued_per_s']:,.0f} issued/s "
        f"({throughput['enrollments_per_s']:,.0f} enrollments/s); "
        f"{outcomes['issued']}/{outcomes['started']} issued, "
        f"{sum(outcomes['rejected'].values())} rejected, {sum(outcomes['failed'].values())} "
        f"failed; p99 {result['latency']['end_to_end']['latency']['p99_us'] / 1000:.1f} ms"
        f"{' (INTERRUPTED)' if result['interrupted'] else ''} -> {out}"
    )


def _timer_note(generator: Mapping[str, Any]) -> str:
    """The open-loop generator's own lateness (timer_error; null in a closed loop)."""
    timer = generator["timer_error"]
    if not timer:
        return "timer error n/a (closed loop)"
    return f"timer error p99 {timer.get('p99_us', 0) / 1000:.3f} ms"


def print_summary(result: Mapping[str, Any], out: Path, *, quiet: bool, note: str = "") -> None:
    """One line when quiet; otherwise a table of latency per step, outcomes, the generator's
    self-check, then the line."""
    console = Console()
    line = summary_line(result, out)
    if quiet:
        console.print(line, highlight=False, soft_wrap=True)
        return
    outcomes = result["outcomes"]
    generator = result["generator"]
    table = Table(title=f"{result['manifest']['profile']}: latency (ms)")
    for column in ("metric", "count", "p50", "p90", "p99", "p99.9", "max"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    latency = result["latency"]
    table.add_row(*_row("end to end (from intended start)", latency["end_to_end"]["latency"]))
    table.add_row(*_row("end to end (service time)", latency["end_to_end"]["service"]))
    places = latency.get("step_places", {})
    for step in places or latency["steps"]:
        if places.get(step) == "round-trip":
            table.add_row(f"  {step}", "-", "in send-request", *("" for _ in _COLUMNS[1:]))
        elif step in latency["steps"]:
            table.add_row(*_row(f"  {step}", latency["steps"][step]))
    for step, stats in latency.get("server_steps", {}).items():
        table.add_row(*_row(f"  server: {step}", stats))
    console.print(table)
    if outcomes["rejected"] or outcomes["failed"]:
        console.print(f"rejected: {outcomes['rejected']}  failed: {outcomes['failed']}")
    if generator["generator_bound"]:
        console.print(f"[bold red]generator-bound:[/] {'; '.join(generator['reasons'])}")
    timing = result["timing"]
    console.print(
        f"generator CPU {generator['generator_core_share']:.1%} of each shard's core "
        f"({generator['generator_cpu_share']:.1%} of the shards' CPU), {_timer_note(generator)}; "
        f"start-up {timing['startup_s']:.1f} s, corpus {timing['corpus_s']:.1f} s"
    )
    if note:
        console.print(note)
    console.print(line, highlight=False, soft_wrap=True)
