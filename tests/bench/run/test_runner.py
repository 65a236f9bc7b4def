"""Runs end to end: shards, outcomes, loads, artifacts, dead workers."""

from __future__ import annotations

import os
import subprocess
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from bench.profile import load_profile
from bench.results import check_accounting
from bench.run.merge import build_result
from bench.run.runner import RunOptions, execute, resolve_workers, write_artifacts
from bench.run.shard import ShardPlan, shard_main
from tests.bench.conftest import run_cli
from tests.conftest import require_tool, vector_key


def _run(overrides: list[str], workers: int = 2, **options: object) -> dict[str, Any]:
    profile = load_profile("smoke", overrides)
    output = execute(profile, workers, RunOptions(workers, **options), None)  # type: ignore[arg-type]
    return build_result(profile, workers, output)


def test_closed_loop_issues_every_device() -> None:
    """Every device of a closed-loop run is issued and accounted for, across two shards."""
    result = _run(["load.devices=120"])
    outcomes = result["outcomes"]
    assert outcomes == {
        "started": 120,
        "issued": 120,
        "rejected": {},
        "failed": {},
        "accounted": True,
        "expected": {
            "issued_fraction": 1.0,
            "tolerance": 0.0,
            "issued_share": 1.0,
            "met": True,
        },
    }
    check_accounting(result)
    assert result["latency"]["end_to_end"]["latency"]["count"] == 120
    steps = result["latency"]["steps"]
    assert steps["generate-key"] == steps["build-request"] == {"precomputed": True}
    assert steps["issue"]["count"] == 120 and not steps["issue"]["precomputed"]
    assert "step.generate-key" not in result["histograms"]


def test_open_loop_runs_for_its_duration() -> None:
    """An open-loop run at 200/s for 1 s starts about 200 devices and measures lag."""
    result = _run(
        ["load.mode='open'", "load.rate=200", "load.duration=1.0", "load.warmup_seconds=0.2"]
    )
    started = result["outcomes"]["started"]
    assert 190 <= started <= 210
    assert result["generator"]["timer_error"]["count"] > 0
    assert result["outcomes"]["accounted"]


def test_warmup_is_excluded_from_latency() -> None:
    """Enrollments intended during warm-up count as outcomes, not as latency samples."""
    result = _run(
        ["load.mode='open'", "load.rate=200", "load.duration=1.0", "load.warmup_seconds=0.5"]
    )
    measured = result["latency"]["end_to_end"]["latency"]["count"]
    assert 0 < measured < result["outcomes"]["issued"]


def test_live_device_crypto_works() -> None:
    """Devices that make their own keys and requests are issued too."""
    result = _run(["load.devices=40", "device.crypto='live'"])
    assert result["outcomes"]["issued"] == 40
    assert result["manifest"]["device_crypto"] == "live"


def test_administrator_rejections_are_accounted() -> None:
    """With a 50% approval rate, issued plus rejected equals started."""
    result = _run(
        [
            "load.devices=60",
            "approval.mode='administrator'",
            "approval.approval_rate=0.5",
            "approval.administrators=8",
            "approval.delay={kind='fixed', mean=0.01}",
        ]
    )
    outcomes = result["outcomes"]
    assert set(outcomes["rejected"]) == {"administrator-rejected"}
    assert outcomes["issued"] + outcomes["rejected"]["administrator-rejected"] == 60


class _Replay:
    """A channel whose first message was already read (the plan), then the real one."""

    def __init__(self, plan: ShardPlan, channel: Connection) -> None:
        self.plan, self.channel, self.first = plan, channel, True

    def recv(self) -> object:
        if self.first:
            self.first = False
            return self.plan
        return self.channel.recv()

    def send(self, message: object) -> None:
        self.channel.send(message)


def _dying_shard(channel: Connection, use_uvloop: bool) -> None:
    """Shard 1 dies right after the start signal; the others run normally."""
    plan: ShardPlan = channel.recv()
    if plan.index == 1:
        channel.send(("ready", plan.index))
        channel.recv()
        os._exit(3)
    shard_main(_Replay(plan, channel), use_uvloop)  # type: ignore[arg-type]


def test_dead_worker_counts_its_devices_as_failed() -> None:
    """A shard that dies leaves its devices failed as WorkerDied; the run still has a result."""
    profile = load_profile("smoke", ["load.devices=100"])
    output = execute(profile, 2, RunOptions(2), None, shard_entry=_dying_shard)
    result = build_result(profile, 2, output)
    outcomes = result["outcomes"]
    assert outcomes["failed"] == {"WorkerDied": 50}
    assert outcomes["issued"] == 50
    assert outcomes["accounted"]
    assert result["workers_died"] == {"1": 50}


def test_artifacts_verify_with_openssl(tmp_path: Path) -> None:
    """The written chain and a sample of certificates pass `openssl verify`."""
    openssl = require_tool("openssl")
    profile = load_profile("smoke", ["load.devices=30", "ca.intermediates=1"])
    output = execute(profile, 2, RunOptions(2, tmp_path, 6), None)
    written = write_artifacts(tmp_path, output.material, output.shards)
    certificates = sorted((tmp_path / "certs").glob("*.pem"))
    assert written == len(certificates) == 6
    verify = subprocess.run(
        [
            openssl,
            "verify",
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "chain.pem"),
            *map(str, certificates),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.count(": OK") == 6


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_counts_split_the_devices(workers: int) -> None:
    """One shard or three: the same devices, all issued."""
    result = _run(["load.devices=31"], workers=workers)
    assert result["outcomes"]["issued"] == 31
    assert result["manifest"]["workers"] == workers


def test_one_administrator_pool_whatever_the_workers() -> None:
    """Approval waits are the same with 1 and 2 shards: the run has one pool of administrators.

    2 administrators taking 20 ms each serve 100/s; 120/s arrive for 2 s, so the queue grows
    and a request waits ~n/600 s. Two pools of 2 (one per shard) would serve 200/s and never
    queue: the issue step would stay near 20 ms with 2 workers.
    """
    overrides = [
        "load.mode='open'",
        "load.rate=120",
        "load.duration=2.0",
        "load.warmup_seconds=0.0",
        "load.devices=400",
        "approval.mode='administrator'",
        "approval.administrators=2",
        "approval.approval_rate=1.0",
        "approval.delay={kind='fixed', mean=0.02}",
    ]
    one, two = (_run(overrides, workers)["latency"]["steps"]["issue"] for workers in (1, 2))
    assert one["p50_us"] > 100_000 and two["p50_us"] > 100_000
    assert two["p50_us"] == pytest.approx(one["p50_us"], rel=0.15)
    assert two["p90_us"] == pytest.approx(one["p90_us"], rel=0.15)


def test_closed_loop_never_has_more_shards_than_devices_in_flight() -> None:
    """Concurrency 1 over 2 requested shards runs 1 shard: a shard with nothing in flight
    would never enroll its share of the devices."""
    assert resolve_workers(load_profile("smoke", ["load.concurrency=1"]), 2) == 1
    assert resolve_workers(load_profile("smoke", ["load.concurrency=8"]), 2) == 2
    open_loop = load_profile("smoke", ["load.mode='open'", "load.concurrency=1"])
    assert resolve_workers(open_loop, 2) == 2


@pytest.mark.server
def test_softhsm_signed_certificates_verify(tmp_path: Path) -> None:
    """ca.signing = softhsm: the shards sign in a SoftHSM2 token made for the run, and the
    certificates verify against the chain with openssl."""
    require_tool("softhsm2-util")
    openssl = require_tool("openssl")
    profile = load_profile("smoke", ["load.devices=40", "ca.signing='softhsm'"])
    output = execute(profile, 2, RunOptions(2, tmp_path, 10), None)
    assert sum(shard.outcomes.get("issued", 0) for shard in output.shards) == 40
    written = write_artifacts(tmp_path, output.material, output.shards)
    certificates = sorted(str(p) for p in (tmp_path / "certs").glob("*.pem"))
    assert written == len(certificates) == 10
    verified = subprocess.run(
        [openssl, "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
         str(tmp_path / "chain.pem"), *certificates],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.server
def test_a_users_pkcs11_token_signs(tmp_path: Path) -> None:
    """ca.signing = pkcs11: the issuing certificate is made for the key in the user's token
    (module, RFC 7512 URI, PIN from the environment), the shards sign there, and the
    certificates verify; without the PIN the run is a one-line usage error."""
    require_tool("softhsm2-util")
    openssl = require_tool("openssl")
    from bench.services.softhsm import create_token, import_key  # noqa: PLC0415

    token = create_token(tmp_path / "token", "users-token", "4321", "87654321")
    uri = import_key(token, vector_key("p256-3"), "my-issuing-ca", b"\x07")
    settings = [
        "ca.signing='pkcs11'", f"ca.pkcs11_module='{token.module}'", f"ca.pkcs11_uri='{uri}'",
        "ca.pkcs11_pin_env='TOKEN_PIN'",
    ]  # fmt: skip
    missing = run_cli("run", "smoke", "--quiet", *(f"--set={s}" for s in settings))
    assert missing.returncode == 2
    assert "ca.pkcs11_pin_env" in missing.stderr.strip()
    os.environ["TOKEN_PIN"] = "4321"
    try:
        profile = load_profile("smoke", ["load.devices=30", *settings])
        output = execute(profile, 2, RunOptions(2, tmp_path, 5), None)
    finally:
        del os.environ["TOKEN_PIN"]
    assert sum(shard.outcomes.get("issued", 0) for shard in output.shards) == 30
    issuing = x509.load_der_x509_certificate(output.material.certificates[-1])
    assert issuing.public_key() == vector_key("p256-3").public_key()
    assert output.material.issuing_key == b""
    write_artifacts(tmp_path, output.material, output.shards)
    certificates = sorted(str(p) for p in (tmp_path / "certs").glob("*.pem"))
    verified = subprocess.run(
        [openssl, "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
         str(tmp_path / "chain.pem"), *certificates],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count(": OK") == len(certificates) > 0
