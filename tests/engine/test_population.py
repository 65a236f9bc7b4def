"""Simulated users and devices."""

from __future__ import annotations

from engine.auth import check_password
from engine.population import device_identity, directory_entry, simulated_enrollee


def test_enrollees_are_reproducible_per_seed() -> None:
    """The same index and seed give the same user and password; another seed another password."""
    assert simulated_enrollee(4, 1) == simulated_enrollee(4, 1)
    assert simulated_enrollee(4, 1).password != simulated_enrollee(4, 2).password


def test_directory_entry_verifies_the_password() -> None:
    """The directory's verifier accepts the enrollee's password."""
    enrollee = simulated_enrollee(0, 3)
    _, verifier = directory_entry(enrollee, 3, iterations=2)
    assert check_password(verifier, enrollee.password)


def test_passwords_stay_out_of_reprs() -> None:
    """Neither the enrollee nor its device prints its password."""
    enrollee = simulated_enrollee(0, 3)
    identity = device_identity(enrollee, "profile", key_der=b"secret-key-bytes")
    assert enrollee.password not in repr(enrollee)
    assert enrollee.password not in repr(identity)
    assert "secret-key-bytes" not in repr(identity)
