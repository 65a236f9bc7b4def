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
    """done/total, current rate, errors and approvals pending, redrawn a few times a second."""

    def __init__(self, profile: Profile, *, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = int(profile.get("load", "devices"))
        self.duration = float(profile.get("load", "duration"))
        self.console = Console(stderr=True)
        self.live: Live | None = None
        self.began = 0.0
        self.last: tuple[float, int] = (0.0, 0)
        self.rate = 0.0

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
        done = sum(s.get("done", 0) for s in snapshots.values())
        now = time.monotonic()
        if not snapshots:
            self.began = now  # the clock of the display starts with the run, not the set-up
        if now - self.last[0] >= 1.0:
            if self.last[0]:
                self.rate = (done - self.last[1]) / (now - self.last[0])
            self.last = (now, done)
        errors = sum(s.get("errors", 0) for s in snapshots.values())
        pending = sum(s.get("pending", 0) for s in snapshots.values())
        in_flight = sum(s.get("in_flight", 0) for s in snapshots.values())
        elapsed = now - self.began
        goal = f"{elapsed:.0f}/{self.duration:.0f} s" if self.duration else f"{done}/{self.total}"
        self.live.update(
            f"[bold]enrolling[/] {goal}  done {done}  in flight {in_flight}  "
            f"{self.rate:,.0f}/s  errors {errors}  approvals pending {pending}"
        )


def _row(name: str, stats: Mapping[str, Any]) -> list[str]:
    def ms(key: str) -> str:
        return f"{stats.get(key, 0) / 1000:.2f}"

    return [
        name,
        str(stats.get("count", 0)),
        ms("p50_us"),
        ms("p90_us"),
        ms("p99_us"),
        ms("p99_9_us"),
        ms("max_us"),
    ]


def print_summary(result: Mapping[str, Any], out: Path, *, quiet: bool, note: str = "") -> None:
    """One line when quiet; otherwise a table of outcomes, throughput and latency per step."""
    console = Console()
    outcomes = result["outcomes"]
    throughput = result["throughput"]
    generator = result["generator"]
    line = (
        f"{result['manifest']['profile']}: {outcomes['issued']}/{outcomes['started']} issued, "
        f"{sum(outcomes['rejected'].values())} rejected, {sum(outcomes['failed'].values())} "
        f"failed; {throughput['enrollments_per_s']:,.0f} enrollments/s, "
        f"{throughput['issued_per_s']:,.0f} issued/s; "
        f"p99 {result['latency']['end_to_end']['latency']['p99_us'] / 1000:.1f} ms"
        f"{' (INTERRUPTED)' if result['interrupted'] else ''} -> {out}"
    )
    if quiet:
        console.print(line, highlight=False, soft_wrap=True)
        return
    table = Table(title=f"{result['manifest']['profile']}: latency (ms)")
    for column in ("metric", "count", "p50", "p90", "p99", "p99.9", "max"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    latency = result["latency"]
    table.add_row(*_row("end to end (from intended start)", latency["end_to_end"]["latency"]))
    table.add_row(*_row("end to end (service time)", latency["end_to_end"]["service"]))
    for step, stats in latency["steps"].items():
        table.add_row(*_row(f"  {step}", stats))
    console.print(table)
    if outcomes["rejected"] or outcomes["failed"]:
        console.print(f"rejected: {outcomes['rejected']}  failed: {outcomes['failed']}")
    if generator["generator_bound"]:
        console.print(f"[bold red]generator-bound:[/] {'; '.join(generator['reasons'])}")
    console.print(
        f"generator CPU share {generator['generator_cpu_share']:.1%}, schedule lag p99 "
        f"{generator['schedule_lag']['p99_us'] / 1000:.2f} ms; start-up "
        f"{result['timing']['startup_s']:.1f} s, corpus {result['timing']['corpus_s']:.1f} s"
    )
    if note:
        console.print(note)
    console.print(line, highlight=False, soft_wrap=True)
