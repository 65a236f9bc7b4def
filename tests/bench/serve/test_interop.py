"""Clients nobody here wrote against `enrollbench serve`: curl and openssl (EST over TLS),
micromdm's scepclient 2.1.0 (SCEP)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from engine.wire.est import decode_base64, decode_certs_only, encode_base64
from tests.bench.serve.conftest import ServerFactory, user_dn, user_id
from tests.conftest import VECTORS, require_tool

WIRE_VECTORS = Path(__file__).parents[2] / "engine" / "wire" / "vectors"


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
    old_tls = subprocess.run(
        [curl, "-sS", "--cacert", str(chain), "--tls-max", "1.2", f"{served.info['est']}/cacerts"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert old_tls.returncode == 35, old_tls.stderr  # TLS 1.3 only: the handshake fails
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
    # simplereenroll: the certificate just issued authenticates the TLS connection, no password
    renewed = tmp_path / "renewed.b64"
    status = tool(
        curl, "-sS", "--cacert", str(chain), "--cert", str(certificate),
        "--key", str(VECTORS / "p256-5.pem"), "-o", str(renewed), "-w", "%{http_code}",
        "--data-binary", f"@{body}", "-H", "Content-Type: application/pkcs10",
        f"{served.info['est']}/simplereenroll",
    )  # fmt: skip
    assert status == b"200"
    [again] = decode_certs_only(decode_base64(renewed.read_bytes()))
    assert x509.load_der_x509_certificate(again).subject == issued.subject
    assert again in served.published().values() and again != issued.public_bytes(
        serialization.Encoding.DER
    )
    assert served.stop() == 0


def tool(path: str, *arguments: str, data: bytes | None = None) -> bytes:
    done = subprocess.run(
        [path, *arguments], input=data, capture_output=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


@pytest.mark.server
def test_scepclient_enrolls_against_serve(server: ServerFactory, tmp_path: Path) -> None:
    """scepclient (DES-CBC, SHA-1, its own subject C/O/OU/CN) enrolls with the user's password
    as challenge and the RA picked by serve.json's fingerprint; under subject policy
    'directory' the certificate carries the directory DN and verifies against the chain."""
    scepclient, openssl = require_tool("scepclient"), require_tool("openssl")
    served = server("--set", "serve.subject_policy='directory'", workers=1)
    who = user_id(8)
    key = serialization.load_pem_private_key(
        (WIRE_VECTORS / "rsa2048-device-4.pem").read_bytes(), None
    )
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # the only form scepclient loads
            serialization.NoEncryption(),
        )
    )
    done = subprocess.run(
        [scepclient, "-server-url", served.info["scep"], "-private-key", str(key_path),
         "-cn", who, "-challenge", served.credentials()[who],
         "-ca-fingerprint", served.info["scep_ra_sha256"]],
        cwd=tmp_path, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    issued = tmp_path / "client.pem"
    verified = tool(openssl, "verify", "-CAfile", served.info["ca_chain"], str(issued))
    assert verified.strip().endswith(b": OK")
    certificate = x509.load_pem_x509_certificate(issued.read_bytes())
    assert certificate.subject == user_dn(8)
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == who
    assert certificate.public_bytes(serialization.Encoding.DER) in served.published().values()
    assert json.loads((served.state / "serve.json").read_text())["pid"] == served.process.pid
    assert served.stop() == 0
