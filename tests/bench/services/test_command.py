"""`enrollbench services up|status|down`, and a run pointed at the services it started."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool

ENROLLBENCH = Path(sys.executable).parent / "enrollbench"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENROLLBENCH), *args], capture_output=True, text=True, check=False, timeout=300,
        env=env,
    )  # fmt: skip


@pytest.mark.server
def test_up_status_a_run_against_them_and_down(tmp_path: Path) -> None:
    """up starts slapd, PostgreSQL and a token (secrets in 0600 files, never printed); a run
    points at them by URL with passwords from the environment; down stops them."""
    for tool in ("slapd", "pg_ctlcluster", "softhsm2-util"):
        require_tool(tool)
    state = tmp_path / "services"
    up = _cli("services", "up", "--state", str(state), "--devices", "300")
    try:
        assert up.returncode == 0, up.stderr
        started = json.loads((state / "services.json").read_text())
        assert set(started) == {"ldap", "postgresql", "softhsm"}
        for service in started.values():
            secret = Path(service["secret_file"])
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
            assert secret.read_text().strip() not in up.stdout + up.stderr
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        status = _cli("services", "status", "--state", str(state))
        assert status.returncode == 0, status.stdout
        assert status.stdout.count(" up ") == 3
        env = {
            **os.environ,
            "LDAP_SECRET": Path(started["ldap"]["secret_file"]).read_text().strip(),
            "PG_SECRET": Path(started["postgresql"]["secret_file"]).read_text().strip(),
        }
        out = tmp_path / "r.json"
        run = _cli(
            "run", "smoke", "--quiet", "--devices", "300", "--out", str(out),
            "--set", "components.directory='ldap'",
            "--set", f"components.ldap_url='{started['ldap']['url']}'",
            "--set", "components.ldap_password_env='LDAP_SECRET'",
            "--set", "components.database='postgresql'",
            "--set", f"components.postgresql_url='{started['postgresql']['url']}'",
            "--set", "components.postgresql_password_env='PG_SECRET'",
            env=env,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        outcomes = json.loads(out.read_text())["outcomes"]
        assert outcomes["issued"] == outcomes["started"] == 300
    finally:
        down = _cli("services", "down", "--state", str(state))
    assert down.returncode == 0, down.stderr
    assert not (state / "services.json").exists()
    assert _cli("services", "status", "--state", str(state)).returncode == 1
