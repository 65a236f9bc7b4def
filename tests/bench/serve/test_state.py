"""bench.serve.state through a real server: a private state folder that a restart reuses."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from engine.wire.est import decode_base64, decode_certs_only, encode_base64, order_chain
from engine.wire.seam import TicketStatus
from tests.bench.serve.conftest import Served, ServerFactory, device, enroll_all, run, user_id
from tests.conftest import VECTORS, require_tool

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


@pytest.mark.server
def test_curl_and_openssl_enroll_over_tls(server: ServerFactory, tmp_path: Path) -> None:
    """EST over TLS as an outside client does it: openssl req with the user's DN, curl with
    the chain from the state folder as its only trust and the credentials file's password;
    the answer reads with openssl pkcs7 and verifies with openssl verify against that chain."""
    curl, openssl = require_tool("curl"), require_tool("openssl")
    served = server(workers=1, plain=False)
    assert str(served.info["est"]).startswith("https://127.0.0.1:")
    chain = Path(served.info["ca_chain"])
    who = user_id(7)
    password = served.credentials()[who]
    request, body, answer = tmp_path / "csr.der", tmp_path / "csr.b64", tmp_path / "answer.b64"
    subject = "/DC=com/DC=example/O=Example Corp/OU=Devices/CN=" + who
    tool(openssl, "req", "-new", "-key", str(VECTORS / "p256-5.pem"), "-subj", subject,
         "-outform", "DER", "-out", str(request))  # fmt: skip
    body.write_bytes(encode_base64(request.read_bytes()))
    status = tool(
        curl, "-sS", "--cacert", str(chain), "-o", str(answer), "-w", "%{http_code}",
        "--data-binary", f"@{body}", "-H", "Content-Type: application/pkcs10",
        "-u", f"{who}:{password}", f"{served.info['est']}/simpleenroll",
    )  # fmt: skip
    assert status == b"200"
    certificate = tmp_path / "certificate.pem"
    certificate.write_bytes(
        tool(
            openssl,
            "pkcs7",
            "-inform",
            "DER",
            "-print_certs",
            data=decode_base64(answer.read_bytes()),
        )
    )
    verified = tool(openssl, "verify", "-CAfile", str(chain), str(certificate))
    assert verified.strip().endswith(b": OK")
    issued = x509.load_pem_x509_certificate(certificate.read_bytes())
    assert issued.public_bytes(serialization.Encoding.DER) in served.published().values()
    assert served.stop() == 0


def tool(path: str, *arguments: str, data: bytes | None = None) -> bytes:
    done = subprocess.run(
        [path, *arguments], input=data, capture_output=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout
