"""The directory and the messaging directory on an LDAP server (OpenLDAP slapd), via python-ldap.

Client choice, measured on loopback against slapd 2.5 on this 2-core machine
(`python -m bench.microbench.ldap --operations`, then the whole enrollment's LDAP work with the
default sides; machine shared, so medians with their range): client CPU per search by uid,
python-ldap ~38-55 µs (blocking), bonsai ~79-103 µs (asyncio, 8 connections), ldap3 ~460-540 µs
(pure Python, schema fetch off); per bind, python-ldap ~31-45 µs as a rebind and ~70-112 µs with
its own connection, bonsai ~240-340 µs (it cannot rebind: each bind is a new client and
connection), ldap3 ~400-440 µs. Per enrollment (bind, search, replace, read; 8 in flight):
this module ~258-372 µs of client CPU with pooled binds and ~437-528 µs with a connection per
bind, bonsai ~675-772 µs, ldap3 ~2,800-2,950 µs; slapd's own CPU beside it ~275-490 µs.
python-ldap's `*_s` calls block, and DESIGN.md forbids threads beside the loop, so this module
uses its asynchronous half instead: an operation is sent (`search_ext`, `simple_bind`, ...
return a message ID at once), the loop watches the connection's socket (`add_reader`), and
`result3(msgid, all=1, timeout=0)` collects the answer without blocking. One operation is in
flight per connection, so a readable socket always belongs to the operation waiting on it. The
TCP connect itself happens inside libldap when a connection sends its first operation: instant
on loopback (or refused), but against an unreachable remote host it can hold the loop for up to
`timeout` seconds (OPT_NETWORK_TIMEOUT).

Steps: 2 = a simple bind as `uid=<user ID>,<people>` (a new connection per enrollment by default,
as devices cause; or a pool of rebinding connections); 3-4 = a search by `uid` (RFC 4515 escaped)
over a pool of admin connections; 11 = replace `userCertificate;binary` (the entry never grows);
12 = read it back and check its serial. Entry layout: see bench/services/slapd.py (the
certificate DN in `seeAlso`, the UPN in `userPrincipalName`).

Connections are made lazily inside the running loop (on first use), and again after a failure:
every client or network error becomes DirectoryUnavailableError and the broken connection is
dropped, so calls succeed again once the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import ldap  # type: ignore[import-untyped]
import ldap.dn  # type: ignore[import-untyped]
import ldap.filter  # type: ignore[import-untyped]

from engine.errors import (
    AuthenticationError,
    CertificateNotFoundError,
    FailedError,
    MalformedDerError,
    UnknownUserError,
)
from engine.identity import DistinguishedName, User
from engine.wire.flow import certificate_serial

CERTIFICATE_ATTRIBUTE = "userCertificate;binary"

# Errors that mean the server or the connection to it is gone, slow or refusing work.
_UNAVAILABLE = (
    ldap.SERVER_DOWN,
    ldap.TIMEOUT,
    ldap.CONNECT_ERROR,
    ldap.UNAVAILABLE,
    ldap.BUSY,
    OSError,
)


class DirectoryUnavailableError(FailedError):
    """The LDAP server could not be reached, dropped the connection or did not answer in time."""

    reason = "directory-unavailable"

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"directory {url} unavailable: {detail}")
        self.url = url
        self.detail = detail


class DirectoryEntryError(FailedError):
    """A directory entry lacks an attribute, holds several where one is expected, or holds an
    oversized value."""

    reason = "directory-entry-invalid"

    def __init__(self, entry: str, detail: str) -> None:
        super().__init__(f"directory entry {entry!r}: {detail}")
        self.entry = entry
        self.detail = detail


class DirectoryOperationError(FailedError):
    """The LDAP server refused an operation for a reason other than credentials or availability."""

    reason = "directory-error"


@dataclass(frozen=True, slots=True)
class LdapSettings:
    """Where the directory is and how entries are laid out.

    `bind_per_enrollment`: step 2 opens a connection, binds and closes it (what a fleet of
    devices causes); False rebinds connections from a pool of `pool_size`.
    """

    url: str
    admin_dn: str
    admin_password: str = field(repr=False)
    people: str = "ou=people,dc=example,dc=com"
    pool_size: int = 4
    bind_per_enrollment: bool = True
    timeout: float = 5.0
    max_certificate: int = 16_384
    dn_attribute: str = "seeAlso"
    mail_attribute: str = "mail"
    upn_attribute: str = "userPrincipalName"
    dn_cache: int = 32_768


@lru_cache(maxsize=65_536)
def _parse_dn(text: str) -> DistinguishedName:
    """RFC 4514 text -> DN with its DER (cached: ~20 µs each, and users enroll again)."""
    return DistinguishedName.from_text(text)


class _Connection:
    """One libldap connection driven from the event loop, one operation at a time.

    The loop watches the socket from the first operation on, instead of adding and removing a
    reader around every wait (two epoll_ctl calls per operation). When the socket turns readable
    with no operation waiting, the server has closed the connection: the watch ends there, so a
    dead connection cannot keep the loop busy.
    """

    def __init__(self, settings: LdapSettings) -> None:
        self.settings = settings
        self.handle: Any = ldap.initialize(settings.url)
        self.handle.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
        # Bounds the (blocking, inside libldap) TCP connect made by the first operation.
        self.handle.set_option(ldap.OPT_NETWORK_TIMEOUT, settings.timeout)
        self.handle.set_option(ldap.OPT_REFERRALS, 0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._waiter: asyncio.Future[None] | None = None

    async def call(self, send: Callable[[Any], int]) -> tuple[Any, ...]:
        """Send one operation and wait for its complete result without blocking the loop."""
        msgid = send(self.handle)
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._unwatch()
            self._fd = self.handle.fileno()
            loop.add_reader(self._fd, self._readable)
            self._loop = loop
        while True:
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            result: tuple[Any, ...] = self.handle.result3(msgid, 1, 0)
            if result[0] is not None:
                return result

    def _readable(self) -> None:
        waiter = self._waiter
        if waiter is None:
            self._unwatch()  # readable with nobody waiting: closed by the server
        elif not waiter.done():  # done: woken already, the answer is not read yet
            waiter.set_result(None)

    def _unwatch(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._fd)

    def close(self) -> None:
        self._unwatch()
        with contextlib.suppress(ldap.LDAPError, OSError):
            self.handle.unbind_ext()


class _Pool:
    """Up to `size` connections, bound once by `bind` when made; broken ones are dropped."""

    def __init__(self, settings: LdapSettings, credentials: tuple[str, str] | None) -> None:
        self._settings = settings
        self._credentials = credentials
        self._idle: list[_Connection] = []
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:
            self._slots, self._loop = asyncio.Semaphore(self._settings.pool_size), loop
        return self._slots

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[_Connection]:
        """A connection for one operation; a failing one is closed instead of returned."""
        slots = self._semaphore()
        async with slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                yield conn
            except ldap.LDAPError as exc:
                # A result code (wrong password, no such entry) leaves the connection usable.
                if isinstance(exc, _UNAVAILABLE):
                    conn.close()
                else:
                    self._idle.append(conn)
                raise
            except BaseException:
                conn.close()  # cancelled or timed out mid-operation: its state is unknown
                raise
            self._idle.append(conn)

    async def _connect(self) -> _Connection:
        conn = _Connection(self._settings)
        if self._credentials is not None:
            user, password = self._credentials
            try:
                await conn.call(lambda h: h.simple_bind(user, password))
            except BaseException:
                conn.close()
                raise
        return conn

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


class LdapDirectory:
    """Directory (steps 2, 11, 12) and messaging directory (steps 3-4) on one LDAP server."""

    def __init__(self, settings: LdapSettings) -> None:
        self.settings = settings
        self._admin = _Pool(settings, (settings.admin_dn, settings.admin_password))
        self._binders = _Pool(settings, None)
        self._entries: dict[str, str] = {}  # certificate DN text -> entry DN (for publish)

    async def _run(self, pool: _Pool, send: Callable[[Any], int]) -> tuple[Any, ...]:
        """One operation on a pooled connection, bounded in time, library errors typed.

        A connection lost while idle (the server restarted) fails its next operation, so the
        pool's idle connections are dropped and the operation is sent once more on a new one
        (every operation here is idempotent: searches, binds, a replace)."""
        try:
            async with asyncio.timeout(self.settings.timeout):
                try:
                    return await self._once(pool, send)
                except _UNAVAILABLE:
                    pool.close()
                    return await self._once(pool, send)
        except TimeoutError as exc:
            raise DirectoryUnavailableError(self.settings.url, "no answer in time") from exc
        except _UNAVAILABLE as exc:
            raise DirectoryUnavailableError(self.settings.url, _describe(exc)) from exc

    @staticmethod
    async def _once(pool: _Pool, send: Callable[[Any], int]) -> tuple[Any, ...]:
        async with pool.connection() as conn:
            return await conn.call(send)

    async def authenticate(self, user_id: str, password: str) -> None:
        """Step 2: a simple bind as the user's entry. An empty password would be an
        unauthenticated bind, which succeeds (RFC 4513 5.1.2): refused here."""
        if not password:
            raise AuthenticationError(user_id)
        entry = f"uid={ldap.dn.escape_dn_chars(user_id)},{self.settings.people}"
        try:
            if self.settings.bind_per_enrollment:
                await self._bind_once(entry, password)
            else:
                await self._run(self._binders, lambda h: h.simple_bind(entry, password))
        except (ldap.INVALID_CREDENTIALS, ldap.INVALID_DN_SYNTAX, ldap.NO_SUCH_OBJECT) as exc:
            raise AuthenticationError(user_id) from exc
        except ldap.LDAPError as exc:
            raise DirectoryOperationError(f"bind as {user_id!r}: {_describe(exc)}") from exc

    async def _bind_once(self, entry: str, password: str) -> None:
        conn = _Connection(self.settings)
        try:
            async with asyncio.timeout(self.settings.timeout):
                await conn.call(lambda h: h.simple_bind(entry, password))
        except TimeoutError as exc:
            raise DirectoryUnavailableError(self.settings.url, "no answer in time") from exc
        except _UNAVAILABLE as exc:
            raise DirectoryUnavailableError(self.settings.url, _describe(exc)) from exc
        finally:
            conn.close()

    async def lookup_user(self, user_id: str) -> User:
        """Steps 3-4: the user's entry by uid (RFC 4515 escaped: no filter injection)."""
        found = await self._search_people(f"(uid={_filter_value(user_id)})")
        if not found:
            raise UnknownUserError(user_id)
        if len(found) > 1:
            raise DirectoryEntryError(user_id, "several entries carry this uid")
        entry, attributes = found[0]
        # uid matches ignoring case and surrounding or repeated spaces (caseIgnoreMatch, RFC 4518
        # string preparation); the engine's user IDs are exact, as in the SQLite directory.
        if user_id.encode() not in attributes.get("uid", ()):
            raise UnknownUserError(user_id)
        s = self.settings
        try:
            dn = _parse_dn(_single(entry, attributes, s.dn_attribute))
        except MalformedDerError as exc:
            raise DirectoryEntryError(entry, f"{s.dn_attribute} is not a DN") from exc
        email = _single(entry, attributes, s.mail_attribute)
        upn = _single(entry, attributes, s.upn_attribute)
        self._remember(dn.text, entry)
        return User(user_id, dn, email, upn)

    async def _search_people(self, query: str) -> list[tuple[str, dict[str, list[bytes]]]]:
        s = self.settings
        wanted = ["uid", s.dn_attribute, s.mail_attribute, s.upn_attribute]
        try:
            result = await self._run(
                self._admin,
                lambda h: h.search_ext(s.people, ldap.SCOPE_ONELEVEL, query, wanted, sizelimit=2),
            )
        except ldap.SIZELIMIT_EXCEEDED as exc:
            raise DirectoryEntryError(query, "several entries match") from exc
        except ldap.LDAPError as exc:
            raise DirectoryOperationError(f"search {query!r}: {_describe(exc)}") from exc
        return [(dn, attrs) for dn, attrs in result[1] if dn is not None]

    def _remember(self, dn_text: str, entry: str) -> None:
        if len(self._entries) >= self.settings.dn_cache:
            del self._entries[next(iter(self._entries))]
        self._entries[dn_text] = entry

    async def _entry_of(self, dn: str) -> str:
        """The entry whose certificates carry `dn` (known from step 4, else searched)."""
        entry = self._entries.get(dn)
        if entry is not None:
            return entry
        s = self.settings
        found = await self._search_people(
            f"({s.dn_attribute}={ldap.filter.escape_filter_chars(dn)})"
        )
        if len(found) != 1:
            raise DirectoryEntryError(dn, f"{len(found)} entries carry this DN")
        self._remember(dn, found[0][0])
        return found[0][0]

    async def publish(self, dn: str, serial: int, certificate: bytes) -> None:  # noqa: ARG002
        """Step 11: replace the entry's certificate (a reused device's entry does not grow).
        The entry keeps one certificate, so `serial` is not stored: retrieve checks it."""
        if len(certificate) > self.settings.max_certificate:
            raise DirectoryEntryError(dn, f"certificate of {len(certificate)} bytes is oversized")
        entry = await self._entry_of(dn)
        change = [(ldap.MOD_REPLACE, CERTIFICATE_ATTRIBUTE, [certificate])]
        try:
            await self._run(self._admin, lambda h: h.modify_ext(entry, change))
        except ldap.LDAPError as exc:
            raise DirectoryOperationError(f"publish to {entry!r}: {_describe(exc)}") from exc

    async def retrieve(self, dn: str, serial: int) -> bytes:
        """Step 12: read the certificate back; it must be the one with `serial`."""
        entry = await self._entry_of(dn)
        try:
            result = await self._run(
                self._admin,
                lambda h: h.search_ext(
                    entry, ldap.SCOPE_BASE, "(objectClass=*)", [CERTIFICATE_ATTRIBUTE]
                ),
            )
        except ldap.NO_SUCH_OBJECT as exc:
            raise CertificateNotFoundError(dn, serial) from exc
        except ldap.LDAPError as exc:
            raise DirectoryOperationError(f"retrieve from {entry!r}: {_describe(exc)}") from exc
        values = _values(result, CERTIFICATE_ATTRIBUTE)
        if not values:
            raise CertificateNotFoundError(dn, serial)
        if len(values) > 1:
            raise DirectoryEntryError(entry, f"{len(values)} certificates where one is kept")
        certificate = values[0]
        if len(certificate) > self.settings.max_certificate:
            raise DirectoryEntryError(entry, f"certificate of {len(certificate)} bytes")
        if certificate_serial(certificate) != serial:
            raise CertificateNotFoundError(dn, serial)
        return certificate

    def close(self) -> None:
        self._admin.close()
        self._binders.close()


def _values(result: tuple[Any, ...], attribute: str) -> list[bytes]:
    for dn, attributes in result[1]:
        if dn is not None:
            for name, values in attributes.items():
                if name.lower() == attribute.lower():
                    return list(values)
    return []


def _single(entry: str, attributes: dict[str, list[bytes]], name: str) -> str:
    """The one value of a single-valued attribute, as text."""
    values = attributes.get(name)  # slapd answers with the names as asked, so this hits
    if values is None:
        values = next((v for k, v in attributes.items() if k.lower() == name.lower()), [])
    if len(values) != 1:
        raise DirectoryEntryError(entry, f"{len(values)} values of {name} (one expected)")
    try:
        return bytes(values[0]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DirectoryEntryError(entry, f"{name} is not UTF-8") from exc


def _filter_value(value: str) -> str:
    """An assertion value escaped per RFC 4515 (3: '*', '(', ')', '\\' and NUL as \\XX);
    letters and digits alone, the usual user ID, need no escaping."""
    if value.isascii() and value.isalnum():
        return value
    escaped: str = ldap.filter.escape_filter_chars(value)
    return escaped


def _describe(exc: BaseException) -> str:
    """A short message from a python-ldap error (its args[0] is a dict with 'desc'/'info')."""
    if exc.args and isinstance(exc.args[0], dict):
        info = exc.args[0]
        return " ".join(str(info[k]) for k in ("desc", "info") if info.get(k))
    return str(exc) or type(exc).__name__
