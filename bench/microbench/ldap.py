"""What an enrollment's LDAP work costs: the directory client's CPU next to slapd's own.

    python -m bench.microbench.ldap [--users 2000] [--enrollments 2000] [--rounds 5]
                                    [--concurrency 8] [--sides ours,ours-pooled,bonsai,ldap3]
                                    [--scheme {SSHA}] [--pin CPU] [--operations]

Starts its own slapd (bench.services.slapd) in a temporary folder with `--users` simulated users,
then runs blocks of `--enrollments` enrollments' LDAP work (step 2 bind as the user, steps 3-4
search by uid, step 11 replace userCertificate;binary, step 12 read it back), `--concurrency` in
flight, on uvloop. Sides, interleaved in rounds (order reversed every other round):

- `ours`: engine.ldap_directory (python-ldap driven by the loop), a new connection per bind;
- `ours-pooled`: the same with pooled rebinding connections;
- `bonsai`: the same operations with bonsai (asyncio, C); a bind is a new connection (bonsai has
  no rebind);
- `ldap3`: the same with ldap3 (pure Python, schema fetch off), blocking, one connection each
  for binds and admin work (a tenth of the enrollments: it is slow).

Each block prints enrollments/s, client CPU µs per enrollment (this process's process_time) and
slapd CPU µs per enrollment (/proc/<pid>/stat utime+stime); medians with min-max over rounds.
Certificates (one per user, P-256, built before the clock) carry the serial retrieve checks.

`--operations` measures single operations instead (how the client was chosen): searches by uid
and simple binds per second and client CPU µs each, for python-ldap blocking (the floor),
engine.ldap_directory (python-ldap on the loop), bonsai and ldap3.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.services.slapd import ADMIN_DN, PEOPLE, Slapd, SlapdConfig
from engine.ldap_directory import CERTIFICATE_ATTRIBUTE, LdapDirectory, LdapSettings
from engine.population import Enrollee, simulated_enrollee

ADMIN_PASSWORD = os.urandom(12).hex()  # a throwaway server's; never printed
SEED = 7


@dataclass(frozen=True, slots=True)
class Work:
    """One enrollment's inputs: the user and the certificate to publish."""

    enrollee: Enrollee
    serial: int
    certificate: bytes


@dataclass(frozen=True, slots=True)
class Block:
    """One block's figures."""

    side: str
    rate: float
    client_us: float
    server_us: float


def certificates(users: Sequence[Enrollee]) -> list[Work]:
    """One P-256 certificate per user with the user's DN and a distinct serial (off the clock)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    work = []
    for serial, enrollee in enumerate(users, 1):
        name = x509.Name.from_rfc4514_string(enrollee.user.dn.text)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        work.append(Work(enrollee, serial, certificate.public_bytes(serialization.Encoding.DER)))
    return work


async def ours(server: Slapd, work: Sequence[Work], concurrency: int, pooled: bool) -> None:
    """The engine's directory: authenticate, lookup_user, publish, retrieve."""
    settings = LdapSettings(
        server.url,
        ADMIN_DN,
        ADMIN_PASSWORD,
        pool_size=concurrency,
        bind_per_enrollment=not pooled,
    )
    directory = LdapDirectory(settings)

    async def enroll(item: Work) -> None:
        user_id = item.enrollee.user.user_id
        await directory.authenticate(user_id, item.enrollee.password)
        user = await directory.lookup_user(user_id)
        await directory.publish(user.dn.text, item.serial, item.certificate)
        await directory.retrieve(user.dn.text, item.serial)

    await _spread(work, concurrency, enroll)
    directory.close()


async def with_bonsai(server: Slapd, work: Sequence[Work], concurrency: int) -> None:
    """The same operations with bonsai: a client per bind, a pool of admin connections."""
    import bonsai  # noqa: PLC0415 (optional: only this comparison needs it)

    admin = bonsai.LDAPClient(server.url)
    admin.set_credentials("SIMPLE", user=ADMIN_DN, password=ADMIN_PASSWORD)
    idle = [await admin.connect(is_async=True) for _ in range(concurrency)]

    async def enroll(item: Work) -> None:
        entry = f"uid={item.enrollee.user.user_id},{PEOPLE}"
        client = bonsai.LDAPClient(server.url)
        client.set_credentials("SIMPLE", user=entry, password=item.enrollee.password)
        (await client.connect(is_async=True)).close()
        conn = idle.pop()
        query = f"(uid={bonsai.escape_filter_exp(item.enrollee.user.user_id)})"
        found = await conn.search(PEOPLE, 1, query, ["seeAlso", "mail", "userPrincipalName"])
        change = bonsai.LDAPEntry(found[0].dn)
        change.connection = conn
        replace, value = bonsai.LDAPModOp.REPLACE, item.certificate
        cast(Any, change).change_attribute(CERTIFICATE_ATTRIBUTE, replace, value)
        await change.modify()
        read = await conn.search(entry, 0, "(objectClass=*)", [CERTIFICATE_ATTRIBUTE])
        assert read[0][CERTIFICATE_ATTRIBUTE][0] == item.certificate
        idle.append(conn)

    await _spread(work, concurrency, enroll)
    for conn in idle:
        conn.close()


def with_ldap3(server: Slapd, work: Sequence[Work]) -> None:
    """The same operations with ldap3, blocking (it has no asyncio mode)."""
    import ldap3  # type: ignore[import-untyped]  # noqa: PLC0415 (optional, as bonsai)

    host = ldap3.Server(server.url.rstrip("/"), get_info=ldap3.NONE)
    admin = ldap3.Connection(host, ADMIN_DN, ADMIN_PASSWORD, auto_bind=True)
    for item in work:
        entry = f"uid={item.enrollee.user.user_id},{PEOPLE}"
        binder = ldap3.Connection(host, entry, item.enrollee.password)
        if not binder.bind():
            raise RuntimeError(f"ldap3 bind failed for {entry}")
        binder.unbind()
        query = f"(uid={ldap3.utils.conv.escape_filter_chars(item.enrollee.user.user_id)})"
        admin.search(PEOPLE, query, attributes=["seeAlso", "mail", "userPrincipalName"])
        admin.modify(entry, {CERTIFICATE_ATTRIBUTE: [(ldap3.MODIFY_REPLACE, [item.certificate])]})
        admin.search(entry, "(objectClass=*)", ldap3.BASE, attributes=[CERTIFICATE_ATTRIBUTE])
    admin.unbind()


async def _spread(
    work: Sequence[Work], concurrency: int, enroll: Callable[[Work], Awaitable[None]]
) -> None:
    async def worker(part: Sequence[Work]) -> None:
        for item in part:
            await enroll(item)

    await asyncio.gather(*(worker(work[i::concurrency]) for i in range(concurrency)))


def measure(side: str, server: Slapd, work: Sequence[Work], concurrency: int) -> Block:
    """Run one block; client CPU from this process, slapd's from /proc."""
    runs: dict[str, Callable[[], Any]] = {
        "ours": lambda: uvloop.run(ours(server, work, concurrency, pooled=False)),
        "ours-pooled": lambda: uvloop.run(ours(server, work, concurrency, pooled=True)),
        "bonsai": lambda: uvloop.run(with_bonsai(server, work, concurrency)),
        "ldap3": lambda: with_ldap3(server, work[: max(1, len(work) // 10)]),
    }
    count = len(work) if side != "ldap3" else max(1, len(work) // 10)
    server_before, client_before, wall_before = (
        server.cpu_seconds(),
        time.process_time(),
        time.perf_counter(),
    )
    runs[side]()
    wall = time.perf_counter() - wall_before
    client = time.process_time() - client_before
    served = server.cpu_seconds() - server_before
    return Block(side, count / wall, 1e6 * client / count, 1e6 * served / count)


def report(blocks: Sequence[Block], sides: Sequence[str]) -> None:
    print(f"{'side':12s} {'enroll/s':>22s} {'client µs/enr':>24s} {'slapd µs/enr':>24s}")
    for side in sides:
        mine = [b for b in blocks if b.side == side]
        cells = [_cell([getattr(b, f) for b in mine]) for f in ("rate", "client_us", "server_us")]
        print(f"{side:12s} {cells[0]:>22s} {cells[1]:>24s} {cells[2]:>24s}")


def _cell(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def operations(server: Slapd, users: Sequence[Enrollee], concurrency: int) -> None:
    """Per-operation rates and client CPU for each client (one block each)."""
    import ldap  # type: ignore[import-untyped]  # noqa: PLC0415 (only this mode uses it)

    def timed(name: str, what: str, run: Callable[[], Any]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        count = len(users)
        print(f"{name:24s} {what:14s} {count / wall:8.0f}/s  {1e6 * cpu / count:6.1f} µs CPU")

    def entry(enrollee: Enrollee) -> str:
        return f"uid={enrollee.user.user_id},{PEOPLE}"

    admin = ldap.initialize(server.url)
    admin.simple_bind_s(ADMIN_DN, ADMIN_PASSWORD)
    wanted = ["seeAlso", "mail", "userPrincipalName"]
    timed(
        "python-ldap (blocking)",
        "search",
        lambda: [
            admin.search_s(PEOPLE, ldap.SCOPE_ONELEVEL, f"(uid={e.user.user_id})", wanted)
            for e in users
        ],
    )
    binder = ldap.initialize(server.url)
    timed(
        "python-ldap (blocking)",
        "rebind",
        lambda: [binder.simple_bind_s(entry(e), e.password) for e in users],
    )

    def connect_bind() -> None:
        for e in users:
            conn = ldap.initialize(server.url)
            conn.simple_bind_s(entry(e), e.password)
            conn.unbind_s()

    timed("python-ldap (blocking)", "connect+bind", connect_bind)
    for pooled in (True, False):
        settings = LdapSettings(
            server.url,
            ADMIN_DN,
            ADMIN_PASSWORD,
            pool_size=concurrency,
            bind_per_enrollment=not pooled,
        )
        directory = LdapDirectory(settings)
        name = f"ours x{concurrency}"
        for what in ("lookup_user", "lookup (again)") if pooled else ():
            timed(
                name,
                what,
                lambda: uvloop.run(
                    _each(users, concurrency, lambda e: directory.lookup_user(e.user.user_id))  # noqa: B023 (run at once)
                ),
            )
        what = "pooled bind" if pooled else "connect+bind"
        timed(
            name,
            what,
            lambda: uvloop.run(
                _each(
                    users,
                    concurrency,
                    lambda e: directory.authenticate(e.user.user_id, e.password),  # noqa: B023
                )
            ),
        )
        directory.close()
    if importlib.util.find_spec("bonsai") is not None:
        timed(
            f"bonsai x{concurrency}",
            "search",
            lambda: uvloop.run(_bonsai_searches(server, users, concurrency)),
        )
    if importlib.util.find_spec("ldap3") is not None:
        import ldap3  # noqa: PLC0415 (optional)

        host = ldap3.Server(server.url.rstrip("/"), get_info=ldap3.NONE)
        conn = ldap3.Connection(host, ADMIN_DN, ADMIN_PASSWORD, auto_bind=True)
        timed(
            "ldap3 (blocking)",
            "search",
            lambda: [
                conn.search(PEOPLE, f"(uid={e.user.user_id})", attributes=wanted) for e in users
            ],
        )
        timed(
            "ldap3 (blocking)", "rebind", lambda: [conn.rebind(entry(e), e.password) for e in users]
        )


async def _each(
    users: Sequence[Enrollee], concurrency: int, call: Callable[[Enrollee], Awaitable[Any]]
) -> None:
    async def worker(part: Sequence[Enrollee]) -> None:
        for enrollee in part:
            await call(enrollee)

    await asyncio.gather(*(worker(users[i::concurrency]) for i in range(concurrency)))


async def _bonsai_searches(server: Slapd, users: Sequence[Enrollee], concurrency: int) -> None:
    import bonsai  # noqa: PLC0415 (optional)

    client = bonsai.LDAPClient(server.url)
    client.set_credentials("SIMPLE", user=ADMIN_DN, password=ADMIN_PASSWORD)
    idle = [await client.connect(is_async=True) for _ in range(concurrency)]

    async def search(enrollee: Enrollee) -> None:
        conn = idle.pop()
        await conn.search(PEOPLE, 1, f"(uid={enrollee.user.user_id})", ["mail", "seeAlso"])
        idle.append(conn)

    await _each(users, concurrency, search)
    for conn in idle:
        conn.close()


def _available_sides() -> list[str]:
    """Ours always; bonsai and ldap3 when installed (they are not enrollbench dependencies)."""
    others = [name for name in ("bonsai", "ldap3") if importlib.util.find_spec(name) is not None]
    return ["ours", "ours-pooled", *others]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.microbench.ldap")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--enrollments", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sides", default=",".join(_available_sides()))
    parser.add_argument("--scheme", default="{SSHA}", help="userPassword scheme in slapd")
    parser.add_argument("--pin", type=int, help="pin this process and slapd to one CPU")
    parser.add_argument("--operations", action="store_true", help="single operations instead")
    options = parser.parse_args(argv)
    sides = options.sides.split(",")
    users = [simulated_enrollee(i, SEED) for i in range(options.users)]
    work = certificates(users)
    work = [work[i % len(work)] for i in range(options.enrollments)]
    with tempfile.TemporaryDirectory(prefix="enrollbench-slapd-") as folder:
        server = Slapd(SlapdConfig(Path(folder), ADMIN_PASSWORD, password_scheme=options.scheme))
        server.configure(users)
        server.start()
        try:
            if options.pin is not None:
                assert server.pid is not None
                threads = [int(t) for t in os.listdir(f"/proc/{server.pid}/task")]
                for pid in (0, *threads):  # slapd's threads each, not just its main one
                    os.sched_setaffinity(pid, {options.pin})
            if options.operations:
                operations(server, users, options.concurrency)
                return 0
            measure(sides[0], server, work[:200], options.concurrency)  # warm slapd's caches
            blocks = []
            for round_ in range(options.rounds):
                for side in sides if round_ % 2 == 0 else list(reversed(sides)):
                    blocks.append(measure(side, server, work, options.concurrency))
            report(blocks, sides)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
