"""Reports read result files only: figures, tables, precomputed steps."""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.errors import UsageError
from bench.judge import report
from tests.bench.conftest import run_cli

Factory = Callable[..., dict[str, Any]]


def test_html_is_self_contained_with_every_figure(result_factory: Factory, tmp_path: Path) -> None:
    """The HTML embeds the four figures as data URIs and links nothing else."""
    result = result_factory(seed=1)
    images = report.render(result)
    assert set(images) == set(report.FIGURES)
    assert all(data.startswith(b"\x89PNG") for data in images.values())
    page = tmp_path / "r.html"
    report.write_html(result, images, page)
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 4
    assert "http" not in text


def test_precomputed_steps_read_precomputed_in_the_html(
    result_factory: Factory, tmp_path: Path
) -> None:
    """generate-key and build-request did no work: 'precomputed', never 0.000 ms."""
    page = tmp_path / "r.html"
    report.write_html(result_factory(seed=1), {}, page)
    text = page.read_text()
    for step in ("generate-key", "build-request"):
        row = re.search(rf"<tr><td>{step}</td>(.*?)</tr>", text)
        assert row is not None and "<td>precomputed</td>" in row.group(1)
        assert "0.000" not in row.group(1)


def test_html_leads_with_issued_and_names_provenance(
    result_factory: Factory, tmp_path: Path
) -> None:
    """issued/s comes before enrollments/s; start time, commit and expectation are shown."""
    result = result_factory(seed=1, failed=100)
    result["manifest"]["git_dirty"] = True
    page = tmp_path / "r.html"
    report.write_html(result, {}, page)
    text = page.read_text()
    assert text.index("issued/s") < text.index("enrollments/s")
    assert "2026-11-30T08:15:00Z" in text and "c0ffee (uncommitted changes)" in text
    assert "NOT met" in text


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib, report says which extra to install."""
    real_import = builtins.__import__

    def refuse(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(UsageError, match=r"enrollbench\[plot\]"):
        report.render({})


def test_cli_writes_pngs(result_factory: Factory, tmp_path: Path) -> None:
    """report --png writes one PNG per figure."""
    source = tmp_path / "r.json"
    source.write_text(json.dumps(result_factory(seed=1)))
    done = run_cli("report", str(source), "--png", str(tmp_path / "png"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.stem for p in (tmp_path / "png").glob("*.png")) == sorted(report.FIGURES)
