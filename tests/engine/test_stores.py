"""SQLite stores: staged writes are readable at once and land in SQLite on flush."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.errors import (
    AuthenticationError,
    CertificateNotFoundError,
    DuplicateSerialError,
    UnknownUserError,
)
from engine.population import directory_entry, simulated_enrollee
from engine.stores import Database, SqliteConfigurationDatabase, SqliteDirectory


def test_published_certificate_is_readable_before_and_after_flush(tmp_path: Path) -> None:
    """A certificate can be retrieved right after publishing and from the file after a flush."""
    database = Database(tmp_path / "engine.sqlite")
    directory = SqliteDirectory(database)
    asyncio.run(directory.publish("CN=a", 5, b"cert"))
    assert asyncio.run(directory.retrieve("CN=a", 5)) == b"cert"
    database.close()
    reopened = SqliteDirectory(Database(tmp_path / "engine.sqlite"))
    assert asyncio.run(reopened.retrieve("CN=a", 5)) == b"cert"


def test_missing_certificate_raises() -> None:
    """Retrieving a certificate nobody published raises CertificateNotFoundError."""
    directory = SqliteDirectory(Database())
    with pytest.raises(CertificateNotFoundError):
        asyncio.run(directory.retrieve("CN=a", 5))


def test_flush_happens_in_batches() -> None:
    """After many writes, rows are in SQLite even without an explicit flush."""
    database = Database()
    configuration = SqliteConfigurationDatabase(database)
    for index in range(1500):
        asyncio.run(configuration.store_key(f"d{index}", b"k"))
    assert database.read_one("SELECT count(*) FROM device_keys", ()) == (1024,)
    assert asyncio.run(configuration.stored_key("d1499")) == b"k"
    assert asyncio.run(configuration.stored_key("unknown")) is None


def test_users_round_trip_and_unknown_users_fail() -> None:
    """Seeded users come back whole; unknown users fail lookups and binds with typed errors."""
    directory = SqliteDirectory(Database())
    enrollee = simulated_enrollee(3, 1)
    directory.seed([directory_entry(enrollee, 1)])
    assert asyncio.run(directory.lookup_user(enrollee.user.user_id)) == enrollee.user
    with pytest.raises(UnknownUserError):
        asyncio.run(directory.lookup_user("nobody"))
    with pytest.raises(AuthenticationError):
        asyncio.run(directory.verifier("nobody"))


def test_entry_cache_is_bounded_and_keeps_recent_entries() -> None:
    """The entry cache never holds more than its size and serves the entries it has."""
    database = Database()
    directory = SqliteDirectory(database)
    directory.ENTRY_CACHE = 3
    enrollees = [simulated_enrollee(i, 1) for i in range(5)]
    directory.seed([directory_entry(e, 1) for e in enrollees])
    for enrollee in enrollees:
        assert asyncio.run(directory.lookup_user(enrollee.user.user_id)) == enrollee.user
    assert list(directory._entries) == [e.user.user_id for e in enrollees[2:]]


def test_a_serial_staged_twice_is_refused() -> None:
    """A second certificate with a serial already staged is refused at once, whatever its DN;
    the first one stays retrievable."""
    database = Database()
    directory = SqliteDirectory(database)
    asyncio.run(directory.publish("CN=a", 5, b"first"))
    with pytest.raises(DuplicateSerialError):
        asyncio.run(directory.publish("CN=b", 5, b"second"))
    database.flush()
    assert asyncio.run(directory.retrieve("CN=a", 5)) == b"first"
