"""Our served SCEP CA against micromdm's scepserver, the same `enrollbench run --target` load.

    python -m bench.microbench.versus_micromdm [--rounds 3] [--micromdm-devices 400]
                                               [--ours-devices 3000] [--in-flight 32]

Blocks alternate M O, O M, ... Each block is a whole `enrollbench run` of the rsa2048-auto
profile (RSA-2048 devices and CA, as micromdm's; `--ca-key p256` gives ours a P-256 CA beside
its RSA RA) over SCEP, from a fresh state:
- M: micromdm scepserver 2.1.0 (Debian `scep`) on a new depot (`scepserver ca -init`), driven
  at one request in flight, the most it handles correctly (2.1.0 hands out duplicate serials
  under concurrency); each device enrolls once (it refuses a DN it has issued);
- O: `--target served` over scep+http (a new state folder), `--in-flight` requests in flight.
Every answer is fully checked by the client (signature, nonces, transaction ID, decryption,
the certificate's key against the device's own); a block counts only issued certificates.
Printed: each block's issued/s and p99, then the ratio ours/micromdm per round and its median.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench.errors import UsageError
from bench.profile import load_profile
from bench.run.merge import build_result
from bench.run.runner import RunOptions, execute, resolve_workers

CHALLENGE_ENV = "ENROLLBENCH_MICROMDM_CHALLENGE"


@contextmanager
def micromdm(folder: Path) -> Iterator[str]:
    """scepserver on a fresh depot in `folder`; yields its scep+http URL (127.0.0.1 only)."""
    tool = shutil.which("scepserver")
    if tool is None:
        raise UsageError("scepserver is not installed (Debian package `scep`)")
    depot = folder / "depot"
    subprocess.run(  # noqa: S603 (a fixed tool path and arguments)
        [tool, "ca", "-init", "-depot", str(depot), "-keySize", "2048"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    challenge = os.environ.setdefault(CHALLENGE_ENV, os.urandom(8).hex())
    process = subprocess.Popen(  # noqa: S603
        [tool, "-depot", str(depot), "-port", str(port), "-challenge", challenge],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                raise UsageError("scepserver exited at start")
            with socket.socket() as attempt:
                if attempt.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise UsageError("scepserver did not listen within 15 s")
            time.sleep(0.05)
        yield f"scep+http://127.0.0.1:{port}/scep"
    finally:
        process.terminate()
        process.wait(10)


def run_block(overrides: Sequence[str]) -> tuple[float, float, int, int]:
    """One `enrollbench run` of rsa2048-auto: issued/s, p99 (ms), issued, started."""
    profile = load_profile("rsa2048-auto", ["load.duration=0", *overrides])
    workers = resolve_workers(profile, None)
    result = build_result(profile, workers, execute(profile, workers, RunOptions(workers), None))
    outcomes = result["outcomes"]
    return (
        result["throughput"]["issued_per_s"],
        result["latency"]["end_to_end"]["latency"]["p99_us"] / 1000,
        outcomes["issued"],
        outcomes["started"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.microbench.versus_micromdm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micromdm-devices", type=int, default=400)
    parser.add_argument("--ours-devices", type=int, default=3000)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--server-workers", type=int, default=0, help="ours (0: one per core)")
    parser.add_argument(
        "--ca-key", default="rsa2048", help="our CA's key (micromdm's is RSA-2048; the RA is RSA)"
    )
    options = parser.parse_args(argv)
    common = ["load.warmup_seconds=0.5", "load.mode='closed'"]
    ratios = []
    for number in range(options.rounds):
        order = "MO" if number % 2 == 0 else "OM"
        figures = {}
        for side in order:
            with tempfile.TemporaryDirectory(prefix="enrollbench-versus-") as folder:
                if side == "M":
                    with micromdm(Path(folder)) as url:
                        figures[side] = run_block(
                            [*common, f"target.url='{url}'", "load.concurrency=1",
                             f"load.devices={options.micromdm_devices}",
                             f"target.challenge_env='{CHALLENGE_ENV}'"]
                        )  # fmt: skip
                else:
                    figures[side] = run_block(
                        [*common, "target.url='served'", "target.served_protocol='scep+http'",
                         f"ca.key='{options.ca_key}'",
                         f"target.server_workers={options.server_workers}",
                         f"load.concurrency={options.in_flight}",
                         f"load.devices={options.ours_devices}"]
                    )  # fmt: skip
        ratio = figures["O"][0] / figures["M"][0]
        ratios.append(ratio)
        for side, name in (("M", "micromdm (1 in flight)"), ("O", f"ours ({options.in_flight})")):
            rate, p99, issued, started = figures[side]
            print(
                f"round {number + 1} {name}: {rate:,.0f} issued/s, p99 {p99:,.1f} ms, "
                f"{issued}/{started} issued"
            )
        print(f"round {number + 1}: ours/micromdm {ratio:.1f}", flush=True)
    print(
        f"ours/micromdm issued/s: median {statistics.median(ratios):.1f} "
        f"(min {min(ratios):.1f}, max {max(ratios):.1f}) over {options.rounds} rounds"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
