"""Result files: the schema version, atomic writing, reading with a schema check.

The format is documented in results/README.md; `bench.run.merge` builds run documents. Readers
(`compare`, `gate`, `report`, `export`) need only this module: they never touch the engine.
`read_result` is the one edge where a file is checked: after it, readers trust the structure
(every key they use is there with its type, every histogram decodes), so bad input is one
ResultError naming the file and the field, never a traceback deep inside a reader.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.errors import AccountingError, ResultError
from bench.histogram import Histogram

SCHEMA_VERSION = 2
KINDS = ("run", "capacity", "suite")


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
    """Read a result file; refuse a missing, corrupt, other-version or malformed one.

    Every refusal is a ResultError whose one-line message names the file and, for a malformed
    result, the field (dotted path) and what was wrong with it.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultError(f"{path}: no such result file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(f"{path}: not a readable result file: {exc}") from exc
    except RecursionError:
        raise ResultError(f"{path}: not a readable result file: nested too deeply") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ResultError(f"{path}: not an enrollbench result (no schema_version)")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ResultError(
            f"{path}: schema version {data['schema_version']!r}, this enrollbench reads "
            f"{SCHEMA_VERSION} (results of other versions must be made again with this one)"
        )
    try:
        validate_result(data)
    except FieldError as exc:
        raise ResultError(f"{path}: field {exc.field}: {exc.problem}") from None
    return data


# ---- the schema: what every reader relies on (extra keys are allowed) ----


class FieldError(Exception):
    """One field of a result that is missing or malformed (wrapped into a ResultError)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


Check = Callable[[Any, str], None]


@dataclass(frozen=True, slots=True)
class _Scalar:
    """A JSON value of one of the named kinds."""

    kinds: tuple[str, ...]

    def __call__(self, value: Any, field: str) -> None:
        if _json_kind(value) not in self.kinds:
            expected = " or ".join(self.kinds)
            raise FieldError(field, f"expected {expected}, got {_describe(value)}")


def _json_kind(value: Any) -> str:
    # bool is an int in Python, but never a number in a result
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "list", dict: "object", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _describe(value: Any) -> str:
    kind = _json_kind(value)
    if kind == "object":
        return "an object"
    if kind == "list":
        return "a list"
    if kind == "null":
        return "null"
    return f"{kind} {json.dumps(value)[:40]}"


@dataclass(frozen=True, slots=True)
class _Finite:
    """A number that is neither NaN nor infinite (json.loads accepts both)."""

    def __call__(self, value: Any, field: str) -> None:
        _Scalar(("integer", "number"))(value, field)
        if not math.isfinite(value):
            raise FieldError(field, f"expected a finite number, got {value}")


INTEGER = _Scalar(("integer",))
NUMBER = _Finite()
STRING = _Scalar(("string",))
BOOLEAN = _Scalar(("boolean",))


def _object(fields: Mapping[str, Check]) -> Check:
    """An object with at least these keys, each checked."""

    def check(value: Any, field: str) -> None:
        _Scalar(("object",))(value, field)
        for key, inner in fields.items():
            where = f"{field}.{key}" if field else key
            if key not in value:
                raise FieldError(where, "missing")
            inner(value[key], where)

    return check


def _mapping(inner: Check) -> Check:
    """An object whose every value is checked (keys are names: steps, reasons, histograms)."""

    def check(value: Any, field: str) -> None:
        _Scalar(("object",))(value, field)
        for key, item in value.items():
            inner(item, f"{field}.{key}")

    return check


def _list(inner: Check) -> Check:
    def check(value: Any, field: str) -> None:
        _Scalar(("list",))(value, field)
        for index, item in enumerate(value):
            inner(item, f"{field}[{index}]")

    return check


def _optional(inner: Check) -> Check:
    def check(value: Any, field: str) -> None:
        if value is not None:
            inner(value, field)

    return check


def _non_negative(inner: Check) -> Check:
    def check(value: Any, field: str) -> None:
        inner(value, field)
        if value < 0:
            raise FieldError(field, f"expected a value >= 0, got {value}")

    return check


def _timestamp(value: Any, field: str) -> None:
    STRING(value, field)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise FieldError(field, f"expected a UTC ISO 8601 time, got {value!r}") from None
    if moment.utcoffset() is None:
        raise FieldError(field, f"expected a time with its UTC offset, got {value!r}")


def _histogram(value: Any, field: str) -> None:
    STRING(value, field)
    try:
        Histogram.decode(value)
    except ResultError as exc:
        raise FieldError(field, str(exc)) from None


COUNT = _non_negative(INTEGER)
SUMMARY = _object(
    {
        "count": COUNT,
        **{
            key: _non_negative(NUMBER)
            for key in ("min_us", "mean_us", "p50_us", "p90_us", "p99_us", "p99_9_us", "max_us")
        },
    }
)


def _step(value: Any, field: str) -> None:
    """A measured step's summary with "precomputed": false, or exactly {"precomputed": true}."""
    _object({"precomputed": BOOLEAN})(value, field)
    if value["precomputed"]:
        if set(value) != {"precomputed"}:
            raise FieldError(field, 'a precomputed step is exactly {"precomputed": true}')
    else:
        SUMMARY(value, field)


MANIFEST = _object(
    {
        "profile": STRING,
        "profile_as_run": _object({"load": _object({"warmup_seconds": _non_negative(NUMBER)})}),
        "profile_sha256": STRING,
        "seed": INTEGER,
        "git_commit": _optional(STRING),
        "git_dirty": _optional(BOOLEAN),
        "started_at": _timestamp,
        "python": STRING,
        "python_implementation": STRING,
        "cryptography": STRING,
        "openssl": STRING,
        "cpu_model": STRING,
        "cpu_count": _optional(COUNT),
        "workers": COUNT,
    }
)
RUN = _object(
    {
        "kind": STRING,
        "interrupted": BOOLEAN,
        "manifest": MANIFEST,
        "outcomes": _object(
            {
                "started": COUNT,
                "issued": COUNT,
                "rejected": _mapping(COUNT),
                "failed": _mapping(COUNT),
                "accounted": BOOLEAN,
                "expected": _object(
                    {
                        "issued_fraction": _non_negative(NUMBER),
                        "tolerance": _non_negative(NUMBER),
                        "issued_share": _non_negative(NUMBER),
                        "met": BOOLEAN,
                    }
                ),
            }
        ),
        "throughput": _object(
            {
                "enrollments_per_s": _non_negative(NUMBER),
                "issued_per_s": _non_negative(NUMBER),
                "series": _object(
                    {
                        "second": _list(COUNT),
                        "completed": _list(_non_negative(NUMBER)),
                        "issued": _list(_non_negative(NUMBER)),
                        "approvals_pending": _list(_non_negative(NUMBER)),
                    }
                ),
            }
        ),
        "latency": _object(
            {
                "end_to_end": _object({"latency": SUMMARY, "service": SUMMARY}),
                "steps": _mapping(_step),
            }
        ),
        "generator": _object({"generator_bound": BOOLEAN, "reasons": _list(STRING)}),
        "histograms": _mapping(_histogram),
    }
)
CAPACITY = _object({"kind": STRING, "manifest": MANIFEST, "points": _list(_object({}))})


def validate_result(data: Mapping[str, Any]) -> None:
    """Check a result document against the schema; raise FieldError at the first bad field."""
    if "kind" not in data:
        raise FieldError("kind", "missing")
    kind = data["kind"]
    if kind not in KINDS:
        raise FieldError("kind", f"expected one of {', '.join(KINDS)}, got {_describe(kind)}")
    if kind == "run":
        RUN(data, "")
        _check_run_histograms(data)
    elif kind == "capacity":
        CAPACITY(data, "")


def _check_run_histograms(data: Mapping[str, Any]) -> None:
    """Readers recompute from histograms: end to end, and one per measured step."""
    histograms = data["histograms"]
    needed = ["end_to_end.latency"] + [
        f"step.{label}"
        for label, step in data["latency"]["steps"].items()
        if not step["precomputed"]
    ]
    for name in needed:
        if name not in histograms:
            raise FieldError(f"histograms.{name}", "missing")
