"""Storage on PostgreSQL (asyncpg): the configuration database, the CA's issued certificates and
the served CA's transactions, behind the same interfaces as the SQLite defaults.

One `PgDatabase` per process and DSN holds an asyncpg pool, created on first use inside the
running event loop (systems are built before the loop starts) together with enrollbench's schema.
Every statement binds its parameters. Every driver or network error becomes a typed engine error:
`DatabaseUnavailableError` when the server cannot be reached or went away (the pool is then
dropped and the next call connects afresh, so the store recovers when the server returns),
`DatabaseError` for anything else the server refuses. Each call is bounded by `timeout`: a
stalled server fails the call instead of hanging the enrollment.

asyncpg over psycopg 3 (async) by measurement on this machine: see the closing note of issue 9.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from engine.errors import CertificateNotFoundError, DuplicateSerialError, FailedError
from engine.service import Publication, Transaction

T = TypeVar("T")
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"  # generic in the stubs only

SCHEMA = """
CREATE TABLE IF NOT EXISTS device_keys (device_id TEXT PRIMARY KEY, spki BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS issued (
    serial BYTEA PRIMARY KEY, dn TEXT NOT NULL, certificate BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS transactions (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, request BYTEA NOT NULL, status TEXT NOT NULL,
    decide_at DOUBLE PRECISION, approve BOOLEAN, serial BYTEA, certificate BYTEA,
    error TEXT NOT NULL, detail TEXT NOT NULL, delivered BOOLEAN NOT NULL,
    created DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS transactions_status ON transactions (status);
"""
# workers of one server start together: CREATE ... IF NOT EXISTS is not safe against a
# concurrent CREATE (a unique violation in pg_type), so the schema is made under this lock
_SCHEMA_LOCK = 0x656E726F6C6C


class DatabaseError(FailedError):
    """PostgreSQL refused a statement (a server-side error that is not a lost connection)."""

    reason = "database-error"


class DatabaseUnavailableError(DatabaseError):
    """PostgreSQL could not be reached, went away, refused the login or did not answer in time."""

    reason = "database-unavailable"


class DatabaseValueError(DatabaseError):
    """A value PostgreSQL cannot store (a NUL character in text), refused before it is sent."""

    reason = "database-value-refused"


_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # admin shutdown, cannot connect now (starting up)
    asyncpg.InsufficientResourcesError,  # too many connections
    asyncpg.InvalidAuthorizationSpecificationError,  # wrong password or user
    asyncpg.InvalidCatalogNameError,  # no such database
)


def _text(value: str) -> str:
    """A text parameter PostgreSQL can hold: its text type has no NUL character."""
    if "\x00" in value:
        raise DatabaseValueError(f"a NUL character in {value!r} cannot be stored")
    return value


async def _reset(connection: asyncpg.Connection) -> None:
    """Ready a connection for its next user: only an unfinished transaction needs undoing.

    asyncpg's default reset sends a query on every release (advisory unlock, CLOSE ALL,
    UNLISTEN, RESET ALL); these stores leave no session state (their locks are transaction
    locks), and that round trip cost about a third of a store_key + stored_key pair."""
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


class PgDatabase:
    """A process's pool on one PostgreSQL database (see the module)."""

    def __init__(
        self, dsn: str, *, max_size: int = 8, timeout: float = 5.0, min_size: int = 1
    ) -> None:
        self._dsn = dsn
        self._sizes = (min_size, max_size)
        self.timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._creating: asyncio.Lock | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for another process (a shard plan): the settings, not the pool or lock."""
        return {"dsn": self._dsn, "sizes": self._sizes, "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        min_size, max_size = state["sizes"]
        self.__init__(  # type: ignore[misc]
            state["dsn"], max_size=max_size, timeout=state["timeout"], min_size=min_size
        )

    def _where(self) -> str:
        """The server without its credentials (for messages: no secrets in logs)."""
        return self._dsn.rpartition("@")[2]

    async def _get_pool(self) -> asyncpg.Pool:
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._loop is loop:  # the common case: no lock
            return self._pool
        if self._loop is not loop:  # a pool belongs to the loop that made it
            self._discard()
            self._loop, self._creating = loop, asyncio.Lock()
        assert self._creating is not None
        async with self._creating:
            if self._pool is None:
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._sizes[0],
                    max_size=self._sizes[1],
                    timeout=self.timeout,
                    command_timeout=self.timeout,
                    reset=_reset,
                )
                try:
                    async with pool.acquire() as connection, connection.transaction():
                        await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                        await connection.execute(SCHEMA)
                except BaseException:
                    pool.terminate()
                    raise
                self._pool = pool
            return self._pool

    def _discard(self) -> None:
        """Drop the pool without waiting (its connections may be dead or of another loop)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.terminate()

    async def run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """`work` on a pooled connection within `timeout`, driver errors made typed."""
        try:
            async with asyncio.timeout(self.timeout):
                pool = await self._get_pool()
                async with pool.acquire() as connection:
                    return await work(connection)
        except _UNAVAILABLE as exc:
            self._discard()  # the next call connects afresh
            raise DatabaseUnavailableError(
                f"PostgreSQL at {self._where()}: {type(exc).__name__}: {exc}"
            ) from exc
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"PostgreSQL at {self._where()}: {exc}") from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


class PgConfigurationDatabase:
    """Device public keys (the enterprise server's configuration database, steps 7 and 13)."""

    def __init__(self, database: PgDatabase) -> None:
        self._db = database

    async def store_key(self, device_id: str, spki: bytes) -> None:
        sql = (
            "INSERT INTO device_keys VALUES ($1, $2) "
            "ON CONFLICT (device_id) DO UPDATE SET spki = EXCLUDED.spki"
        )
        device = _text(device_id)

        async def write(connection: Connection) -> None:
            await connection.execute(sql, device, spki)

        await self._db.run(write)

    async def stored_key(self, device_id: str) -> bytes | None:
        device = _text(device_id)

        async def read(connection: Connection) -> bytes | None:
            found: bytes | None = await connection.fetchval(
                "SELECT spki FROM device_keys WHERE device_id = $1", device
            )
            return found

        return await self._db.run(read)


class PgIssuedStore:
    """The CA's issued certificates; the serial is the table's PRIMARY KEY (RFC 5280 4.1.2.2)."""

    def __init__(self, database: PgDatabase) -> None:
        self._db = database

    async def record(self, serial: int, dn: str, certificate: bytes) -> None:
        """DuplicateSerialError when the database already holds the serial."""
        name = _text(dn)

        async def write(connection: Connection) -> None:
            await connection.execute(
                "INSERT INTO issued VALUES ($1, $2, $3)", _serial(serial), name, certificate
            )

        try:
            await self._db.run(write)
        except DatabaseError as exc:
            if isinstance(exc.__cause__, asyncpg.UniqueViolationError):
                raise DuplicateSerialError(serial) from exc.__cause__
            raise

    async def retrieve(self, dn: str, serial: int) -> bytes:
        name = _text(dn)

        async def read(connection: Connection) -> bytes | None:
            found: bytes | None = await connection.fetchval(
                "SELECT certificate FROM issued WHERE serial = $1 AND dn = $2",
                _serial(serial),
                name,
            )
            return found

        certificate = await self._db.run(read)
        if certificate is None:
            raise CertificateNotFoundError(dn, serial)
        return certificate

    # the Directory interface's names for the same operations
    async def publish(self, dn: str, serial: int, certificate: bytes) -> None:
        await self.record(serial, dn, certificate)


def _serial(serial: int) -> bytes:
    return serial.to_bytes(16, "big")


_ISSUED_WITH_SQL = (
    "INSERT INTO issued SELECT * FROM unnest($1::bytea[], $2::text[], $3::bytea[]) "
    "ON CONFLICT (serial) DO NOTHING RETURNING serial"
)
_CLOSE_SQL = (
    "UPDATE transactions SET status = 'issued', serial = u.serial, certificate = u.certificate, "
    "delivered = TRUE FROM unnest($1::text[], $2::bytea[], $3::bytea[]) "
    "AS u(id, serial, certificate) WHERE transactions.id = u.id "
    "AND transactions.status = 'pending' RETURNING transactions.id"
)
# requests awaiting an administrator: undecided, or a simulated review not yet ended
_PENDING_SQL = (
    "SELECT id, user_id, created FROM transactions WHERE status = 'pending' "
    "AND (approve IS NULL OR decide_at > $1) ORDER BY created"
)
_AWAITING_SQL = (
    "SELECT COUNT(*) FROM transactions WHERE status = 'pending' "
    "AND (approve IS NULL OR decide_at > $1)"
)


class PgServiceStore:
    """The served CA's transactions and published certificates (engine.service.ServiceStore)."""

    def __init__(self, database: PgDatabase) -> None:
        self._db = database

    async def find(self, transaction_id: str) -> Transaction | None:
        key = _text(transaction_id)

        async def read(connection: Connection) -> asyncpg.Record | None:
            row: asyncpg.Record | None = await connection.fetchrow(
                "SELECT id, user_id, request, status, decide_at, approve, certificate, error, "
                "detail, delivered FROM transactions WHERE id = $1",
                key,
            )
            return row

        row = await self._db.run(read)
        return None if row is None else Transaction(*row)

    async def queue(
        self,
        transaction_id: str,
        user_id: str,
        request: bytes,
        decide_at: float | None,
        approve: bool | None,
        now: float,
    ) -> None:
        values = (_text(transaction_id), _text(user_id), request, decide_at, approve, now)

        async def write(connection: Connection) -> None:
            await connection.execute(
                "INSERT INTO transactions VALUES ($1, $2, $3, 'pending', $4, $5, NULL, NULL, "
                "'', '', FALSE, $6) ON CONFLICT (id) DO UPDATE SET user_id = EXCLUDED.user_id, "
                "request = EXCLUDED.request, status = 'pending', decide_at = EXCLUDED.decide_at, "
                "approve = EXCLUDED.approve, serial = NULL, certificate = NULL, error = '', "
                "detail = '', delivered = FALSE, created = EXCLUDED.created",
                *values,
            )

        await self._db.run(write)

    async def deliver(self, transaction_id: str) -> None:
        await self._execute(
            "UPDATE transactions SET delivered = TRUE WHERE id = $1", _text(transaction_id)
        )

    async def finish(self, transaction_id: str, status: str, error: str, detail: str) -> None:
        await self._execute(
            "UPDATE transactions SET status = $1, error = $2, detail = $3, delivered = TRUE "
            "WHERE id = $4 AND status = 'pending'",
            status,
            _text(error),
            _text(detail),
            _text(transaction_id),
        )

    async def decide(self, transaction_id: str, approve: bool, now: float) -> bool:
        key = _text(transaction_id)

        async def write(connection: Connection) -> str:
            status: str = await connection.execute(
                "UPDATE transactions SET approve = $1, decide_at = $2 WHERE id = $3 "
                "AND status = 'pending' AND (approve IS NULL OR decide_at > $2)",
                approve,
                now,
                key,
            )
            return status

        return await self._db.run(write) == "UPDATE 1"

    async def pending(self, now: float) -> list[tuple[str, str, float]]:
        async def read(connection: Connection) -> list[asyncpg.Record]:
            return await connection.fetch(_PENDING_SQL, now)

        return [(str(r[0]), str(r[1]), float(r[2])) for r in await self._db.run(read)]

    async def counts(self, now: float) -> dict[str, int]:
        async def read(connection: Connection) -> dict[str, int]:
            found = await connection.fetch(
                "SELECT status, COUNT(*) FROM transactions GROUP BY status"
            )
            awaiting = await connection.fetchval(_AWAITING_SQL, now)
            published = await connection.fetchval("SELECT COUNT(*) FROM issued")
            return {
                **{str(r[0]): int(r[1]) for r in found},
                "awaiting": int(awaiting),
                "published": int(published),
            }

        return await self._db.run(read)

    async def publish(self, batch: Sequence[Publication]) -> list[bool | DuplicateSerialError]:
        """A group commit: every publication in one transaction, three statements at most.

        A serial the table holds (or that came earlier in the batch) is that publication's
        DuplicateSerialError; a publication closing a transaction that is no longer pending
        (another worker closed it) writes nothing and is False."""
        for publication in batch:
            _text(publication.dn)
            if publication.closes is not None:
                _text(publication.closes)

        async def write(connection: Connection) -> list[bool | DuplicateSerialError]:
            async with connection.transaction():
                return await _publish(connection, batch)

        return await self._db.run(write)

    async def close(self) -> None:
        await self._db.close()

    async def _execute(self, sql: str, *args: Any) -> None:
        async def write(connection: Connection) -> None:
            await connection.execute(sql, *args)

        await self._db.run(write)


async def _publish(
    connection: Connection, batch: Sequence[Publication]
) -> list[bool | DuplicateSerialError]:
    inserted = {
        r[0]
        for r in await connection.fetch(
            _ISSUED_WITH_SQL,
            [p.serial for p in batch],
            [p.dn for p in batch],
            [p.certificate for p in batch],
        )
    }
    outcomes: list[bool | DuplicateSerialError] = []
    for publication in batch:
        if publication.serial in inserted:
            inserted.discard(publication.serial)  # a second use in this batch is a duplicate
            outcomes.append(True)
        else:
            outcomes.append(DuplicateSerialError(int.from_bytes(publication.serial, "big")))
    # a transaction closes once: a later publication closing it in this batch writes nothing
    closing: list[tuple[int, Publication]] = []
    for i, publication in enumerate(batch):
        if publication.closes is not None and outcomes[i] is True:
            if any(p.closes == publication.closes for _, p in closing):
                outcomes[i] = False
            else:
                closing.append((i, publication))
    if closing:
        closed = {
            r[0]
            for r in await connection.fetch(
                _CLOSE_SQL,
                [p.closes for _, p in closing],
                [p.serial for _, p in closing],
                [p.certificate for _, p in closing],
            )
        }
        for i, publication in closing:
            if publication.closes not in closed:
                outcomes[i] = False  # another worker closed it first
    unwritten = [p.serial for i, p in enumerate(batch) if outcomes[i] is False]
    if unwritten:  # a publication that closes nothing writes nothing
        await connection.execute("DELETE FROM issued WHERE serial = ANY($1::bytea[])", unwritten)
    return outcomes
