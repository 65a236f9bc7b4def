"""bench.serve.state through a real server: a private state folder that a restart reuses."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509

from engine.wire.est import decode_base64, decode_certs_only, order_chain
from engine.wire.seam import TicketStatus
from tests.bench.serve.conftest import Served, ServerFactory, device, enroll_all, run

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
