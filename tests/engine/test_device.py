"""The device: precomputed crypto is used as given; live devices make their own."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import serialization

from engine.errors import MalformedDerError
from engine.keys import private_key_to_der
from engine.population import simulated_enrollee
from engine.request import parse_request, verify_request
from tests.conftest import SystemFactory, device_of, vector_key


def test_fully_precomputed_device_never_loads_its_key(make_system: SystemFactory) -> None:
    """With request and protected key from the corpus, a garbage key DER is never touched."""
    system, users = make_system(1)
    identity = replace(
        device_of(users[0]), key_der=b"not a key", request_der=b"req", protected_key=b"blob"
    )
    device = system.device(identity)
    device.generate_key()
    assert device.build_request(users[0].user) == b"req"


def test_partly_precomputed_device_loads_the_corpus_key(make_system: SystemFactory) -> None:
    """A corpus key without a ready request is loaded (and a broken one is a typed error)."""
    system, users = make_system(1)
    device = system.device(device_of(users[0]))
    device.generate_key()
    request = parse_request(device.build_request(users[0].user))
    verify_request(request)
    broken = system.device(replace(device_of(users[0]), key_der=b"\x30\x00"))
    with pytest.raises(MalformedDerError):
        broken.generate_key()


def test_stored_key_pair_opens_with_the_device_secret(make_system: SystemFactory) -> None:
    """Step 5 stores the key encrypted under the device's own secret."""
    system, users = make_system(1)
    device = system.device(device_of(users[0]))
    device.generate_key()
    asyncio.run(device.store_key_pair(users[0].user))
    system.database.flush()
    row = system.database.read_one("SELECT protected_key FROM persistent_store", ())
    assert row is not None
    secret = simulated_enrollee(0, 7).device_secret
    opened = serialization.load_der_private_key(row[0], secret)
    assert private_key_to_der(opened) == private_key_to_der(vector_key("p256-4"))  # type: ignore[arg-type]


def test_building_a_request_before_a_key_is_an_error(make_system: SystemFactory) -> None:
    """Step 6 before step 1 is a programming error, said plainly."""
    system, users = make_system(1)
    device = system.device(device_of(users[0], request_der=None, key_der=None))
    with pytest.raises(RuntimeError, match="step 1"):
        device.build_request(users[0].user)
