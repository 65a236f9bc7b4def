"""Wire targets: URL parsing, refusals before a run, served and remote runs end to end, faults."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from bench.errors import UsageError
from bench.microbench.versus_micromdm import CHALLENGE_ENV, micromdm
from bench.profile import load_profile
from bench.run.targets import check_target, is_loopback, parse_target
from tests.bench.conftest import run_cli
from tests.conftest import require_tool

ENROLLBENCH = Path(sys.executable).parent / "enrollbench"


def test_parse_target_reads_scheme_host_port_and_path() -> None:
    """An EST URL gives protocol, TLS, host, port and path; defaults fill the rest."""
    target = parse_target("est+https://127.0.0.1:8443/.well-known/est/arbitrary")
    assert (target.protocol, target.tls, target.host, target.port, target.path) == (
        "est",
        True,
        "127.0.0.1",
        8443,
        "/.well-known/est/arbitrary",
    )
    scep = parse_target("scep+http://localhost:8080")
    assert (scep.protocol, scep.tls, scep.port, scep.path) == ("scep", False, 8080, "/scep")
    assert parse_target("est+http://[::1]:80/x").host == "::1"


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/est", "scep+https://127.0.0.1/scep", "est+ftp://x", "est+http://"]
)
def test_parse_target_refuses_what_is_not_a_target(url: str) -> None:
    """A URL without a known protocol and transport, or without a host, is a usage error."""
    with pytest.raises(UsageError):
        parse_target(url)


def test_loopback_is_recognised() -> None:
    """127.0.0.0/8, ::1 and localhost are loopback; other hosts are not."""
    assert is_loopback("127.0.0.2")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("10.0.0.1")
    assert not is_loopback("ca.example.com")


def test_scep_with_ec_devices_is_refused() -> None:
    """SCEP replies are enveloped to the device key: EC devices are refused with the fix."""
    profile = load_profile("smoke", [])
    with pytest.raises(UsageError, match="SCEP devices need RSA keys"):
        check_target(profile, parse_target("scep+http://127.0.0.1:1/scep"))


def test_remote_target_needs_opt_in_and_stays_under_caps() -> None:
    """Beyond loopback: refused without allow_remote, and over the rate or device caps."""
    remote = parse_target("est+https://ca.example.com/.well-known/est")
    with pytest.raises(UsageError, match="allow-remote"):
        check_target(load_profile("smoke", []), remote)
    allowed = ["target.allow_remote=true", "load.concurrency=4", "load.devices=100"]
    check_target(load_profile("smoke", allowed), remote)
    with pytest.raises(UsageError, match="max_rate"):
        check_target(load_profile("smoke", [*allowed, "load.concurrency=64"]), remote)
    with pytest.raises(UsageError, match="max_devices"):
        check_target(load_profile("smoke", [*allowed, "load.devices=5000"]), remote)


def test_target_that_does_not_answer_is_one_line(tmp_path: Path) -> None:
    """A refused port: exit 2, one line naming the target, no result file."""
    out = tmp_path / "r.json"
    done = run_cli(
        "run", "smoke", "--quiet", "--target", "est+http://127.0.0.1:9/.well-known/est",
        "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "est+http://127.0.0.1:9/.well-known/est does not answer" in lines[0]
    assert not out.exists()


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "result.json"
    done = run_cli("run", "smoke", "--quiet", "--out", str(out), *args, timeout=600)
    assert done.returncode == 0, done.stderr
    return done, json.loads(out.read_text())


@pytest.mark.parametrize(
    ("protocol", "extra"),
    [
        ("est+http", []),
        ("est+https", []),
        ("scep+http", ["--set", "device.key='rsa2048'"]),
    ],
)
def test_served_run_issues_every_device(tmp_path: Path, protocol: str, extra: list[str]) -> None:
    """A served CA issues all devices; the result records the target, where each step was
    measured, the server's own step times, and one serial per certificate."""
    _, result = _run(
        tmp_path,
        "--target", "served", "--devices", "60",
        "--set", f"target.served_protocol='{protocol}'", *extra,
    )  # fmt: skip
    assert result["outcomes"]["issued"] == result["outcomes"]["started"] == 60
    target = result["manifest"]["target"]
    assert (target["kind"], target["protocol"], target["tls"]) == (
        "served",
        protocol.split("+", maxsplit=1)[0],
        protocol.endswith("https"),
    )
    assert target["server_workers"] >= 1
    places = result["latency"]["step_places"]
    assert places["authenticate"] == "round-trip"
    assert places["send-request"] == "client"
    assert places["generate-key"] == "precomputed"
    assert "authenticate" not in result["latency"]["steps"]
    server = result["latency"]["server_steps"]
    assert server["issue"]["count"] == 60
    serials = (tmp_path / "result.serials").read_text().split()
    assert len(set(serials)) == 60
    assert result["generator"]["client_cpu_us_per_enrollment"] > 0
    # keep-alive: the pool's connections are reused (16 in flight, 60 enrollments)
    assert result["generator"]["client_phases"]["connections_per_enrollment"] < 1


def test_per_device_connections_open_one_tls_connection_each(tmp_path: Path) -> None:
    """A fleet: a new TLS connection per request, its handshake timed apart from connect."""
    _, result = _run(
        tmp_path,
        "--target", "served", "--devices", "30",
        "--set", "target.connection='per-device'",
    )  # fmt: skip
    assert result["outcomes"]["issued"] == 30
    phases = result["generator"]["client_phases"]
    assert phases["connections_per_enrollment"] >= 1
    assert phases["tls_us_per_enrollment"] > 0
    assert phases["connect_us_per_enrollment"] > 0


@pytest.fixture
def served_est(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`enrollbench serve smoke` on loopback (plain HTTP EST, two workers), stopped after."""
    state = tmp_path / "state"
    server = subprocess.Popen(
        [str(ENROLLBENCH), "serve", "smoke", "--listen", "127.0.0.1:0", "--scep-listen", "off",
         "--plain-http", "--workers", "2", "--state", str(state)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (state / "serve.json").exists():
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield {**json.loads((state / "serve.json").read_text()), "process": server}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        if server.stderr is not None:
            server.stderr.close()


def test_run_against_a_url_verifies_with_the_servers_chain(
    tmp_path: Path, served_est: dict[str, Any]
) -> None:
    """`--target est+http://...` against a running server: all issued, and the serials the
    run wrote are the certificates the server published."""
    url = "est+" + served_est["est"]
    _, result = _run(tmp_path, "--target", url, "--devices", "40")
    assert result["outcomes"]["issued"] == 40
    assert result["manifest"]["target"] == {
        "url": url,
        "kind": "remote",
        "protocol": "est",
        "tls": False,
        "loopback": True,
    }
    serials = {int(s, 16) for s in (tmp_path / "result.serials").read_text().split()}
    store = Path(served_est["ca_chain"]).parent.parent / "store.sqlite"
    with sqlite3.connect(store) as connection:
        published = connection.execute("SELECT certificate FROM published").fetchall()
    found = {x509.load_der_x509_certificate(row[0]).serial_number for row in published}
    assert serials <= found


def test_target_dying_mid_run_ends_devices_failed_with_a_type(
    tmp_path: Path, served_est: dict[str, Any]
) -> None:
    """Killing the server mid-run: the run goes on, accounts every device and writes its
    result; the devices caught end failed with a wire error type."""
    out = tmp_path / "result.json"
    run = subprocess.Popen(
        [str(ENROLLBENCH), "run", "smoke", "--quiet", "--duration", "3", "--out", str(out),
         "--target", "est+" + served_est["est"], "--set", "target.timeout=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(2.0)
    os.killpg(served_est["process"].pid, signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=120)
    assert out.exists(), stderr
    result = json.loads(out.read_text())
    outcomes = result["outcomes"]
    failed = outcomes["failed"]
    assert sum(failed.values()) > 0, (stdout, stderr)
    wire_errors = {"TargetUnavailableError", "ConnectionLostError", "TargetTimeoutError"}
    assert set(failed) <= wire_errors, failed
    assert (
        outcomes["issued"] + sum(failed.values()) + sum(outcomes["rejected"].values())
        == outcomes["started"]
    )
    assert run.returncode == 1  # the profile expected every device issued


@pytest.fixture
def scepserver(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """micromdm's scepserver 2.1.0 on a fresh depot (127.0.0.1 only), its challenge in the
    environment variable the benchmark uses."""
    require_tool("scepserver")
    with micromdm(tmp_path) as url:
        yield url, tmp_path / "depot" / "ca.pem"


@pytest.mark.server
def test_run_against_micromdm_scepserver(tmp_path: Path, scepserver: tuple[str, Path]) -> None:
    """`enrollbench run --target scep+http://...` against micromdm: one request in flight,
    every device issued once, every certificate verifying against scepserver's own CA."""
    url, ca = scepserver
    artifacts = tmp_path / "artifacts"
    out = tmp_path / "result.json"
    done = subprocess.run(
        [str(ENROLLBENCH), "run", "smoke", "--quiet", "--out", str(out), "--target", url,
         "--concurrency", "1", "--devices", "12", "--artifacts", str(artifacts),
         "--set", "device.key='rsa2048'", "--set", f"target.challenge_env='{CHALLENGE_ENV}'"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert os.environ[CHALLENGE_ENV] not in done.stdout + done.stderr + out.read_text()
    result = json.loads(out.read_text())
    assert result["outcomes"]["issued"] == result["outcomes"]["started"] == 12
    certificates = sorted((artifacts / "certs").glob("*.pem"))
    assert len(certificates) == 12
    openssl = require_tool("openssl")
    verified = subprocess.run(
        [openssl, "verify", "-CAfile", str(ca), *map(str, certificates)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count(": OK") == 12
