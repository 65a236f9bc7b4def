"""Reports and exports read result files only."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.errors import UsageError
from bench.results import read_result
from tests.bench.conftest import run_cli


def test_html_is_self_contained_with_every_figure(
    two_results: tuple[Path, Path], tmp_path: Path
) -> None:
    """The HTML embeds the four figures as data URIs and links nothing else."""
    result = read_result(two_results[0])
    images = report.render(result)
    assert set(images) == set(report.FIGURES)
    assert all(data.startswith(b"\x89PNG") for data in images.values())
    page = tmp_path / "r.html"
    report.write_html(result, images, page)
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 4
    assert "http" not in text


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib the report says which extra to install."""
    real_import = builtins.__import__

    def refuse(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(UsageError, match=r"enrollbench\[plot\]"):
        report.render({})


def test_cli_writes_pngs(two_results: tuple[Path, Path], tmp_path: Path) -> None:
    """report --png writes one PNG per figure."""
    done = run_cli("report", str(two_results[0]), "--png", str(tmp_path / "png"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.stem for p in (tmp_path / "png").glob("*.png")) == sorted(report.FIGURES)
