"""engine.pgstores against a real PostgreSQL started for the session."""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509

from bench.services import postgres
from engine.approval import ApprovalPolicy
from engine.distribution import Distribution
from engine.errors import CertificateNotFoundError, DuplicateSerialError
from engine.pgstores import (
    DatabaseUnavailableError,
    DatabaseValueError,
    PgConfigurationDatabase,
    PgDatabase,
    PgIssuedStore,
    PgServiceStore,
)
from engine.population import directory_entry, simulated_enrollee
from engine.service import Publication, ServiceStore, SharedCAService, seed_users
from engine.stores import ConfigurationDatabase, IssuedStore
from engine.system import EngineConfig
from engine.wire.seam import TicketStatus
from tests.conftest import SEED, ca_material, require_tool
from tests.engine.test_service import _request, _user

pytestmark = pytest.mark.server
T = TypeVar("T")
HOSTILE = [
    "o'brien",
    "'; DROP TABLE device_keys; --",
    "back\\slash\\",
    '"double" $1 %s ?',
    "ünïcödé ✓",
    "",
]
_keys = itertools.count(1)


@pytest.fixture(scope="module")
def server() -> Iterator[postgres.PostgresServer]:
    """One PostgreSQL for this module's tests, stopped at the end."""
    try:
        folder = postgres.bin_dir()
    except postgres.PostgresError:
        require_tool("initdb")
        raise
    require_tool(str(folder / "initdb"))
    started = postgres.start_postgres()
    yield started
    started.stop()


def _run(database: PgDatabase, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` in a fresh loop and close the loop's pool after it."""

    async def main() -> T:
        try:
            return await work()
        finally:
            await database.close()

    return asyncio.run(main())


def _serial() -> int:
    """A serial no other test uses (the session's database is shared)."""
    return 0x5E_0000 + next(_keys)


def test_configuration_database_round_trip(server: postgres.PostgresServer) -> None:
    """A stored key reads back; storing again replaces it; an unknown device has none."""
    database = PgDatabase(server.dsn)
    store: ConfigurationDatabase = PgConfigurationDatabase(database)  # the engine's interface

    async def work() -> tuple[bytes | None, bytes | None]:
        await store.store_key("device-1", b"first")
        await store.store_key("device-1", b"second")
        return await store.stored_key("device-1"), await store.stored_key("nobody")

    assert _run(database, work) == (b"second", None)


@pytest.mark.parametrize("device_id", HOSTILE)
def test_hostile_device_ids_are_data(server: postgres.PostgresServer, device_id: str) -> None:
    """Quotes, backslashes and SQL in a device ID are stored and read back as given."""
    database = PgDatabase(server.dsn)
    store = PgConfigurationDatabase(database)
    spki = device_id.encode() + b"\x00\xff"

    async def work() -> bytes | None:
        await store.store_key(device_id, spki)
        await store.store_key(device_id + "-other", b"x")
        return await store.stored_key(device_id)

    assert _run(database, work) == spki


def test_a_pickled_database_connects_afresh(server: postgres.PostgresServer) -> None:
    """A database pickled after use (for another process) carries its settings, not its pool."""
    database = PgDatabase(server.dsn, max_size=3, timeout=4.0)
    _run(database, lambda: PgConfigurationDatabase(database).store_key("pickled", b"k"))
    copy = pickle.loads(pickle.dumps(database))
    assert copy.timeout == 4.0
    assert _run(copy, lambda: PgConfigurationDatabase(copy).stored_key("pickled")) == b"k"


def test_a_nul_in_an_id_is_refused_cleanly(server: postgres.PostgresServer) -> None:
    """A NUL character (which PostgreSQL text cannot hold) is a DatabaseValueError."""
    database = PgDatabase(server.dsn)
    store = PgConfigurationDatabase(database)

    async def work() -> None:
        await store.store_key("nul\x00device", b"key")

    with pytest.raises(DatabaseValueError, match="NUL"):
        _run(database, work)
    with pytest.raises(DatabaseValueError):
        _run(database, lambda: store.stored_key("\x00"))


def test_issued_store_round_trip_and_duplicate(server: postgres.PostgresServer) -> None:
    """A recorded certificate is retrieved; its serial again is DuplicateSerialError."""
    database = PgDatabase(server.dsn)
    store = PgIssuedStore(database)
    recorder: IssuedStore = store  # the engine's interface
    serial = _serial()

    async def work() -> bytes:
        await recorder.record(serial, "CN=o'brien\\,x", b"certificate")
        with pytest.raises(DuplicateSerialError) as refused:
            await store.record(serial, "CN=someone else", b"other")
        assert refused.value.serial == serial
        with pytest.raises(CertificateNotFoundError):
            await store.retrieve("CN=someone else", serial)
        return await store.retrieve("CN=o'brien\\,x", serial)

    assert _run(database, work) == b"certificate"


def test_group_commit_outcomes(server: postgres.PostgresServer) -> None:
    """One batch: a new serial is written, a taken one and a repeat in the batch are
    DuplicateSerialError, and closing an unknown transaction writes nothing (False)."""
    database = PgDatabase(server.dsn)
    store: ServiceStore = PgServiceStore(database)  # the engine's interface
    issued = PgIssuedStore(database)
    taken, fresh, orphan = _serial(), _serial(), _serial()

    def publication(serial: int, closes: str | None = None) -> Publication:
        return Publication(serial.to_bytes(16, "big"), "CN=x", b"c%d" % serial, closes)

    async def work() -> list[bool | DuplicateSerialError]:
        await issued.record(taken, "CN=x", b"first")
        batch = [publication(taken), publication(fresh), publication(fresh)]
        outcomes = await store.publish([*batch, publication(orphan, "no-such-transaction")])
        with pytest.raises(CertificateNotFoundError):
            await issued.retrieve("CN=x", orphan)
        assert await issued.retrieve("CN=x", fresh) == b"c%d" % fresh
        return outcomes

    outcomes = _run(database, work)
    assert [type(o).__name__ for o in outcomes] == [
        "DuplicateSerialError",
        "bool",
        "DuplicateSerialError",
        "bool",
    ]
    assert (outcomes[1], outcomes[3]) == (True, False)


CONFIG = EngineConfig(auth_iterations=1)
APPROVAL = EngineConfig(
    auth_iterations=1, approval=ApprovalPolicy(1, Distribution("fixed", mean=0.0), 1.0)
)


@pytest.fixture
def users(tmp_path: Path) -> Path:
    """The service's users (SQLite); transactions and certificates go to PostgreSQL."""
    path = tmp_path / "users.sqlite"
    seed_users(path, [directory_entry(simulated_enrollee(i, SEED), SEED, 1) for i in range(5)])
    return path


def _service(path: Path, database: PgDatabase, config: EngineConfig = CONFIG) -> SharedCAService:
    store = PgServiceStore(database)
    return SharedCAService(config, ca_material(config), path, store=store, manual=True)


def test_service_issues_on_postgres(server: postgres.PostgresServer, users: Path) -> None:
    """Auto-issue: the certificate is committed in PostgreSQL before the answer."""
    database = PgDatabase(server.dsn)
    service = _service(users, database)

    async def work() -> tuple[bytes, bytes]:
        before = (await service.counts_async())["published"]
        ticket = await service.submit("pg-auto", _request(_user(1)), _user(1))
        assert ticket.status is TicketStatus.ISSUED
        assert (await service.counts_async())["published"] == before + 1
        serial = x509.load_der_x509_certificate(ticket.certificate).serial_number
        stored = await PgIssuedStore(database).retrieve(_user(1).dn.text, serial)
        return stored, ticket.certificate

    stored, answered = _run(database, work)
    assert stored == answered
    service.close()


def test_queue_poll_on_another_instance_then_decide(
    server: postgres.PostgresServer, users: Path
) -> None:
    """Queued by one service, found by a second one's poll (its own pool), decided, issued once."""
    first_db, second_db = PgDatabase(server.dsn), PgDatabase(server.dsn)
    first = _service(users, first_db, APPROVAL)
    second = _service(users, second_db, APPROVAL)

    async def work() -> None:
        queued = await first.submit("pg-queued", _request(_user(2)), _user(2))
        assert queued.status is TicketStatus.PENDING
        polled = await second.poll("pg-queued")
        assert polled is not None
        assert polled.status is TicketStatus.PENDING
        assert ("pg-queued", _user(2).user_id) in [p[:2] for p in await second.pending_async()]
        assert await second.decide_async("pg-queued", approve=True)
        assert not await second.decide_async("pg-queued", approve=False)  # decisions are final
        issued = await second.poll("pg-queued")
        assert issued is not None
        assert issued.status is TicketStatus.ISSUED
        again = await first.poll("pg-queued")  # the same answer, from the store
        assert again is not None
        assert (again.status, again.certificate) == (TicketStatus.ISSUED, issued.certificate)
        assert await first.poll("pg-unknown") is None
        await second_db.close()

    _run(first_db, work)
    first.close()
    second.close()


def test_rejected_decision_on_postgres(server: postgres.PostgresServer, users: Path) -> None:
    """An administrator's refusal ends the transaction rejected."""
    database = PgDatabase(server.dsn)
    service = _service(users, database, APPROVAL)

    async def work() -> tuple[TicketStatus, str]:
        await service.submit("pg-denied", _request(_user(3)), _user(3))
        assert await service.decide_async("pg-denied", approve=False)
        ticket = await service.poll("pg-denied")
        assert ticket is not None
        return ticket.status, ticket.error

    assert _run(database, work) == (TicketStatus.REJECTED, "ApprovalDeniedError")
    service.close()


def test_server_down_then_back(server: postgres.PostgresServer) -> None:
    """Stopped mid-way: calls raise DatabaseUnavailableError; started again: calls succeed."""
    database = PgDatabase(server.dsn, timeout=5.0)
    store = PgConfigurationDatabase(database)

    async def work() -> bytes | None:
        await store.store_key("fault", b"before")
        await asyncio.to_thread(server.halt)
        try:
            for _ in range(2):  # the pooled connection is dead, then the port refuses
                with pytest.raises(DatabaseUnavailableError) as down:
                    await store.stored_key("fault")
                assert down.value.reason == "database-unavailable"
                assert server.dsn.split("@")[0] not in str(down.value)  # no password
        finally:
            await asyncio.to_thread(server.resume)
        await store.store_key("fault", b"after")
        return await store.stored_key("fault")

    assert _run(database, work) == b"after"


def test_a_silent_server_times_out() -> None:
    """A server that accepts but never answers fails the call within its timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        database = PgDatabase(f"postgresql://u:p@127.0.0.1:{port}/db", timeout=0.5)
        with pytest.raises(DatabaseUnavailableError, match="TimeoutError"):
            _run(database, lambda: PgConfigurationDatabase(database).stored_key("x"))


def test_service_fails_typed_while_the_database_is_down(
    server: postgres.PostgresServer, users: Path
) -> None:
    """Database stopped: submit answers FAILED DatabaseUnavailableError; back: it issues."""
    database = PgDatabase(server.dsn, timeout=5.0)
    service = _service(users, database)

    async def work() -> tuple[tuple[TicketStatus, str], TicketStatus]:
        await service.counts_async()  # connected before the fault
        await asyncio.to_thread(server.halt)
        try:
            down = await service.submit("pg-down", _request(_user(4)), _user(4))
        finally:
            await asyncio.to_thread(server.resume)
        back = await service.submit("pg-back", _request(_user(4)), _user(4))
        return (down.status, down.error), back.status

    down, back = _run(database, work)
    assert down == (TicketStatus.FAILED, "DatabaseUnavailableError")
    assert back is TicketStatus.ISSUED
    service.close()


_POLLER = """
import asyncio, os, sys
from engine.pgstores import PgDatabase, PgServiceStore
from engine.service import SharedCAService
from engine.system import EngineConfig
from tests.engine.test_pgstores import APPROVAL
from tests.conftest import ca_material

async def main():
    database = PgDatabase(os.environ["ENROLLBENCH_TEST_DSN"])
    service = SharedCAService(APPROVAL, ca_material(APPROVAL), sys.argv[1],
                              store=PgServiceStore(database), manual=True)
    ticket = await service.poll("pg-other-process")
    await database.close()
    print(ticket.status.value if ticket else "none")

asyncio.run(main())
"""


def test_a_poll_in_another_process_finds_the_transaction(
    server: postgres.PostgresServer, users: Path
) -> None:
    """A request queued here is found, pending, by a poll from another process."""
    database = PgDatabase(server.dsn)
    service = _service(users, database, APPROVAL)
    queued = _run(
        database, lambda: service.submit("pg-other-process", _request(_user(0)), _user(0))
    )
    assert queued.status is TicketStatus.PENDING
    environment = {**os.environ, "ENROLLBENCH_TEST_DSN": server.dsn}
    done = subprocess.run(
        [sys.executable, "-c", _POLLER, str(users)],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        cwd=Path(__file__).parents[2],
        check=True,
    )
    assert done.stdout.strip() == TicketStatus.PENDING.value
    service.close()
