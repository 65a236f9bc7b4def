"""Salted password verifiers, as a directory keeps them for a simple bind (step 2).

With `iterations` 1 (the default) the verifier is one salted SHA-256 of the password, what an
LDAP simple bind checks against a {SSHA256} userPassword; above 1 it is PBKDF2-HMAC-SHA256 with
that many iterations, so profiles can model a costlier verifier.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

DEFAULT_ITERATIONS = 1


@dataclass(frozen=True, slots=True)
class Verifier:
    """A salted password verifier; never holds the password."""

    salt: bytes
    digest: bytes = field(repr=False)
    iterations: int


def make_verifier(password: str, salt: bytes, iterations: int = DEFAULT_ITERATIONS) -> Verifier:
    """Derive a verifier from a password (directory seeding, off the clock)."""
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    return Verifier(salt, _digest(password, salt, iterations), iterations)


def check_password(verifier: Verifier, password: str) -> bool:
    """True when `password` matches, compared in constant time."""
    candidate = _digest(password, verifier.salt, verifier.iterations)
    return hmac.compare_digest(candidate, verifier.digest)


def _digest(password: str, salt: bytes, iterations: int) -> bytes:
    if iterations == 1:
        return hashlib.sha256(password.encode() + salt).digest()  # {SSHA256}: H(password || salt)
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
