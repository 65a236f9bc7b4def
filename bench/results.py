"""Result files: the schema version, atomic writing, reading with a schema check.

The format is documented in results/README.md; `bench.merge` builds run documents. Readers
(`compare`, `gate`, `report`, `export`) need only this module: they never touch the engine.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.errors import AccountingError, ResultError

SCHEMA_VERSION = 1


def check_accounting(result: Mapping[str, Any]) -> None:
    """Refuse a result whose outcomes do not add up to the devices started."""
    outcomes = result["outcomes"]
    if not outcomes["accounted"]:
        total = (
            outcomes["issued"]
            + sum(outcomes["rejected"].values())
            + sum(outcomes["failed"].values())
        )
        raise AccountingError(
            f"outcomes add up to {total} but {outcomes['started']} devices started"
        )


def check_writable(path: Path) -> None:
    """Fail before the run if the result cannot be written where asked."""
    folder = path.parent if path.parent != Path() else Path.cwd()
    if path.is_dir():
        raise ResultError(f"--out {path} is a directory")
    if not folder.is_dir():
        raise ResultError(f"--out {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ResultError(f"--out {path}: folder {folder} is not writable")


def write_result(path: Path, result: Mapping[str, Any]) -> None:
    """Write JSON atomically: a temporary file in the same folder, then a rename."""
    folder = path.parent if path.parent != Path() else Path.cwd()
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
            handle.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; results are for sharing
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_result(path: Path) -> dict[str, Any]:
    """Read a result file; refuse missing, corrupt or other-version files with a ResultError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultError(f"{path}: no such result file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(f"{path}: not a readable result file: {exc}") from exc
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ResultError(f"{path}: not an enrollbench result (no schema_version)")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ResultError(
            f"{path}: schema version {data['schema_version']}, this enrollbench reads "
            f"{SCHEMA_VERSION}"
        )
    return data
