"""The naive baseline: the server side of enrollment with cryptography's builders, one process.

For each device: load the request, verify its signature, build and sign the certificate with
`CertificateBuilder`, load the certificate back and compare its public key with the request's.
`python -m bench.naive` runs it side by side with `enrollbench run` on the same profile, in
alternating rounds, and reports the ratio of each round (DESIGN.md: compare in one run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from bench.profile import Profile, load_profile
from bench.results import build_result
from bench.runner import RunOptions, execute, resolve_workers
from bench.workloads import CaWorkload


def naive_rate(workload: CaWorkload, seconds: float) -> float:
    """Enrollments per second of the naive loop over `seconds`."""
    done = 0
    began = time.perf_counter()
    deadline = began + seconds
    while time.perf_counter() < deadline:
        for _ in range(32):
            workload.naive()
        done += 32
    return done / (time.perf_counter() - began)


def run_rate(profile: Profile, workers: int) -> float:
    """enrollbench run's enrollments per second on `profile` (its load section as given)."""
    output = execute(profile, workers, RunOptions(workers), None)
    result = build_result(profile, workers, output)
    return float(result["throughput"]["enrollments_per_s"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive", description=__doc__)
    parser.add_argument("--profile", default="p256-auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    profile = load_profile(args.profile, [f"load.duration={args.seconds}"])
    workers = resolve_workers(profile, args.workers)
    key = profile.get("device", "key")
    workload = CaWorkload(key, profile.get("ca", "key"), profile.get("ca", "hash"))
    table = Table(title=f"enrollbench run ({profile.name}, {workers} workers) vs naive loop")
    for column in ("round", "naive /s", "run /s", "ratio"):
        table.add_column(column, justify="right")
    ratios = []
    for number in range(1, args.rounds + 1):
        naive = naive_rate(workload, args.seconds)
        run = run_rate(profile, workers)
        ratios.append(run / naive)
        table.add_row(str(number), f"{naive:,.0f}", f"{run:,.0f}", f"{run / naive:.2f}")
    workload.close()
    console = Console()
    console.print(table)
    console.print(f"median ratio {statistics.median(ratios):.2f} over {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
