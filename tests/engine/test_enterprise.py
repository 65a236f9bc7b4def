"""The enterprise server: records keys from requests, delivers only matching certificates."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import KeyMismatchError, MalformedDerError
from tests.conftest import SystemFactory, device_of


def test_relay_records_the_request_key(make_system: SystemFactory) -> None:
    """Step 7 parses the request and stores its SubjectPublicKeyInfo for the device."""
    system, users = make_system(1)
    device = system.device(device_of(users[0]))
    device.generate_key()
    request = device.build_request(users[0].user)
    parsed = asyncio.run(system.enterprise.relay_request("device-1", request))
    assert asyncio.run(system.configuration.stored_key("device-1")) == parsed.key.spki


def test_relay_refuses_garbage(make_system: SystemFactory) -> None:
    """Bytes that are not a request raise MalformedDerError and store nothing."""
    system, _ = make_system(1)
    with pytest.raises(MalformedDerError):
        asyncio.run(system.enterprise.relay_request("device-1", b"\x30\x03abc"))
    assert asyncio.run(system.configuration.stored_key("device-1")) is None


def test_certificate_for_a_device_without_a_record_is_refused(make_system: SystemFactory) -> None:
    """No stored key means no delivery: KeyMismatchError names the device."""
    system, users = make_system(1)
    outcome = asyncio.run(system.enroll(device_of(users[0])))
    certificate = asyncio.run(system.directory.retrieve(users[0].user.dn.text, outcome.serial or 0))
    with pytest.raises(KeyMismatchError) as info:
        asyncio.run(system.enterprise.check_certificate("device-unknown", certificate))
    assert info.value.device_id == "device-unknown"
