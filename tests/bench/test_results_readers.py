"""Bad input is exit 2 in every reader: one line naming the file and the field, no traceback."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.errors import ResultError
from bench.judge import report
from bench.judge.compare import compare_pair, unsteady
from bench.judge.export import to_pytest_benchmark
from bench.results import read_result
from tests.bench.conftest import measured_result, run_cli

VALID = measured_result(seed=5, count=300)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in a JSON document (list items by index)."""
    children: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        children = list(node.items())
    elif isinstance(node, list):
        children = list(enumerate(node))
    paths = []
    for key, child in children:
        paths.append((*prefix, key))
        paths += _paths(child, (*prefix, key))
    return paths


PATHS = _paths(VALID)
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _mutated(path: tuple[Any, ...], value: Any, drop: bool) -> dict[str, Any]:
    document = copy.deepcopy(VALID)
    node: Any = document
    for key in path[:-1]:
        node = node[key]
    if drop and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return document


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sampled_from(PATHS), JSON_VALUES, st.booleans())
def test_any_mutation_is_refused_or_read_by_every_reader(
    tmp_path: Path, path: tuple[Any, ...], value: Any, drop: bool
) -> None:
    """Changing or dropping any field anywhere: a ResultError, or compare, export and the HTML
    report all work on the file; never another exception."""
    source = tmp_path / "r.json"
    source.write_text(json.dumps(_mutated(path, value, drop)))
    try:
        result = read_result(source)
    except ResultError as exc:
        message = str(exc)
    else:
        message = ""
        compare_pair(VALID, result)
        compare_pair(result, VALID)
        unsteady(result)
        json.dumps(to_pytest_benchmark(result))
        report.write_html(result, {}, tmp_path / "r.html")
    assert not message or (message.startswith(f"{source}: ") and "\n" not in message)


def _broken(tmp_path: Path) -> Path:
    document = copy.deepcopy(VALID)
    del document["manifest"]["started_at"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(document))
    return path


def _good(tmp_path: Path) -> Path:
    path = tmp_path / "good.json"
    path.write_text(json.dumps(VALID))
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["compare", "{good}", "{broken}"],
        ["compare", "{good}", "--vs", "{broken}"],
        ["report", "{broken}", "--html", "{out}"],
        ["export", "{broken}", "--out", "{out}"],
        ["gate", "--layers", "stored", "--stored", "{good}", "--result", "{broken}"],
    ],
)
def test_every_reader_exits_2_naming_file_and_field(tmp_path: Path, command: list[str]) -> None:
    """compare, report, export and gate: exit 2 and one line naming the file and the field."""
    names = {"good": _good(tmp_path), "broken": _broken(tmp_path), "out": tmp_path / "out"}
    done = run_cli(*(part.format(**names) for part in command))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"{names['broken']}: field manifest.started_at: missing" in done.stderr


def test_old_schema_versions_are_exit_2(tmp_path: Path) -> None:
    """A schema-1 file says which version it is and which this enrollbench reads."""
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**VALID, "schema_version": 1}))
    done = run_cli("export", str(old), "--out", str(tmp_path / "out.json"))
    assert done.returncode == 2
    assert "schema version 1, this enrollbench reads 2" in done.stderr


def test_unaccounted_outcomes_do_not_fail_a_reader(tmp_path: Path) -> None:
    """Exit 1 is for a run whose outcomes do not add up, never for reading such a result."""
    document = copy.deepcopy(VALID)
    document["outcomes"]["accounted"] = False
    path = tmp_path / "unaccounted.json"
    path.write_text(json.dumps(document))
    done = run_cli("compare", str(_good(tmp_path)), str(path))
    assert done.returncode == 0, done.stderr
