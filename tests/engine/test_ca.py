"""The CA: hierarchies verify with openssl; policy refuses what it must; serials are unique."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from engine._der import encode_oid, encode_tlv
from engine.ca import Issued
from engine.errors import (
    DuplicateSanError,
    DuplicateSerialError,
    EmptySanError,
    SanNotAllowedError,
    SignatureInvalidError,
    SubjectMismatchError,
    UnsupportedKeyError,
)
from engine.flow import Status
from engine.identity import (
    DistinguishedName,
    User,
    encode_alternative_names,
    general_name_elements,
)
from engine.keys import Signer
from engine.request import (
    EXTENSION_REQUEST_OID,
    SAN_OID_DER,
    RequestContent,
    RequestTemplate,
    build_request_with_builder,
    encode_extension,
    parse_request,
)
from tests.conftest import SystemFactory, device_of, require_tool, vector_key


def _pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


@pytest.mark.parametrize(
    ("ca_key", "device_key", "intermediates", "hash_name"),
    [
        ("p256", "p256", 0, "sha256"),
        ("rsa2048", "p256", 1, "sha256"),
        ("p384", "p384", 1, "sha384"),
        ("ed25519", "ed25519", 0, "sha256"),
        ("p256", "rsa2048", 1, "sha256"),
    ],
)
def test_issued_chain_verifies_with_openssl(
    make_system: SystemFactory,
    tmp_path: Path,
    ca_key: str,
    device_key: str,
    intermediates: int,
    hash_name: str,
) -> None:
    """`openssl verify -CAfile root -untrusted chain leaf` accepts every issued certificate."""
    openssl = require_tool("openssl")
    system, users = make_system(
        2,
        ca_key=ca_key,
        device_key=device_key,
        ca_intermediates=intermediates,
        hash_name=hash_name,
    )
    vector = {"p256": "p256-4", "p384": "p384-2", "ed25519": "ed25519-2", "rsa2048": "rsa2048-4"}
    outcome = asyncio.run(system.enroll(device_of(users[0], key=vector[device_key])))
    assert outcome.status == "issued", outcome
    chain = system.authority.chain.certificates
    leaf = asyncio.run(system.directory.retrieve(users[0].user.dn.text, outcome.serial or 0))
    (tmp_path / "root.pem").write_bytes(_pem([chain[0]]))
    (tmp_path / "chain.pem").write_bytes(_pem(list(chain[1:])))
    (tmp_path / "leaf.pem").write_bytes(
        x509.load_der_x509_certificate(leaf).public_bytes(serialization.Encoding.PEM)
    )
    result = subprocess.run(
        [
            openssl,
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "chain.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(chain) == intermediates + 2


def test_chain_is_pkcs7_of_the_hierarchy(make_system: SystemFactory) -> None:
    """The cached chain is a PKCS #7 certs-only bundle of root, intermediate and issuing CA."""
    system, _ = make_system(1, ca_intermediates=1)
    loaded = pkcs7.load_der_pkcs7_certificates(system.authority.chain_der)
    assert loaded == list(system.authority.chain.certificates)


def _request(system_user_dn: DistinguishedName, email: str, upn: str, key: str = "p256-4") -> bytes:
    signer = Signer(vector_key(key), "sha256")
    return RequestTemplate(signer.algorithm.family).build(
        signer, RequestContent(system_user_dn, email, upn)
    )


def test_policy_refuses_foreign_subject(make_system: SystemFactory) -> None:
    """A request for another user's DN raises SubjectMismatchError naming both."""
    system, users = make_system(2)
    alice, bob = users[0].user, users[1].user
    request = parse_request(_request(bob.dn, bob.email, bob.upn))
    with pytest.raises(SubjectMismatchError) as info:
        system.authority.check(request, alice)
    assert info.value.expected == alice.dn.text and info.value.found == bob.dn.text


def test_policy_refuses_foreign_san(make_system: SystemFactory) -> None:
    """A request with the user's DN but someone else's e-mail raises SanNotAllowedError."""
    system, users = make_system(2)
    alice = users[0].user
    request = parse_request(_request(alice.dn, users[1].user.email, alice.upn))
    with pytest.raises(SanNotAllowedError):
        system.authority.check(request, alice)


def test_policy_refuses_key_types_not_allowed(make_system: SystemFactory) -> None:
    """A profile allowing only P-256 refuses an Ed25519 request."""
    system, users = make_system(1, allowed_keys=frozenset({"p256"}))
    alice = users[0].user
    signer = Signer(vector_key("ed25519-2"), None)
    der = build_request_with_builder(signer, RequestContent(alice.dn, alice.email, alice.upn))
    with pytest.raises(UnsupportedKeyError, match="ed25519"):
        system.authority.check(parse_request(der), alice)


def test_policy_checks_proof_of_possession_first(make_system: SystemFactory) -> None:
    """A request whose signature is altered is refused before any policy rule."""
    system, users = make_system(1)
    alice = users[0].user
    der = bytearray(_request(alice.dn, alice.email, alice.upn))
    der[-2] ^= 0x40
    with pytest.raises(SignatureInvalidError):
        system.authority.check(parse_request(bytes(der)), alice)


def test_serials_are_unique_positive_and_long(make_system: SystemFactory) -> None:
    """Many issuances give distinct positive serials of at most 128 bits."""
    system, users = make_system(1)
    alice = users[0].user
    request = parse_request(_request(alice.dn, alice.email, alice.upn))
    serials = [system.authority.issue(request, alice).serial for _ in range(2000)]
    assert len(set(serials)) == 2000
    assert all(0 < s < 2**128 for s in serials)
    assert max(serials).bit_length() > 120  # drawn from the full 128-bit range


def test_device_of_uses_vector_keys(make_system: SystemFactory) -> None:
    """Helper sanity: the identity carries the vector key, so no key is generated."""
    _, users = make_system(1)
    assert replace(device_of(users[0]), request_der=None).key_der is not None


def _request_with_san(user: User, san_value: bytes) -> bytes:
    """A correctly signed request for `user` whose SAN extnValue is `san_value` verbatim."""
    signer = Signer(vector_key("p256-4"), "sha256")
    extensions = encode_tlv(0x30, encode_extension(SAN_OID_DER, san_value, critical=False))
    attribute = encode_tlv(0x30, encode_oid(EXTENSION_REQUEST_OID) + encode_tlv(0x31, extensions))
    info = encode_tlv(
        0x30, b"\x02\x01\x00" + user.dn.der + signer.spki + encode_tlv(0xA0, attribute)
    )
    return signer.signed(info)


def test_policy_refuses_empty_san(make_system: SystemFactory) -> None:
    """A request asking for a SAN with no names raises EmptySanError (reason san-empty)."""
    system, users = make_system(1)
    alice = users[0].user
    request = parse_request(_request_with_san(alice, encode_tlv(0x30, b"")))
    with pytest.raises(EmptySanError) as info:
        system.authority.check(request, alice)
    assert info.value.reason == "san-empty"


def test_policy_refuses_duplicate_san_entries(make_system: SystemFactory) -> None:
    """A SAN naming the user's own e-mail twice raises DuplicateSanError (reason san-duplicate)."""
    system, users = make_system(1)
    alice = users[0].user
    email, upn = general_name_elements(encode_alternative_names(alice.email, alice.upn))
    request = parse_request(_request_with_san(alice, encode_tlv(0x30, email + upn + email)))
    with pytest.raises(DuplicateSanError) as info:
        system.authority.check(request, alice)
    assert info.value.reason == "san-duplicate"


def test_policy_accepts_the_users_own_san(make_system: SystemFactory) -> None:
    """The same construction with each of the user's names once passes the policy."""
    system, users = make_system(1)
    alice = users[0].user
    system.authority.check(
        parse_request(_request_with_san(alice, encode_alternative_names(alice.email, alice.upn))),
        alice,
    )


@pytest.mark.parametrize(
    ("san", "reason"), [("empty", "san-empty"), ("duplicate", "san-duplicate")]
)
def test_bad_san_enrollment_ends_rejected_and_nothing_is_issued(
    make_system: SystemFactory, san: str, reason: str
) -> None:
    """Through the whole flow, a bad SAN ends the enrollment rejected with its reason, unissued."""
    system, users = make_system(1)
    alice = users[0].user
    upn = general_name_elements(encode_alternative_names(alice.email, alice.upn))[1]
    value = encode_tlv(0x30, b"" if san == "empty" else upn + upn)
    device = device_of(users[0], request_der=_request_with_san(alice, value))
    outcome = asyncio.run(system.enroll(device))
    assert (outcome.status, outcome.reason) == (Status.REJECTED, reason)
    assert system.authority.issued == 0


class _RefusingDirectory:
    """A directory whose unique serial refuses the first `refusals` publishes."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.offered: list[int] = []

    async def publish(self, dn: str, serial: int, certificate: bytes) -> None:
        self.offered.append(serial)
        if len(self.offered) <= self.refusals:
            raise DuplicateSerialError(serial)


def _process(system_factory: SystemFactory, refusals: int) -> tuple[Issued, list[int]]:
    system, users = system_factory(1)
    alice = users[0].user
    directory = _RefusingDirectory(refusals)
    system.authority.directory = directory  # type: ignore[assignment]
    request = parse_request(_request(alice.dn, alice.email, alice.upn))
    issued = asyncio.run(system.authority.process("d", request, alice, lambda _: None))
    return issued, directory.offered


def test_duplicate_serial_at_publish_draws_again(make_system: SystemFactory) -> None:
    """When the directory refuses a serial as a duplicate, the CA issues under a fresh one."""
    issued, offered = _process(make_system, refusals=2)
    assert len(offered) == 3 and len(set(offered)) == 3
    assert issued.serial == offered[-1]
    assert x509.load_der_x509_certificate(issued.certificate).serial_number == issued.serial


def test_duplicate_serial_every_draw_fails_the_enrollment(make_system: SystemFactory) -> None:
    """A directory refusing every draw ends in DuplicateSerialError after three draws."""
    with pytest.raises(DuplicateSerialError):
        _process(make_system, refusals=3)


def test_ca_keeps_no_serials_in_memory(make_system: SystemFactory) -> None:
    """Issuing leaves the CA's own state as it was: serials live in the directory only."""
    system, users = make_system(1)
    alice = users[0].user
    request = parse_request(_request(alice.dn, alice.email, alice.upn))
    before = {name: repr(value) for name, value in vars(system.authority).items()}
    for _ in range(50):
        system.authority.issue(request, alice)
    after = {name: repr(value) for name, value in vars(system.authority).items()}
    assert {name for name in before if before[name] != after[name]} == {"issued"}
