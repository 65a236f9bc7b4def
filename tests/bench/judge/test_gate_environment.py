"""The measured workload runs in the gate's own environment, and the verdict says which."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import cryptography
import pytest

from bench.errors import UsageError
from bench.judge import gate

ROOT = Path(__file__).resolve().parents[3]
FAKE_VALGRIND = """#!/bin/sh
# Stands in for valgrind: drops its own options, runs the command, reports a fixed count.
while [ "${1#--}" != "$1" ]; do shift; done
"$@"
status=$?
echo "==1== I refs:      1,000" >&2
exit $status
"""
REPORT = (
    "import json, sys; from pathlib import Path; from bench.judge import gate;"
    "_, measured = gate.measure_instructions(Path(sys.argv[1]));"
    "print(json.dumps([sys.prefix, measured.prefix, measured.cryptography, measured.engine]))"
)


def _bare_venv(folder: Path) -> Path:
    """A virtual environment from the base interpreter: no pip, no packages, no system site.

    It reaches this environment's packages only through a .pth file in its own site-packages,
    so whatever it imports comes through the venv, never from the base installation.
    """
    base = getattr(sys, "_base_executable", sys.executable)
    venv = folder / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(site, "gate_environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    return venv


def _fake_valgrind(folder: Path) -> Path:
    tools = folder / "tools"
    tools.mkdir()
    script = tools / "valgrind"
    script.write_text(FAKE_VALGRIND)
    script.chmod(0o755)
    return tools


def test_counted_command_runs_the_interpreter_as_invoked() -> None:
    """The counted command names sys.executable itself, never the base interpreter behind it."""
    command = gate.counted_command("valgrind", 10)
    assert command[4] == sys.executable
    assert command[5:] == [str(gate.DRIVER), "count", "10"]


def test_count_runs_in_a_virtual_environment_the_base_cannot_see(tmp_path: Path) -> None:
    """A gate running from a venv counts with that venv's packages (the old realpath ran the base
    interpreter: another sys.prefix, another cryptography or none)."""
    venv = _bare_venv(tmp_path)
    environment = {
        **os.environ,
        "PATH": f"{_fake_valgrind(tmp_path)}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    }
    environment.pop("VIRTUAL_ENV", None)
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", REPORT, str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        env=environment,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    gate_prefix, measured_prefix, measured_cryptography, engine = json.loads(done.stdout)
    assert Path(gate_prefix) == venv
    assert Path(measured_prefix) == venv
    assert measured_cryptography == cryptography.__version__
    assert Path(engine) == (ROOT / "engine").resolve()


def test_environment_of_another_interpreter_is_refused() -> None:
    """A measured process that reports another prefix or cryptography is an error, not a number."""
    line = {
        "python": "3.11.2",
        "prefix": "/usr",
        "cryptography": "38.0.4",
        "openssl": "OpenSSL 3.0.17",
        "engine": str((ROOT / "engine").resolve()),
        "der": "c",
    }
    with pytest.raises(UsageError, match="not in the gate's environment"):
        gate.read_environment(json.dumps(line), ROOT)
    here = {**line, "prefix": sys.prefix, "cryptography": cryptography.__version__}
    assert gate.read_environment(json.dumps(here), ROOT).describe().startswith("python 3.11.2")
    with pytest.raises(UsageError, match="not from"):
        gate.read_environment(json.dumps({**here, "engine": "/elsewhere/engine"}), ROOT)
    with pytest.raises(UsageError, match="did not report its environment"):
        gate.read_environment("Traceback (most recent call last):", ROOT)


def test_a_live_worker_is_pinned_and_reports_this_environment() -> None:
    """A/B workers run this interpreter on the one measuring CPU and say what they run with."""
    cpu = gate.measuring_cpu()
    if cpu is None:
        pytest.skip("this platform cannot pin processes")
    worker = gate._Worker(ROOT, cpu)
    try:
        measured = worker.environment
        assert os.sched_getaffinity(worker.process.pid) == {cpu}
        assert worker.block(2) > 0
    finally:
        worker.close()
    assert Path(measured.prefix) == Path(sys.prefix)
    assert measured.cryptography == cryptography.__version__
    assert Path(measured.engine) == (ROOT / "engine").resolve()


def test_a_tree_without_its_c_build_runs_its_own_python_path(tmp_path: Path) -> None:
    """A tree whose C DER module is not built never borrows the installed checkout's build
    (an editable install's finder would serve it): it runs, and reports, its Python path."""
    shutil.copytree(
        ROOT / "engine", tmp_path / "engine", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    worker = gate._Worker(tmp_path, None)
    try:
        measured = worker.environment
    finally:
        worker.close()
    assert measured.der == "python"
    assert Path(measured.engine) == (tmp_path / "engine").resolve()
