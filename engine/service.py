"""The server side of the flow as one CA service, its state shared by every worker process.

`enrollbench serve` runs N worker processes; each holds a `SharedCAService` on the same SQLite
file (WAL mode) in the state folder. So there is one serial space (the published certificates'
PRIMARY KEY), one store of transactions (a poll served by another worker finds its
transaction), one directory and one approval queue, whose administrators are one `ReviewBoard`
in the state folder. Every answer is committed before it is returned: after a SIGKILL, each
certificate a client received is in the store.

A transaction is open until its final answer (issued or refused) has been given once: a repeated
transaction ID while it is open gets its current state (polls, retries of a pending request);
the same ID after that starts a new transaction (a device enrolling again with the same key).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from engine import _der
from engine.approval import ReviewBoard
from engine.auth import Verifier
from engine.ca import CertificationAuthority, IssuancePolicy
from engine.errors import (
    ApprovalDeniedError,
    DuplicateSerialError,
    EnrollmentError,
    FailedError,
    RejectedError,
    UnknownUserError,
)
from engine.flow import Step
from engine.identity import User
from engine.keys import CaSigner, key_spec
from engine.request import SAN_OID_DER, ParsedRequest, parse_request, split_request
from engine.stores import Database, SqliteDirectory, UserDirectory
from engine.system import CAMaterial, EngineConfig
from engine.wire.seam import Ticket, TicketStatus

_SCHEMA = """
CREATE TABLE IF NOT EXISTS transactions (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, request BLOB NOT NULL, status TEXT NOT NULL,
    decide_at REAL, approve INTEGER, serial BLOB, certificate BLOB, error TEXT NOT NULL,
    detail TEXT NOT NULL, delivered INTEGER NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS transactions_status ON transactions (status);
-- the SQLite directory's table (engine.stores), made here too for a store whose users are
-- in another directory (an LDAP server)
CREATE TABLE IF NOT EXISTS published (
    serial BLOB PRIMARY KEY, dn TEXT NOT NULL, certificate BLOB NOT NULL);
"""
# A serial colliding this many times in a row means the random source is broken.
_SERIAL_DRAWS = 3
# The soonest a client is asked to poll again (seconds).
MIN_RETRY_AFTER = 0.05


class SubjectPolicy(StrEnum):
    """Whose subject the certificate carries."""

    MATCH = "match"  # the request's subject must equal the user's directory DN (the seed's CA)
    DIRECTORY = "directory"  # the CA writes the directory's DN and names (as AD CS templates do)


Observe = Callable[[Step, int], None]
_Written = asyncio.Future[tuple[bool, int]]  # written?, this request's share of the commit (ns)
_Outcome = bool | DuplicateSerialError  # a publication in a group commit: written?, or refused


@dataclass(frozen=True, slots=True)
class Transaction:
    """A stored transaction (one queued request and, once decided, its outcome)."""

    id: str
    user_id: str
    request: bytes
    status: str
    decide_at: float | None
    approve: bool | None
    certificate: bytes | None
    error: str
    detail: str
    delivered: bool


@dataclass(frozen=True, slots=True)
class Publication:
    """One issuance's writes in a group commit: the certificate under its serial (16 bytes,
    unique in the store) and, for a queued request, the pending transaction it closes."""

    serial: bytes
    dn: str
    certificate: bytes
    closes: str | None = None


class ServiceStore(Protocol):
    """The served CA's shared state: transactions and published certificates, one store for
    every worker (SQLite file by default, `engine.pgstores.PgServiceStore` on PostgreSQL)."""

    async def find(self, transaction_id: str) -> Transaction | None: ...

    async def queue(
        self,
        transaction_id: str,
        user_id: str,
        request: bytes,
        decide_at: float | None,
        approve: bool | None,
        now: float,
    ) -> None:
        """Store a pending request (replacing a finished transaction with the same ID)."""

    async def deliver(self, transaction_id: str) -> None:
        """Mark a finished transaction's answer as given (the ID may start a new one)."""

    async def finish(self, transaction_id: str, status: str, error: str, detail: str) -> None:
        """Close a pending transaction without a certificate (refused)."""

    async def decide(self, transaction_id: str, approve: bool, now: float) -> bool:
        """An administrator's decision on a request still awaiting one; False if none."""

    async def pending(self, now: float) -> list[tuple[str, str, float]]: ...

    async def counts(self, now: float) -> dict[str, int]: ...

    async def publish(self, batch: Sequence[Publication]) -> list[_Outcome]:
        """A group commit, all in one transaction: per publication True (written), False
        (its transaction was no longer pending: nothing written) or DuplicateSerialError (the
        serial is taken: nothing written). Any other failure raises and writes nothing."""


def _ignore(step: Step, nanoseconds: int) -> None:
    pass


def seed_users(path: Path, users: Iterable[tuple[User, Verifier]]) -> None:
    """Create the service's store at `path` and load its users (before the workers start)."""
    database = Database(path, durable=True)
    try:
        SqliteDirectory(database).seed(users)
    finally:
        database.close()
    connection = sqlite3.connect(str(path))
    try:
        connection.executescript(_SCHEMA)
    finally:
        connection.close()


class SqliteServiceStore:
    """The service's state in its SQLite file (WAL mode), shared by the workers' connections.

    The administrators' operations also exist as plain calls (`*_now`): `enrollbench approve`
    and the metrics endpoint call them outside a coroutine."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    async def find(self, transaction_id: str) -> Transaction | None:
        row = self._db.execute(
            "SELECT id, user_id, request, status, decide_at, approve, certificate, error, "
            "detail, delivered FROM transactions WHERE id = ?",
            (transaction_id,),
        ).fetchone()
        if row is None:
            return None
        approve = None if row[5] is None else bool(row[5])
        return Transaction(
            row[0], row[1], row[2], row[3], row[4], approve, row[6], row[7], row[8], bool(row[9])
        )

    async def queue(
        self,
        transaction_id: str,
        user_id: str,
        request: bytes,
        decide_at: float | None,
        approve: bool | None,
        now: float,
    ) -> None:
        flag = None if approve is None else int(approve)
        self._db.execute(
            "INSERT OR REPLACE INTO transactions VALUES (?,?,?,?,?,?,NULL,NULL,'','',0,?)",
            (transaction_id, user_id, request, "pending", decide_at, flag, now),
        )

    async def deliver(self, transaction_id: str) -> None:
        self._db.execute("UPDATE transactions SET delivered = 1 WHERE id = ?", (transaction_id,))

    async def finish(self, transaction_id: str, status: str, error: str, detail: str) -> None:
        self._db.execute(
            "UPDATE transactions SET status = ?, error = ?, detail = ?, delivered = 1 "
            "WHERE id = ? AND status = 'pending'",
            (status, error, detail, transaction_id),
        )

    async def decide(self, transaction_id: str, approve: bool, now: float) -> bool:
        return self.decide_now(transaction_id, approve, now)

    async def pending(self, now: float) -> list[tuple[str, str, float]]:
        return self.pending_now(now)

    async def counts(self, now: float) -> dict[str, int]:
        return self.counts_now(now)

    def decide_now(self, transaction_id: str, approve: bool, now: float) -> bool:
        cursor = self._db.execute(
            "UPDATE transactions SET approve = ?, decide_at = ? WHERE id = ? "
            "AND status = 'pending' AND (approve IS NULL OR decide_at > ?)",
            (int(approve), now, transaction_id, now),
        )
        return cursor.rowcount == 1

    def pending_now(self, now: float) -> list[tuple[str, str, float]]:
        rows = self._db.execute(
            "SELECT id, user_id, created FROM transactions WHERE status = 'pending' "
            "AND (approve IS NULL OR decide_at > ?) ORDER BY created",
            (now,),
        ).fetchall()
        return [(str(r[0]), str(r[1]), float(r[2])) for r in rows]

    def counts_now(self, now: float) -> dict[str, int]:
        found = dict(self._db.execute("SELECT status, COUNT(*) FROM transactions GROUP BY status"))
        awaiting = self._db.execute(
            "SELECT COUNT(*) FROM transactions WHERE status = 'pending' "
            "AND (approve IS NULL OR decide_at > ?)",
            (now,),
        ).fetchone()[0]
        published = self._db.execute("SELECT COUNT(*) FROM published").fetchone()[0]
        return {
            **{str(k): int(v) for k, v in found.items()},
            "awaiting": int(awaiting),
            "published": int(published),
        }

    async def publish(self, batch: Sequence[Publication]) -> list[_Outcome]:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            outcomes = [self._apply(publication) for publication in batch]
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes

    def _apply(self, publication: Publication) -> _Outcome:
        """One publication's writes inside the group's transaction: all of them or none."""
        db = self._db
        insert = (
            "INSERT INTO published VALUES (?, ?, ?)",
            (publication.serial, publication.dn, publication.certificate),
        )
        if publication.closes is None:
            try:
                db.execute(*insert)
            except sqlite3.IntegrityError as exc:
                return _duplicate(publication, exc)
            return True
        db.execute("SAVEPOINT request")
        try:
            closed = db.execute(
                "UPDATE transactions SET status = 'issued', serial = ?, certificate = ?, "
                "delivered = 1 WHERE id = ? AND status = 'pending'",
                (publication.serial, publication.certificate, publication.closes),
            )
            if closed.rowcount != 1:
                return False
            db.execute(*insert)
        except sqlite3.IntegrityError as exc:
            db.execute("ROLLBACK TO request")
            return _duplicate(publication, exc)
        finally:
            db.execute("RELEASE request")
        return True

    def close(self) -> None:
        self._db.close()


def _duplicate(publication: Publication, cause: Exception) -> DuplicateSerialError:
    duplicate = DuplicateSerialError(int.from_bytes(publication.serial, "big"))
    duplicate.__cause__ = cause
    return duplicate


class SharedCAService:
    """One worker's handle on the CA service (implements `engine.wire.seam.CAService`).

    `review_board`: the administrators' calendar shared by all workers (required when the
    configuration has approval). `manual`: no simulated administrators; requests wait for
    `decide` (an administrator's call from the admin endpoint or command). `store`: where
    transactions and published certificates live (the caller closes it); by default the SQLite
    file at `path`, which also holds the users unless `directory` is given. `directory`: the
    users, binds and publication on a real directory (an LDAP server; the caller closes it):
    each certificate is published there once the store has committed it (the store keeps
    serials unique; an LDAP entry's certificate is replaced). `ca_signer`: the issuing CA's key
    where it is not in memory (a PKCS #11 token, this process's own session).
    """

    def __init__(
        self,
        config: EngineConfig,
        material: CAMaterial,
        path: Path,
        *,
        review_board: ReviewBoard | None = None,
        subject_policy: SubjectPolicy = SubjectPolicy.MATCH,
        manual: bool = False,
        observe: Observe = _ignore,
        wall_clock: Callable[[], float] = time.time,
        store: ServiceStore | None = None,
        directory: UserDirectory | None = None,
        ca_signer: CaSigner | None = None,
    ) -> None:
        if config.approval is not None and review_board is None and not manual:
            raise ValueError("an approval policy needs the service's shared review board")
        self._users: Database | None = None
        # a directory given publishes there after the store's commit; the SQLite one's
        # published table is the store's, written by the commit itself
        self._publish_to = directory
        if directory is None:
            self._users = Database(path, durable=True)
            directory = SqliteDirectory(self._users)
        self.directory: UserDirectory = directory
        self._own_store: SqliteServiceStore | None = None
        if store is None:
            store = self._own_store = SqliteServiceStore(path)
        self._store = store
        self.authority = CertificationAuthority(
            config.profile_id,
            material.chain(),
            config.hash_name,
            key_spec(config.device_key).family,
            IssuancePolicy(config.allowed_keys),
            config.validity_days * 86_400,
            self.directory,
            wall_clock,
            signer=ca_signer,
        )
        self._certificates = material.certificates
        self._chain_pkcs7 = self.authority.chain_der
        self._approval = config.approval
        self._rng = random.Random()
        # the simulated administrators: their shared calendar, review times, approval rate
        self._simulated: tuple[ReviewBoard, Callable[[], float], float] | None = None
        if config.approval is not None and review_board is not None and not manual:
            policy = config.approval
            self._simulated = (review_board, policy.delay.sampler(self._rng), policy.approval_rate)
        self._subject_policy = subject_policy
        self._batch: list[tuple[Publication, _Written]] = []
        self._commits: set[asyncio.Task[None]] = set()
        self._observe = observe
        self._wall_clock = wall_clock

    @property
    def ca_certificates(self) -> tuple[bytes, ...]:
        return self._certificates

    @property
    def chain_pkcs7(self) -> bytes:
        return self._chain_pkcs7

    async def authenticate(self, user_id: str, password: str) -> User:
        """Step 2: a simple bind; the user's entry on success."""
        began = time.perf_counter_ns()
        try:
            await self.directory.authenticate(user_id, password)
            return await self.directory.lookup_user(user_id)
        finally:
            self._observe(Step.AUTHENTICATE, time.perf_counter_ns() - began)

    async def find_user(self, request_der: bytes) -> User:
        """The user a request names: its subject's CN is the user ID (every directory DN here
        starts with it; scepclient can write a CN but not the DN's DC parts)."""
        began = time.perf_counter_ns()
        try:
            # the subject alone: a signature algorithm we do not accept is the CA's refusal
            # at submit (a ticket), not a failure to find the user
            user_id = common_name(split_request(request_der)[1])
            if user_id is None:
                raise UnknownUserError("(no CN in the request's subject)")
            return await self.directory.lookup_user(user_id)
        finally:
            self._observe(Step.LOOKUP_DN, time.perf_counter_ns() - began)

    async def submit(self, transaction_id: str, request_der: bytes, user: User) -> Ticket:
        """Check the request, then issue it or queue it for an administrator (see the module).
        A store that fails (a database server down, serials colliding draw after draw) fails
        this request with the error's type (a FAILED ticket) instead of raising.

        Only a queued request leaves a transaction behind (an auto-issued one is finished when
        answered), so without approval there is nothing to look up."""
        try:
            return await self._submit(transaction_id, request_der, user)
        except FailedError as exc:
            return _refusal(transaction_id, exc)

    async def _submit(self, transaction_id: str, request_der: bytes, user: User) -> Ticket:
        if self._approval is not None:
            row = await self._store.find(transaction_id)
            if row is not None and not row.delivered:
                return await self._advance(row)
        began = time.perf_counter_ns()
        try:
            request = self._policy_view(parse_request(request_der), user)
            self.authority.check(request, user)
        except EnrollmentError as exc:
            return _refusal(transaction_id, exc)
        finally:
            self._observe(Step.SEND_REQUEST, time.perf_counter_ns() - began)
        if self._approval is None:
            return await self._issue(transaction_id, request, user, replace=True)
        return await self._queue(transaction_id, request_der, user)

    async def poll(self, transaction_id: str) -> Ticket | None:
        """The transaction's state; a failing store is a FAILED ticket (as in `submit`)."""
        try:
            row = await self._store.find(transaction_id)
            return None if row is None else await self._advance(row)
        except FailedError as exc:
            return _refusal(transaction_id, exc)

    def decide(self, transaction_id: str, approve: bool) -> bool:
        """An administrator's decision on a request still waiting for one; False if there is
        none (unknown, finished, or already decided: a decision in effect is final)."""
        return self._sqlite().decide_now(transaction_id, approve, self._wall_clock())

    def pending(self) -> list[tuple[str, str, float]]:
        """Requests waiting for an administrator: (transaction ID, user ID, since). A request
        decided but not yet collected by its device is no longer waiting for one."""
        return self._sqlite().pending_now(self._wall_clock())

    def counts(self) -> dict[str, int]:
        """Transactions by status, those awaiting a decision, and certificates published (for
        the metrics endpoint)."""
        return self._sqlite().counts_now(self._wall_clock())

    async def decide_async(self, transaction_id: str, approve: bool) -> bool:
        """`decide` on any store."""
        return await self._store.decide(transaction_id, approve, self._wall_clock())

    async def pending_async(self) -> list[tuple[str, str, float]]:
        """`pending` on any store."""
        return await self._store.pending(self._wall_clock())

    async def counts_async(self) -> dict[str, int]:
        """`counts` on any store."""
        return await self._store.counts(self._wall_clock())

    def close(self) -> None:
        """Close the SQLite connections this service opened (a store passed in is not ours)."""
        if self._own_store is not None:
            self._own_store.close()
        if self._users is not None:
            self._users.close()

    def _sqlite(self) -> SqliteServiceStore:
        """The default store, whose administrators' calls need no event loop."""
        if self._own_store is None:
            raise TypeError("this store's administrators' calls are async: use *_async")
        return self._own_store

    def _policy_view(self, request: ParsedRequest, user: User) -> ParsedRequest:
        """The request as the CA's subject policy reads it."""
        if self._subject_policy is SubjectPolicy.MATCH:
            return request
        return request._replace(
            subject=user.dn.der, extensions={SAN_OID_DER: (False, user.alternative_names)}
        )

    async def _queue(self, transaction_id: str, request_der: bytes, user: User) -> Ticket:
        """Book an administrator (simulated) or wait for a person (manual); store as pending."""
        decide_at: float | None = None
        approve: bool | None = None
        if self._simulated is not None:
            board, draw_delay, approval_rate = self._simulated
            booked = board.reserve(draw_delay(), time.monotonic)
            # the board's clock is monotonic, the store's the wall clock: read both together,
            # after the board's lock (waiting for it between the reads shifted decide_at)
            now, monotonic = self._wall_clock(), time.monotonic()
            decide_at = now + (booked.finish - monotonic)
            approve = self._rng.random() < approval_rate
        else:
            now = self._wall_clock()
        await self._store.queue(transaction_id, user.user_id, request_der, decide_at, approve, now)
        return self._pending_ticket(transaction_id, decide_at, now)

    async def _advance(self, row: Transaction) -> Ticket:
        """An open transaction's current state; decide it if its administrator has."""
        transaction_id = row.id
        status = TicketStatus(row.status)
        if status is not TicketStatus.PENDING:
            await self._store.deliver(transaction_id)
            return Ticket(transaction_id, status, row.certificate or b"", row.error, row.detail)
        now = self._wall_clock()
        if row.approve is None or row.decide_at is None or row.decide_at > now:
            return self._pending_ticket(transaction_id, row.decide_at, now)
        if self._simulated is not None:
            self._simulated[0].release()
        user = await self.directory.lookup_user(row.user_id)
        if not row.approve:
            denied = ApprovalDeniedError(transaction_id, 0)
            await self._store.finish(transaction_id, "rejected", type(denied).__name__, str(denied))
            return _refusal(transaction_id, denied)
        request = self._policy_view(parse_request(row.request), user)
        return await self._issue(transaction_id, request, user, replace=False)

    async def _issue(
        self,
        transaction_id: str,
        request: ParsedRequest,
        user: User,
        *,
        replace: bool,
    ) -> Ticket:
        """Sign and publish, committed before the answer; a colliding serial draws again
        (RFC 5280 4.1.2.2: unique per CA, which the store enforces).

        Auto-issued transactions are finished when answered, so only the certificate is
        stored; a request decided after a wait also closes its pending transaction, unless
        another worker closed it first (then its result is the answer)."""
        for draw in range(_SERIAL_DRAWS):
            began = time.perf_counter_ns()
            issued = self.authority.issue(request, user)
            signed = time.perf_counter_ns() - began
            certificate = issued.certificate
            publication = Publication(
                issued.serial.to_bytes(16, "big"),
                issued.dn,
                certificate,
                None if replace else transaction_id,
            )
            try:
                written, commit_share = await self._write(publication)
                # the CA's time: its signature, its share of the group commit and its
                # directory write (a directory given)
                published = 0
                if written:
                    published = await self._publish(issued.dn, issued.serial, certificate)
                self._observe(Step.ISSUE, signed + commit_share + published)
                if written:
                    return Ticket(transaction_id, TicketStatus.ISSUED, certificate)
            except DuplicateSerialError:
                if draw == _SERIAL_DRAWS - 1:
                    raise
                continue
            row = await self._store.find(transaction_id)  # another worker decided it first
            if row is None:  # pragma: no cover (rows are never deleted)
                raise UnknownUserError(transaction_id)
            return await self._advance(row)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _publish(self, dn: str, serial: int, certificate: bytes) -> int:
        """The certificate into a directory given, after the store's commit; the time it took
        (ns). A failure there (FailedError) fails the request with its type."""
        if self._publish_to is None:
            return 0
        began = time.perf_counter_ns()
        await self._publish_to.publish(dn, serial, certificate)
        return time.perf_counter_ns() - began

    async def _write(self, publication: Publication) -> tuple[bool, int]:
        """Write `publication` in the next group commit and return once it is committed, with
        this request's share of the commit's time (ns).

        Requests handled in the same turn of the event loop share one store transaction (a
        commit costs more than the rest of an issuance's storage). False: the transaction it
        closes was closed elsewhere, nothing written. DuplicateSerialError: nothing written."""
        loop = asyncio.get_running_loop()
        future: _Written = loop.create_future()
        self._batch.append((publication, future))
        if len(self._batch) == 1:
            loop.call_soon(self._start_commit)
        return await future

    def _start_commit(self) -> None:
        batch, self._batch = self._batch, []
        # a task of its own: while it waits for a server, the next turn's requests form the
        # next batch
        task = asyncio.get_running_loop().create_task(self._commit_batch(batch))
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    async def _commit_batch(self, batch: list[tuple[Publication, _Written]]) -> None:
        began = time.perf_counter_ns()
        outcomes: Sequence[_Outcome | BaseException]
        try:
            outcomes = await self._store.publish([publication for publication, _ in batch])
        except Exception as exc:  # every request of the batch shares its failure
            outcomes = [exc] * len(batch)
        share = (time.perf_counter_ns() - began) // len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its request was cancelled
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result((outcome, share))

    @staticmethod
    def _pending_ticket(transaction_id: str, decide_at: float | None, now: float) -> Ticket:
        wait = MIN_RETRY_AFTER if decide_at is None else max(MIN_RETRY_AFTER, decide_at - now)
        return Ticket(transaction_id, TicketStatus.PENDING, retry_after=wait)


def _refusal(transaction_id: str, exc: EnrollmentError) -> Ticket:
    status = TicketStatus.REJECTED if isinstance(exc, RejectedError) else TicketStatus.FAILED
    return Ticket(transaction_id, status, error=type(exc).__name__, detail=str(exc))


_CN_OID = bytes.fromhex("550403")


def common_name(name_der: bytes) -> str | None:
    """The first CN of a DER Name (RFC 5280 4.1.2.4), or None; MalformedDerError when the
    Name does not parse."""
    start, end = _der.read_whole(name_der, _der.SEQUENCE)
    for _, _, rdn_start, rdn_end in _der.split_children(name_der, start, end):
        for _, _, atv_start, atv_end in _der.split_children(name_der, rdn_start, rdn_end):
            oid_start, oid_end = _der.expect(name_der, atv_start, _der.OID, atv_end)
            if name_der[oid_start:oid_end] == _CN_OID:
                _, value_start, value_end = _der.read_header(name_der, oid_end)
                return name_der[value_start:value_end].decode("utf-8", "replace")
    return None
