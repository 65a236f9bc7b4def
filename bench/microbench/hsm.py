"""What a CA key in an HSM costs per certificate: the key in memory against the key in SoftHSM2.

    python -m bench.microbench.hsm [--keys p256,p384,rsa2048,rsa3072] [--rounds 21]
                                   [--ec-per-block 200] [--rsa-per-block 20] [--json PATH]

For each CA key type one `CertificateTemplate` issues the same P-256 device certificate three
ways, in blocks whose order is shuffled every round (one process, one CPU budget):
- M: `engine.keys.Signer` (the key in memory, OpenSSL),
- H: `engine.hsm.HsmSigner` (the key imported into a SoftHSM2 token in a temporary folder),
- M': a second in-memory template, the A/A control (M'/M must centre on 1.0).
Each block records CPU (process_time: SoftHSM2 runs inside this process, so its work is counted)
and wall time per certificate. Printed per key type: M and H medians with min-max over blocks,
and the paired ratios H/M and M'/M (median, min-max over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench.microbench.workloads import corpus_keys
from bench.services.softhsm import Token, create_token, import_key
from engine.ca import build_hierarchy
from engine.certificate import CertificateTemplate
from engine.hsm import HsmSigner
from engine.keys import KeyFamily, Signer, key_spec, split_spki

CA_SEED = 9  # corpus seed of the CA keys (EC derived, RSA made once and cached)
HASHES = {"p256": "sha256", "p384": "sha384", "rsa2048": "sha256", "rsa3072": "sha256"}


@dataclass(frozen=True, slots=True)
class Spread:
    """Median and min-max of one series."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def show(self, scale: float = 1.0, digits: int = 1) -> str:
        m, lo, hi = (v / scale for v in (self.median, self.low, self.high))
        return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


@dataclass(frozen=True, slots=True)
class Row:
    """One key type: per-certificate CPU and wall (ns) for M and H, and paired ratios."""

    key: str
    per_block: int
    rounds: int
    memory_cpu: Spread
    hsm_cpu: Spread
    memory_wall: Spread
    hsm_wall: Spread
    ratio_cpu: Spread
    ratio_wall: Spread
    aa_cpu: Spread
    aa_wall: Spread


def _issuer(key: str, token: Token, index: int) -> tuple[x509.Certificate, Signer, HsmSigner]:
    """The CA certificate, the in-memory signer and the HSM signer over the same issuing key."""
    root, issuing = corpus_keys(key, CA_SEED, 2)
    chain = build_hierarchy("hsm-bench", [root, issuing], HASHES[key], datetime.now(UTC))
    uri = import_key(token, issuing, f"ca-{key}", bytes([index]))
    hsm = HsmSigner.open(token.module, uri, token.pin, HASHES[key])
    return chain.certificates[-1], Signer(issuing, HASHES[key]), hsm


def _issue_call(issuer: x509.Certificate, signer: Signer | HsmSigner) -> Callable[[], bytes]:
    """One certificate for a fixed P-256 device through a template on `signer`."""
    template = CertificateTemplate(issuer, signer, KeyFamily.EC, 86_400)
    device = corpus_keys("p256", 1, 1)[0].public_key()
    spki = split_spki(
        device.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    subject = x509.Name.from_rfc4514_string("CN=device-1,O=enrollbench").public_bytes()
    now = int(time.time())
    return lambda: template.issue(2**120 + 7, now, subject, spki, None)


def _block(call: Callable[[], bytes], count: int) -> tuple[float, float]:
    """CPU and wall ns per call over `count` calls."""
    cpu, wall = time.process_time_ns, time.perf_counter_ns
    cpu0, wall0 = cpu(), wall()
    for _ in range(count):
        call()
    return (cpu() - cpu0) / count, (wall() - wall0) / count


def measure_key(key: str, token: Token, index: int, rounds: int, per_block: int) -> Row:
    """Interleave M, H and M' blocks (shuffled each round) for one CA key type."""
    issuer, memory, hsm = _issuer(key, token, index)
    arms = {
        "M": _issue_call(issuer, memory),
        "H": _issue_call(issuer, hsm),
        "A": _issue_call(issuer, Signer(memory.key, HASHES[key])),
    }
    for call in arms.values():  # warm up: sessions, caches, branch predictors
        _block(call, max(per_block // 4, 2))
    order = random.Random(f"{key}/{CA_SEED}")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    for _ in range(rounds):
        names = list(arms)
        order.shuffle(names)
        for name in names:
            times[name].append(_block(arms[name], per_block))

    def series(name: str, clock: int) -> list[float]:
        return [t[clock] for t in times[name]]

    def ratios(name: str, clock: int) -> Spread:
        pairs = zip(series(name, clock), series("M", clock), strict=True)
        return Spread.of([b / a for b, a in pairs])

    return Row(
        key, per_block, rounds,
        Spread.of(series("M", 0)), Spread.of(series("H", 0)),
        Spread.of(series("M", 1)), Spread.of(series("H", 1)),
        ratios("H", 0), ratios("H", 1), ratios("A", 0), ratios("A", 1),
    )  # fmt: skip


def render(rows: Sequence[Row]) -> str:
    lines = [
        "CA key in memory (M) vs in SoftHSM2 (H), per certificate issued; "
        "median [min-max] over blocks; ratios paired per round",
        f"{'key':8} {'M cpu µs':>22} {'H cpu µs':>24} {'H/M cpu':>20} {'H/M wall':>20} "
        f"{'A/A cpu':>20} {'A/A wall':>20} {'H-M cpu µs':>11}",
    ]
    for row in rows:
        lines.append(
            f"{row.key:8} {row.memory_cpu.show(1000):>22} {row.hsm_cpu.show(1000):>24} "
            f"{row.ratio_cpu.show(digits=2):>20} {row.ratio_wall.show(digits=2):>20} "
            f"{row.aa_cpu.show(digits=3):>20} {row.aa_wall.show(digits=3):>20} "
            f"{(row.hsm_cpu.median - row.memory_cpu.median) / 1000:>11.1f}"
        )
        lines.append(
            f"{'':8} wall µs: M {row.memory_wall.show(1000)}  H {row.hsm_wall.show(1000)}  "
            f"({row.rounds} rounds x {row.per_block} certificates per block)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.microbench.hsm")
    parser.add_argument("--keys", default="p256,p384,rsa2048,rsa3072")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--ec-per-block", type=int, default=200)
    parser.add_argument("--rsa-per-block", type=int, default=20)
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    keys = [k for k in args.keys.split(",") if k]
    for key in keys:
        if key not in HASHES:
            parser.error(f"unknown key type {key!r}; known: {', '.join(HASHES)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="enrollbench-hsm-") as folder:
        pin = os.urandom(8).hex()  # a throwaway token: its PIN lives only in this process
        token = create_token(Path(folder), "enrollbench-bench", pin, os.urandom(8).hex())
        for index, key in enumerate(keys, start=1):
            rsa = key_spec(key).family is KeyFamily.RSA
            per_block = args.rsa_per_block if rsa else args.ec_per_block
            rows.append(measure_key(key, token, index, args.rounds, per_block))
            print(render(rows[-1:]).splitlines()[-2:][0], file=sys.stderr, flush=True)
    print(render(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
