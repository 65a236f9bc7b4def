"""Storage behind small interfaces, with SQLite as the embedded default.

Each actor's storage is a Protocol: the messaging directory (DNs), the directory (user entries and
published certificates, as LDAP holds them), the configuration database (device public keys), and
the device's persistent store and key store. A real server (OpenLDAP, PostgreSQL) implements the
same Protocol and plugs in without touching the flow.

One `Database` (one SQLite connection) serves one engine replica: in memory by default, or a file
in WAL mode. Writes are staged and group-committed; reads see them at once.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from engine.auth import Verifier, check_password
from engine.errors import (
    AuthenticationError,
    CertificateNotFoundError,
    DuplicateSerialError,
    UnknownUserError,
)
from engine.identity import DistinguishedName, User

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY, dn TEXT NOT NULL, dn_der BLOB NOT NULL,
    email TEXT NOT NULL, upn TEXT NOT NULL, alternative_names BLOB NOT NULL,
    salt BLOB NOT NULL, verifier BLOB NOT NULL, iterations INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS published (
    serial BLOB PRIMARY KEY, dn TEXT NOT NULL, certificate BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS device_keys (device_id TEXT PRIMARY KEY, spki BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS persistent_store (
    device_id TEXT NOT NULL, protected_key BLOB NOT NULL, dn TEXT NOT NULL,
    profile_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS key_store (
    device_id TEXT NOT NULL, certificate BLOB NOT NULL, protected_key BLOB NOT NULL);
"""

_FLUSH_EVERY = 512


class Database:
    """One SQLite connection with write-behind batching.

    Writes are staged and flushed with `executemany` in one transaction every few hundred rows
    (group commit). A staged row that is read back before its flush (a certificate retrieved
    right after it was published) is served from `staged`, so readers always see every write.
    """

    def __init__(self, path: str | Path = ":memory:", *, durable: bool = False) -> None:
        """`durable`: a file that must survive a crash (fsync at checkpoints). An engine
        replica's scratch store in a run's temporary folder is not: without fsync, writes go to
        the page cache and the run does not stall on the disk (measured: fsync-ing file stores
        cost ~12% of `enrollbench run p256-auto` against in-memory ones)."""
        self._connection = sqlite3.connect(str(path), isolation_level="DEFERRED")
        if str(path) != ":memory:":
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute(f"PRAGMA synchronous={'NORMAL' if durable else 'OFF'}")
        self._connection.executescript(_SCHEMA)
        self._pending: defaultdict[str, list[tuple[Any, ...]]] = defaultdict(list)
        self._count = 0
        self.staged: dict[tuple[Any, ...], Any] = {}

    def write(
        self,
        sql: str,
        params: tuple[Any, ...],
        key: tuple[Any, ...] | None = None,
        value: Any = None,
    ) -> None:
        """Stage one write; `key` makes `value` readable from `staged` until the flush."""
        self._pending[sql].append(params)
        if key is not None:
            self.staged[key] = value
        self._count += 1
        if self._count >= _FLUSH_EVERY:
            self.flush()

    def read_one(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Execute a query over flushed rows and return its first row."""
        row: tuple[Any, ...] | None = self._connection.execute(sql, params).fetchone()
        return row

    def flush(self) -> None:
        """Write every staged row in one transaction."""
        with self._connection:
            for sql, rows in self._pending.items():
                self._connection.executemany(sql, rows)
        self._pending.clear()
        self.staged.clear()
        self._count = 0

    def close(self) -> None:
        self.flush()
        self._connection.close()


class MessagingDirectory(Protocol):
    """Source of each user's distinguished name (steps 3-4)."""

    async def lookup_user(self, user_id: str) -> User: ...


class Directory(Protocol):
    """LDAP: user entries one can bind as, and published certificates (steps 2, 11, 12)."""

    async def authenticate(self, user_id: str, password: str) -> None:
        """Step 2: a simple bind as the user; AuthenticationError when it fails (an unknown
        user fails like a wrong password)."""

    async def publish(self, dn: str, serial: int, certificate: bytes) -> None: ...

    async def retrieve(self, dn: str, serial: int) -> bytes: ...


class IssuedStore(Protocol):
    """The CA's record of what it issued: one serial once (RFC 5280 4.1.2.2)."""

    async def record(self, serial: int, dn: str, certificate: bytes) -> None:
        """DuplicateSerialError when the serial is already recorded."""


class UserDirectory(MessagingDirectory, Directory, Protocol):
    """One directory serving both: users and their DNs, binds, published certificates."""


class RecordingDirectory:
    """A directory whose publications are first recorded in the CA's issued store (which
    refuses a serial it holds), for a directory that does not keep serials unique itself
    (LDAP replaces the user's certificate)."""

    def __init__(self, directory: UserDirectory, issued: IssuedStore) -> None:
        self._directory = directory
        self._issued = issued

    async def lookup_user(self, user_id: str) -> User:
        return await self._directory.lookup_user(user_id)

    async def authenticate(self, user_id: str, password: str) -> None:
        await self._directory.authenticate(user_id, password)

    async def publish(self, dn: str, serial: int, certificate: bytes) -> None:
        await self._issued.record(serial, dn, certificate)
        await self._directory.publish(dn, serial, certificate)

    async def retrieve(self, dn: str, serial: int) -> bytes:
        return await self._directory.retrieve(dn, serial)


class ConfigurationDatabase(Protocol):
    """The enterprise server's store of device public keys (steps 7 and 13)."""

    async def store_key(self, device_id: str, spki: bytes) -> None: ...

    async def stored_key(self, device_id: str) -> bytes | None: ...


class PersistentStore(Protocol):
    """The device's flash store: protected key pair, DN and CA profile ID (step 5)."""

    async def save(
        self, device_id: str, protected_key: bytes, dn: str, profile_id: str
    ) -> None: ...


class KeyStore(Protocol):
    """The device's key store: certificate and private key (step 14)."""

    async def install(self, device_id: str, certificate: bytes, protected_key: bytes) -> None: ...


class SqliteUsers:
    """Messaging directory and directory user entries in SQLite, behind a small entry cache.

    Like a directory server's entry cache, the entries read last stay in memory: an enrollment
    reads its user twice (the bind in step 2, the DN in step 4), SQLite once. 32,768 entries
    (about 1.3 KB each, ~43 MB at most) hold a fleet of tens of thousands of devices: a served CA
    with 20,000 users missed on most reads with 4,096 (a SQLite read is ~45 µs of its ~450 µs
    per enrollment), and so did each embedded shard with 10,000.
    """

    ENTRY_CACHE = 32_768

    def __init__(self, database: Database) -> None:
        self._db = database
        self._entries: dict[str, tuple[User, Verifier]] = {}

    def seed(self, users: Iterable[tuple[User, Verifier]]) -> None:
        """Load users and their verifiers (off the clock)."""
        for user, verifier in users:
            self._db.write(
                "INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    user.user_id,
                    user.dn.text,
                    user.dn.der,
                    user.email,
                    user.upn,
                    user.alternative_names,
                    verifier.salt,
                    verifier.digest,
                    verifier.iterations,
                ),
            )
        self._db.flush()
        self._entries.clear()

    def _entry(self, user_id: str) -> tuple[User, Verifier] | None:
        entry = self._entries.get(user_id)
        if entry is not None:
            return entry
        row = self._db.read_one("SELECT * FROM users WHERE user_id = ?", (user_id,))
        if row is None:
            return None
        dn = DistinguishedName(row[1], row[2])
        entry = (User(user_id, dn, row[3], row[4], row[5]), Verifier(row[6], row[7], row[8]))
        if len(self._entries) >= self.ENTRY_CACHE:
            del self._entries[next(iter(self._entries))]  # the oldest entry
        self._entries[user_id] = entry
        return entry

    async def lookup_user(self, user_id: str) -> User:
        entry = self._entry(user_id)
        if entry is None:
            raise UnknownUserError(user_id)
        return entry[0]

    async def verifier(self, user_id: str) -> Verifier:
        entry = self._entry(user_id)
        if entry is None:
            raise AuthenticationError(user_id)  # an unknown user fails the bind like a bad password
        return entry[1]

    async def authenticate(self, user_id: str, password: str) -> None:
        """A bind against the user's salted verifier, compared in constant time."""
        if not check_password(await self.verifier(user_id), password):
            raise AuthenticationError(user_id)


class SqliteDirectory(SqliteUsers):
    """The directory: user entries plus published certificates."""

    async def publish(self, dn: str, serial: int, certificate: bytes) -> None:
        """Stage the certificate. A serial staged in this batch is refused at once (the CA
        draws again); against committed rows the serial's PRIMARY KEY is the backstop at the
        group commit. A lookup per publish is not worth it: serials are 128 bits from the OS's
        CSPRNG (about n^2 / 2^129 collisions in n certificates), and the lookup, a random B-tree
        probe between crypto operations, cost 4% of an enrollment's time (gate A/B, 1.04)."""
        staged = self._db.staged
        if ("serial", serial) in staged:
            raise DuplicateSerialError(serial)
        self._db.write(
            "INSERT INTO published VALUES (?, ?, ?)",
            (serial.to_bytes(16, "big"), dn, certificate),
            ("published", dn, serial),
            certificate,
        )
        staged["serial", serial] = True

    async def retrieve(self, dn: str, serial: int) -> bytes:
        staged: bytes | None = self._db.staged.get(("published", dn, serial))
        if staged is not None:
            return staged
        row = self._db.read_one(
            "SELECT certificate FROM published WHERE serial = ? AND dn = ?",
            (serial.to_bytes(16, "big"), dn),
        )
        if row is None:
            raise CertificateNotFoundError(dn, serial)
        certificate: bytes = row[0]
        return certificate


class SqliteConfigurationDatabase:
    """Device public keys in SQLite."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def store_key(self, device_id: str, spki: bytes) -> None:
        self._db.write(
            "INSERT OR REPLACE INTO device_keys VALUES (?, ?)",
            (device_id, spki),
            ("device_keys", device_id),
            spki,
        )

    async def stored_key(self, device_id: str) -> bytes | None:
        staged: bytes | None = self._db.staged.get(("device_keys", device_id))
        if staged is not None:
            return staged
        row = self._db.read_one("SELECT spki FROM device_keys WHERE device_id = ?", (device_id,))
        return None if row is None else bytes(row[0])


class SqliteDeviceStores:
    """The device side's persistent store and key store in SQLite."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def save(self, device_id: str, protected_key: bytes, dn: str, profile_id: str) -> None:
        self._db.write(
            "INSERT INTO persistent_store VALUES (?, ?, ?, ?)",
            (device_id, protected_key, dn, profile_id),
        )

    async def install(self, device_id: str, certificate: bytes, protected_key: bytes) -> None:
        self._db.write(
            "INSERT INTO key_store VALUES (?, ?, ?)", (device_id, certificate, protected_key)
        )
