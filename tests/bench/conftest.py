"""Result files made once per test session by real (short) runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def make_result(folder: Path, name: str, *extra: str) -> Path:
    path = folder / f"{name}.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.cli",
            "run",
            "smoke",
            "--quiet",
            "--duration",
            "1.5",
            "--out",
            str(path),
            *extra,
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
        timeout=300,
    )
    return path


@pytest.fixture(scope="session")
def two_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("results")
    return make_result(folder, "a"), make_result(folder, "b")
