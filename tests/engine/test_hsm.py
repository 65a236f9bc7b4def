"""engine.hsm: CA keys in a SoftHSM2 token, and the RFC 7512 URI parser."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import given
from hypothesis import strategies as st
from pkcs11 import ObjectClass

from bench.services.softhsm import CONF_ENV, Token, create_token, import_key
from engine.ca import build_hierarchy
from engine.certificate import CertificateTemplate
from engine.hsm import (
    HsmKeyNotFoundError,
    HsmModuleError,
    HsmPinError,
    HsmSigner,
    HsmSigningError,
    HsmTokenNotFoundError,
    Pkcs11Uri,
    Pkcs11UriError,
    reinitialize_module,
    reset_sessions,
)
from engine.keys import KeyFamily, Signer, split_spki
from tests.conftest import require_tool, vector_key

PIN = "4711-user"
CA_KEYS = {"p256": ("p256-1", "p256-2"), "rsa2048": ("rsa2048-1", "rsa2048-2")}
MESSAGE = b"tbsCertificate stand-in"


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    """A SoftHSM2 token holding the P-256 and RSA-2048 issuing keys (label = key type, id 1, 2)."""
    require_tool("softhsm2-util")
    previous = os.environ.get(CONF_ENV)
    made = create_token(tmp_path_factory.mktemp("softhsm"), "enrollbench-ca", PIN, "so-pin-1")
    for index, (label, (issuing, _)) in enumerate(CA_KEYS.items(), start=1):
        import_key(made, vector_key(issuing), label, bytes([index]))
    yield made
    reset_sessions()
    if previous is None:
        os.environ.pop(CONF_ENV, None)
    else:
        os.environ[CONF_ENV] = previous
    reinitialize_module(made.module)


def open_signer(token: Token, label: str, pin: str = PIN) -> HsmSigner:
    return HsmSigner.open(token.module, token.uri(label), pin, "sha256")


def verify(label: str, signature: bytes, data: bytes) -> None:
    """Verify with the vector key's public key (cryptography), raising if it does not verify."""
    public = vector_key(CA_KEYS[label][0]).public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.server
@pytest.mark.parametrize("label", list(CA_KEYS))
def test_signature_verifies_with_the_public_key(token: Token, label: str) -> None:
    """A signature made in the token verifies with the imported key's public key."""
    verify(label, open_signer(token, label).sign(MESSAGE), MESSAGE)


@pytest.mark.server
@pytest.mark.parametrize("label", list(CA_KEYS))
def test_spki_and_algorithm_match_the_key_in_memory(token: Token, label: str) -> None:
    """spki and algorithm equal those of engine.keys.Signer over the same key."""
    signer = open_signer(token, label)
    reference = Signer(vector_key(CA_KEYS[label][0]), "sha256")
    assert (signer.spki, signer.algorithm) == (reference.spki, reference.algorithm)


@pytest.mark.server
@pytest.mark.parametrize("label", list(CA_KEYS))
def test_certificate_from_template_passes_openssl_verify(
    token: Token, label: str, tmp_path: Path
) -> None:
    """A certificate CertificateTemplate issues with an HsmSigner passes `openssl verify`."""
    openssl = require_tool("openssl")
    issuing, root = CA_KEYS[label]
    chain = build_hierarchy(
        "hsm", [vector_key(root), vector_key(issuing)], "sha256", datetime.now(UTC)
    )
    signer = open_signer(token, label)
    # CertificateTemplate is annotated with Signer; HsmSigner has the same interface.
    template = CertificateTemplate(chain.certificates[-1], signer, KeyFamily.EC, 86_400)
    device = vector_key("p256-4").public_key()
    spki = device.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    subject = x509.Name.from_rfc4514_string("CN=device-1,O=enrollbench").public_bytes()
    der = template.issue(0x1234, int(time.time()) - 60, subject, split_spki(spki), None)
    pem = {
        "root.pem": chain.certificates[0],
        "issuing.pem": chain.certificates[-1],
        "leaf.pem": x509.load_der_x509_certificate(der),
    }
    for name, certificate in pem.items():
        (tmp_path / name).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    done = subprocess.run(
        [openssl, "verify", "-CAfile", "root.pem", "-untrusted", "issuing.pem", "leaf.pem"],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.server
def test_wrong_pin_is_refused_by_the_token(token: Token) -> None:
    """With no session open, the token's own login refuses a wrong PIN (HsmPinError)."""
    reset_sessions()
    with pytest.raises(HsmPinError, match="refused the PIN") as raised:
        open_signer(token, "p256", pin="0000-wrong")
    assert "0000-wrong" not in str(raised.value)


@pytest.mark.server
def test_other_pin_while_logged_in_is_refused(token: Token) -> None:
    """A second signer with another PIN than the process's login is refused, not let through."""
    open_signer(token, "p256")
    with pytest.raises(HsmPinError):
        open_signer(token, "rsa2048", pin="0000-wrong")


@pytest.mark.server
def test_missing_key_is_named(token: Token) -> None:
    """A URI naming no key in the token raises HsmKeyNotFoundError with the URI."""
    with pytest.raises(HsmKeyNotFoundError, match="object=ed25519"):
        open_signer(token, "ed25519")


@pytest.mark.server
def test_token_found_by_serial_and_by_slot_id(token: Token) -> None:
    """serial= and slot-id= select the token as token= does."""
    found = pkcs11.lib(token.module).get_token(token_label=token.label)
    serial = found.serial.decode() if isinstance(found.serial, bytes) else str(found.serial)
    by_serial = f"pkcs11:serial={serial.strip()};object=p256"
    by_slot = f"pkcs11:slot-id={found.slot.slot_id};object=p256"
    for uri in (by_serial, by_slot):
        verify("p256", HsmSigner.open(token.module, uri, PIN, "sha256").sign(MESSAGE), MESSAGE)


@pytest.mark.server
def test_missing_token_is_named(token: Token) -> None:
    """A URI naming another token raises HsmTokenNotFoundError."""
    with pytest.raises(HsmTokenNotFoundError, match="no token"):
        HsmSigner.open(token.module, "pkcs11:token=nowhere;object=p256", PIN, "sha256")


def test_missing_module_is_named(tmp_path: Path) -> None:
    """A module path that does not exist raises HsmModuleError naming it."""
    missing = str(tmp_path / "libnothing.so")
    with pytest.raises(HsmModuleError, match="libnothing"):
        HsmSigner.open(missing, "pkcs11:token=a;object=b", PIN, "sha256")


def test_module_that_is_not_pkcs11_is_refused(tmp_path: Path) -> None:
    """A file that is not a shared library raises HsmModuleError."""
    bogus = tmp_path / "libbogus.so"
    bogus.write_bytes(b"not an ELF file")
    with pytest.raises(HsmModuleError, match="does not load"):
        HsmSigner.open(str(bogus), "pkcs11:token=a;object=b", PIN, "sha256")


@pytest.mark.server
def test_repr_and_pickle_carry_no_pin_in_text(token: Token) -> None:
    """The signer's repr names module and URI, never the PIN."""
    assert PIN not in repr(open_signer(token, "p256"))


@pytest.mark.server
def test_unpickled_signer_reopens_and_signs(token: Token) -> None:
    """A signer restored from a pickle in the same process finds its key and signs."""
    restored = pickle.loads(pickle.dumps(open_signer(token, "rsa2048")))
    reset_sessions()
    verify("rsa2048", restored.sign(MESSAGE), MESSAGE)


@pytest.mark.server
def test_key_deleted_from_the_token_fails_typed(token: Token) -> None:
    """A key removed under a signer: signing raises HsmSigningError, the next try names it gone."""
    uri = import_key(token, vector_key("p256-3"), "doomed", b"\x09")
    signer = HsmSigner.open(token.module, uri, PIN, "sha256")
    session = pkcs11.lib(token.module).get_token(token_label=token.label).open(rw=True)
    try:
        session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="doomed").destroy()
    finally:
        session.close()
    with pytest.raises(HsmSigningError, match="failed to sign"):
        signer.sign(MESSAGE)
    with pytest.raises(HsmKeyNotFoundError, match="no private key"):
        signer.sign(MESSAGE)


def sign_in_child(signer: HsmSigner, queue: multiprocessing.Queue[tuple[int, bytes]]) -> None:
    queue.put((os.getpid(), signer.sign(MESSAGE)))


@pytest.mark.server
@pytest.mark.parametrize("method", ["spawn", "fork"])
@pytest.mark.parametrize("label", list(CA_KEYS))
def test_signer_signs_in_a_child_process(token: Token, label: str, method: str) -> None:
    """A signer passed to a spawned or forked child opens its own session there and signs."""
    signer = open_signer(token, label)
    signer.sign(MESSAGE)  # the parent's session is open and in use
    spawn = method == "spawn"
    context = multiprocessing.get_context("spawn") if spawn else multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[tuple[int, bytes]] = context.Queue()
    child = context.Process(target=sign_in_child, args=(signer, queue))
    child.start()
    pid, signature = queue.get(timeout=60)
    child.join(timeout=60)
    assert (child.exitcode, pid != os.getpid()) == (0, True)
    verify(label, signature, MESSAGE)
    verify(label, signer.sign(MESSAGE), MESSAGE)  # the parent's session still works


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("pkcs11:token=ca;object=p256;type=private", Pkcs11Uri(token="ca", object="p256")),
        ("PKCS11:token=My%20CA;id=%01%A2", Pkcs11Uri(token="My CA", id=b"\x01\xa2")),
        (
            "pkcs11:serial=2239a8b93178f576;object=k;model=SoftHSM%20v2",
            Pkcs11Uri(serial="2239a8b93178f576", object="k", model="SoftHSM v2"),
        ),
        ("pkcs11:slot-id=7;id=%ff", Pkcs11Uri(slot_id=7, id=b"\xff")),
        (
            "pkcs11:manufacturer=SoftHSM%20project;token=a;object=%C3%A9t%C3%A9",
            Pkcs11Uri(token="a", manufacturer="SoftHSM project", object="été"),
        ),
    ],
)
def test_uri_parses(uri: str, expected: Pkcs11Uri) -> None:
    """Good RFC 7512 URIs parse into their attributes (percent-decoded)."""
    assert Pkcs11Uri.parse(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("token=a;object=b", "starts with 'pkcs11:'"),
        ("https:token=a;object=b", "starts with 'pkcs11:'"),
        ("pkcs11:", "must name the key"),
        ("pkcs11:token=a", "must name the key"),
        ("pkcs11:object=a", "must name the token"),
        ("pkcs11:token=a;token=b;object=c", "appears twice"),
        ("pkcs11:token=a;object=b;type=cert", "type=private"),
        ("pkcs11:token=a;object=b;type=bogus", "type must be one of"),
        ("pkcs11:token=a;object=b?pin-value=1234", "query attributes"),
        ("pkcs11:token=a;object=%zz", "malformed %-escape"),
        ("pkcs11:token=a;object=b%2", "malformed %-escape"),
        ("pkcs11:token=a;object=b c", "must be %-encoded"),
        ("pkcs11:token=a;object=b/c", "must be %-encoded"),
        ("pkcs11:token=a;object=b;slot-id=x", "slot-id must be"),
        ("pkcs11:token=a;object=b;x-vendor=1", "unsupported path attribute"),
        ("pkcs11:token=a;object=b;library-version=1", "unsupported path attribute"),
        ("pkcs11:token=a;object", "has no '=value'"),
        ("pkcs11:token=a;;object=b", "has no '=value'"),
        ("pkcs11:token=;object=b", "is empty"),
        ("pkcs11:token=a;id=", "'id' is empty"),
        ("pkcs11:token=a;object=%ff", "not UTF-8"),
    ],
)
def test_uri_refused(uri: str, message: str) -> None:
    """Malformed or unusable URIs raise Pkcs11UriError saying what is wrong."""
    with pytest.raises(Pkcs11UriError, match=message):
        Pkcs11Uri.parse(uri)


def test_uri_error_does_not_echo_a_pin() -> None:
    """A PIN put in the URI's query is refused without being repeated in the message."""
    with pytest.raises(Pkcs11UriError) as raised:
        Pkcs11Uri.parse("pkcs11:token=a;object=b?pin-value=secret-4711")
    assert "secret-4711" not in str(raised.value)


_TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20)


@given(
    token=st.none() | _TEXT,
    serial=st.none() | _TEXT,
    slot_id=st.none() | st.integers(0, 2**32),
    obj=st.none() | _TEXT,
    key_id=st.none() | st.binary(min_size=1, max_size=8),
)
def test_uri_round_trips(
    token: str | None,
    serial: str | None,
    slot_id: int | None,
    obj: str | None,
    key_id: bytes | None,
) -> None:
    """str() of a Pkcs11Uri parses back to the same attributes, or is refused as incomplete."""
    uri = Pkcs11Uri(token=token, serial=serial, slot_id=slot_id, object=obj, id=key_id)
    complete = (obj is not None or key_id is not None) and (
        token is not None or serial is not None or slot_id is not None
    )
    if complete:
        assert Pkcs11Uri.parse(str(uri)) == uri
    else:
        with pytest.raises(Pkcs11UriError, match="must name"):
            Pkcs11Uri.parse(str(uri))
