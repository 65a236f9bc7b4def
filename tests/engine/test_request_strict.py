"""Strict DER for requests: both walks fail alike at one offset; cryptography agrees."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import AttributeOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder
from pyasn1.error import PyAsn1Error
from pyasn1_modules import rfc2986

from engine import _der
from engine._der import encode_oid, encode_tlv
from engine.errors import EnrollmentError, MalformedRequestError
from engine.identity import DistinguishedName
from engine.keys import Signer, load_public_key
from engine.request import (
    EXTENSION_REQUEST_OID,
    RequestContent,
    RequestTemplate,
    parse_request,
    python_split_request,
    split_request,
)
from tests.conftest import vector_key

CONTENT = RequestContent(
    DistinguishedName.from_text("CN=user0000001,OU=Devices,O=Example Corp,DC=example,DC=com"),
    "user0000001@example.com",
    "user0000001@corp.example.com",
)
_ED25519 = Signer(vector_key("ed25519-1"), None)
_P256 = Signer(vector_key("p256-4"), "sha256")
_KEY_USAGE = encode_tlv(0x30, encode_oid("2.5.29.15") + encode_tlv(0x04, b"\x03\x02\x07\x80"))
_CHALLENGE = encode_tlv(0x30, encode_oid("1.2.840.113549.1.9.7") + encode_tlv(0x31, b"\x0c\x02pw"))

needs_c = pytest.mark.skipif(
    split_request is python_split_request and not os.environ.get("CI"),
    reason="C walk not built",
)


def _rich_request() -> bytes:
    """A request with more kinds of element: PrintableString, multi-valued RDN, two attributes."""
    subject = x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "US")]),
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "device 7"),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, "A-7"),
                ]
            ),
        ]
    )
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name("a@x.org")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"secret")
    )
    return builder.sign(_P256.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


_SEEDS = [
    RequestTemplate(_ED25519.algorithm.family).build(_ED25519, CONTENT),
    RequestTemplate(_P256.algorithm.family).build(_P256, CONTENT),
    _rich_request(),
]


def _request(attributes: bytes, signer: Signer = _ED25519) -> bytes:
    """A signed request around raw attribute bytes (the content of [0] attributes)."""
    info = encode_tlv(
        0x30, b"\x02\x01\x00" + CONTENT.subject.der + signer.spki + encode_tlv(0xA0, attributes)
    )
    return signer.signed(info)


def _extension_request(values: bytes, after: bytes = b"") -> bytes:
    return encode_tlv(0x30, encode_oid(EXTENSION_REQUEST_OID) + encode_tlv(0x31, values) + after)


def _outcome(split: Callable[[bytes], object], der: bytes) -> object:
    """The walk's slices, or its error's type, message and offset: what C and Python share."""
    try:
        return split(der)
    except MalformedRequestError as exc:
        return (type(exc).__name__, exc.detail, exc.offset)


def _headers(der: bytes) -> list[int]:
    """Offsets of every element header in a valid request, constructed ones walked down."""
    found: list[int] = []

    def walk(start: int, end: int) -> None:
        while start < end:
            tag, content, stop = _der.read_header(der, start)
            found.append(start)
            if tag & 0x20:
                walk(content, stop)
            start = stop

    walk(0, len(der))
    return found


def _length_bytes(length: int, form: str) -> bytes:
    """Encode a length minimally, in a non-minimal long form, or as indefinite."""
    if form == "indefinite":
        return b"\x80"
    if form == "long":
        body = length.to_bytes(max(1, (length.bit_length() + 7) // 8) + 1, "big")
        return bytes((0x80 | len(body),)) + body
    return _der.encode_length(length)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request after substitution, insertion, deletion, length rewriting, truncation."""
    der = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        kind = draw(st.sampled_from(["substitute", "insert", "delete", "length", "truncate"]))
        index = draw(st.integers(min_value=0, max_value=max(0, len(der) - 1)))
        if kind == "substitute" and der:
            der[index] = draw(st.integers(min_value=0, max_value=255))
        elif kind == "insert":
            der[index:index] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del der[index : index + draw(st.integers(min_value=1, max_value=4))]
        elif kind == "length":
            der = bytearray(_rewrite_length(bytes(der), draw))
        else:
            del der[index:]
    return bytes(der)


def _rewrite_length(der: bytes, draw: st.DrawFn) -> bytes:
    """Rewrite the length of one element header (if `der` still walks as DER)."""
    try:
        headers = _headers(der)
    except EnrollmentError:
        return der
    if not headers:
        return der
    offset = draw(st.sampled_from(headers))
    _, start, end = _der.read_header(der, offset)
    length = max(0, end - start + draw(st.integers(min_value=-3, max_value=3)))
    length = draw(st.sampled_from([length, draw(st.integers(min_value=0, max_value=600))]))
    form = draw(st.sampled_from(["minimal", "long", "indefinite"]))
    return der[: offset + 1] + _length_bytes(length, form) + der[start:]


def test_seed_requests_are_valid() -> None:
    """The mutation seeds parse on both walks and load in cryptography."""
    for der in _SEEDS:
        assert _outcome(split_request, der) == _outcome(python_split_request, der)
        x509.load_der_x509_csr(der)
        parse_request(der)


@pytest.mark.parametrize("split", [split_request, python_split_request])
def test_data_after_the_extension_request_set_is_refused(split: Callable[[bytes], object]) -> None:
    """The issue's case: bytes after the SET in extensionRequest are refused (cryptography too)."""
    der = _request(_extension_request(encode_tlv(0x30, _KEY_USAGE), after=b"\x05\x00"))
    with pytest.raises(ValueError, match="ExtraData"):
        x509.load_der_x509_csr(der)
    with pytest.raises(MalformedRequestError) as info:
        split(der)
    assert info.value.detail == "trailing bytes after the attribute's values"
    assert der[info.value.offset : info.value.offset + 2] == b"\x05\x00"


@needs_c
def test_data_after_the_extension_request_set_fails_alike() -> None:
    """C and Python report that case with the same message at the same offset."""
    der = _request(_extension_request(encode_tlv(0x30, _KEY_USAGE), after=b"\x05\x00"))
    assert _outcome(split_request, der) == _outcome(python_split_request, der)
    assert isinstance(_outcome(split_request, der), tuple)


_REFUSED = {
    "two values in extensionRequest": _extension_request(
        encode_tlv(0x30, _KEY_USAGE) + encode_tlv(0x30, _KEY_USAGE)
    ),
    "empty extensionRequest": _extension_request(encode_tlv(0x30, b"")),
    "attribute without values": _extension_request(b""),
    "data after another attribute's SET": _CHALLENGE[:1]
    + bytes((_CHALLENGE[1] + 2,))
    + _CHALLENGE[2:]
    + b"\x05\x00",
    "explicit critical FALSE": _extension_request(
        encode_tlv(0x30, encode_tlv(0x30, encode_oid("2.5.29.15") + b"\x01\x01\x00" + b"\x04\x00"))
    ),
    "extnValue not one element": _extension_request(
        encode_tlv(
            0x30, encode_tlv(0x30, encode_oid("2.5.29.15") + encode_tlv(0x04, b"\x05\x00\x05"))
        )
    ),
    "attributes out of DER order": _extension_request(encode_tlv(0x30, _KEY_USAGE)) + _CHALLENGE,
    "extensionRequest twice": _extension_request(encode_tlv(0x30, _KEY_USAGE)) * 2,
    "non-minimal length": bytes((0x30, 0x81, _CHALLENGE[1])) + _CHALLENGE[2:],
}


@pytest.mark.parametrize("name", sorted(_REFUSED))
@pytest.mark.parametrize("split", [split_request, python_split_request])
def test_non_der_attributes_are_refused(split: Callable[[bytes], object], name: str) -> None:
    """Each DER or RFC 2986 violation in the attributes raises MalformedRequestError."""
    with pytest.raises(MalformedRequestError):
        split(_request(_REFUSED[name]))


@pytest.mark.parametrize("split", [split_request, python_split_request])
def test_attributes_in_der_order_are_accepted(split: Callable[[bytes], object]) -> None:
    """Two attributes in DER order (shorter encoding first here) parse."""
    der = _request(_CHALLENGE + _extension_request(encode_tlv(0x30, _KEY_USAGE)))
    x509.load_der_x509_csr(der)
    split(der)


def test_pyasn1_agrees_on_the_refused_case() -> None:
    """pyasn1-modules also refuses bytes after an attribute's SET (an independent decoder)."""
    der = _request(_extension_request(encode_tlv(0x30, _KEY_USAGE), after=b"\x05\x00"))
    with pytest.raises(PyAsn1Error):
        decoder.decode(der, asn1Spec=rfc2986.CertificationRequest())


@needs_c
@settings(max_examples=1500, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_c_and_python_walks_fail_alike(der: bytes) -> None:
    """On mutated requests both walks return the same slices or the same error at one offset."""
    assert _outcome(split_request, der) == _outcome(python_split_request, der)


@settings(max_examples=1500, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_what_we_accept_cryptography_accepts(der: bytes) -> None:
    """Oracle: a mutated request our parser and key loader accept, cryptography loads too.

    The key loader is part of it because the walk checks AlgorithmIdentifier parameters only as
    DER; which parameters an algorithm takes is the key loader's table (exact bytes).
    """
    try:
        load_public_key(parse_request(der).key)
    except EnrollmentError:
        return
    x509.load_der_x509_csr(der)


@needs_c
@given(st.binary(max_size=400))
def test_garbage_fails_alike(garbage: bytes) -> None:
    """Arbitrary bytes give the same error at the same offset on both walks."""
    assert _outcome(split_request, garbage) == _outcome(python_split_request, garbage)
