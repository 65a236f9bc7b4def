"""The real parts a profile asks for in place of the embedded SQLite ones (issue 9): an OpenLDAP
directory and a PostgreSQL database, either existing ones named by URL (secrets from environment
variables) or started for the run on loopback and stopped after it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import UsageError
from bench.profile import Profile
from engine.errors import EnrollmentError
from engine.population import simulated_enrollee

if TYPE_CHECKING:
    from engine.ldap_directory import LdapSettings

ADMIN_DN = "cn=admin,dc=example,dc=com"


@dataclass(frozen=True, slots=True)
class Components:
    """What a shard connects to (secrets inside reach it only through its plan's pipe)."""

    ldap: LdapSettings | None = None
    postgresql: str | None = field(default=None, repr=False)  # a DSN with its password
    servers: tuple[tuple[str, int], ...] = ()  # (name, pid) of each server started for the run

    def stores(self) -> dict[str, Any]:
        """The engine's stores on these servers (EnrollmentSystem's keyword arguments); the
        drivers are imported only by runs that use them (an extra: enrollbench[components])."""
        stores: dict[str, Any] = {}
        if self.ldap is not None:
            from engine.ldap_directory import LdapDirectory  # noqa: PLC0415

            stores["directory"] = LdapDirectory(self.ldap)
        if self.postgresql is not None:
            from engine.pgstores import (  # noqa: PLC0415
                PgConfigurationDatabase,
                PgDatabase,
                PgIssuedStore,
            )

            database = PgDatabase(self.postgresql)
            stores["configuration"] = PgConfigurationDatabase(database)
            stores["issued"] = PgIssuedStore(database)
        return stores

    def describe(self) -> dict[str, str]:
        """What a result records: kinds and where, never credentials."""
        found = {}
        if self.ldap is not None:
            found["directory"] = f"ldap {self.ldap.url}"
        if self.postgresql is not None:
            found["database"] = f"postgresql {self.postgresql.rpartition('@')[2]}"
        return found


def _secret(name: str, what: str) -> str:
    value = os.environ.get(name) if name else None
    if not value:
        raise UsageError(
            f"{what}: set its password in an environment variable named by the profile"
        )
    return value


@contextmanager
def components_for(profile: Profile, folder: Path) -> Iterator[Components]:
    """Start (or reach) the profile's components; stop the ones started here afterwards."""
    with ExitStack() as stack:
        servers: list[tuple[str, int]] = []
        ldap = None
        if profile.get("components", "directory") == "ldap":
            ldap = stack.enter_context(_ldap(profile, folder / "slapd", servers))
        postgresql = None
        if profile.get("components", "database") == "postgresql":
            postgresql = stack.enter_context(_postgresql(profile, servers))
        components = Components(ldap, postgresql, tuple(servers))
        _probe(components)
        yield components


@contextmanager
def _ldap(profile: Profile, folder: Path, servers: list[tuple[str, int]]) -> Iterator[LdapSettings]:
    from engine.ldap_directory import LdapSettings  # noqa: PLC0415 (LDAP runs only)

    url = str(profile.get("components", "ldap_url"))
    if url:
        password = _secret(profile.get("components", "ldap_password_env"), f"directory {url}")
        yield LdapSettings(url, ADMIN_DN, password)
        return
    from bench.services.slapd import Slapd, SlapdConfig  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    password = secrets.token_hex(16)
    slapd = Slapd(SlapdConfig(folder, password))
    seed = profile.get("", "seed")
    devices = int(profile.get("load", "devices"))
    slapd.configure(simulated_enrollee(i, seed) for i in range(devices))
    slapd.start()
    if slapd.pid is not None:
        servers.append(("slapd", slapd.pid))
    try:
        yield LdapSettings(slapd.url, ADMIN_DN, password)
    finally:
        slapd.stop()


@contextmanager
def _postgresql(profile: Profile, servers: list[tuple[str, int]]) -> Iterator[str]:
    url = str(profile.get("components", "postgresql_url"))
    if url:
        password = _secret(profile.get("components", "postgresql_password_env"), f"database {url}")
        user, _, rest = url.removeprefix("postgresql://").partition("@")
        yield f"postgresql://{user}:{password}@{rest}"
        return
    from bench.services.postgres import start_postgres  # noqa: PLC0415 (PostgreSQL runs only)

    # in the system's temporary folder: the cluster's unprivileged user must reach its folder
    server = start_postgres()
    postmaster = server.data / "postmaster.pid"
    if postmaster.exists():  # its backends are its children
        servers.append(("postgres", int(postmaster.read_text().split()[0])))
    try:
        yield server.dsn
    finally:
        server.stop()


def servers_cpu(components: Components) -> dict[str, float]:
    """CPU seconds each server started for the run has used so far: its process, the children
    it has reaped (PostgreSQL's backends of closed connections), and the children alive."""
    from bench.run.targets import _process_tree, process_cpu  # noqa: PLC0415

    return {
        name: _reaped_cpu(pid) + sum(process_cpu(p) for p in _process_tree(pid))
        for name, pid in components.servers
    }


def _reaped_cpu(pid: int) -> float:
    """cutime + cstime of a process (fields 16 and 17 of /proc/PID/stat), seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def _probe(components: Components) -> None:
    """A component down at start is one line naming it, not a run of failed devices."""

    stores = components.stores()

    async def ask() -> None:
        if components.postgresql is not None:
            from engine.pgstores import PgDatabase  # noqa: PLC0415 (PostgreSQL runs only)

            database = PgDatabase(components.postgresql)
            try:
                await database.run(lambda connection: connection.fetchval("SELECT 1"))
            finally:
                await database.close()
        if components.ldap is not None:
            directory = stores["directory"]
            try:
                await directory.authenticate("enrollbench-probe", secrets.token_hex(8))
            except EnrollmentError as exc:
                if exc.reason != "wrong-credentials":
                    raise
            finally:
                directory.close()

    try:
        asyncio.run(ask())
    except EnrollmentError as exc:
        raise UsageError(f"{', '.join(components.describe().values())}: {exc}") from exc
