"""PKCS #10 certification requests (RFC 2986): a fast template path, a builder path, a parser.

The template path pre-encodes everything a profile fixes (version, the extension request's key
usage) and splices in the per-device subject, SubjectPublicKeyInfo and alternative names, then
signs once. The builder path uses cryptography's `CertificateSigningRequestBuilder`; both produce
the same fields and both pass `openssl req -verify` (tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from engine import _der
from engine.errors import MalformedDerError
from engine.identity import DistinguishedName, encode_alternative_names
from engine.keys import (
    KeyFamily,
    KeySpec,
    PublicKey,
    SignatureAlgorithm,
    Signer,
    SubjectKey,
    algorithm_from_identifier,
    hash_algorithm,
    load_public_key,
    split_spki,
    verify_signature,
)

EXTENSION_REQUEST_OID = "1.2.840.113549.1.9.14"  # PKCS #9 extensionRequest (RFC 2985 5.4.2)
SAN_OID = "2.5.29.17"
KEY_USAGE_OID = "2.5.29.15"
SAN_OID_DER = _der.encode_oid(SAN_OID)
_KEY_USAGE_OID_DER = _der.encode_oid(KEY_USAGE_OID)
_EXTENSION_REQUEST_DER = _der.encode_oid(EXTENSION_REQUEST_OID)
_VERSION_1 = _der.encode_integer(0)  # RFC 2986 4.1: version v1(0)
_TRUE = _der.encode_tlv(_der.BOOLEAN, b"\xff")


def encode_extension(oid: bytes, value: bytes, *, critical: bool) -> bytes:
    """Encode Extension ::= SEQUENCE { extnID, critical, extnValue } (RFC 5280 4.1).

    `oid` is the extnID already DER-encoded, so the hot path never encodes an OID.
    """
    flag = _TRUE if critical else b""  # DER omits a DEFAULT value (X.690 11.5)
    return _der.encode_tlv(_der.SEQUENCE, oid + flag + _der.encode_tlv(_der.OCTET_STRING, value))


def device_key_usage(family: KeyFamily) -> x509.KeyUsage:
    """Key usage a device key asks for: signing always, key encipherment for RSA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=family is KeyFamily.RSA,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True, slots=True)
class RequestContent:
    """What a device puts in its request: subject, key and alternative names."""

    subject: DistinguishedName
    email: str
    upn: str


class RequestTemplate:
    """Pre-encoded PKCS #10 parts for one profile; `build` splices and signs once."""

    __slots__ = ("_key_usage_extension",)

    def __init__(self, family: KeyFamily) -> None:
        self._key_usage_extension = encode_extension(
            _KEY_USAGE_OID_DER, device_key_usage(family).public_bytes(), critical=True
        )

    def build(self, signer: Signer, content: RequestContent) -> bytes:
        """Return a signed CertificationRequest in DER."""
        san_value = encode_alternative_names(content.email, content.upn)
        san = encode_extension(SAN_OID_DER, san_value, critical=False)
        extensions = _der.encode_tlv(_der.SEQUENCE, san + self._key_usage_extension)
        attribute = _der.encode_tlv(
            _der.SEQUENCE, _EXTENSION_REQUEST_DER + _der.encode_tlv(_der.SET, extensions)
        )
        info = _der.encode_tlv(
            _der.SEQUENCE,
            _VERSION_1
            + content.subject.der
            + signer.spki
            + _der.encode_tlv(0xA0, attribute),  # attributes [0] IMPLICIT SET OF Attribute
        )
        return signer.signed(info)


def build_request_with_builder(signer: Signer, content: RequestContent) -> bytes:
    """The reference path: the same request through cryptography's builder."""
    names = x509.SubjectAlternativeName(
        [
            x509.RFC822Name(content.email),
            x509.OtherName(
                x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"),
                _der.encode_tlv(_der.UTF8_STRING, content.upn.encode()),
            ),
        ]
    )
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name.from_rfc4514_string(content.subject.text))
        .add_extension(names, critical=False)
        .add_extension(device_key_usage(signer.algorithm.family), critical=True)
    )
    hash_name = signer.algorithm.hash_name
    request = builder.sign(signer.key, None if hash_name is None else hash_algorithm(hash_name))
    return request.public_bytes(serialization.Encoding.DER)


class ParsedRequest(NamedTuple):
    """The parts of a request the CA and the enterprise server act on, as raw DER slices.

    `extensions` maps each requested extension's OID, as its DER TLV, to (critical, extnValue).
    A NamedTuple rather than a frozen dataclass: immutable too, and five times cheaper to make
    on the hot path.
    """

    info: bytes
    subject: bytes
    key: SubjectKey
    algorithm: SignatureAlgorithm
    signature: bytes
    extensions: dict[bytes, tuple[bool, bytes]]


RequestSlices = tuple[
    bytes, bytes, bytes, bytes, bytes, bytes, bytes, dict[bytes, tuple[bool, bytes]]
]


def parse_request(der: bytes) -> ParsedRequest:
    """Split a DER CertificationRequest into its parts; raise `MalformedDerError` on bad bytes."""
    info, subject, spki, key_algorithm, key_bits, algorithm, signature, extensions = split_request(
        der
    )
    return ParsedRequest(
        info,
        subject,
        SubjectKey(spki, key_algorithm, key_bits),
        algorithm_from_identifier(algorithm),
        signature,
        extensions,
    )


def python_split_request(der: bytes) -> RequestSlices:
    """The structure walk of a request (RFC 2986 4.1, 4.2); engine/_derc.c has the same in C.

    Returns the info, subject, SPKI, SPKI algorithm, key bits, signature algorithm, signature
    and the requested extensions (OID DER -> (critical, extnValue)).
    """
    if not isinstance(der, bytes):
        raise MalformedDerError("request is not bytes")
    start, end = _der.read_whole(der, _der.SEQUENCE)
    info_start, info_end = _der.expect(der, start, _der.SEQUENCE, end)
    _, alg_end = _der.expect(der, info_end, _der.SEQUENCE, end)
    sig_start, sig_end = _der.expect(der, alg_end, _der.BIT_STRING, end)
    if sig_end != end:
        raise MalformedDerError("trailing bytes in CertificationRequest", sig_end)
    if sig_end == sig_start or der[sig_start] != 0:
        raise MalformedDerError("signature BIT STRING has unused bits", sig_start)
    # CertificationRequestInfo: version v1(0), subject, subjectPKInfo, [0] attributes
    subject_start = info_start + len(_VERSION_1)
    if subject_start > info_end or der[info_start:subject_start] != _VERSION_1:
        raise MalformedDerError("request version is not v1(0)", info_start)
    _, subject_end = _der.expect(der, subject_start, _der.SEQUENCE, info_end)
    key = split_spki(der, subject_end, info_end)
    attrs_start, attrs_end = _der.expect(der, subject_end + len(key.spki), 0xA0, info_end)
    if attrs_end != info_end:
        raise MalformedDerError("trailing bytes in CertificationRequestInfo", attrs_end)
    return (
        der[start:info_end],
        der[subject_start:subject_end],
        key.spki,
        key.algorithm,
        key.bits,
        der[info_end:alg_end],
        der[sig_start + 1 : sig_end],
        _parse_attributes(der, attrs_start, attrs_end),
    )


def _parse_attributes(data: bytes, start: int, end: int) -> dict[bytes, tuple[bool, bytes]]:
    """Collect the extensions of any extensionRequest attribute (RFC 2985 5.4.2)."""
    extensions: dict[bytes, tuple[bool, bytes]] = {}
    offset = start
    marker = len(_EXTENSION_REQUEST_DER)
    while offset < end:
        content, stop = _der.expect(data, offset, _der.SEQUENCE, end)
        if data[content : content + marker] == _EXTENSION_REQUEST_DER:
            set_start, set_end = _der.expect(data, content + marker, _der.SET, stop)
            value = set_start
            while value < set_end:
                ext_start, value = _der.expect(data, value, _der.SEQUENCE, set_end)
                _parse_extensions(data, ext_start, value, extensions)
        else:
            _der.expect(data, content, _der.OID, stop)  # any other attribute: type, then values
        offset = stop
    return extensions


def _parse_extensions(
    data: bytes, start: int, end: int, into: dict[bytes, tuple[bool, bytes]]
) -> None:
    """Read Extension SEQUENCEs (RFC 5280 4.1) into `into`, refusing duplicates."""
    offset = start
    while offset < end:
        content, stop = _der.expect(data, offset, _der.SEQUENCE, end)
        if content + 2 > stop or data[content] != _der.OID or data[content + 1] >= 0x80:
            raise MalformedDerError("extension has no extnID", content)
        cursor = content + 2 + data[content + 1]
        if cursor > stop:
            raise MalformedDerError("extnID runs past the end of its extension", content)
        oid = data[content:cursor]
        # critical BOOLEAN DEFAULT FALSE: DER writes TRUE as 0xFF, omits FALSE (X.690 11.1, 11.5)
        critical = data[cursor : cursor + 3] == _TRUE
        if critical:
            cursor += 3
        value_start, value_end = _der.expect(data, cursor, _der.OCTET_STRING, stop)
        if value_end != stop:
            raise MalformedDerError("malformed or trailing bytes in extension", value_end)
        if oid in into:
            raise MalformedDerError("extension appears twice", offset)
        into[oid] = (critical, data[value_start:value_end])
        offset = stop


def verify_request(request: ParsedRequest) -> tuple[PublicKey, KeySpec]:
    """Check proof of possession: the request's signature verifies with its own key."""
    key, spec = load_public_key(request.key)
    verify_signature(key, spec, request.algorithm, request.signature, request.info)
    return key, spec


split_request: Callable[[bytes], RequestSlices]
try:  # the same walk in C (engine/_derc.c), when the build compiled it
    from engine._derc import parse_request as _c_split_request
except ImportError:  # pragma: no cover (a build without a C compiler)
    split_request = python_split_request
else:
    split_request = _c_split_request
