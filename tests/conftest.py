"""Shared fixtures: fixed key vectors, CA material and small engine replicas."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from engine.device import DeviceIdentity
from engine.keys import PrivateKey, private_key_to_der
from engine.population import Enrollee, device_identity, directory_entry, simulated_enrollee
from engine.system import CAMaterial, EngineConfig, EnrollmentSystem

VECTORS = Path(__file__).parent / "engine" / "vectors"
SEED = 7


@cache
def vector_key(name: str) -> PrivateKey:
    """A fixed test key from tests/engine/vectors (never generate RSA keys in unit tests)."""
    key = serialization.load_pem_private_key((VECTORS / f"{name}.pem").read_bytes(), None)
    assert isinstance(key, PrivateKey)
    return key


CA_KEYS = {
    "p256": ["p256-1", "p256-2", "p256-3"],
    "p384": ["p384-1", "p384-2", "p384-3"],
    "ed25519": ["ed25519-1", "ed25519-2", "ed25519-3"],
    "rsa2048": ["rsa2048-1", "rsa2048-2", "rsa2048-3"],
}


def ca_material(config: EngineConfig) -> CAMaterial:
    """CA material for a config, from fixed vectors (up to one intermediate)."""
    names = CA_KEYS[config.ca_key][: config.ca_intermediates + 2]
    return CAMaterial.create(config, [vector_key(n) for n in names])


def require_tool(name: str) -> str:
    """The path of an external tool; a missing tool skips locally and errors in CI.

    Daemons such as slapd live in the sbin folders, which a plain user's PATH lacks."""
    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (install it in .ci/run)")
        pytest.skip(f"{name} not installed")
    return path


SystemFactory = Callable[..., tuple[EnrollmentSystem, list[Enrollee]]]


@pytest.fixture
def make_system() -> Iterator[SystemFactory]:
    """Build engine replicas with `count` seeded users; closes them afterwards."""
    built: list[EnrollmentSystem] = []

    def factory(
        count: int = 4, users: Sequence[Enrollee] | None = None, **overrides: object
    ) -> tuple[EnrollmentSystem, list[Enrollee]]:
        config = EngineConfig(**overrides)  # type: ignore[arg-type]
        enrollees = (
            list(users)
            if users is not None
            else [simulated_enrollee(i, SEED) for i in range(count)]
        )
        entries = [directory_entry(e, SEED, config.auth_iterations) for e in enrollees]
        system = EnrollmentSystem(config, ca_material(config), entries)
        built.append(system)
        return system, enrollees

    yield factory
    for system in built:
        system.close()


def device_of(enrollee: Enrollee, key: str = "p256-4", **fields: object) -> DeviceIdentity:
    """A device identity that takes a fixed vector key instead of generating one."""
    identity = device_identity(enrollee, "enrollbench", private_key_to_der(vector_key(key)))
    return replace(identity, **fields)  # type: ignore[arg-type]
