"""bench.services.slapd: slapd configured, loaded and run in a temporary folder on loopback."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import ldap  # type: ignore[import-untyped]
import pytest

from bench.services.slapd import (
    ADMIN_DN,
    PEOPLE,
    Slapd,
    SlapdConfig,
    SlapdError,
    hash_password,
    user_ldif,
)
from engine.population import simulated_enrollee
from tests.conftest import SEED, require_tool

ADMIN_PASSWORD = "admin-secret-for-tests"
USERS = [simulated_enrollee(i, SEED) for i in range(3)]


def _started(folder: Path, **options: object) -> Slapd:
    require_tool("slapd")
    require_tool("slapadd")
    server = Slapd(SlapdConfig(folder, ADMIN_PASSWORD, **options))  # type: ignore[arg-type]
    server.configure(USERS)
    server.start()
    return server


def _bind(url: str, dn: str, password: str) -> None:
    connection = ldap.initialize(url)
    try:
        connection.simple_bind_s(dn, password)
    finally:
        connection.unbind_s()


def test_ssha_matches_the_rfc_layout() -> None:
    """{SSHA} is base64(SHA-1(password + salt) + salt)."""
    value = hash_password("secret", "{SSHA}", b"salt", 0)
    raw = base64.b64decode(value.removeprefix("{SSHA}"))
    assert raw == hashlib.sha1(b"secretsalt").digest() + b"salt"


def test_pbkdf2_uses_the_adapted_base64_of_pw_pbkdf2() -> None:
    """{PBKDF2-SHA256} is iterations$salt$key with '.' for '+' and no padding."""
    value = hash_password("secret", "{PBKDF2-SHA256}", b"\xfb" * 16, 1000)
    iterations, salt, key = value.removeprefix("{PBKDF2-SHA256}").split("$")
    assert iterations == "1000"
    assert "+" not in salt + key and "=" not in salt + key
    expected = hashlib.pbkdf2_hmac("sha256", b"secret", b"\xfb" * 16, 1000)
    assert base64.b64decode(key.replace(".", "+") + "=") == expected


def test_an_unknown_scheme_is_refused() -> None:
    """A scheme slapd would not check is a SlapdError, not a silent plain text password."""
    with pytest.raises(SlapdError):
        hash_password("secret", "{CLEARTEXT}", b"", 0)


def test_user_ldif_carries_the_engine_fields(tmp_path: Path) -> None:
    """The entry has uid, mail, userPrincipalName and the certificate DN in seeAlso."""
    text = user_ldif(USERS[0], SlapdConfig(tmp_path, ADMIN_PASSWORD))
    user = USERS[0].user
    assert text.startswith(f"dn: uid={user.user_id},{PEOPLE}\n")
    for line in (
        f"mail: {user.email}",
        f"userPrincipalName: {user.upn}",
        f"seeAlso: {user.dn.text}",
    ):
        assert f"\n{line}\n" in text
    assert USERS[0].password not in text


@pytest.mark.server
@pytest.mark.parametrize("scheme", ["{SSHA}", "{PBKDF2-SHA256}"])
def test_users_bind_with_their_passwords(tmp_path: Path, scheme: str) -> None:
    """slapd checks both hash formats we write (PBKDF2 through slapd-contrib's module)."""
    if scheme == "{PBKDF2-SHA256}" and not Path("/usr/lib/ldap/pw-pbkdf2.so").exists():
        require_tool("slapd-contrib-pw-pbkdf2")  # skips locally, fails in CI
    server = _started(tmp_path, password_scheme=scheme, pbkdf2_iterations=1000)
    try:
        for enrollee in USERS:
            _bind(server.url, f"uid={enrollee.user.user_id},{PEOPLE}", enrollee.password)
        with pytest.raises(ldap.INVALID_CREDENTIALS):
            _bind(server.url, f"uid={USERS[0].user.user_id},{PEOPLE}", USERS[1].password)
    finally:
        server.stop()


@pytest.mark.server
def test_admin_reads_and_users_cannot_read_others(tmp_path: Path) -> None:
    """The rootdn reads every entry; a user reads its own entry, not another's password."""
    server = _started(tmp_path)
    try:
        admin = ldap.initialize(server.url)
        admin.simple_bind_s(ADMIN_DN, ADMIN_PASSWORD)
        assert len(admin.search_s(PEOPLE, ldap.SCOPE_ONELEVEL, "(uid=*)")) == len(USERS)
        admin.unbind_s()
        user = ldap.initialize(server.url)
        first = USERS[0]
        user.simple_bind_s(f"uid={first.user.user_id},{PEOPLE}", first.password)
        own = f"uid={first.user.user_id},{PEOPLE}"
        found = user.search_s(own, ldap.SCOPE_BASE, "(objectClass=*)", ["userPassword", "mail"])
        assert found[0][1] == {"mail": [first.user.email.encode()]}
        other = f"uid={USERS[1].user.user_id},{PEOPLE}"
        with pytest.raises(ldap.NO_SUCH_OBJECT):  # hidden, not merely filtered
            user.search_s(other, ldap.SCOPE_BASE, "(objectClass=*)", ["mail"])
        user.unbind_s()
    finally:
        server.stop()


@pytest.mark.server
def test_stop_ends_the_process_and_start_serves_again(tmp_path: Path) -> None:
    """stop() ends our slapd by pid; start() on the same port serves the same data."""
    server = _started(tmp_path)
    try:
        pid = server.pid
        assert pid is not None
        assert server.cpu_seconds() >= 0
        server.stop()
        assert server.pid is None
        assert not Path(f"/proc/{pid}").exists()  # ended and reaped
        with pytest.raises(ldap.SERVER_DOWN):
            _bind(server.url, ADMIN_DN, ADMIN_PASSWORD)
        server.start()
        _bind(server.url, f"uid={USERS[1].user.user_id},{PEOPLE}", USERS[1].password)
    finally:
        server.stop()


@pytest.mark.server
def test_a_bad_config_is_a_slapd_error(tmp_path: Path) -> None:
    """slapd refusing its configuration is a SlapdError with its log, not a hang."""
    server = _started(tmp_path)
    server.stop()
    server.conf.write_text(server.conf.read_text() + "nonsense directive\n")
    with pytest.raises(SlapdError):
        server.start()


def test_the_admin_password_is_not_in_the_config(tmp_path: Path) -> None:
    """slapd.conf holds the admin's salted hash only, readable by its owner alone."""
    require_tool("slapadd")
    server = Slapd(SlapdConfig(tmp_path, ADMIN_PASSWORD))
    server.configure(USERS)
    assert ADMIN_PASSWORD not in server.conf.read_text()
    assert "rootpw {SSHA}" in server.conf.read_text()
    assert server.conf.stat().st_mode & 0o077 == 0
