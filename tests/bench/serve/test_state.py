"""bench.serve.state through a real server: a private state folder that a restart reuses."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from bench.errors import UsageError
from bench.serve.state import BringYourOwnCA, _own_material
from engine.keys import load_private_key
from engine.system import CAMaterial, EngineConfig
from engine.wire.est import decode_base64, decode_certs_only, order_chain
from engine.wire.seam import TicketStatus
from tests.bench.serve.conftest import (
    ENROLLBENCH,
    Served,
    ServerFactory,
    device,
    enroll_all,
    run,
)
from tests.conftest import ca_material

SECRET_FILES = (
    "ca/issuing-key.der",
    "tls/server.key",
    "scep/ra.key",
    "credentials",
    "store.sqlite",  # users' password verifiers
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cacerts(served: Served) -> bytes:
    status, body = served.get("/.well-known/est/cacerts")
    assert status == 200
    return body


def test_state_is_private_and_a_restart_reuses_it(server: ServerFactory, tmp_path: Path) -> None:
    """The folder and its subfolders are 0700; keys, credentials and the store (with its WAL
    files, checked while the server runs) 0600; after a restart the CA chain, credentials and
    store are the same and hold what was issued, and new certificates chain to the same CA."""
    state = tmp_path / "state"
    first = server(workers=1)
    [ticket] = run(enroll_all(first, [device(first, 0)]))
    assert ticket.status is TicketStatus.ISSUED
    folders = [state, *(p for p in state.rglob("*") if p.is_dir())]
    assert {str(p): mode(p) for p in folders} == {str(p): 0o700 for p in folders}
    secrets = [state / name for name in SECRET_FILES] + list(state.glob("store.sqlite-*"))
    assert len(secrets) == len(SECRET_FILES) + 2
    assert {p.name: mode(p) for p in secrets} == {p.name: 0o600 for p in secrets}
    chain, credentials = cacerts(first), (state / "credentials").read_bytes()
    assert first.stop() == 0

    second = server(workers=1)
    assert cacerts(second) == chain
    assert (state / "credentials").read_bytes() == credentials
    assert ticket.certificate in second.published().values()
    [again] = run(enroll_all(second, [device(second, 1)]))
    assert again.status is TicketStatus.ISSUED
    assert set(second.published().values()) == {ticket.certificate, again.certificate}
    issuing = x509.load_der_x509_certificate(
        order_chain(decode_certs_only(decode_base64(chain)))[-1]
    )
    for certificate in (ticket.certificate, again.certificate):
        x509.load_der_x509_certificate(certificate).verify_directly_issued_by(issuing)
    assert second.stop() == 0


def own_ca(folder: Path, intermediates: int = 0) -> tuple[list[Path], Path, CAMaterial]:
    """A CA hierarchy made elsewhere (fixed P-256 vector keys): PEM certificate files, root
    first, and the issuing CA's PEM key."""
    folder.mkdir(exist_ok=True)
    material = ca_material(EngineConfig(ca_intermediates=intermediates))
    certificates = []
    for n, der in enumerate(material.certificates):
        path = folder / f"ca-{n}.pem"
        path.write_bytes(
            x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        )
        certificates.append(path)
    key = folder / "issuing.key"
    key.write_bytes(
        load_private_key(material.issuing_key).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificates, key, material


def test_bring_your_own_ca_files(server: ServerFactory, tmp_path: Path) -> None:
    """--ca-cert (repeated, issuing CA last) and --ca-key: cacerts is that hierarchy and the
    certificates issued verify against its issuing CA."""
    certificates, key, material = own_ca(tmp_path)
    options = [f"--ca-cert={path}" for path in certificates] + [f"--ca-key={key}"]
    served = server(*options, workers=1)
    assert order_chain(decode_certs_only(decode_base64(cacerts(served)))) == material.certificates
    [ticket] = run(enroll_all(served, [device(served, 2)]))
    issuing = x509.load_der_x509_certificate(material.certificates[-1])
    x509.load_der_x509_certificate(ticket.certificate).verify_directly_issued_by(issuing)
    assert served.stop() == 0
    # the same state with another CA given: refused, not silently served with the first
    other, other_key, _ = own_ca(tmp_path / "other", intermediates=1)
    refused = subprocess.run(
        [str(ENROLLBENCH), "serve", "smoke", "--listen", "127.0.0.1:0", "--scep-listen", "off",
         "--state", str(served.state), *[f"--ca-cert={p}" for p in other], f"--ca-key={other_key}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "already holds another CA" in refused.stderr


def test_bring_your_own_ca_as_pkcs12(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PKCS #12 bundle (password from $ENROLLBENCH_CA_PASSWORD) with an intermediate, its
    other certificates listed leaf-side first: the material is root, intermediate, issuing CA
    (the order the TLS chain and cacerts are written in) and the issuing CA's key."""
    _, _, material = own_ca(tmp_path, intermediates=1)
    root, intermediate, issuing = (x509.load_der_x509_certificate(c) for c in material.certificates)
    bundle = tmp_path / "ca.p12"
    bundle.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"ca",
            load_private_key(material.issuing_key),
            issuing,
            [intermediate, root],
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    monkeypatch.setenv("ENROLLBENCH_CA_PASSWORD", "s3cret")
    loaded = _own_material(BringYourOwnCA(pkcs12=bundle))
    assert loaded.certificates == material.certificates
    assert load_private_key(loaded.issuing_key).public_key() == issuing.public_key()
    monkeypatch.setenv("ENROLLBENCH_CA_PASSWORD", "wrong")
    with pytest.raises(UsageError, match="cannot load the CA"):
        _own_material(BringYourOwnCA(pkcs12=bundle))


def test_bring_your_own_ca_refuses_a_key_of_another_certificate(tmp_path: Path) -> None:
    """A key that does not belong to the last certificate, or no key at all: usage errors."""
    certificates, key, _ = own_ca(tmp_path)
    with pytest.raises(UsageError, match="does not belong"):
        _own_material(BringYourOwnCA(tuple(reversed(certificates)), key))
    with pytest.raises(UsageError, match="give its certificate files and its key"):
        _own_material(BringYourOwnCA(tuple(certificates)))
