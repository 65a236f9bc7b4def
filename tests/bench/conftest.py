"""The command line as the tests run it, and result files made once per session by real runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "bench.cli"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`enrollbench ARGS` from the repository root, output captured, exit code not checked."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, check=False, cwd=ROOT, timeout=timeout
    )


def make_result(folder: Path, name: str, *extra: str) -> Path:
    path = folder / f"{name}.json"
    done = run_cli("run", "smoke", "--quiet", "--duration", "1.5", "--out", str(path), *extra)
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture(scope="session")
def two_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("results")
    return make_result(folder, "a"), make_result(folder, "b")
