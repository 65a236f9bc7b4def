"""The server's state folder: CA hierarchy, TLS and RA material, credentials, the shared store.

Made once and reused across restarts (the same CA, store and credentials). The folder is private
(0700) and every key or credential file in it is 0600. Layout:

    ca/certificate-<n>.der   the hierarchy, root first, issuing CA last
    ca/issuing-key.der       the issuing CA's key (PKCS #8)
    ca/chain.pem             the hierarchy as PEM (what outside clients trust)
    tls/server.pem, .key     the EST server's certificate (from the issuing CA) and key
    scep/ra.der, ra.key      the SCEP RA certificate (RSA, keyEncipherment) and key
    credentials              "user_id:password" per simulated user (0600)
    store.sqlite             the shared store (SQLite, WAL): users, transactions, certificates
    metrics/                 each worker's metrics snapshot
    serve.json               where the running server listens (written when it is ready)
    serve.lock               held (flock) by the server using the folder: one at a time
    database                 the running server's PostgreSQL DSN, when it uses one (0600)
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench.errors import UsageError
from bench.profile import Profile
from engine.keys import (
    KeyFamily,
    PrivateKey,
    family_of,
    generate_private_key,
    key_spec,
    load_private_key,
    private_key_to_der,
)
from engine.population import directory_entry, simulated_enrollee
from engine.service import seed_users
from engine.system import CAMaterial
from engine.wire.est import order_chain

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


@dataclass(frozen=True, slots=True)
class BringYourOwnCA:
    """An existing issuing CA: certificate files (issuing CA last) and key, or a PKCS #12."""

    certificates: tuple[Path, ...] = ()
    key: Path | None = None
    pkcs12: Path | None = None
    password_env: str = "ENROLLBENCH_CA_PASSWORD"  # noqa: S105 (the variable's name, not a secret)


@dataclass(frozen=True, slots=True)
class ServerState:
    """A state folder that exists and is complete."""

    folder: Path

    @property
    def store(self) -> Path:
        return self.folder / "store.sqlite"

    @property
    def credentials(self) -> Path:
        return self.folder / "credentials"

    @property
    def chain_pem(self) -> Path:
        return self.folder / "ca" / "chain.pem"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics"

    @property
    def listening(self) -> Path:
        return self.folder / "serve.json"

    @property
    def database(self) -> Path:
        """The running server's PostgreSQL DSN (0600, while it serves: `enrollbench approve`
        reaches the store through it; a password never goes on a command line)."""
        return self.folder / "database"

    def material(self) -> CAMaterial:
        ca = self.folder / "ca"
        certificates = tuple(
            p.read_bytes()
            for p in sorted(ca.glob("certificate-*.der"), key=lambda p: int(p.stem.split("-")[1]))
        )
        return CAMaterial(certificates, (ca / "issuing-key.der").read_bytes())

    def tls_files(self) -> tuple[Path, Path]:
        return self.folder / "tls" / "server.pem", self.folder / "tls" / "server.key"

    def ra(self) -> tuple[bytes, rsa.RSAPrivateKey]:
        key = load_private_key((self.folder / "scep" / "ra.key").read_bytes())
        if not isinstance(key, rsa.RSAPrivateKey):  # pragma: no cover (we wrote it)
            raise UsageError("the SCEP RA key in the state folder is not RSA")
        return (self.folder / "scep" / "ra.der").read_bytes(), key

    def ra_fingerprint(self) -> str:
        """SHA-256 of the RA certificate (scepclient's -ca-fingerprint picks it by this)."""
        return hashlib.sha256((self.folder / "scep" / "ra.der").read_bytes()).hexdigest()

    def read_listening(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.listening.read_text())
        return data


def prepare_state(
    folder: Path, profile: Profile, own_ca: BringYourOwnCA | None = None
) -> ServerState:
    """Create what the folder lacks (CA, TLS, RA, users); keep what is there."""
    folder.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    os.chmod(folder, PRIVATE_DIR)
    state = ServerState(folder)
    ca = folder / "ca"
    if not (ca / "issuing-key.der").exists():
        material = _own_material(own_ca) if own_ca is not None else _new_material(profile)
        _write_material(ca, material)
    material = state.material()
    if own_ca is not None and _own_material(own_ca).certificates != material.certificates:
        # the folder's CA is kept across restarts: another one given would be silently ignored
        raise UsageError(f"{folder} already holds another CA: give a new --state for this one")
    issuing = x509.load_der_x509_certificate(material.certificates[-1])
    issuing_key = load_private_key(material.issuing_key)
    if not (folder / "tls" / "server.key").exists():
        _write_tls(folder / "tls", issuing, issuing_key, material.certificates)
    if not (folder / "scep" / "ra.key").exists():
        _write_ra(folder / "scep", issuing, issuing_key)
    _private_store(state.store)
    if not state.credentials.exists():
        _write_users(state, profile)
    return state


def _private_store(store: Path) -> None:
    """The store holds password verifiers: 0600 from its first byte. SQLite creates its -wal
    and -shm files with the database file's mode; a store made before this rule is fixed."""
    if not store.exists():
        os.close(os.open(store, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE))
    for path in (store, store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
        if path.exists():
            os.chmod(path, PRIVATE_FILE)


def _new_material(profile: Profile) -> CAMaterial:
    config = profile.engine_config()
    spec = key_spec(config.ca_key)
    keys = [generate_private_key(spec) for _ in range(config.ca_intermediates + 2)]
    return CAMaterial.create(config, keys)


def _own_material(own: BringYourOwnCA) -> CAMaterial:
    """An existing CA: PEM/DER certificate files and a key file, or a PKCS #12 bundle."""
    try:
        if own.pkcs12 is not None:
            password = os.environ.get(own.password_env)
            bundle = pkcs12.load_pkcs12(
                own.pkcs12.read_bytes(), None if password is None else password.encode()
            )
            if bundle.key is None or bundle.cert is None:
                raise UsageError(f"{own.pkcs12}: the PKCS #12 needs the CA's key and certificate")
            chain = [c.certificate for c in bundle.additional_certs] + [bundle.cert.certificate]
            key: Any = bundle.key
        else:
            if own.key is None or not own.certificates:
                raise UsageError("bring your own CA: give its certificate files and its key")
            chain = [_load_certificate(p) for p in own.certificates]
            key = serialization.load_pem_private_key(own.key.read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the CA given: {exc}") from exc
    if not isinstance(key, PrivateKey):
        raise UsageError("the CA key is of a type enrollbench cannot sign with")
    return CAMaterial(_root_first(chain, key), private_key_to_der(key))


def _root_first(chain: list[x509.Certificate], key: PrivateKey) -> tuple[bytes, ...]:
    """The hierarchy as CAMaterial holds it: root first, the key's certificate (the issuing CA)
    last. A PKCS #12 bundle lists its other certificates in any order (a TLS chain written
    from a misordered hierarchy would skip the intermediate)."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    wanted = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    issuing = chain[-1]
    if issuing.public_key().public_bytes(serialization.Encoding.DER, spki) != wanted:
        raise UsageError("the CA key does not belong to the last certificate given")
    others = [c.public_bytes(serialization.Encoding.DER) for c in chain[:-1]]
    ordered = order_chain(others) if others else ()
    return (*ordered, issuing.public_bytes(serialization.Encoding.DER))


def _load_certificate(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, PRIVATE_FILE)


def _write_material(folder: Path, material: CAMaterial) -> None:
    folder.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    pem = b""
    for n, der in enumerate(material.certificates):
        (folder / f"certificate-{n}.der").write_bytes(der)
        pem += x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    (folder / "chain.pem").write_bytes(pem)
    write_private(folder / "issuing-key.der", material.issuing_key)


def _leaf(
    subject: str, public: Any, issuing: x509.Certificate, issuing_key: PrivateKey
) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuing.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuing_key.public_key()),
            critical=False,
        )
    )


def _sign(builder: x509.CertificateBuilder, key: PrivateKey) -> x509.Certificate:
    digest = None if family_of(key) is KeyFamily.ED25519 else hashes.SHA256()
    return builder.sign(key, digest)


def _write_tls(
    folder: Path, issuing: x509.Certificate, issuing_key: PrivateKey, chain: tuple[bytes, ...]
) -> None:
    """A TLS server certificate for 127.0.0.1 and localhost from the issuing CA (P-256 key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _leaf("enrollbench EST server", key.public_key(), issuing, issuing_key)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
    )
    certificate = _sign(builder, issuing_key)
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    for der in reversed(chain[1:]):  # the server sends its chain up to (not including) the root
        pem += x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    folder.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    (folder / "server.pem").write_bytes(pem)
    write_private(
        folder / "server.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _write_ra(folder: Path, issuing: x509.Certificate, issuing_key: PrivateKey) -> None:
    """The SCEP RA: an RSA-2048 key and certificate for key transport and signing replies,
    beside any CA key type (an EC CA cannot decrypt an RSA-enveloped SCEP request)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    builder = _leaf("enrollbench SCEP RA", key.public_key(), issuing, issuing_key).add_extension(
        x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
    )
    certificate = _sign(builder, issuing_key)
    folder.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    (folder / "ra.der").write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    write_private(folder / "ra.key", private_key_to_der(key))


def _write_users(state: ServerState, profile: Profile) -> None:
    """The simulated users: into the store, and their passwords into the credentials file."""
    seed = profile.get("", "seed")
    iterations = profile.get("auth", "iterations")
    enrollees = [simulated_enrollee(i, seed) for i in range(profile.get("load", "devices"))]
    seed_users(state.store, (directory_entry(e, seed, iterations) for e in enrollees))
    lines = "".join(f"{e.user.user_id}:{e.password}\n" for e in enrollees)
    write_private(state.credentials, lines.encode())
