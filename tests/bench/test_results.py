"""Result files: atomic writes, the schema check at the edge, accounting."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.errors import AccountingError, ResultError
from bench.results import (
    SCHEMA_VERSION,
    check_accounting,
    check_writable,
    read_result,
    validate_result,
    write_result,
)
from tests.bench.conftest import measured_result

VALID = measured_result(seed=3, count=300)

# Every field a reader relies on (results/README.md), with the JSON kinds it accepts.
REQUIRED: dict[str, tuple[str, ...]] = {
    "kind": ("string",),
    "interrupted": ("boolean",),
    "manifest": ("object",),
    "manifest.profile": ("string",),
    "manifest.profile_as_run": ("object",),
    "manifest.profile_as_run.load": ("object",),
    "manifest.profile_as_run.load.warmup_seconds": ("integer", "number"),
    "manifest.profile_sha256": ("string",),
    "manifest.seed": ("integer",),
    "manifest.git_commit": ("string", "null"),
    "manifest.git_dirty": ("boolean", "null"),
    "manifest.started_at": ("string",),
    "manifest.python": ("string",),
    "manifest.python_implementation": ("string",),
    "manifest.cryptography": ("string",),
    "manifest.openssl": ("string",),
    "manifest.cpu_model": ("string",),
    "manifest.cpu_count": ("integer", "null"),
    "manifest.workers": ("integer",),
    "outcomes": ("object",),
    "outcomes.started": ("integer",),
    "outcomes.issued": ("integer",),
    "outcomes.rejected": ("object",),
    "outcomes.failed": ("object",),
    "outcomes.accounted": ("boolean",),
    "outcomes.expected": ("object",),
    "outcomes.expected.issued_fraction": ("integer", "number"),
    "outcomes.expected.tolerance": ("integer", "number"),
    "outcomes.expected.issued_share": ("integer", "number"),
    "outcomes.expected.met": ("boolean",),
    "throughput": ("object",),
    "throughput.enrollments_per_s": ("integer", "number"),
    "throughput.issued_per_s": ("integer", "number"),
    "throughput.series": ("object",),
    "throughput.series.second": ("list",),
    "throughput.series.completed": ("list",),
    "throughput.series.issued": ("list",),
    "throughput.series.approvals_pending": ("list",),
    "latency": ("object",),
    "latency.end_to_end": ("object",),
    "latency.end_to_end.latency": ("object",),
    "latency.end_to_end.latency.p99_us": ("integer", "number"),
    "latency.end_to_end.service": ("object",),
    "latency.steps": ("object",),
    "latency.steps.issue": ("object",),
    "latency.steps.issue.precomputed": ("boolean",),
    "latency.steps.issue.count": ("integer",),
    "latency.steps.issue.p50_us": ("integer", "number"),
    "generator": ("object",),
    "generator.generator_bound": ("boolean",),
    "generator.reasons": ("list",),
    "histograms": ("object",),
    "histograms.end_to_end.latency": ("string",),
    "histograms.step.issue": ("string",),
}
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "list", dict: "object", type(None): "null"}[type(value)]


def _split(path: str) -> tuple[list[str], str]:
    """Dotted path -> (parent keys, key); histogram names contain dots themselves."""
    if path.startswith("histograms."):
        return ["histograms"], path.removeprefix("histograms.")
    *parents, key = path.split(".")
    return parents, key


def _parent(document: dict[str, Any], parents: list[str]) -> dict[str, Any]:
    node = document
    for key in parents:
        node = node[key]
    return node


def _written(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(document))
    return path


def _rejects(tmp_path: Path, document: Any, field: str) -> str:
    """read_result raises ResultError naming the file and the field, in one line."""
    path = _written(tmp_path, document)
    with pytest.raises(ResultError) as caught:
        read_result(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: field {field}") and "\n" not in message
    return message


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    """A written result reads back equal; no temporary file is left behind."""
    path = tmp_path / "r.json"
    write_result(path, VALID)
    assert read_result(path) == VALID
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    """A document that cannot be serialized does not replace or half-write the old result."""
    path = tmp_path / "r.json"
    write_result(path, VALID)
    with pytest.raises(TypeError):
        write_result(path, {**VALID, "bad": object()})
    assert read_result(path) == VALID
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such result file"),
        ("{not json", "not a readable result file"),
        ('["a list"]', "no schema_version"),
        ('{"schema_version": 999}', "schema version 999"),
        ('{"schema_version": 1, "kind": "run"}', "schema version 1, this enrollbench reads 2"),
        ('{"schema_version": 2}', "field kind"),
        ('{"schema_version": 2, "kind": "picture"}', "field kind: expected one of run"),
        ("[" * 100_000, "not a readable result file"),
    ],
)
def test_bad_result_files_raise(tmp_path: Path, content: str | None, message: str) -> None:
    """Missing, corrupt, foreign, old and kindless files raise ResultError naming the problem."""
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ResultError, match=message):
        read_result(path)


def test_the_schema_version_is_2() -> None:
    """Schema 2 (git_dirty, started_at, expected outcomes, precomputed steps) is what is read."""
    assert SCHEMA_VERSION == 2


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(set(REQUIRED) - {"latency.steps.issue"})))
def test_a_missing_field_is_named(tmp_path: Path, field: str) -> None:
    """Dropping any field readers rely on gives one ResultError naming that field.

    (A step may be absent: a run that never reached it has no row for it.)
    """
    document = copy.deepcopy(VALID)
    parents, key = _split(field)
    del _parent(document, parents)[key]
    assert _rejects(tmp_path, document, field).endswith("missing")


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(REQUIRED)), JSON_VALUES)
def test_a_field_of_the_wrong_type_is_named(tmp_path: Path, field: str, value: Any) -> None:
    """A field holding another JSON type gives one ResultError naming that field."""
    if _kind(value) in REQUIRED[field] or (
        _kind(value) == "integer" and "number" in REQUIRED[field]
    ):
        return
    document = copy.deepcopy(VALID)
    parents, key = _split(field)
    _parent(document, parents)[key] = value
    _rejects(tmp_path, document, field)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("throughput.issued_per_s", -1.0, "expected a value >= 0"),
        ("outcomes.issued", True, "expected integer, got boolean"),
        ("manifest.started_at", "yesterday", "expected a UTC ISO 8601 time"),
        ("manifest.started_at", "2026-11-30T08:15:00", "with its UTC offset"),
        ("latency.steps.issue", {"precomputed": True, "p50_us": 0}, "exactly"),
        ("latency.steps.generate-key", {"precomputed": False}, "count: missing"),
        ("throughput.series.issued", [1, "2"], "expected integer or number"),
    ],
)
def test_values_readers_cannot_use_are_refused(
    tmp_path: Path, field: str, value: Any, problem: str
) -> None:
    """Negative rates, booleans as counts, local times, half-precomputed steps are refused."""
    document = copy.deepcopy(VALID)
    parents, key = _split(field)
    _parent(document, parents)[key] = value
    assert problem in _rejects(tmp_path, document, field)


def test_not_a_number_is_refused(tmp_path: Path) -> None:
    """NaN and infinity (json.loads accepts both) are not rates."""
    text = json.dumps(VALID).replace('"issued_per_s": 8000.0', '"issued_per_s": NaN')
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(ResultError, match=r"throughput\.issued_per_s: expected a finite number"):
        read_result(path)


def test_a_measured_step_needs_its_histogram(tmp_path: Path) -> None:
    """A step with a summary but no histogram cannot be compared: named as missing."""
    document = copy.deepcopy(VALID)
    del document["histograms"]["step.install"]
    _rejects(tmp_path, document, "histograms.step.install")


@st.composite
def corrupted(draw: st.DrawFn, text: str) -> str:
    """One edit of an encoded histogram: cut, overwrite, insert, or a header field replaced."""
    how = draw(st.sampled_from(["cut", "overwrite", "insert", "header"]))
    at = draw(st.integers(min_value=0, max_value=len(text) - 1))
    junk = draw(st.text(min_size=1, max_size=6))
    if how == "cut":
        return text[:at]
    if how == "overwrite":
        return text[:at] + junk + text[at + len(junk) :]
    if how == "insert":
        return text[:at] + junk + text[at:]
    fields = text.split(":")
    fields[draw(st.integers(min_value=0, max_value=3))] = junk
    return ":".join(fields)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_a_broken_histogram_is_named(
    tmp_path: Path, result_factory: Callable[..., dict[str, Any]], data: st.DataObject
) -> None:
    """A corrupted histogram string is a ResultError naming it, or still a usable histogram."""
    from bench.judge.compare import compare_pair  # noqa: PLC0415 (the reader that decodes most)

    name = data.draw(st.sampled_from(sorted(VALID["histograms"])))
    document = copy.deepcopy(VALID)
    document["histograms"][name] = data.draw(corrupted(VALID["histograms"][name]))
    path = _written(tmp_path, document)
    try:
        result = read_result(path)
    except ResultError as exc:
        message = str(exc)
    else:
        message = ""
        assert compare_pair(VALID, result)
    assert not message or message.startswith(f"{path}: field histograms.{name}: ")


def test_capacity_and_suite_results_are_read(tmp_path: Path) -> None:
    """Other kinds pass with their own (smaller) schema."""
    capacity = {
        "schema_version": SCHEMA_VERSION,
        "kind": "capacity",
        "manifest": VALID["manifest"],
        "points": [],
    }
    assert read_result(_written(tmp_path, capacity)) == capacity
    validate_result({"schema_version": SCHEMA_VERSION, "kind": "suite", "results": []})


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
