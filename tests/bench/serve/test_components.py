"""`enrollbench serve` on the profile's real components: OpenLDAP, PostgreSQL, a SoftHSM2 key."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from engine.wire.seam import TicketStatus
from tests.bench.conftest import run_cli
from tests.bench.serve.conftest import (
    ENROLLBENCH,
    Served,
    ServerFactory,
    csr,
    device,
    enroll_all,
    run,
    serving,
    user_id,
)
from tests.conftest import require_tool

# what each part loads into a worker that uses it: python-ldap's libldap, the SoftHSM2 module
CLIENT_LIBRARY = {"slapd": "libldap", "softhsm2-util": "libsofthsm2", "pg_ctlcluster": "asyncpg"}
# a smaller population than the shipped 2,000 (slapd and the state load every user)
DEVICES = ("--set", "load.devices=300")
LDAP = ("--set", "components.directory='ldap'")
POSTGRESQL = ("--set", "components.database='postgresql'")
SOFTHSM = ("--set", "ca.signing='softhsm'")
MANUAL = ("--set", "serve.approval='manual'")
ENTERPRISE = (*DEVICES, *MANUAL)


def verify(served: Served, certificates: list[bytes], folder: Path) -> None:
    """openssl verifies each certificate against the server's chain."""
    openssl = require_tool("openssl")
    for n, der in enumerate(certificates):
        leaf = folder / f"leaf-{n}.pem"
        pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        leaf.write_bytes(pem)
        done = subprocess.run(
            [openssl, "verify", "-CAfile", str(served.info["ca_chain"]), str(leaf)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def database_serials(served: Served) -> dict[bytes, bytes]:
    """The certificates PostgreSQL holds (serial -> DER), read with the server's own DSN."""
    import asyncpg  # noqa: PLC0415 (PostgreSQL tests only)

    dsn = (served.state / "database").read_text()

    async def read() -> dict[bytes, bytes]:
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            rows = await connection.fetch("SELECT serial, certificate FROM issued")
        finally:
            await connection.close()
        return {bytes(r[0]): bytes(r[1]) for r in rows}

    return run(read())


def loaded(served: Served, library: str) -> bool:
    """Whether every worker of the server has `library` mapped (it uses that part)."""
    return all(library in Path(f"/proc/{pid}/maps").read_text() for pid in served.worker_pids())


def serial_of(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).serial_number.to_bytes(16, "big")


def enroll(served: Served, indices: range) -> list[bytes]:
    """simpleenroll users `indices` with their passwords from the credentials file; every
    certificate."""
    tickets = run(enroll_all(served, [device(served, n) for n in indices]))
    assert {t.status for t in tickets} == {TicketStatus.ISSUED}, tickets
    return [t.certificate for t in tickets]


@pytest.mark.server
@pytest.mark.parametrize(
    ("options", "tool"),
    [(LDAP, "slapd"), (POSTGRESQL, "pg_ctlcluster"), (SOFTHSM, "softhsm2-util")],
    ids=["ldap", "postgresql", "softhsm"],
)
def test_serve_with_one_component(
    server: ServerFactory, tmp_path: Path, options: tuple[str, ...], tool: str
) -> None:
    """One real part at a time: EST devices enroll, openssl verifies what they got, and
    PostgreSQL (when used) holds each certificate; stopping the server removes its DSN."""
    require_tool(tool)
    served = server(*options, workers=2)
    certificates = enroll(served, range(3))
    verify(served, certificates, tmp_path)
    assert {name: loaded(served, library) for name, library in CLIENT_LIBRARY.items()} == {
        name: name == tool for name in CLIENT_LIBRARY
    }
    if tool == "pg_ctlcluster":
        held = database_serials(served)
        assert {serial_of(c): c for c in certificates}.items() <= held.items()
        assert served.published() == {}  # not the SQLite file's
    else:
        assert not (served.state / "database").exists()
    assert served.stop() == 0
    assert not (served.state / "database").exists()


@pytest.mark.server
def test_serve_seed_enterprise_with_manual_approval(server: ServerFactory, tmp_path: Path) -> None:
    """slapd, PostgreSQL and an HSM-held key together under manual approval: a request waits,
    `enrollbench approve` lists it from PostgreSQL and approves it, the next poll is issued
    and verifies, and PostgreSQL holds it; /metrics counts from PostgreSQL."""
    for tool in ("slapd", "pg_ctlcluster", "softhsm2-util"):
        require_tool(tool)
    served = server(*ENTERPRISE, workers=2, profile="seed-enterprise")
    request = csr(30)
    credentials = [device(served, 30, request)]
    waiting = run(enroll_all(served, credentials))[0]
    assert waiting.status is TicketStatus.PENDING

    def approve(*arguments: str) -> subprocess.CompletedProcess[str]:
        command = [str(ENROLLBENCH), "approve", "seed-enterprise", "--state", str(served.state)]
        return subprocess.run(
            [*command, *arguments, *ENTERPRISE],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    listed = approve()
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[:2] for line in listed.stdout.splitlines()] == [
        [waiting.transaction_id, user_id(30)]
    ]
    decided = approve(waiting.transaction_id)
    assert decided.returncode == 0, decided.stderr
    assert approve(waiting.transaction_id).returncode == 2  # a decision in effect is final
    issued = run(enroll_all(served, credentials))[0]
    assert issued.status is TicketStatus.ISSUED, issued
    verify(served, [issued.certificate], tmp_path)
    assert all(loaded(served, library) for library in CLIENT_LIBRARY.values())
    parts = served.info["components"]
    assert parts["directory"].startswith("ldap ldap://127.0.0.1:"), parts
    assert parts["database"].startswith("postgresql 127.0.0.1:"), parts
    assert parts["ca_key"] == "softhsm (PKCS #11)"
    secret = (served.state / "database").read_text().rpartition("@")[0].rpartition(":")[2]
    assert secret and secret not in (served.state / "serve.json").read_text()
    assert database_serials(served) == {serial_of(issued.certificate): issued.certificate}
    assert "enrollbench_certificates_published 1" in served.metrics()
    assert served.stop() == 0


@pytest.mark.server
def test_serve_database_down_at_start_is_one_line(tmp_path: Path) -> None:
    """A PostgreSQL that does not answer: serve exits 2 with one line naming it, no password."""
    done = subprocess.run(
        [str(ENROLLBENCH), "serve", "smoke", "--state", str(tmp_path / "state"),
         "--listen", "127.0.0.1:0", "--scep-listen", "off", "--workers", "1", *POSTGRESQL,
         "--set", "components.postgresql_url='postgresql://enrollbench@127.0.0.1:9/enrollbench'",
         "--set", "components.postgresql_password_env='PG_SECRET'"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PG_SECRET": "not-to-be-printed"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "127.0.0.1:9/enrollbench" in lines[0]
    assert "not-to-be-printed" not in done.stderr + done.stdout


@pytest.mark.server
def test_served_seed_enterprise_run_issues_every_device(tmp_path: Path) -> None:
    """`enrollbench run seed-enterprise --target served`: the served CA on slapd, PostgreSQL
    and a SoftHSM2 key (simulated administrators) issues every device."""
    for tool in ("slapd", "pg_ctlcluster", "softhsm2-util"):
        require_tool(tool)
    out = tmp_path / "r.json"
    done = run_cli("run", "seed-enterprise", "--target", "served", "--quiet", "--duration",
                   "2", "--devices", "300", "--out", str(out), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(out.read_text())["outcomes"]
    assert outcomes["issued"] == outcomes["started"] > 0, outcomes


@pytest.mark.server
def test_serve_on_an_existing_directory_publishes_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slapd reached by URL (its password from the environment): devices bind as their
    users there, a wrong password is refused, and each certificate is on its user's entry."""
    require_tool("slapd")
    from bench.run.components import ADMIN_DN  # noqa: PLC0415
    from bench.services.slapd import Slapd, SlapdConfig  # noqa: PLC0415
    from engine.ldap_directory import LdapDirectory, LdapSettings  # noqa: PLC0415
    from engine.population import simulated_enrollee  # noqa: PLC0415

    password = "directory-admin-secret"
    (tmp_path / "slapd").mkdir()
    slapd = Slapd(SlapdConfig(tmp_path / "slapd", password))
    slapd.configure(simulated_enrollee(i, 1) for i in range(300))
    slapd.start()
    monkeypatch.setenv("LDAP_SECRET_TEST", password)  # the server inherits it
    try:
        with serving(
            tmp_path / "state", *LDAP,
            "--set", f"components.ldap_url='{slapd.url}'",
            "--set", "components.ldap_password_env='LDAP_SECRET_TEST'",
            workers=1,
        ) as served:  # fmt: skip
            certificates = enroll(served, range(3))
            wrong = device(served, 4)
            refused = run(enroll_all(served, [wrong._replace(password="wrong")]))[0]
            assert refused.status is not TicketStatus.ISSUED
            assert served.stop() == 0
        directory = LdapDirectory(LdapSettings(slapd.url, ADMIN_DN, password))

        async def read(der: bytes) -> bytes:
            leaf = x509.load_der_x509_certificate(der)
            return await directory.retrieve(leaf.subject.rfc4514_string(), leaf.serial_number)

        try:
            assert [run(read(der)) for der in certificates] == certificates
        finally:
            directory.close()
    finally:
        slapd.stop()
