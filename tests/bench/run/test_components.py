"""Real components in an embedded run: OpenLDAP, PostgreSQL, a SoftHSM2-held CA key; faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.services.postgres import start_postgres
from bench.services.slapd import Slapd, SlapdConfig
from engine.population import simulated_enrollee
from tests.bench.conftest import run_cli
from tests.conftest import require_tool

ENROLLBENCH = Path(sys.executable).parent / "enrollbench"


@pytest.mark.server
@pytest.mark.parametrize(
    ("profile", "tools", "expected"),
    [
        ("p256-ldap", ["slapd"], {"directory": "ldap ldap://127.0.0.1:"}),
        ("p256-postgres", ["pg_ctlcluster"], {"database": "postgresql 127.0.0.1:"}),
        (
            "seed-enterprise",
            ["slapd", "pg_ctlcluster", "softhsm2-util"],
            {"directory": "ldap", "database": "postgresql", "ca_key": "softhsm"},
        ),
    ],
)
def test_profiles_with_real_components_issue_every_device(
    tmp_path: Path, profile: str, tools: list[str], expected: dict[str, str]
) -> None:
    """Each shipped profile with real parts starts them, issues every device, records them."""
    for tool in tools:  # pg_ctlcluster stands for Debian's postgresql package
        require_tool(tool)
    out = tmp_path / "r.json"
    done = run_cli("run", profile, "--quiet", "--duration", "2", "--devices", "300",
                   "--out", str(out), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["outcomes"]["issued"] == result["outcomes"]["started"] > 0
    components = result["manifest"]["components"]
    for key, start in expected.items():
        assert components[key].startswith(start), components


@pytest.mark.server
def test_postgresql_down_at_start_is_one_line(tmp_path: Path) -> None:
    """A database that does not answer: exit 2, one line naming it, no password in it."""
    done = run_cli(
        "run", "smoke", "--quiet", "--out", str(tmp_path / "r.json"),
        "--set", "components.database='postgresql'",
        "--set", "components.postgresql_url='postgresql://enrollbench@127.0.0.1:9/enrollbench'",
        "--set", "components.postgresql_password_env='PG_SECRET'",
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "127.0.0.1:9/enrollbench" in lines[0]


@pytest.mark.server
def test_postgresql_stopped_mid_run_fails_devices_with_a_type(tmp_path: Path) -> None:
    """PostgreSQL stopped in the middle of a run, then started again: the devices caught end
    failed with DatabaseUnavailableError, the run reconnects and issues again (the per-second
    series shows the dip), accounts for every device and writes its result."""
    require_tool("pg_ctlcluster")
    server = start_postgres()
    try:
        user, _, rest = server.dsn.removeprefix("postgresql://").partition("@")
        name, _, password = user.partition(":")
        out = tmp_path / "r.json"
        run = subprocess.Popen(
            [str(ENROLLBENCH), "run", "smoke", "--quiet", "--duration", "9", "--out", str(out),
             "--set", "components.database='postgresql'",
             "--set", f"components.postgresql_url='postgresql://{name}@{rest}'",
             "--set", "components.postgresql_password_env='PG_SECRET'"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PG_SECRET": password},
        )  # fmt: skip
        time.sleep(2.5)
        server.halt()
        time.sleep(2.5)  # over two whole seconds: one of them has next to nothing issued
        server.resume()
        stdout, stderr = run.communicate(timeout=180)
    finally:
        server.stop()
    assert out.exists(), stderr
    text = out.read_text()
    assert password not in text + stdout + stderr
    result = json.loads(text)
    outcomes = result["outcomes"]
    assert outcomes["failed"].get("DatabaseUnavailableError", 0) > 0, outcomes
    assert outcomes["accounted"]
    issued = result["throughput"]["series"]["issued"][1:-1]  # whole seconds of load
    dip = issued.index(min(issued))
    assert issued[dip] < 0.3 * max(issued), issued  # the outage shows
    assert max(issued[dip + 1 :], default=0) > 0.5 * max(issued), issued  # and it recovered


@pytest.mark.server
def test_slapd_stopped_mid_run_fails_devices_with_a_type(tmp_path: Path) -> None:
    """slapd stopped in the middle of a run: the devices caught end failed with
    DirectoryUnavailableError; the run accounts for every device and writes its result."""
    require_tool("slapd")
    password = "directory-admin-secret"
    slapd = Slapd(SlapdConfig(tmp_path / "slapd", password))
    (tmp_path / "slapd").mkdir()
    slapd.configure(simulated_enrollee(i, 1) for i in range(300))
    slapd.start()
    try:
        out = tmp_path / "r.json"
        run = subprocess.Popen(
            [str(ENROLLBENCH), "run", "smoke", "--quiet", "--duration", "4", "--out", str(out),
             "--set", "components.directory='ldap'",
             "--set", f"components.ldap_url='{slapd.url}'",
             "--set", "components.ldap_password_env='LDAP_SECRET'"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "LDAP_SECRET": password},
        )  # fmt: skip
        time.sleep(2.5)
        slapd.stop()
        stdout, stderr = run.communicate(timeout=180)
    finally:
        slapd.stop()
    assert out.exists(), stderr
    text = out.read_text()
    assert password not in text + stdout + stderr
    outcomes = json.loads(text)["outcomes"]
    assert outcomes["failed"].get("DirectoryUnavailableError", 0) > 0, outcomes
    assert outcomes["accounted"]
