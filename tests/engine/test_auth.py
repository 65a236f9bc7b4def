"""Salted password verifiers."""

from __future__ import annotations

import pytest

from engine.auth import check_password, make_verifier


def test_right_password_passes_wrong_fails() -> None:
    """The verifier accepts its password and nothing else."""
    verifier = make_verifier("correct horse", b"salt" * 4, 3)
    assert check_password(verifier, "correct horse")
    assert not check_password(verifier, "correct horse ")


def test_salt_changes_the_verifier() -> None:
    """Two salts give two digests for one password."""
    assert make_verifier("pw", b"a" * 16).digest != make_verifier("pw", b"b" * 16).digest


def test_verifier_repr_hides_the_digest() -> None:
    """A logged verifier shows no digest."""
    verifier = make_verifier("pw", b"a" * 16)
    assert verifier.digest.hex() not in repr(verifier)


def test_zero_iterations_refused() -> None:
    """Iterations below one are a configuration error."""
    with pytest.raises(ValueError, match="iterations"):
        make_verifier("pw", b"a" * 16, 0)
