"""The wheel carries every package: `pip install .` (the README's first command) is not editable."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_for_the_wheel() -> None:
    """Each folder of engine/ and bench/ with an __init__.py is in [tool.setuptools] packages."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("engine", "bench")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found - listed == set()
