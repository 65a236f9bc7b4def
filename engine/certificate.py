"""End-entity certificates from a pre-encoded TBSCertificate template (RFC 5280 4.1).

Everything one issuing CA fixes (version, signature algorithm, issuer, basic constraints, key
usage, extended key usage, authority key identifier) is encoded once; issuance splices serial,
validity, subject, SubjectPublicKeyInfo, subject key identifier and alternative names, then signs
once with the CA key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from engine import _der
from engine.errors import EmptySanError
from engine.keys import CaSigner, KeyFamily, Signer, SubjectKey, hash_algorithm
from engine.request import SAN_OID_DER, device_key_usage, encode_extension

_VERSION_3 = _der.encode_tlv(0xA0, _der.encode_integer(2))  # [0] EXPLICIT Version v3(2)
_UTC_TIME_LIMIT = 2_524_608_000  # 2050-01-01: RFC 5280 4.1.2.5 switches to GeneralizedTime
_CLIENT_AUTH = _der.encode_oid("1.3.6.1.5.5.7.3.2")
_BASIC_CONSTRAINTS = _der.encode_oid("2.5.29.19")
_KEY_USAGE = _der.encode_oid("2.5.29.15")
_EXT_KEY_USAGE = _der.encode_oid("2.5.29.37")
_AUTHORITY_KEY_ID = _der.encode_oid("2.5.29.35")
_EMPTY_SEQUENCE = _der.encode_tlv(_der.SEQUENCE, b"")


# Extension { extnID subjectKeyIdentifier, extnValue OCTET STRING { KeyIdentifier (20 octets) } }
_SKI_HEADER = encode_extension(
    _der.encode_oid("2.5.29.14"), _der.encode_tlv(_der.OCTET_STRING, bytes(20)), critical=False
)[:-20]


def encode_time(epoch: int) -> bytes:
    """Encode a validity time: UTCTime through 2049, GeneralizedTime after (RFC 5280 4.1.2.5)."""
    moment = datetime.fromtimestamp(epoch, UTC)
    if epoch < _UTC_TIME_LIMIT:
        return _der.encode_tlv(_der.UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode())
    return _der.encode_tlv(_der.GENERALIZED_TIME, moment.strftime("%Y%m%d%H%M%SZ").encode())


def key_identifier(key: SubjectKey) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING value (RFC 5280 4.2.1.2, method 1)."""
    return hashlib.sha1(key.bits, usedforsecurity=False).digest()


class CertificateTemplate:
    """The fixed parts of one issuing CA's end-entity TBSCertificate, encoded once."""

    __slots__ = (
        "_head",
        "_issuer",
        "_signer",
        "_tail_extensions",
        "_validity",
        "_validity_cache",
    )

    def __init__(
        self,
        issuer: x509.Certificate,
        signer: CaSigner,
        device_family: KeyFamily,
        validity_seconds: int,
    ) -> None:
        self._signer = signer
        self._issuer = issuer.subject.public_bytes()  # the issuer's subject bytes, verbatim
        self._validity = validity_seconds
        self._validity_cache: tuple[int, bytes] = (-1, b"")
        issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier(issuer_ski.digest, None, None).public_bytes()
        self._head = (
            encode_extension(_BASIC_CONSTRAINTS, _der.encode_tlv(_der.SEQUENCE, b""), critical=True)
            + encode_extension(
                _KEY_USAGE, device_key_usage(device_family).public_bytes(), critical=True
            )
            + encode_extension(
                _EXT_KEY_USAGE,
                _der.encode_tlv(_der.SEQUENCE, _CLIENT_AUTH),
                critical=False,
            )
        )
        self._tail_extensions = encode_extension(_AUTHORITY_KEY_ID, aki, critical=False)

    def issue(
        self, serial: int, now: int, subject: bytes, key: SubjectKey, san_value: bytes | None
    ) -> bytes:
        """Return a signed certificate in DER for one device."""
        # SubjectKeyIdentifier: a 20-byte digest behind a constant header (RFC 5280 4.2.1.2).
        extensions = self._head + _SKI_HEADER + key_identifier(key) + self._tail_extensions
        if san_value is not None:
            if len(san_value) <= len(_EMPTY_SEQUENCE):  # never an empty SAN (RFC 5280 4.2.1.6)
                raise EmptySanError("an empty subjectAltName is never issued")
            extensions += encode_extension(SAN_OID_DER, san_value, critical=False)
        tbs = _der.encode_tlv(
            _der.SEQUENCE,
            b"".join(
                (
                    _VERSION_3,
                    _der.encode_integer(serial),
                    self._signer.algorithm.identifier,
                    self._issuer,
                    self._validity_for(now),
                    subject,
                    key.spki,
                    _der.encode_tlv(0xA3, _der.encode_tlv(_der.SEQUENCE, extensions)),
                )
            ),
        )
        return self._signer.signed(tbs)

    def _validity_for(self, now: int) -> bytes:
        """Validity ::= SEQUENCE { notBefore, notAfter }, re-encoded once per second."""
        cached_at, encoded = self._validity_cache
        if cached_at != now:
            encoded = _der.encode_tlv(
                _der.SEQUENCE, encode_time(now) + encode_time(now + self._validity)
            )
            self._validity_cache = (now, encoded)
        return encoded


def python_certificate_spki(certificate: bytes) -> bytes:
    """Slice the SubjectPublicKeyInfo out of a DER certificate (engine/_derc.c has it in C)."""
    start, end = _der.read_whole(certificate, _der.SEQUENCE)
    offset, tbs_end = _der.expect(certificate, start, _der.SEQUENCE, end)
    # tbsCertificate (RFC 5280 4.1): [0] version, serial, signature, issuer, validity, subject, spki
    count = 6 if offset < tbs_end and certificate[offset] == 0xA0 else 5
    offset = _der.skip(certificate, offset, count, tbs_end)
    _, spki_end = _der.expect(certificate, offset, _der.SEQUENCE, tbs_end)
    return certificate[offset:spki_end]


def build_certificate_with_builder(
    issuer: x509.Certificate,
    signer: Signer,
    device_family: KeyFamily,
    validity_seconds: int,
    serial: int,
    now: int,
    request: x509.CertificateSigningRequest,
) -> bytes:
    """The reference path: the same end-entity certificate through `CertificateBuilder`."""
    moment = datetime.fromtimestamp(now, UTC)
    public_key = request.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(request.subject)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(moment)
        .not_valid_after(moment + timedelta(seconds=validity_seconds))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(device_key_usage(device_family), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
    )
    try:
        names = request.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        builder = builder.add_extension(names.value, critical=False)
    except x509.ExtensionNotFound:
        pass
    hash_name = signer.algorithm.hash_name
    algorithm = None if hash_name is None else hash_algorithm(hash_name)
    return builder.sign(signer.key, algorithm).public_bytes(serialization.Encoding.DER)


certificate_spki: Callable[[bytes], bytes]
try:  # the same slice in C (engine/_derc.c), when the build compiled it
    from engine._derc import certificate_spki as _c_certificate_spki
except ImportError:  # pragma: no cover (a build without a C compiler)
    certificate_spki = python_certificate_spki
else:
    certificate_spki = _c_certificate_spki
