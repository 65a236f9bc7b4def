"""Salted password verifiers, as a directory keeps them for a simple bind (step 2).

The verifier is PBKDF2-HMAC-SHA256 with a per-user salt. One iteration costs about what an LDAP
simple bind against a salted hash ({SSHA}) costs; profiles raise `iterations` to model a costlier
verifier.
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
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return Verifier(salt, digest, iterations)


def check_password(verifier: Verifier, password: str) -> bool:
    """True when `password` matches, compared in constant time."""
    candidate = hashlib.pbkdf2_hmac("sha256", password.encode(), verifier.salt, verifier.iterations)
    return hmac.compare_digest(candidate, verifier.digest)
