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

from bench.cli import check_outcomes
from bench.errors import AccountingError
from bench.results import SCHEMA_VERSION, read_result
from bench.run.corpus import load_keys
from tests.bench.conftest import CLI, ROOT, run_cli, synthetic_result


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
        (
            ["run", "p256-auto", "--duration", "0.5"],
            "load.warmup_seconds = 1.0 is not allowed: it must be below load.duration = 0.5",
        ),
        (
            ["run", "smoke", "--set", "link.latency={kind='uniform', mean=1, low=0, high=2}"],
            "link.latency = {'kind': 'uniform', 'mean': 1, 'low': 0, 'high': 2} is not allowed: "
            "uniform distribution takes no 'mean'",
        ),
        (["run", "smoke", "--set", "approval.delay=3"], "approval.delay = 3 is not allowed"),
        (["run", "smoke", "--artifacts", "/proc/enrollbench"], "--artifacts /proc/enrollbench"),
        (["run", "smoke", "--artifacts", "/dev/null"], "--artifacts /dev/null: cannot make"),
        (["run", "smoke", "--set", "expect.issued_fraction=2"], "expect.issued_fraction = 2"),
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


def test_expected_outcomes_pass() -> None:
    """All issued where all are expected, or 97% issued where 98% +- 2% are, is a good run."""
    check_outcomes(synthetic_result(issued=300))
    check_outcomes(synthetic_result(issued=97, rejected=3, issued_fraction=0.98, tolerance=0.02))


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (synthetic_result(issued=0, rejected=300), "0/300 issued (0.0%), the profile expects"),
        (
            synthetic_result(issued=90, rejected=10, issued_fraction=0.98, tolerance=0.02),
            "90/100 issued (90.0%), the profile expects at least 96.0%",
        ),
        (synthetic_result(issued=0), "0/0 issued"),
    ],
)
def test_fewer_issued_than_expected_is_an_accounting_error(
    result: dict[str, object], message: str
) -> None:
    """Fewer devices issued than the profile expects fails the run, saying how many and why."""
    with pytest.raises(AccountingError, match=re.escape(message)):
        check_outcomes(result)


def test_outcomes_that_do_not_add_up_fail() -> None:
    """A result whose outcomes miss devices fails even when the expectation is met."""
    result = synthetic_result(issued=100)
    result["outcomes"]["accounted"] = False
    result["outcomes"]["started"] = 101
    with pytest.raises(AccountingError, match="add up to 100 but 101"):
        check_outcomes(result)


def test_run_with_every_device_rejected_exits_1(tmp_path: Path) -> None:
    """A CA that accepts no device key type rejects all: result written, one line, exit 1."""
    out = tmp_path / "rejected.json"
    done = run_cli(
        "run", "smoke", "--devices", "40", "--quiet", "--out", str(out),
        "--set", "ca.allowed_keys=['p384']",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "0/40 issued (0.0%), the profile expects at least 100.0%" in done.stderr
    assert "40 unsupported-key" in done.stderr
    result = read_result(out)
    assert result["outcomes"]["rejected"] == {"unsupported-key": 40}
    assert result["outcomes"]["expected"]["met"] is False


def test_suite_runs_every_profile_then_exits_1_when_one_falls_short(tmp_path: Path) -> None:
    """A suite judges each result, writes them and index.json, then exits 1 naming the profile."""
    suite = tmp_path / "strict.toml"
    suite.write_text(
        'description = "x"\nprofiles = ["smoke"]\n'
        'overrides = ["ca.allowed_keys=[\'p384\']", "load.devices=20"]\n'
        '[rules]\nthroughput = "-5%"\n'
    )
    out = tmp_path / "out"
    done = run_cli("suite", str(suite), "--out", str(out), "--quiet")
    assert done.returncode == 1, done.stderr
    assert "enrollbench: error: smoke: 0/20 issued" in done.stderr
    assert (out / "smoke.json").exists() and (out / "index.json").exists()


def test_profiles_validate_refuses_a_warmup_as_long_as_the_run(tmp_path: Path) -> None:
    """`profiles validate` names the file and both keys, one line, exit 2."""
    path = tmp_path / "long-warmup.toml"
    path.write_text('description = "x"\n[load]\nduration = 3.0\nwarmup_seconds = 5.0\n')
    done = run_cli("profiles", "validate", str(path))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and str(path) in done.stderr
    assert "load.warmup_seconds = 5.0 is not allowed" in done.stderr


def test_live_profile_measures_device_steps_and_auto_marks_them_precomputed(tmp_path: Path) -> None:
    """p256-live measures steps 1, 5, 6; p256-auto marks 1 and 6 precomputed (5 still stores)."""
    device_steps = ("generate-key", "store-key-pair", "build-request")
    steps = {}
    for name in ("p256-live", "p256-auto"):
        out = tmp_path / f"{name}.json"
        done = run_cli(
            "run", name, "--devices", "40", "--duration", "0", "--quiet", "--out", str(out),
            "--set", "load.warmup_seconds=0",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        steps[name] = read_result(out)["latency"]["steps"]
    for step in device_steps:
        assert steps["p256-live"][step]["precomputed"] is False
        assert steps["p256-live"][step]["count"] == 40
    for step in ("generate-key", "build-request"):
        assert steps["p256-auto"][step] == {"precomputed": True}
