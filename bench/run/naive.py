"""The naive baseline: the server side of enrollment with cryptography's builders, one process.

For each device, with the engine's own stores (the same SQLite directory and configuration
database): authenticate the user, look up the DN, load the request and verify its signature,
check the subject, record the key, build and sign the certificate with `CertificateBuilder`,
publish it, retrieve it, load it back and compare its public key with the recorded one.
`python -m bench.run.naive` runs it side by side with `enrollbench run` on the same profile, in
alternating rounds, and reports the ratio of each round (DESIGN.md: compare in one run).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.table import Table

from bench.errors import UsageError
from bench.microbench.workloads import run_ready
from bench.profile import Profile, load_profile
from bench.run.corpus import build_corpus, read_corpus
from bench.run.merge import build_result
from bench.run.runner import RunOptions, ca_material, corpus_spec, execute, resolve_workers
from engine.certificate import build_certificate_with_builder
from engine.keys import Signer, key_spec
from engine.population import directory_entry, simulated_enrollee
from engine.system import EnrollmentSystem

DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


class NaiveServer:
    """The servers' work for one enrollment, written the obvious way."""

    def __init__(self, profile: Profile, devices: int) -> None:
        spec = corpus_spec(profile)
        if spec is None:
            raise UsageError("the naive baseline needs a precomputed corpus (device.crypto)")
        build_corpus(spec)
        seed = profile.get("", "seed")
        indices = list(range(devices))
        self.config = profile.engine_config()
        material = ca_material(profile)
        enrollees = [simulated_enrollee(i, seed) for i in indices]
        self.system = EnrollmentSystem(
            self.config, material, [directory_entry(e, seed) for e in enrollees]
        )
        entries = read_corpus(dataclasses.replace(spec, devices=devices), indices)
        self.devices = [(e, entry[1]) for e, entry in zip(enrollees, entries, strict=True)]
        chain = material.chain()
        self.issuer = chain.issuing
        self.signer = Signer(chain.private_issuing_key(), self.config.hash_name)
        self.family = key_spec(self.config.device_key).family

    def enroll(self, index: int) -> None:
        enrollee, request_der = self.devices[index % len(self.devices)]
        system, user_id = self.system, enrollee.user.user_id
        device_id = f"device-{user_id}"
        run_ready(system.connection.authenticate(user_id, enrollee.password))
        user = run_ready(system.enterprise.lookup_user(user_id))
        request = x509.load_der_x509_csr(request_der)
        if not request.is_signature_valid or request.subject.public_bytes() != user.dn.der:
            raise RuntimeError("request refused")
        spki = request.public_key().public_bytes(DER, SPKI)
        run_ready(system.configuration.store_key(device_id, spki))
        serial = int.from_bytes(os.urandom(16), "big") or 1
        certificate = build_certificate_with_builder(
            self.issuer, self.signer, self.family, 86_400, serial, int(time.time()), request
        )
        run_ready(system.directory.publish(user.dn.text, serial, certificate))
        fetched = run_ready(system.directory.retrieve(user.dn.text, serial))
        issued_key = x509.load_der_x509_certificate(fetched).public_key().public_bytes(DER, SPKI)
        if issued_key != run_ready(system.configuration.stored_key(device_id)):
            raise RuntimeError("key mismatch")


def naive_rate(server: NaiveServer, seconds: float) -> float:
    """Enrollments per second of the naive loop over `seconds`."""
    done = 0
    began = time.perf_counter()
    deadline = began + seconds
    while time.perf_counter() < deadline:
        for _ in range(32):
            server.enroll(done)
            done += 1
    return done / (time.perf_counter() - began)


def run_rate(profile: Profile, workers: int) -> float:
    """enrollbench run's issued certificates per second on `profile` (its load as given)."""
    output = execute(profile, workers, RunOptions(workers), None)
    result = build_result(profile, workers, output)
    return float(result["throughput"]["issued_per_s"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run.naive", description=__doc__)
    parser.add_argument("--profile", default="p256-auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    profile = load_profile(args.profile, [f"load.duration={args.seconds}"])
    workers = resolve_workers(profile, args.workers)
    server = NaiveServer(profile, min(int(profile.get("load", "devices")), 5000))
    table = Table(title=f"enrollbench run ({profile.name}, {workers} workers) vs naive loop")
    for column in ("round", "naive /s", "run /s", "ratio"):
        table.add_column(column, justify="right")
    ratios = []
    for number in range(1, args.rounds + 1):
        naive = naive_rate(server, args.seconds)
        run = run_rate(profile, workers)
        ratios.append(run / naive)
        table.add_row(str(number), f"{naive:,.0f}", f"{run:,.0f}", f"{run / naive:.2f}")
    server.system.close()
    console = Console()
    console.print(table)
    console.print(f"median ratio {statistics.median(ratios):.2f} over {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
