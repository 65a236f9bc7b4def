"""Engine assembly: configuration checks, CA material across processes, key types end to end."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives import serialization

from engine.errors import UnsupportedKeyError
from engine.flow import Status
from engine.system import CAMaterial, EngineConfig
from tests.conftest import SystemFactory, ca_material, device_of, vector_key


def test_ca_material_round_trips_as_bytes() -> None:
    """CA material rebuilt from its DER has the same certificates and issuing key."""
    config = EngineConfig(ca_intermediates=1)
    material = ca_material(config)
    chain = material.chain()
    assert (
        tuple(c.public_bytes(serialization.Encoding.DER) for c in chain.certificates)
        == material.certificates
    )
    assert len(material.certificates) == 3


def test_ca_material_needs_one_key_per_level() -> None:
    """A hierarchy with one intermediate needs three keys."""
    with pytest.raises(ValueError, match="need 3 CA keys"):
        CAMaterial.create(EngineConfig(ca_intermediates=1), [vector_key("p256-1")])


def test_material_repr_hides_the_key() -> None:
    """The issuing key never shows in a repr."""
    material = ca_material(EngineConfig())
    assert material.issuing_key.hex()[:40] not in repr(material)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [({"device_key": "dsa"}, UnsupportedKeyError), ({"ca_intermediates": -1}, ValueError)],
)
def test_bad_configs_are_refused(overrides: dict[str, object], error: type[Exception]) -> None:
    """Unknown key types and negative depths fail at construction."""
    with pytest.raises(error):
        EngineConfig(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("device_key", "hash_name", "vector"),
    [
        ("p384", "sha384", "p384-2"),
        ("ed25519", "sha256", "ed25519-2"),
        ("rsa3072", "sha256", "rsa3072-1"),
        ("rsa4096", "sha512", "rsa4096-1"),
    ],
)
def test_every_key_type_enrolls(
    make_system: SystemFactory, device_key: str, hash_name: str, vector: str
) -> None:
    """Each supported device key type is issued end to end."""
    system, users = make_system(1, device_key=device_key, hash_name=hash_name)
    outcome = asyncio.run(system.enroll(device_of(users[0], key=vector)))
    assert outcome.status is Status.ISSUED, outcome
