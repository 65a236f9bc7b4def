"""Simulated users and their devices, derived reproducibly from a seed.

The messaging directory and the directory are seeded from the same users; each device belongs to
one user. Passwords and salts come from HMAC-SHA256 over the seed, so a run can be repeated.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from engine.auth import DEFAULT_ITERATIONS, Verifier, make_verifier
from engine.device import DeviceIdentity
from engine.identity import DistinguishedName, User

DOMAIN = "example.com"


@dataclass(frozen=True, slots=True)
class Enrollee:
    """A simulated user with the password their device will present."""

    user: User
    password: str = field(repr=False)
    device_secret: bytes = field(repr=False)


def _derive(seed: int, label: str) -> bytes:
    return hmac.new(seed.to_bytes(8, "big", signed=True), label.encode(), hashlib.sha256).digest()


def simulated_enrollee(index: int, seed: int) -> Enrollee:
    """The user with a given index: DN, e-mail, UPN and password."""
    user_id = f"user{index:07d}"
    dn = DistinguishedName.from_text(f"CN={user_id},OU=Devices,O=Example Corp,DC=example,DC=com")
    user = User(user_id, dn, f"{user_id}@{DOMAIN}", f"{user_id}@corp.{DOMAIN}")
    password = _derive(seed, f"password/{user_id}").hex()
    return Enrollee(user, password, _derive(seed, f"device-secret/{user_id}"))


def directory_entry(
    enrollee: Enrollee, seed: int, iterations: int = DEFAULT_ITERATIONS
) -> tuple[User, Verifier]:
    """The directory's record of a user: the user and a salted verifier of their password."""
    salt = _derive(seed, f"salt/{enrollee.user.user_id}")[:16]
    return enrollee.user, make_verifier(enrollee.password, salt, iterations)


def device_identity(
    enrollee: Enrollee,
    profile_id: str,
    key_der: bytes | None = None,
    request_der: bytes | None = None,
    protected_key: bytes | None = None,
) -> DeviceIdentity:
    """The device of a user (one device per user), with any precomputed crypto."""
    return DeviceIdentity(
        device_id=f"device-{enrollee.user.user_id}",
        user_id=enrollee.user.user_id,
        password=enrollee.password,
        profile_id=profile_id,
        secret=enrollee.device_secret,
        key_der=key_der,
        request_der=request_der,
        protected_key=protected_key,
    )
