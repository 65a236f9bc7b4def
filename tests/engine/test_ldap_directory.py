"""engine.ldap_directory against a real slapd started by the tests (127.0.0.1, a free port)."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import ldap  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.services.slapd import ADMIN_DN, PEOPLE, Slapd, SlapdConfig
from engine.errors import AuthenticationError, CertificateNotFoundError, UnknownUserError
from engine.ldap_directory import (
    CERTIFICATE_ATTRIBUTE,
    DirectoryEntryError,
    DirectoryUnavailableError,
    LdapDirectory,
    LdapSettings,
)
from engine.population import Enrollee, simulated_enrollee
from engine.wire.flow import certificate_serial
from tests.conftest import SEED, require_tool, vector_key

pytestmark = pytest.mark.server

ADMIN_PASSWORD = "admin-secret-for-tests"
USERS = [simulated_enrollee(i, SEED) for i in range(6)]
T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a call with a hang guard (a hang fails the test instead of stalling CI)."""

    async def guarded() -> T:
        return await asyncio.wait_for(coroutine, 60)

    return asyncio.run(guarded())


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One slapd with the simulated users and a few odd entries, stopped afterwards."""
    require_tool("slapd")
    require_tool("slapadd")
    server = Slapd(SlapdConfig(tmp_path_factory.mktemp("slapd"), ADMIN_PASSWORD))
    server.configure(USERS)
    server.start()
    try:  # a failing setup must not leave slapd running
        _add_odd_entries(server.url)
        yield server
    finally:
        server.stop()


def _add_odd_entries(url: str) -> None:
    """Entries an administrator could have left behind (added synchronously, off any loop)."""
    admin = ldap.initialize(url)
    admin.simple_bind_s(ADMIN_DN, ADMIN_PASSWORD)
    base = {
        "objectClass": [b"inetOrgPerson", b"enrollbenchUser"],
        "sn": [b"odd"],
        "userPrincipalName": [b"odd@corp.example.com"],
    }
    odd: dict[str, dict[str, list[bytes]]] = {
        "nomail": {"seeAlso": [b"CN=nomail,O=Example Corp"]},
        "twodns": {
            "mail": [b"twodns@example.com"],
            "seeAlso": [b"CN=twodns,O=Example Corp", b"CN=twodns2,O=Example Corp"],
        },
        "bigcert": {
            "mail": [b"bigcert@example.com"],
            "seeAlso": [b"CN=bigcert,O=Example Corp"],
            CERTIFICATE_ATTRIBUTE: [_certificate(1, "bigcert", padding=20_000)],
        },
        "twocerts": {
            "mail": [b"twocerts@example.com"],
            "seeAlso": [b"CN=twocerts,O=Example Corp"],
            CERTIFICATE_ATTRIBUTE: [_certificate(1, "twocerts"), _certificate(2, "twocerts")],
        },
    }
    for uid, attributes in odd.items():
        entry = {**base, "uid": [uid.encode()], "cn": [uid.encode()], **attributes}
        admin.add_s(f"uid={uid},{PEOPLE}", list(entry.items()))
    admin.unbind_s()


def _certificate(serial: int, name: str = "user", padding: int = 0) -> bytes:
    """A self-signed P-256 certificate from a fixed vector key; `padding` bytes of a private
    extension make it as large as a test needs."""
    key = vector_key("p256-1")
    subject = x509.Name.from_rfc4514_string(f"CN={name}")
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
    )
    if padding:
        oid = x509.ObjectIdentifier("1.3.6.1.4.1.4203.666.11.1953.2")
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, b"\0" * padding), False)
    certificate = builder.sign(key, hashes.SHA256())
    return certificate.public_bytes(serialization.Encoding.DER)


def directory(server: Slapd, **overrides: Any) -> LdapDirectory:
    return LdapDirectory(LdapSettings(server.url, ADMIN_DN, ADMIN_PASSWORD, **overrides))


def _stored_certificates(server: Slapd, entry: str) -> list[bytes]:
    admin = ldap.initialize(server.url)
    admin.simple_bind_s(ADMIN_DN, ADMIN_PASSWORD)
    found = admin.search_s(entry, ldap.SCOPE_BASE, "(objectClass=*)", [CERTIFICATE_ATTRIBUTE])
    admin.unbind_s()
    values: list[bytes] = found[0][1].get(CERTIFICATE_ATTRIBUTE, [])
    return values


@pytest.mark.parametrize("per_enrollment", [True, False])
def test_bind_with_the_right_password(slapd: Slapd, per_enrollment: bool) -> None:
    """A user binds with their password, per enrollment or on pooled connections."""
    target = directory(slapd, bind_per_enrollment=per_enrollment)
    for user in USERS[:3]:
        run(target.authenticate(user.user.user_id, user.password))
    target.close()


@pytest.mark.parametrize("per_enrollment", [True, False])
def test_bind_with_a_wrong_password_is_refused(slapd: Slapd, per_enrollment: bool) -> None:
    """A wrong password is an AuthenticationError; the pool still binds the next user."""
    target = directory(slapd, bind_per_enrollment=per_enrollment)
    with pytest.raises(AuthenticationError):
        run(target.authenticate(USERS[0].user.user_id, USERS[1].password))
    run(target.authenticate(USERS[1].user.user_id, USERS[1].password))
    target.close()


def test_an_empty_password_is_refused(slapd: Slapd) -> None:
    """An empty password (an unauthenticated bind slapd would accept) is refused."""
    with pytest.raises(AuthenticationError):
        run(directory(slapd).authenticate(USERS[0].user.user_id, ""))


@pytest.mark.parametrize("password", ["\x00", "pw\x00rest", "\\", "*", "\u00e9" * 300])
def test_odd_passwords_are_refused(slapd: Slapd, password: str) -> None:
    """NUL bytes, metacharacters and long non-ASCII passwords are plain wrong passwords."""
    with pytest.raises(AuthenticationError):
        run(directory(slapd).authenticate(USERS[0].user.user_id, password))


def test_a_password_with_a_nul_is_not_cut_at_the_nul(slapd: Slapd) -> None:
    """The right password followed by NUL and more is refused (no C-string truncation)."""
    enrollee = USERS[0]
    with pytest.raises(AuthenticationError):
        run(directory(slapd).authenticate(enrollee.user.user_id, enrollee.password + "\x00x"))


def test_bind_as_an_unknown_user_fails_like_a_wrong_password(slapd: Slapd) -> None:
    """An unknown user ID is an AuthenticationError, not a different error."""
    with pytest.raises(AuthenticationError):
        run(directory(slapd).authenticate("nobody", USERS[0].password))


def test_lookup_equals_the_simulated_user(slapd: Slapd) -> None:
    """The User read from slapd equals the engine's simulated one (DN text and DER too)."""
    target = directory(slapd)
    for enrollee in USERS:
        user = run(target.lookup_user(enrollee.user.user_id))
        assert user == enrollee.user
        assert user.dn.der == enrollee.user.dn.der
        assert user.general_names == enrollee.user.general_names
    target.close()


def test_lookup_of_an_unknown_user(slapd: Slapd) -> None:
    """A user ID with no entry is UnknownUserError."""
    with pytest.raises(UnknownUserError):
        run(directory(slapd).lookup_user("user9999999"))


HOSTILE = [
    "user 0000001",
    "*",
    "*)(uid=*",
    "user0000001)(mail=*",
    "user*",
    "a\\b",
    "\\2a",
    "a\x00b",
    "(",
    "",
]


@pytest.mark.parametrize("per_enrollment", [True, False])
@pytest.mark.parametrize("user_id", HOSTILE)
def test_hostile_user_ids_match_nothing(slapd: Slapd, user_id: str, per_enrollment: bool) -> None:
    """Filter and DN metacharacters are escaped: unknown user, never another user's entry."""
    target = directory(slapd, bind_per_enrollment=per_enrollment)
    with pytest.raises(UnknownUserError):
        run(target.lookup_user(user_id))
    with pytest.raises(AuthenticationError):
        run(target.authenticate(user_id, USERS[1].password))
    target.close()


METACHARACTERS = st.sampled_from(["*", "(", ")", "\\", "\x00", ",", "+", "=", "#", " ", "u"])


@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(user_id=st.lists(METACHARACTERS | st.characters(), max_size=24).map("".join))
def test_generated_user_ids_find_no_entry_but_their_own(slapd: Slapd, user_id: str) -> None:
    """Any text as a user ID: the entry whose uid it is exactly, or unknown user; nothing else."""
    known = {e.user.user_id: e.user for e in USERS}
    target = directory(slapd)
    try:
        found = run(target.lookup_user(user_id))
    except UnknownUserError:
        found = None
    finally:
        target.close()
    assert found is None or found == known[user_id]


@pytest.mark.parametrize("user_id", ["USER0000001", " user0000001", "user0000001 "])
def test_variants_of_a_user_id_are_unknown_to_lookup(slapd: Slapd, user_id: str) -> None:
    """slapd matches uid ignoring case and outer spaces; lookup_user is exact (as SQLite is),
    so a variant is an unknown user. The bind, LDAP's own, reaches the same entry only."""
    target = directory(slapd)
    with pytest.raises(UnknownUserError):
        run(target.lookup_user(user_id))
    run(target.authenticate(user_id, USERS[1].password))
    with pytest.raises(AuthenticationError):
        run(target.authenticate(user_id, USERS[2].password))
    target.close()


def test_publish_replaces_and_retrieve_checks_the_serial(slapd: Slapd) -> None:
    """The entry keeps the latest certificate only; retrieve returns it for its serial."""
    target = directory(slapd)
    enrollee: Enrollee = USERS[2]
    dn = run(target.lookup_user(enrollee.user.user_id)).dn.text
    first, second = _certificate(11), _certificate(12)
    run(target.publish(dn, 11, first))
    assert run(target.retrieve(dn, 11)) == first
    run(target.publish(dn, 12, second))
    assert run(target.retrieve(dn, 12)) == second
    with pytest.raises(CertificateNotFoundError):
        run(target.retrieve(dn, 11))
    assert _stored_certificates(slapd, f"uid={enrollee.user.user_id},{PEOPLE}") == [second]
    target.close()


def test_publish_finds_the_entry_without_a_lookup_first(slapd: Slapd) -> None:
    """Another process's directory (no step 4 seen) finds the entry by its certificate DN."""
    enrollee = USERS[3]
    certificate = _certificate(5)  # ECDSA: a new signature each time, so built once
    run(directory(slapd).publish(enrollee.user.dn.text, 5, certificate))
    assert run(directory(slapd).retrieve(enrollee.user.dn.text, 5)) == certificate


def test_retrieve_before_any_publish(slapd: Slapd) -> None:
    """An entry with no certificate is CertificateNotFoundError."""
    enrollee = USERS[4]
    with pytest.raises(CertificateNotFoundError):
        run(directory(slapd).retrieve(enrollee.user.dn.text, 1))


def test_an_oversized_certificate_is_refused_before_sending(slapd: Slapd) -> None:
    """Publishing more than max_certificate bytes is a DirectoryEntryError."""
    with pytest.raises(DirectoryEntryError):
        run(directory(slapd).publish(USERS[0].user.dn.text, 1, b"\x30" * 20_000))


@pytest.mark.parametrize("uid", ["nomail", "twodns"])
def test_entries_with_missing_or_repeated_attributes(slapd: Slapd, uid: str) -> None:
    """No mail, or two certificate DNs, is a DirectoryEntryError naming the entry."""
    with pytest.raises(DirectoryEntryError, match=uid):
        run(directory(slapd).lookup_user(uid))


@pytest.mark.parametrize("uid", ["bigcert", "twocerts"])
def test_entries_with_odd_certificates(slapd: Slapd, uid: str) -> None:
    """An oversized stored certificate, or two of them, is a DirectoryEntryError."""
    with pytest.raises(DirectoryEntryError, match=uid):
        run(directory(slapd).retrieve(f"CN={uid},O=Example Corp", 1))


def test_certificate_serial_reads_the_tbs_serial() -> None:
    """The serial parser agrees with cryptography's for a large positive serial."""
    serial = (1 << 127) + 12345
    assert certificate_serial(_certificate(serial)) == serial


def test_a_stopped_server_gives_typed_errors_then_calls_succeed_after_restart(
    tmp_path: Path,
) -> None:
    """slapd stopped mid-way: DirectoryUnavailableError (no hang); restarted: calls succeed."""
    require_tool("slapd")
    server = Slapd(SlapdConfig(tmp_path, ADMIN_PASSWORD))
    server.configure(USERS[:2])
    server.start()
    try:
        for per_enrollment in (True, False):
            target = directory(server, bind_per_enrollment=per_enrollment)
            enrollee = USERS[0]
            run(target.lookup_user(enrollee.user.user_id))
            run(target.authenticate(enrollee.user.user_id, enrollee.password))
            server.stop()
            with pytest.raises(DirectoryUnavailableError):
                run(target.lookup_user(enrollee.user.user_id))
            with pytest.raises(DirectoryUnavailableError):
                run(target.authenticate(enrollee.user.user_id, enrollee.password))
            with pytest.raises(DirectoryUnavailableError):
                run(target.publish(enrollee.user.dn.text, 3, _certificate(3)))
            server.start()
            assert run(target.lookup_user(enrollee.user.user_id)) == enrollee.user
            run(target.authenticate(enrollee.user.user_id, enrollee.password))
            run(target.publish(enrollee.user.dn.text, 3, _certificate(3)))
            target.close()
    finally:
        server.stop()


def test_a_stalled_server_times_out(slapd: Slapd) -> None:
    """slapd frozen (SIGSTOP): calls end in DirectoryUnavailableError after the timeout."""
    target = directory(slapd, timeout=0.5)  # only the frozen calls (a loaded CI box is slow)
    assert slapd.pid is not None
    os.kill(slapd.pid, signal.SIGSTOP)
    try:
        with pytest.raises(DirectoryUnavailableError, match="in time"):
            run(target.lookup_user(USERS[1].user.user_id))
        with pytest.raises(DirectoryUnavailableError, match="in time"):
            run(target.authenticate(USERS[1].user.user_id, USERS[1].password))
    finally:
        os.kill(slapd.pid, signal.SIGCONT)
    target.close()
    thawed = directory(slapd)
    assert run(thawed.lookup_user(USERS[1].user.user_id)) == USERS[1].user
    thawed.close()
