"""The command line: results written, one-line errors with exit code 2, Ctrl-C handled."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.corpus import load_keys
from bench.results import SCHEMA_VERSION, read_result
from tests.bench.conftest import CLI, ROOT, run_cli


def test_run_writes_a_result_and_one_quiet_line(tmp_path: Path) -> None:
    """`run --quiet` prints one summary line and writes a versioned result."""
    out = tmp_path / "smoke.json"
    done = run_cli("run", "smoke", "--devices", "60", "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "60/60 issued" in done.stdout
    result = read_result(out)
    assert result["schema_version"] == SCHEMA_VERSION
    assert result["manifest"]["profile"] == "smoke"
    assert result["manifest"]["workers"] == 2


def test_result_has_no_private_keys_or_host_name(tmp_path: Path) -> None:
    """Neither a device key, a CA key nor the host name appears in the result file."""
    out = tmp_path / "smoke.json"
    assert run_cli("run", "smoke", "--devices", "20", "--quiet", "--out", str(out)).returncode == 0
    text = out.read_text()
    for der in load_keys("p256", 1, 20) + load_keys("p256", -1, 2):
        assert der.hex() not in text
        assert der[-40:].hex() not in text
    assert "PRIVATE" not in text
    readable = json.dumps({k: v for k, v in json.loads(text).items() if k != "histograms"})
    assert not re.search(rf"\b{re.escape(os.uname().nodename)}\b", readable)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "no-such-profile"], "no profile 'no-such-profile'"),
        (
            ["run", "smoke", "--set", "load.rat=5"],
            "unknown key 'load.rat' (did you mean 'load.rate'?)",
        ),
        (["run", "smoke", "--set", "load.devices=-3"], "load.devices = -3 is not allowed"),
        (["run", "smoke", "--rate", "5", "--concurrency", "3"], "not allowed with argument"),
        (["run", "smoke", "--out", "/nonexistent/dir/r.json"], "does not exist"),
        (["run", "smoke", "--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    """Each usage or input error is a single line on stderr and exit code 2, nothing written."""
    done = run_cli(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert "Traceback" not in done.stderr


def test_unwritable_out_is_refused_before_running(tmp_path: Path) -> None:
    """A read-only folder for --out fails fast with exit 2 (as root, a directory path)."""
    done = run_cli("run", "smoke", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "is a directory" in done.stderr


def test_invalid_profile_file_is_named(tmp_path: Path) -> None:
    """A profile that does not validate names its file and key."""
    bad = tmp_path / "bad.toml"
    bad.write_text('description = "x"\n[load]\nmode = "sideways"\n')
    done = run_cli("run", str(bad))
    assert done.returncode == 2
    assert str(bad) in done.stderr and "load.mode = 'sideways'" in done.stderr


def test_ctrl_c_writes_what_was_measured(tmp_path: Path) -> None:
    """SIGINT mid-run still writes a result, marked interrupted, and exits 130."""
    out = tmp_path / "interrupted.json"
    process = subprocess.Popen(
        [*CLI, "run", "smoke", "--duration", "60", "--quiet", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=ROOT,
    )
    time.sleep(6)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    result = json.loads(out.read_text())
    assert result["interrupted"] is True
    assert result["outcomes"]["accounted"]
    assert result["outcomes"]["issued"] > 0
