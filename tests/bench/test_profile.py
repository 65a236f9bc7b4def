"""Profiles: shipped ones validate; bad values are refused naming file, key and what is allowed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.errors import ProfileError
from bench.profile import PROFILE_DIRECTORY, SCHEMA, load_profile, shipped_profiles


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


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "x.toml"
    path.write_text(f'description = "x"\n{body}')
    return path


def test_warmup_must_end_before_the_duration(tmp_path: Path) -> None:
    """warmup_seconds >= duration (duration > 0) would measure nothing: refused, naming both."""
    path = _write(tmp_path, "[load]\nduration = 2.0\nwarmup_seconds = 2.0\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "load.warmup_seconds = 2.0" in message and "load.duration = 2.0" in message
    with pytest.raises(ProfileError, match=r"load\.warmup_seconds"):
        load_profile("smoke", ["load.duration=1", "load.warmup_seconds=3"])


def test_warmup_is_free_when_the_run_is_bounded_by_devices() -> None:
    """With duration 0 (until all devices are done) any warm-up is allowed."""
    profile = load_profile("smoke", ["load.duration=0", "load.warmup_seconds=5"])
    assert profile.get("load", "warmup_seconds") == 5


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('{ kind = "uniform", mean = 1, low = 0, high = 2 }', ["uniform", "'mean'"]),
        ('{ kind = "fixed" }', ["fixed", "'mean'"]),
        ('{ kind = "lognormal", mean = 0.2 }', ["lognormal", "'sigma'"]),
    ],
)
def test_distribution_errors_name_kind_and_parameter(
    tmp_path: Path, table: str, words: list[str]
) -> None:
    """A parameter a kind ignores, or one it needs and lacks, is named with the file and key."""
    path = _write(tmp_path, f"[link]\nlatency = {table}\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message and "link.latency" in message
    assert all(word in message for word in words), message
    assert "expected a delay table" not in message


def test_distribution_message_passes_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the engine's Distribution says is wrong reaches the user as it was said."""

    def refuse(kind: str, **given: float) -> None:
        raise ValueError(f"{kind} distribution dislikes {sorted(given)}")

    monkeypatch.setattr("bench.profile.Distribution", refuse)
    path = _write(tmp_path, '[approval]\ndelay = { kind = "exponential", mean = 0.3 }\n')
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message and "approval.delay" in message
    assert "exponential distribution dislikes ['mean']" in message


def test_distribution_tables_refuse_unknown_parameters_and_text(tmp_path: Path) -> None:
    """A parameter no kind takes, or a value that is not a number, is named."""
    path = _write(tmp_path, '[link]\nlatency = { kind = "fixed", median = 1 }\n')
    with pytest.raises(ProfileError, match=r"unknown parameter 'median'"):
        load_profile(str(path))
    path = _write(tmp_path, '[link]\nlatency = { kind = "fixed", mean = "1s" }\n')
    with pytest.raises(ProfileError, match=r"mean = '1s': expected a number"):
        load_profile(str(path))


def test_expectation_defaults_to_every_device_issued() -> None:
    """Without an [expect] table a profile expects all started devices issued, no tolerance."""
    profile = load_profile("smoke", ["expect.issued_fraction=1.0"])
    assert profile.get("expect", "issued_fraction") == 1.0
    assert profile.get("expect", "tolerance") == 0.0
    with pytest.raises(ProfileError, match=r"expect.tolerance = 1.5 is not allowed"):
        load_profile("smoke", ["expect.tolerance=1.5"])


def test_default_expectation_applies_when_the_table_is_absent(tmp_path: Path) -> None:
    """A profile file without [expect] gets issued_fraction 1.0 and tolerance 0.0."""
    profile = load_profile(str(_write(tmp_path, "")))
    assert profile.as_dict()["expect"] == {"issued_fraction": 1.0, "tolerance": 0.0}


@pytest.mark.parametrize("path", shipped_profiles(), ids=lambda p: p.stem)
def test_shipped_expectations_match_the_approval_policy(path: Path) -> None:
    """Auto-issue expects all; approval expects approval_rate, within sampling error at its size."""
    profile = load_profile(str(path))
    fraction = profile.get("expect", "issued_fraction")
    tolerance = profile.get("expect", "tolerance")
    if profile.get("approval", "mode") == "auto":
        assert (fraction, tolerance) == (1.0, 0.0)
        return
    rate = profile.get("approval", "approval_rate")
    assert fraction == rate
    assert profile.get("load", "mode") == "open" and profile.get("load", "duration") > 0
    started = profile.get("load", "rate") * profile.get("load", "duration")
    sampling_sd = math.sqrt(rate * (1 - rate) / started)
    assert 4 * sampling_sd <= tolerance <= 0.05


def test_live_profile_measures_device_crypto() -> None:
    """p256-live makes keys, protected keys and requests during the run."""
    profile = load_profile("p256-live")
    assert profile.get("device", "crypto") == "live"
    assert profile.get("device", "key") == "p256"


def test_readme_documents_every_key_and_shipped_profile() -> None:
    """profiles/README.md has a row for each schema key and each shipped profile."""
    text = (PROFILE_DIRECTORY / "README.md").read_text()
    for section, rules in SCHEMA.items():
        for key in rules:
            assert f"| `{section}.{key}` |" in text or f"| `{key}` |" in text, key
    for path in shipped_profiles():
        assert f"| `{path.stem}` |" in text, path.stem
