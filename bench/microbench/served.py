"""Served against embedded: what taking the CA onto the wire costs, side by side in one run.

    python -m bench.microbench.served [--profile p256-auto] [--rounds 5] [--seconds 4]
                                      [--protocol est+http] [--connection keep-alive]

Each round runs three blocks of the same profile, in an order that alternates between rounds:
E (embedded: the engine in every shard), S (`--target served`: `enrollbench serve` on loopback,
half the cores to it) and E' (embedded again, the A/A check that says how far a ratio can be
trusted), then a do-nothing block on the same HTTP stack (our client and server, a POST of the
size of an EST request answered like one, `concurrency` in flight).

Printed per round: issued/s of each block, the ratios S/E and E'/E; and for S the CPU per
enrollment split four ways:
- HTTP: the do-nothing endpoint's client + server CPU per request (one request per enrollment:
  EST keep-alive, the chain cached);
- CA: the served CA's own step times (authenticate, send-request, issue: synchronous work, so
  their wall time is their CPU);
- protocol: the rest of the server's CPU (EST handler, routing, metrics, event loop; and over
  TLS the handshakes and the record layer, as the do-nothing block is plain HTTP);
- generator: the client's CPU less its HTTP share (the device side, the EST client, the shard).
The medians close the report.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.microbench.http_stack import ServerProcess, ours_sender, run_block
from bench.profile import load_profile
from bench.run.merge import build_result
from bench.run.runner import RunOptions, execute, resolve_workers
from engine.wire.http import HttpClient, Phases

SERVER_STEPS = ("authenticate", "send-request", "issue")


@dataclass(frozen=True, slots=True)
class Block:
    """One run's figures."""

    side: str
    issued_per_s: float
    client_us: float  # the generator's CPU per enrollment started
    server_us: float  # the served CA's CPU per enrollment started (0 embedded)
    ca_us: float  # the served CA's step times per enrollment (0 embedded)
    generator_bound: bool  # the run's own verdict: its generator limited it


def run_side(side: str, profile_name: str, overrides: Sequence[str]) -> Block:
    """One block: a whole `enrollbench run` of the profile, in this process's children."""
    profile = load_profile(profile_name, list(overrides))
    workers = resolve_workers(profile, None)
    result = build_result(profile, workers, execute(profile, workers, RunOptions(workers), None))
    generator = result["generator"]
    started = max(1, result["outcomes"]["started"])
    target = result["manifest"]["target"]
    server_steps: dict[str, Any] = result["latency"].get("server_steps", {})
    ca_us = (
        sum(
            server_steps[s]["mean_us"] * server_steps[s]["count"]
            for s in SERVER_STEPS
            if s in server_steps
        )
        / started
    )
    return Block(
        side,
        result["throughput"]["issued_per_s"],
        generator["process_cpu_s"] / started * 1e6,
        target.get("server_cpu_us_per_enrollment", 0.0),
        ca_us,
        bool(generator["generator_bound"]),
    )


def do_nothing(requests: int, concurrency: int) -> tuple[float, float]:
    """Client and server CPU microseconds per request of our HTTP stack doing nothing."""
    server = ServerProcess("ours", None, None)
    try:

        async def measure() -> tuple[float, float]:
            client = HttpClient("127.0.0.1", server.port)
            try:
                send = ours_sender(client, Phases())
                await run_block("warm-up", send, server.pid, concurrency * 10, concurrency)
                block = await run_block("http", send, server.pid, requests, concurrency)
            finally:
                await client.close()
            return block.client_us, block.server_us

        figures: tuple[float, float] = _run(measure())
        return figures
    finally:
        server.close()


def _run(coroutine: Any) -> Any:
    try:
        import uvloop  # noqa: PLC0415 (optional at import time)
    except ImportError:  # pragma: no cover
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.microbench.served")
    parser.add_argument("--profile", default="p256-auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--protocol", default="est+http", choices=["est+http", "est+https"])
    parser.add_argument("--connection", default="keep-alive", choices=["keep-alive", "per-device"])
    parser.add_argument("--http-requests", type=int, default=20_000)
    options = parser.parse_args(argv)
    common = [f"load.duration={options.seconds}", "load.warmup_seconds=1.0"]
    served = [
        *common,
        "target.url='served'",
        f"target.served_protocol='{options.protocol}'",
        f"target.connection='{options.connection}'",
    ]
    concurrency = int(load_profile(options.profile, []).get("load", "concurrency"))
    # the do-nothing block is plain HTTP: over TLS the handshakes and record layer land in
    # the server's "protocol" share and the client's "generator" share
    protocol = "protocol+TLS" if options.protocol == "est+https" else "protocol"
    ratios: list[float] = []
    aa: list[float] = []
    splits: list[tuple[float, float, float, float]] = []
    for round_number in range(options.rounds):
        order = ["E", "S", "E'"] if round_number % 2 == 0 else ["E'", "S", "E"]
        blocks = {
            side: run_side(side, options.profile, served if side == "S" else common)
            for side in order
        }
        http_client, http_server = do_nothing(options.http_requests, concurrency)
        e, s, e2 = blocks["E"], blocks["S"], blocks["E'"]
        ratios.append(s.issued_per_s / e.issued_per_s)
        aa.append(e2.issued_per_s / e.issued_per_s)
        split = (
            http_client + http_server,
            s.ca_us,
            max(0.0, s.server_us - http_server - s.ca_us),
            max(0.0, s.client_us - http_client),
        )
        splits.append(split)
        bound = " (generator-bound)" if s.generator_bound else ""
        print(
            f"round {round_number + 1} ({' '.join(order)}): embedded {e.issued_per_s:,.0f}/s, "
            f"served {s.issued_per_s:,.0f}/s{bound}, embedded again {e2.issued_per_s:,.0f}/s; "
            f"served/embedded {ratios[-1]:.3f}, A/A {aa[-1]:.3f}; served CPU per enrollment "
            f"{s.client_us + s.server_us:,.0f} us = HTTP {split[0]:,.0f} + CA {split[1]:,.0f} "
            f"+ {protocol} {split[2]:,.0f} + generator {split[3]:,.0f} "
            f"(client {s.client_us:,.0f}, server {s.server_us:,.0f}; embedded "
            f"{e.client_us:,.0f} us)",
            flush=True,
        )
    columns = list(zip(*splits, strict=True))
    print(
        f"served/embedded issued/s: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}); A/A median {statistics.median(aa):.3f} "
        f"(min {min(aa):.3f}, max {max(aa):.3f}); {options.protocol}, {options.connection}, "
        f"{options.profile}, {options.rounds} rounds of {options.seconds:g} s"
    )
    print(
        "served CPU per enrollment, medians (us): "
        + ", ".join(
            f"{name} {statistics.median(values):,.0f}"
            for name, values in zip(("HTTP", "CA", protocol, "generator"), columns, strict=True)
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
