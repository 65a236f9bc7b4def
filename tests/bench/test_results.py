"""Result files: atomic writes, schema checks, accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.errors import AccountingError, ResultError
from bench.results import (
    SCHEMA_VERSION,
    check_accounting,
    check_writable,
    read_result,
    write_result,
)


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    """A written result reads back equal; no temporary file is left behind."""
    path = tmp_path / "r.json"
    document = {"schema_version": SCHEMA_VERSION, "kind": "run", "x": [1, 2]}
    write_result(path, document)
    assert read_result(path) == document
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    """A document that cannot be serialized does not replace or half-write the old result."""
    path = tmp_path / "r.json"
    write_result(path, {"schema_version": SCHEMA_VERSION})
    with pytest.raises(TypeError):
        write_result(path, {"schema_version": SCHEMA_VERSION, "bad": object()})
    assert read_result(path) == {"schema_version": SCHEMA_VERSION}
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such result file"),
        ("{not json", "not a readable result file"),
        ('["a list"]', "no schema_version"),
        ('{"schema_version": 999}', "schema version 999"),
    ],
)
def test_bad_result_files_raise(tmp_path: Path, content: str | None, message: str) -> None:
    """Missing, corrupt, foreign and other-version files raise ResultError naming the problem."""
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ResultError, match=message):
        read_result(path)


def test_unaccounted_devices_are_an_error() -> None:
    """Outcomes that do not add up to the devices started raise AccountingError."""
    outcomes = {
        "started": 10,
        "issued": 8,
        "rejected": {"weak-key": 1},
        "failed": {},
        "accounted": False,
    }
    with pytest.raises(AccountingError, match="add up to 9 but 10"):
        check_accounting({"outcomes": outcomes})


def test_writable_checks(tmp_path: Path) -> None:
    """A missing folder or a directory as --out is refused before anything runs."""
    with pytest.raises(ResultError, match="does not exist"):
        check_writable(tmp_path / "missing" / "r.json")
    with pytest.raises(ResultError, match="is a directory"):
        check_writable(tmp_path)
    check_writable(tmp_path / "fine.json")


def test_result_is_json_with_sorted_outcomes(tmp_path: Path) -> None:
    """Results are plain JSON documents."""
    path = tmp_path / "r.json"
    write_result(path, {"schema_version": SCHEMA_VERSION, "outcomes": {"b": 1, "a": 2}})
    assert json.loads(path.read_text())["outcomes"] == {"b": 1, "a": 2}
