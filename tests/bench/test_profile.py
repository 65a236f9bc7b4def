"""Profiles: shipped ones validate; bad values are refused naming file, key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.errors import ProfileError
from bench.profile import load_profile, shipped_profiles


@pytest.mark.parametrize("path", shipped_profiles(), ids=lambda p: p.stem)
def test_shipped_profiles_validate(path: Path) -> None:
    """Every shipped profile loads and has a description."""
    profile = load_profile(str(path))
    assert profile.get("", "description")
    profile.engine_config()


def test_defaults_fill_in_and_profile_id_defaults_to_the_name() -> None:
    """Unspecified keys take their defaults; the CA profile ID is the profile's name."""
    profile = load_profile("smoke")
    assert profile.get("ca", "profile_id") == "smoke"
    assert profile.get("auth", "iterations") == 1


def test_overrides_are_validated_like_the_file() -> None:
    """--set values are parsed as TOML and checked against the schema."""
    assert load_profile("smoke", ["load.rate=250"]).get("load", "rate") == 250
    with pytest.raises(ProfileError, match=r"load.rate = 0 is not allowed"):
        load_profile("smoke", ["load.rate=0"])


def test_misspelt_keys_get_a_suggestion(tmp_path: Path) -> None:
    """An unknown key names the file and suggests the closest known key."""
    path = tmp_path / "x.toml"
    path.write_text('description = "x"\n[load]\nconcurency = 3\n')
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message and "did you mean 'load.concurrency'" in message


def test_distribution_tables_are_checked(tmp_path: Path) -> None:
    """A delay table with an unknown kind is refused with what is allowed."""
    path = tmp_path / "x.toml"
    path.write_text('description = "x"\n[link]\nlatency = { kind = "pareto", mean = 1 }\n')
    with pytest.raises(ProfileError, match=r"fixed\|uniform\|exponential\|lognormal"):
        load_profile(str(path))


def test_digest_changes_with_the_profile() -> None:
    """The manifest hash differs when any value differs."""
    assert load_profile("smoke").digest() != load_profile("smoke", ["seed=2"]).digest()
