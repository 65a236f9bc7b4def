"""`enrollbench run`: build the corpus, start the shards, drive them together, merge, write.

Start-up (corpus, CA material, shard processes and their engine replicas) happens before the
common start time and is reported separately from the measured window.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench.errors import BenchError, UsageError
from bench.histogram import Histogram
from bench.profile import Profile
from bench.run.components import Components, components_for, servers_cpu
from bench.run.corpus import CorpusSpec, build_corpus, load_keys
from bench.run.shard import HsmKey, ShardPlan, ShardResult, shard_main
from bench.run.targets import (
    ServedCA,
    WireTarget,
    check_target,
    generator_workers,
    parse_target,
    probe,
)
from bench.serve.metrics import gather
from engine.approval import ReviewBoard
from engine.hsm import HsmSigner
from engine.keys import PublicKey, load_private_key
from engine.system import CAMaterial

START_DELAY_S = 0.2  # between "everyone is ready" and the common start time
READY_TIMEOUT_S = 600.0
DRAIN_TIMEOUT_S = 30.0
CA_KEY_SEED = -1  # CA keys come from their own corpus seed, apart from device keys


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What the command line adds to a profile."""

    workers: int
    artifacts: Path | None = None
    artifacts_sample: int = 0
    use_uvloop: bool = True


@dataclass(slots=True)
class RunOutput:
    """The shards' results, the devices of shards that died, and where the time went."""

    shards: list[ShardResult]
    died: dict[int, int]
    timings: dict[str, float]
    interrupted: bool
    material: CAMaterial
    peak_rss_bytes: int
    rss_per_second: list[int]  # bytes, all processes, sampled about once a second
    started_at: str  # UTC, ISO 8601: when the measured run began
    target: dict[str, Any] | None = None  # the wire target as recorded (None: embedded)
    server_steps: dict[str, Histogram] | None = None  # a served CA's own per-step times
    components: dict[str, str] | None = None  # the real parts the run used, and where


ProgressSink = Callable[[dict[int, dict[str, int]]], None]
ShardTarget = Callable[[Connection, bool], None]


def resolve_workers(profile: Profile, override: int | None) -> int:
    """Shard processes: as asked, or one per core (a served CA's workers take their share)."""
    requested = override if override is not None else int(profile.get("load", "workers"))
    cores = os.cpu_count() or 1
    if profile.get("target", "url") == "served":
        cores = generator_workers()
    workers = requested or cores
    if profile.get("load", "mode") == "closed":
        # a shard without a device in flight would never enroll its share of the devices
        workers = min(workers, int(profile.get("load", "concurrency")))
    return workers


def resolve_target(profile: Profile) -> WireTarget | None:
    """The profile's wire target, checked; None for the embedded engine or a served one
    (which `execute` starts)."""
    url = str(profile.get("target", "url"))
    if url in ("embedded", "served"):
        if url == "served":
            check_target(
                profile, parse_target(f"{profile.get('target', 'served_protocol')}://127.0.0.1")
            )
        return None
    target = parse_target(url, str(profile.get("target", "ca_file")))
    check_target(profile, target)
    return target


def corpus_spec(profile: Profile) -> CorpusSpec | None:
    """The corpus a profile needs, or None for live device crypto."""
    if profile.get("device", "crypto") != "precomputed":
        return None
    return CorpusSpec(
        profile.get("device", "key"),
        profile.get("ca", "hash"),
        profile.get("", "seed"),
        int(profile.get("load", "devices")),
        profile.get("device", "key_protection") != "none",
    )


def _prepare_corpus(spec: CorpusSpec | None) -> None:
    """Build the corpus in a child process, so this one never holds it (shards read theirs)."""
    if spec is None:
        return
    process = multiprocessing.get_context("spawn").Process(target=build_corpus, args=(spec,))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise BenchError(f"building the device corpus failed (exit code {process.exitcode})")


def ca_material(profile: Profile) -> CAMaterial:
    """The run's CA hierarchy; with ca.signing = pkcs11 its issuing certificate is made for
    the key in the user's token (the root and intermediates from the corpus sign it)."""
    config = profile.engine_config()
    ders = load_keys(config.ca_key, CA_KEY_SEED, config.ca_intermediates + 2)
    keys = [load_private_key(der) for der in ders]
    token = user_token(profile)
    if token is None:
        return CAMaterial.create(config, keys)
    signer = HsmSigner.open(token.module, token.uri, token.pin, config.hash_name)
    public = serialization.load_der_public_key(signer.spki)
    if not isinstance(public, PublicKey):  # pragma: no cover (HsmSigner reads RSA and EC)
        raise BenchError("the token's key is of a type enrollbench cannot use")
    return CAMaterial.create(config, keys[:-1], public)


def user_token(profile: Profile) -> HsmKey | None:
    """ca.signing = pkcs11: the user's token, its key and the PIN from the environment."""
    if profile.get("ca", "signing") != "pkcs11":
        return None
    module, uri = profile.get("ca", "pkcs11_module"), profile.get("ca", "pkcs11_uri")
    pin_env = profile.get("ca", "pkcs11_pin_env")
    pin = os.environ.get(pin_env) if pin_env else None
    if not module or not uri or not pin:
        raise UsageError(
            "ca.signing = pkcs11 needs ca.pkcs11_module, ca.pkcs11_uri and the PIN in the "
            "environment variable ca.pkcs11_pin_env names"
        )
    return HsmKey(module, uri, pin)


def _plans(
    profile: Profile,
    workers: int,
    material: CAMaterial,
    corpus: CorpusSpec | None,
    options: RunOptions,
    board: ReviewBoard | None,
    target: WireTarget | None,
    hsm: HsmKey | None = None,
    components: Components | None = None,
) -> list[ShardPlan]:
    devices = int(profile.get("load", "devices"))
    sample = options.artifacts_sample if options.artifacts else 0
    plans = []
    for index in range(workers):
        mine = tuple(range(index, devices, workers))
        if not mine:
            continue
        plans.append(
            ShardPlan(
                index=index,
                workers=workers,
                profile=profile,
                material=material,
                device_indices=mine,
                corpus=corpus,
                artifacts_sample=-(-sample // workers),
                review_board=board,
                target=target,
                hsm=hsm,
                components=components or Components(),
            )
        )
    return plans


def _parts(
    stack: contextlib.ExitStack, profile: Profile, material: CAMaterial, target: WireTarget | None
) -> tuple[Components, HsmKey | None]:
    """The real components and the HSM an embedded run asks for, stopped with `stack`."""
    if target is not None:
        return Components(), None
    parts = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="enrollbench-parts-")))
    components = stack.enter_context(components_for(profile, parts))
    hsm = user_token(profile)
    if profile.get("ca", "signing") == "softhsm":
        hsm = embedded_hsm(parts / "softhsm", material)
    return components, hsm


def embedded_hsm(folder: Path, material: CAMaterial) -> HsmKey:
    """A SoftHSM2 token in `folder` holding the issuing CA's key, for one run: the shards sign
    through it, each in its own session (SoftHSM2 runs inside the process)."""
    from bench.services.softhsm import create_token, import_key  # noqa: PLC0415 (HSM runs only)

    pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    token = create_token(folder, "enrollbench-ca", pin, so_pin)
    uri = import_key(token, load_private_key(material.issuing_key), "issuing-ca", b"\x01")
    return HsmKey(token.module, uri, pin)


class _Fleet:
    """The shard processes and the parent's end of their channels."""

    def __init__(self, plans: Sequence[ShardPlan], use_uvloop: bool, target: ShardTarget) -> None:
        context = multiprocessing.get_context("spawn")
        self.channels: dict[int, Connection] = {}
        self.processes: dict[int, BaseProcess] = {}
        self.devices = {plan.index: len(plan.device_indices) for plan in plans}
        self.peak_rss = 0
        self.rss_per_second: list[int] = []
        self._next_sample = 0.0
        for plan in plans:
            parent, child = context.Pipe()
            process = context.Process(
                target=target, args=(child, use_uvloop), name=f"shard-{plan.index}"
            )
            process.start()
            child.close()
            parent.send(plan)
            self.channels[plan.index] = parent
            self.processes[plan.index] = process

    def wait_ready(self) -> None:
        waiting = set(self.channels)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while waiting:
            if time.monotonic() > deadline:
                raise BenchError(f"shards {sorted(waiting)} were not ready in {READY_TIMEOUT_S} s")
            for index in list(waiting):
                channel = self.channels[index]
                if channel.poll(0.05):
                    message = channel.recv()
                    if message[0] == "ready":
                        waiting.discard(index)
                elif not self.processes[index].is_alive():
                    raise BenchError(f"shard {index} exited while starting up")

    def go(self, start_ns: int) -> None:
        for channel in self.channels.values():
            channel.send(("go", start_ns))

    def collect(
        self, progress: ProgressSink | None
    ) -> tuple[list[ShardResult], dict[int, int], bool]:
        results: dict[int, ShardResult] = {}
        snapshots: dict[int, dict[str, int]] = {}
        died: dict[int, int] = {}
        interrupted = False
        drain_deadline: float | None = None
        while len(results) + len(died) < len(self.channels):
            try:
                self._poll(results, snapshots, died, progress)
            except KeyboardInterrupt:
                interrupted = True  # the shards got the same SIGINT and are winding down
                drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S
            if drain_deadline is not None and time.monotonic() > drain_deadline:
                for index in set(self.channels) - set(results) - set(died):
                    self.processes[index].kill()
                    died[index] = snapshots.get(index, {}).get("started", self.devices[index])
        for process in self.processes.values():
            process.join(timeout=5)
        return [results[i] for i in sorted(results)], died, interrupted

    def _poll(
        self,
        results: dict[int, ShardResult],
        snapshots: dict[int, dict[str, int]],
        died: dict[int, int],
        progress: ProgressSink | None,
    ) -> None:
        open_channels = [c for i, c in self.channels.items() if i not in results and i not in died]
        ready = wait(open_channels, timeout=0.25)
        for index, channel in self.channels.items():
            if channel not in ready:
                continue
            try:
                message: tuple[Any, ...] = channel.recv()
            except (EOFError, OSError):
                died[index] = self._lost_devices(index, snapshots)
                continue
            if message[0] == "progress":
                snapshots[index] = message[2]
            elif message[0] == "result":
                results[index] = message[2]
        for index, process in self.processes.items():
            if index not in results and index not in died and not process.is_alive():
                if self.channels[index].poll(0):
                    continue  # its result is still in the pipe
                died[index] = self._lost_devices(index, snapshots)
        resident = self._resident_bytes()
        self.peak_rss = max(self.peak_rss, resident)
        if time.monotonic() >= self._next_sample:
            self.rss_per_second.append(resident)
            self._next_sample = time.monotonic() + 1.0
        if progress is not None:
            progress(snapshots)

    def _resident_bytes(self) -> int:
        """Resident memory of the parent and every live shard (Linux /proc; 0 elsewhere)."""
        pids = [os.getpid()] + [p.pid for p in self.processes.values() if p.is_alive() and p.pid]
        total = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, ValueError):
                continue
        return total

    def _lost_devices(self, index: int, snapshots: dict[int, dict[str, int]]) -> int:
        """A dead shard's devices all count as failed: the ones it started, or all it had."""
        return max(snapshots.get(index, {}).get("started", 0), self.devices[index])

    def stop(self) -> None:
        for process in self.processes.values():
            if process.is_alive():
                process.kill()
            process.join(timeout=5)


def execute(
    profile: Profile,
    workers: int,
    options: RunOptions,
    progress: ProgressSink | None,
    shard_entry: ShardTarget = shard_main,
) -> RunOutput:
    """Run a profile across `workers` shards and return what they measured.

    `shard_entry` is the shard process's entry point (tests pass one that dies on purpose).
    A served target is started before the shards and stopped after them.
    """
    began = time.perf_counter()
    target = resolve_target(profile)
    corpus = corpus_spec(profile)
    _prepare_corpus(corpus)
    material = ca_material(profile)
    corpus_s = time.perf_counter() - began
    with contextlib.ExitStack() as stack:
        served = None
        if profile.get("target", "url") == "served":
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="enrollbench-ca-"))
            served = ServedCA(profile, Path(folder) / "state")
            stack.callback(served.stop)
            target = served.start()
        if target is not None:
            probe(target)
        components, hsm = _parts(stack, profile, material, target)
        # One pool of administrators for the whole run, whatever the number of shards (a
        # wire target has its own).
        board = None
        if target is None and profile.get("approval", "mode") == "administrator":
            board = stack.enter_context(
                ReviewBoard.shared(profile.get("approval", "administrators"))
            )
        plans = _plans(profile, workers, material, corpus, options, board, target, hsm, components)
        fleet = _Fleet(plans, options.use_uvloop, shard_entry)
        try:
            fleet.wait_ready()
            startup_s = time.perf_counter() - began - corpus_s
            start_ns = time.perf_counter_ns() + int(START_DELAY_S * 1e9)
            started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            server_cpu = served.cpu_seconds() if served is not None else 0.0
            parts_cpu = servers_cpu(components)
            fleet.go(start_ns)
            shards, died, interrupted = fleet.collect(progress)
            if served is not None:
                server_cpu = served.cpu_seconds() - server_cpu
            parts_cpu = {k: v - parts_cpu.get(k, 0.0) for k, v in servers_cpu(components).items()}
        finally:
            fleet.stop()
        recorded = None if target is None else target.describe()
        server_steps = None
        if served is not None and recorded is not None:
            served.stop()
            recorded["server_workers"] = served.workers
            recorded["server_cpu_s"] = round(server_cpu, 3)
            recorded["generator_workers"] = workers
            _, histograms = gather(served.metrics_folder)
            server_steps = {label: h for (kind, label), h in histograms.items() if kind == "step"}
    timings = {"corpus_s": corpus_s, "startup_s": startup_s}
    return RunOutput(
        shards,
        died,
        timings,
        interrupted,
        material,
        fleet.peak_rss,
        fleet.rss_per_second,
        started_at,
        recorded,
        server_steps,
        served.components
        if served is not None
        else {
            **components.describe(),
            "ca_key": "softhsm (PKCS #11)" if hsm is not None else "memory",
            **{f"{name}_cpu_s": f"{cpu:.3f}" for name, cpu in parts_cpu.items()},
        },
    )


def write_artifacts(folder: Path, material: CAMaterial, shards: Sequence[ShardResult]) -> int:
    """The CA chain (a wire target's, as its devices fetched it) and the sampled certificates
    as PEM, for `openssl verify`."""
    fetched = next((shard.chain for shard in shards if shard.chain), ())
    chain = fetched or material.certificates
    certificates = [x509.load_der_x509_certificate(der) for der in chain]
    # the root first: GetCACert need not list it first (and lists an RA beside the CA)
    certificates.sort(key=lambda c: c.subject != c.issuer)
    (folder / "certs").mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (folder / "root.pem").write_bytes(certificates[0].public_bytes(pem))
    (folder / "chain.pem").write_bytes(b"".join(c.public_bytes(pem) for c in certificates[1:]))
    written = 0
    for shard in shards:
        for user_id, der in shard.samples:
            leaf = x509.load_der_x509_certificate(der)
            (folder / "certs" / f"{user_id}-{leaf.serial_number:032x}.pem").write_bytes(
                leaf.public_bytes(pem)
            )
            written += 1
    return written
