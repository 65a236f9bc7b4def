"""What each real component costs: the embedded default against OpenLDAP, PostgreSQL and a
SoftHSM2-held CA key, side by side in one script.

    python -m bench.microbench.components [--profile p256-auto] [--rounds 3] [--seconds 3]
                                          [--devices 2000] [--concurrency 32]

Each round runs the profile embedded (E), with each component in turn (ldap, postgresql, softhsm:
started for the block, as `enrollbench run` does), and embedded again (E', the A/A check), in an
order that alternates between rounds. Printed per block: issued/s and its ratio to E; the step
that limits the rate (the largest share of an enrollment's mean time); and CPU per enrollment:
the generator's shards (process CPU) beside the component's server (slapd, or PostgreSQL's
postmaster and backends: their process tree in /proc over the run's load), so a reader sees
whether enrollbench or the server is the bottleneck. The medians of the ratios close the report.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import Any

from bench.profile import load_profile
from bench.run.merge import build_result
from bench.run.runner import RunOptions, execute, resolve_workers

SIDES: dict[str, list[str]] = {
    "E": [],
    "ldap": ["components.directory='ldap'"],
    "postgresql": ["components.database='postgresql'"],
    "softhsm": ["ca.signing='softhsm'"],
    "E'": [],
}
SERVERS = {"ldap": "slapd", "postgresql": "postgres"}


def limiting_step(result: dict[str, Any]) -> tuple[str, float]:
    """The step with the largest share of an enrollment's mean time, and that share."""
    steps = {
        name: float(summary["mean_us"])
        for name, summary in result["latency"]["steps"].items()
        if not summary.get("precomputed")
    }
    total = sum(steps.values()) or 1.0
    name = max(steps, key=lambda step: steps[step])
    return name, steps[name] / total


def run_block(side: str, options: argparse.Namespace) -> dict[str, Any]:
    overrides = [
        f"load.duration={options.seconds}",
        "load.warmup_seconds=0.5",
        f"load.devices={options.devices}",
        "load.mode='closed'",
        f"load.concurrency={options.concurrency}",
        *SIDES[side],
    ]
    profile = load_profile(options.profile, overrides)
    workers = resolve_workers(profile, None)
    server = SERVERS.get(side)
    output = execute(profile, workers, RunOptions(workers), None)
    result = build_result(profile, workers, output)
    # the server's CPU over the run's load (the runner reads its process tree from /proc)
    spent = float(result["manifest"]["components"].get(f"{server}_cpu_s", 0.0)) if server else 0.0
    started = max(1, result["outcomes"]["started"])
    step, share = limiting_step(result)
    return {
        "issued_per_s": result["throughput"]["issued_per_s"],
        "issued": result["outcomes"]["issued"],
        "started": result["outcomes"]["started"],
        "generator_us": result["generator"]["process_cpu_s"] / started * 1e6,
        "server_us": spent / started * 1e6,
        "step": step,
        "share": share,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.microbench.components")
    parser.add_argument("--profile", default="p256-auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    options = parser.parse_args(argv)
    ratios: dict[str, list[float]] = {side: [] for side in SIDES if side != "E"}
    for number in range(options.rounds):
        order = list(SIDES) if number % 2 == 0 else list(reversed(SIDES))
        blocks = {side: run_block(side, options) for side in order}
        base = blocks["E"]["issued_per_s"] or 1.0
        for side in order:
            block = blocks[side]
            if side != "E":
                ratios[side].append(block["issued_per_s"] / base)
            server = f", {SERVERS[side]} {block['server_us']:,.0f} us" if side in SERVERS else ""
            print(
                f"round {number + 1} {side:10} {block['issued_per_s']:8,.0f} issued/s "
                f"({block['issued']}/{block['started']}), /E {block['issued_per_s'] / base:.3f}; "
                f"limiting step {block['step']} ({block['share']:.0%} of an enrollment); CPU per "
                f"enrollment: generator and engine {block['generator_us']:,.0f} us{server}",
                flush=True,
            )
    for side, values in ratios.items():
        print(
            f"{side:10} issued/s over embedded: median {statistics.median(values):.3f} "
            f"(min {min(values):.3f}, max {max(values):.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
