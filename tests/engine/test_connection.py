"""The connection service: binds, profile lookup, status updates."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import AuthenticationError, UnknownProfileError
from tests.conftest import SystemFactory


def test_bind_checks_the_password(make_system: SystemFactory) -> None:
    """The right password binds; a wrong one raises AuthenticationError naming the user."""
    system, users = make_system(1)
    user = users[0]
    asyncio.run(system.connection.authenticate(user.user.user_id, user.password))
    with pytest.raises(AuthenticationError) as info:
        asyncio.run(system.connection.authenticate(user.user.user_id, "guess"))
    assert info.value.user_id == user.user.user_id


def test_unknown_profile_is_rejected(make_system: SystemFactory) -> None:
    """A profile ID no CA serves raises UnknownProfileError."""
    system, _ = make_system(1)
    with pytest.raises(UnknownProfileError, match="nope"):
        system.connection.authority("nope")


def test_acknowledge_tells_the_device(make_system: SystemFactory) -> None:
    """Step 10's status update reaches the device."""
    system, _ = make_system(1)
    heard: list[str] = []
    system.connection.acknowledge(heard.append)
    assert heard == ["submitted"]
