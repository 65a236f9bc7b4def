"""CMS (RFC 5652) for SCEP's hot path: SignedData, EnvelopedData, certs-only bundles.

Built from pre-encoded DER pieces the way requests and certificates are (engine/_der.py);
cryptography does only the RSA, AES and DES primitives. Parsing takes BER where peers send it
(micromdm's encrypted content is a constructed OCTET STRING; indefinite lengths occur in other
implementations' output), nested at most 32 deep and at most `MAX_CMS_BYTES` long. Every bad input
raises `MalformedCmsError` (or a subclass that says why), never IndexError or ValueError.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import NamedTuple, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import BlockCipherAlgorithm, Cipher, algorithms, modes

from engine import _der
from engine.certificate import certificate_spki
from engine.errors import MalformedDerError

_T = TypeVar("_T")
MAX_CMS_BYTES = 1 << 20  # a SCEP message is a few KiB; nothing legitimate comes near this
_MAX_DEPTH = 32

# Content types (RFC 5652 4, 5.1, 6.1) and attributes (RFC 5652 11.1, 11.2), as DER TLVs.
DATA = _der.encode_oid("1.2.840.113549.1.7.1")
SIGNED_DATA = _der.encode_oid("1.2.840.113549.1.7.2")
ENVELOPED_DATA = _der.encode_oid("1.2.840.113549.1.7.3")
CONTENT_TYPE_ATTRIBUTE = _der.encode_oid("1.2.840.113549.1.9.3")
MESSAGE_DIGEST_ATTRIBUTE = _der.encode_oid("1.2.840.113549.1.9.4")
_RSA_ENCRYPTION_OID = _der.encode_oid("1.2.840.113549.1.1.1")
_RSA_ENCRYPTION = _der.encode_tlv(
    _der.SEQUENCE, _RSA_ENCRYPTION_OID + _der.encode_tlv(_der.NULL, b"")
)
_VERSION_0 = _der.encode_integer(0)
_VERSION_1 = _der.encode_integer(1)
_EMPTY_SET = _der.encode_tlv(_der.SET, b"")
_PKCS1 = padding.PKCS1v15()


class MalformedCmsError(MalformedDerError):
    """Bytes that should be a CMS message are not one we can read (RFC 5652)."""

    reason = "malformed-cms"


class CmsSignatureError(MalformedCmsError):
    """A SignedData whose signer is unknown or whose signature or digest does not verify."""

    reason = "cms-bad-signature"


class CmsDecryptError(MalformedCmsError):
    """An EnvelopedData that is not for us, or that does not decrypt (key, padding)."""

    reason = "cms-decrypt-failed"


class CmsUnsupportedError(MalformedCmsError):
    """A well-formed CMS message using an algorithm we do not implement."""

    reason = "cms-unsupported-algorithm"


# ---- Algorithms ----


class _Hash(NamedTuple):
    name: str
    identifier: bytes  # DER AlgorithmIdentifier, parameters absent (RFC 5754 2)
    make: Callable[[], hashes.HashAlgorithm]


_HASHES_BY_OID: dict[bytes, _Hash] = {}
for _name, _oid, _make in (
    ("sha1", "1.3.14.3.2.26", hashes.SHA1),
    ("sha256", "2.16.840.1.101.3.4.2.1", hashes.SHA256),
    ("sha384", "2.16.840.1.101.3.4.2.2", hashes.SHA384),
    ("sha512", "2.16.840.1.101.3.4.2.3", hashes.SHA512),
):
    _encoded = _der.encode_oid(_oid)
    _HASHES_BY_OID[_encoded] = _Hash(_name, _der.encode_tlv(_der.SEQUENCE, _encoded), _make)
_HASHES = {entry.name: entry for entry in _HASHES_BY_OID.values()}

# signatureAlgorithm in a SignerInfo: rsaEncryption (hash from digestAlgorithm, RFC 3370 3.2)
# or shaNNNWithRSAEncryption naming the same hash (RFC 5754 3.2).
_RSA_SIGNATURES: dict[bytes, str | None] = {
    _der.encode_oid("1.2.840.113549.1.1.1"): None,
    _der.encode_oid("1.2.840.113549.1.1.5"): "sha1",
    _der.encode_oid("1.2.840.113549.1.1.11"): "sha256",
    _der.encode_oid("1.2.840.113549.1.1.12"): "sha384",
    _der.encode_oid("1.2.840.113549.1.1.13"): "sha512",
}


def _single_des(key: bytes) -> BlockCipherAlgorithm:
    # DES-EDE with K1 = K2 = K3 is single DES; cryptography deprecates 8-byte TripleDES keys.
    return TripleDES(key * 3)


class _Cipher(NamedTuple):
    name: str
    oid: bytes
    key_size: int
    block_size: int
    make: Callable[[bytes], BlockCipherAlgorithm]


CIPHERS: dict[str, _Cipher] = {
    entry.name: entry
    for entry in (
        _Cipher("aes128", _der.encode_oid("2.16.840.1.101.3.4.1.2"), 16, 16, algorithms.AES),
        _Cipher("aes192", _der.encode_oid("2.16.840.1.101.3.4.1.22"), 24, 16, algorithms.AES),
        _Cipher("aes256", _der.encode_oid("2.16.840.1.101.3.4.1.42"), 32, 16, algorithms.AES),
        _Cipher("des3", _der.encode_oid("1.2.840.113549.3.7"), 24, 8, TripleDES),
        _Cipher("des", _der.encode_oid("1.3.14.3.2.7"), 8, 8, _single_des),
    )
}
_CIPHERS_BY_OID = {entry.oid: entry for entry in CIPHERS.values()}


# ---- A BER reader (X.690 8) with limits ----

# (tag, element offset, content start, content end, element end)
_Element = tuple[int, int, int, int, int]


def _read(data: bytes, offset: int, limit: int, depth: int) -> _Element:
    """Read one BER element at `offset` that must end by `limit`."""
    if depth > _MAX_DEPTH:
        raise MalformedCmsError("elements nested too deeply", offset)
    if limit - offset < 2:
        raise MalformedCmsError("truncated element header", offset)
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise MalformedCmsError("multi-byte tags do not occur in CMS", offset)
    first = data[offset + 1]
    start = offset + 2
    if first < 0x80:
        end = start + first
    elif first == 0x80:  # indefinite length (X.690 8.1.3.6): children up to end-of-contents
        if not tag & 0x20:
            raise MalformedCmsError("indefinite length on a primitive element", offset)
        end = _end_of_contents(data, offset, start, limit, depth)
        return tag, offset, start, end, end + 2
    else:
        count = first & 0x7F
        if count > 4:
            raise MalformedCmsError("length of more than four octets", offset)
        if limit - start < count:
            raise MalformedCmsError("truncated length", offset)
        end = start + count + int.from_bytes(data[start : start + count], "big")
        start += count
    if end > limit:
        raise MalformedCmsError("element runs past the end of its container", offset)
    return tag, offset, start, end, end


def _end_of_contents(data: bytes, offset: int, cursor: int, limit: int, depth: int) -> int:
    """Where the end-of-contents octets of the indefinite element at `offset` start."""
    while True:
        if limit - cursor < 2:
            raise MalformedCmsError("missing end-of-contents octets", offset)
        if data[cursor] == 0 and data[cursor + 1] == 0:
            return cursor
        cursor = _read(data, cursor, limit, depth + 1)[4]


def _children(data: bytes, element: _Element, depth: int) -> list[_Element]:
    """The child elements of a constructed element."""
    tag, offset, start, end, _ = element
    if not tag & 0x20:
        raise MalformedCmsError(f"expected a constructed element, found tag 0x{tag:02x}", offset)
    if depth >= _MAX_DEPTH:
        raise MalformedCmsError("elements nested too deeply", offset)
    found = []
    while start < end:
        # Inline the common case (a one-byte tag, a definite length below 64 KiB): a call to
        # _read per child costs as much as the rest of a SignedData walk.
        child_tag = data[start]
        first = data[start + 1] if start + 1 < end else 0x80
        if child_tag and child_tag & 0x1F != 0x1F and first != 0x80:
            if first < 0x80:
                content = start + 2
                stop = content + first
            elif first == 0x81 and start + 2 < end:
                content = start + 3
                stop = content + data[start + 2]
            elif first == 0x82 and start + 3 < end:
                content = start + 4
                stop = content + (data[start + 2] << 8 | data[start + 3])
            else:
                content = stop = end + 1  # not inline: _read decides
            if stop <= end:
                found.append((child_tag, start, content, stop, stop))
                start = stop
                continue
        child = _read(data, start, end, depth + 1)
        if child[0] == 0:
            raise MalformedCmsError("unexpected end-of-contents octets", start)
        found.append(child)
        start = child[4]
    return found


def _expect(element: _Element, tag: int, what: str) -> _Element:
    if element[0] != tag:
        raise MalformedCmsError(
            f"{what}: expected tag 0x{tag:02x}, found 0x{element[0]:02x}", element[1]
        )
    return element


def _octets(data: bytes, element: _Element, depth: int) -> bytes:
    """The value of an OCTET STRING, primitive or constructed (X.690 8.7), any tag."""
    tag, _, start, end, _ = element
    if not tag & 0x20:
        return data[start:end]
    parts = []
    for child in _children(data, element, depth):
        if child[0] not in (_der.OCTET_STRING, _der.OCTET_STRING | 0x20):
            raise MalformedCmsError("constructed OCTET STRING holds a non-OCTET STRING", child[1])
        parts.append(_octets(data, child, depth + 1))
    return b"".join(parts)


def _der_slice(data: bytes, element: _Element, what: str) -> bytes:
    """The raw encoding of an element that must be DER (definite length): signed bytes."""
    _, offset, _, end, stop = element
    if end != stop:  # indefinite: the end-of-contents octets follow the content
        raise MalformedCmsError(f"{what} must use a definite length", offset)
    return data[offset:stop]


def _top(data: bytes, content_type: bytes, what: str) -> tuple[bytes, _Element]:
    """ContentInfo ::= SEQUENCE { contentType, content [0] EXPLICIT ANY } (RFC 5652 3);
    return the data and its one content element."""
    if not isinstance(data, bytes):
        raise MalformedCmsError(f"{what} is not bytes")
    if len(data) > MAX_CMS_BYTES:
        raise MalformedCmsError(f"{what} is larger than {MAX_CMS_BYTES} bytes")
    outer = _expect(_read(data, 0, len(data), 0), _der.SEQUENCE, "ContentInfo")
    if outer[4] != len(data):
        raise MalformedCmsError("trailing bytes after the ContentInfo", outer[4])
    parts = _children(data, outer, 0)
    if len(parts) != 2 or parts[0][0] != _der.OID or parts[1][0] != 0xA0:
        raise MalformedCmsError("ContentInfo is not { contentType, [0] content }")
    if data[parts[0][1] : parts[0][4]] != content_type:
        raise MalformedCmsError(f"ContentInfo does not hold {what}", parts[0][1])
    inner = _children(data, parts[1], 1)
    if len(inner) != 1:
        raise MalformedCmsError("ContentInfo content is not one element", parts[1][1])
    return data, _expect(inner[0], _der.SEQUENCE, what)


def _algorithm(data: bytes, element: _Element, depth: int) -> tuple[bytes, list[_Element]]:
    """AlgorithmIdentifier ::= SEQUENCE { algorithm OID, parameters ANY OPTIONAL }."""
    parts = _children(data, _expect(element, _der.SEQUENCE, "AlgorithmIdentifier"), depth)
    if not parts or parts[0][0] != _der.OID or len(parts) > 2:
        raise MalformedCmsError("AlgorithmIdentifier is not { OID, parameters }", element[1])
    return data[parts[0][1] : parts[0][4]], parts[1:]


def _guard(what: str, call: Callable[[], _T]) -> _T:
    """Run a parse; turn the lower-level DER errors (and any slip) into MalformedCmsError."""
    try:
        return call()
    except MalformedCmsError:
        raise
    except MalformedDerError as exc:
        raise MalformedCmsError(f"{what}: {exc.detail}", exc.offset) from exc
    except (IndexError, ValueError, TypeError, OverflowError) as exc:  # a safety net only
        raise MalformedCmsError(f"{what}: {type(exc).__name__}: {exc}") from exc


# ---- Certificates: the identifiers CMS uses to name them ----


@lru_cache(maxsize=1024)
def issuer_and_serial(certificate: bytes) -> bytes:
    """IssuerAndSerialNumber ::= SEQUENCE { issuer Name, serialNumber } of a DER certificate
    (RFC 5652 10.2.4), sliced from its TBSCertificate (RFC 5280 4.1)."""

    def walk() -> bytes:
        start, end = _der.read_whole(certificate, _der.SEQUENCE)
        offset, tbs_end = _der.expect(certificate, start, _der.SEQUENCE, end)
        if offset < tbs_end and certificate[offset] == 0xA0:
            offset = _der.skip(certificate, offset, 1, tbs_end)
        _, _, serial_end = _der.read_header(certificate, offset, tbs_end)
        issuer = _der.skip(certificate, serial_end, 1, tbs_end)
        _, issuer_end = _der.expect(certificate, issuer, _der.SEQUENCE, tbs_end)
        return _der.encode_tlv(
            _der.SEQUENCE, certificate[issuer:issuer_end] + certificate[offset:serial_end]
        )

    return _guard("certificate", walk)


@lru_cache(maxsize=256)
def _subject_key_identifier(certificate: bytes) -> bytes | None:
    """The certificate's subjectKeyIdentifier (RFC 5280 4.2.1.2); rare in SCEP, so no template."""
    try:
        parsed = x509.load_der_x509_certificate(certificate)
        return parsed.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except (ValueError, x509.ExtensionNotFound):
        return None


@lru_cache(maxsize=1024)
def rsa_public_key(certificate: bytes) -> rsa.RSAPublicKey:
    """The RSA public key of a DER certificate (cached: a CA's or RA's repeats every message)."""
    spki = _guard("certificate", lambda: certificate_spki(certificate))
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise MalformedCmsError(f"certificate public key does not load: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise CmsUnsupportedError(f"certificate key is {type(key).__name__}, not RSA")
    return key


def _identifies(data: bytes, identifier: _Element, certificate: bytes) -> bool:
    """Whether a SignerIdentifier / RecipientIdentifier names `certificate` (RFC 5652 5.3,
    6.2.1): issuerAndSerialNumber, or [0] subjectKeyIdentifier."""
    tag, offset, start, end, stop = identifier
    if tag == _der.SEQUENCE:
        if end != stop:  # compare encodings: only a definite-length one can match
            return False
        return data[offset:stop] == issuer_and_serial(certificate)
    if tag == 0x80:
        return _subject_key_identifier(certificate) == data[start:end]
    raise MalformedCmsError(f"unknown signer or recipient identifier tag 0x{tag:02x}", offset)


# ---- SignedData (RFC 5652 5) ----


def encode_attribute(oid: bytes, value: bytes) -> bytes:
    """Attribute ::= SEQUENCE { attrType OID, attrValues SET OF ANY } with one value (DER TLVs)."""
    return _der.encode_tlv(_der.SEQUENCE, oid + _der.encode_tlv(_der.SET, value))


class CmsSigner:
    """A signing certificate and its RSA key with everything a SignerInfo fixes, encoded once:
    SignerIdentifier, digest and signature algorithm identifiers. PKCS #1 v1.5 signatures."""

    __slots__ = ("_hash", "_key", "certificate", "digest_algorithm", "sid")

    def __init__(self, certificate: bytes, key: rsa.RSAPrivateKey, hash_name: str = "sha256"):
        if hash_name not in _HASHES:
            raise CmsUnsupportedError(f"unsupported digest {hash_name!r}")
        self.certificate = certificate
        self._key = key
        self._hash = _HASHES[hash_name]
        self.digest_algorithm = self._hash.identifier
        self.sid = issuer_and_serial(certificate)

    def sign(self, signed_attributes: bytes) -> bytes:
        """The signature over the DER SET OF signed attributes (RFC 5652 5.4)."""
        return self._key.sign(signed_attributes, _PKCS1, self._hash.make())

    def digest(self, content: bytes) -> bytes:
        """The messageDigest value of `content`."""
        return hashlib.new(self._hash.name, content).digest()


def build_signed_data(
    content: bytes | None,
    signer: CmsSigner,
    attributes: Sequence[bytes] = (),
    certificates: Sequence[bytes] | None = None,
) -> bytes:
    """ContentInfo(SignedData) with one SignerInfo over id-data `content` (None: no eContent,
    digest of the empty string, as SCEP's FAILURE and PENDING answers have it).

    `attributes` are extra encoded Attributes (`encode_attribute`); contentType and messageDigest
    are added. `certificates` default to the signer's.
    """
    digest = signer.digest(content or b"")
    encoded = [
        encode_attribute(CONTENT_TYPE_ATTRIBUTE, DATA),
        encode_attribute(MESSAGE_DIGEST_ATTRIBUTE, _der.encode_tlv(_der.OCTET_STRING, digest)),
        *attributes,
    ]
    encoded.sort()  # DER orders a SET OF by the encodings (X.690 11.6)
    signed_attributes = _der.encode_tlv(_der.SET, b"".join(encoded))
    signer_info = _der.encode_tlv(
        _der.SEQUENCE,
        b"".join(
            (
                _VERSION_1,  # sid is issuerAndSerialNumber (RFC 5652 5.3)
                signer.sid,
                signer.digest_algorithm,
                b"\xa0" + signed_attributes[1:],  # [0] IMPLICIT SET OF Attribute
                _RSA_ENCRYPTION,
                _der.encode_tlv(_der.OCTET_STRING, signer.sign(signed_attributes)),
            )
        ),
    )
    encapsulated = DATA
    if content is not None:
        encapsulated += _der.encode_tlv(0xA0, _der.encode_tlv(_der.OCTET_STRING, content))
    certs = (signer.certificate,) if certificates is None else certificates
    return _signed_data_info(
        _der.encode_tlv(_der.SET, signer.digest_algorithm),
        _der.encode_tlv(_der.SEQUENCE, encapsulated),
        b"".join(certs),
        _der.encode_tlv(_der.SET, signer_info),
    )


def _signed_data_info(digests: bytes, encapsulated: bytes, certs: bytes, infos: bytes) -> bytes:
    body = _VERSION_1 + digests + encapsulated  # version 1: id-data, v1 SignerInfos (5.1)
    if certs:
        body += _der.encode_tlv(0xA0, certs)  # certificates [0] IMPLICIT CertificateSet
    inner = _der.encode_tlv(_der.SEQUENCE, body + infos)
    return _der.encode_tlv(_der.SEQUENCE, SIGNED_DATA + _der.encode_tlv(0xA0, inner))


def build_certificates_only(certificates: Sequence[bytes]) -> bytes:
    """A degenerate certs-only SignedData: no content, no signers (RFC 8894 3.4, RFC 5652 5)."""
    return _signed_data_info(
        _EMPTY_SET, _der.encode_tlv(_der.SEQUENCE, DATA), b"".join(certificates), _EMPTY_SET
    )


class SignedData(NamedTuple):
    """A parsed SignedData with one SignerInfo, not yet verified (`verify_signed_data`)."""

    content: bytes  # the eContent octets, b"" when absent
    content_type: bytes  # eContentType as a DER OID
    attributes: dict[bytes, bytes]  # signed attributes: DER OID -> first value's DER
    certificates: tuple[bytes, ...]
    digest_name: str
    signature_hash: str | None  # the hash the signatureAlgorithm names, None for rsaEncryption
    signed_attributes: bytes  # the DER SET OF Attribute the signature covers
    signature: bytes
    signer_id: bytes  # the SignerIdentifier's encoding (for error messages and matching)


def parse_signed_data(data: bytes) -> SignedData:
    """Parse ContentInfo(SignedData) with exactly one SignerInfo carrying signed attributes."""
    return _guard("SignedData", lambda: _parse_signed_data(data))


def _parse_signed_data(data: bytes) -> SignedData:
    data, body = _top(data, SIGNED_DATA, "SignedData")
    parts = _children(data, body, 2)
    if len(parts) < 4 or parts[0][0] != _der.INTEGER:
        raise MalformedCmsError("SignedData is not { version, digestAlgorithms, ... }", body[1])
    _expect(parts[1], _der.SET, "digestAlgorithms")
    content_type, content = _encapsulated(data, parts[2])
    certificates: tuple[bytes, ...] = ()
    rest = parts[3:]
    if rest and rest[0][0] == 0xA0:
        certificates = _certificates(data, rest[0])
        rest = rest[1:]
    if rest and rest[0][0] == 0xA1:  # crls: not used by SCEP, skipped
        rest = rest[1:]
    if len(rest) != 1:
        raise MalformedCmsError("SignedData has no signerInfos at its end", body[1])
    infos = _children(data, _expect(rest[0], _der.SET, "signerInfos"), 3)
    if len(infos) != 1:
        raise MalformedCmsError(f"SignedData has {len(infos)} SignerInfos, not one", rest[0][1])
    return _signer_info(data, infos[0], content, content_type, certificates)


def _encapsulated(data: bytes, element: _Element) -> tuple[bytes, bytes]:
    """EncapsulatedContentInfo ::= SEQUENCE { eContentType, eContent [0] EXPLICIT OCTET STRING
    OPTIONAL }: (type DER, content octets)."""
    parts = _children(data, _expect(element, _der.SEQUENCE, "encapContentInfo"), 3)
    if not parts or parts[0][0] != _der.OID or len(parts) > 2:
        raise MalformedCmsError("encapContentInfo is not { eContentType, [0] eContent }")
    content = b""
    if len(parts) == 2:
        wrapped = _children(data, _expect(parts[1], 0xA0, "eContent"), 4)
        if len(wrapped) != 1 or wrapped[0][0] not in (_der.OCTET_STRING, 0x24):
            raise MalformedCmsError("eContent is not one OCTET STRING", parts[1][1])
        content = _octets(data, wrapped[0], 5)
    return data[parts[0][1] : parts[0][4]], content


def _certificates(data: bytes, element: _Element) -> tuple[bytes, ...]:
    """CertificateSet: the X.509 certificates, as DER; other choices are skipped."""
    return tuple(
        _der_slice(data, child, "a certificate")
        for child in _children(data, element, 3)
        if child[0] == _der.SEQUENCE
    )


def _signer_info(
    data: bytes, element: _Element, content: bytes, content_type: bytes, certs: tuple[bytes, ...]
) -> SignedData:
    """SignerInfo ::= SEQUENCE { version, sid, digestAlgorithm, [0] signedAttrs, signatureAlgorithm,
    signature OCTET STRING, [1] unsignedAttrs OPTIONAL } (RFC 5652 5.3)."""
    parts = _children(data, _expect(element, _der.SEQUENCE, "SignerInfo"), 4)
    if len(parts) < 6 or parts[0][0] != _der.INTEGER or parts[3][0] != 0xA0:
        raise MalformedCmsError("SignerInfo without signed attributes", element[1])
    digest_oid, _ = _algorithm(data, parts[2], 5)
    digest = _HASHES_BY_OID.get(digest_oid)
    if digest is None:
        raise CmsUnsupportedError(f"unsupported digest {_describe(digest_oid)}", parts[2][1])
    signature_oid, _ = _algorithm(data, parts[4], 5)
    if signature_oid not in _RSA_SIGNATURES:
        raise CmsUnsupportedError(f"unsupported signature {_describe(signature_oid)}", parts[4][1])
    if parts[5][0] not in (_der.OCTET_STRING, 0x24) or (len(parts) == 7 and parts[6][0] != 0xA1):
        raise MalformedCmsError("SignerInfo signature is not an OCTET STRING", parts[5][1])
    if len(parts) > 7:
        raise MalformedCmsError("trailing elements in SignerInfo", parts[7][1])
    signed = _der_slice(data, parts[3], "signedAttrs")
    sid = parts[1]
    if sid[0] not in (_der.SEQUENCE, 0x80):
        raise MalformedCmsError(f"unknown SignerIdentifier tag 0x{sid[0]:02x}", sid[1])
    return SignedData(
        content=content,
        content_type=content_type,
        attributes=_attributes(data, parts[3]),
        certificates=certs,
        digest_name=digest.name,
        signature_hash=_RSA_SIGNATURES[signature_oid],
        signed_attributes=b"\x31" + signed[1:],  # signed as a SET OF (RFC 5652 5.4)
        signature=_octets(data, parts[5], 5),
        signer_id=data[sid[1] : sid[4]],
    )


def _attributes(data: bytes, element: _Element) -> dict[bytes, bytes]:
    """SignedAttributes: OID -> its first value; an attribute twice is refused (5.3)."""
    found: dict[bytes, bytes] = {}
    for attribute in _children(data, element, 5):
        parts = _children(data, _expect(attribute, _der.SEQUENCE, "Attribute"), 6)
        if len(parts) != 2 or parts[0][0] != _der.OID or parts[1][0] != _der.SET:
            raise MalformedCmsError("Attribute is not { OID, SET OF value }", attribute[1])
        values = _children(data, parts[1], 7)
        if not values:
            raise MalformedCmsError("Attribute has no value", attribute[1])
        oid = data[parts[0][1] : parts[0][4]]
        if oid in found:
            raise MalformedCmsError(f"attribute {_describe(oid)} appears twice", attribute[1])
        found[oid] = data[values[0][1] : values[0][4]]
    return found


def verify_signed_data(
    signed: SignedData, trusted: Sequence[bytes] = (), *, use_included: bool = True
) -> bytes:
    """Check the signature, contentType and messageDigest; return the signer's certificate.

    The signer is looked up among `trusted` first, then (if `use_included`) among the message's
    own certificates. Raises `CmsSignatureError`.
    """
    candidates = (*trusted, *signed.certificates) if use_included else tuple(trusted)
    certificate = _find_signer(signed.signer_id, candidates)
    if certificate is None:
        raise CmsSignatureError("no certificate for the SignedData's signer")
    attributes = signed.attributes
    if attributes.get(CONTENT_TYPE_ATTRIBUTE) != signed.content_type:
        raise CmsSignatureError("contentType attribute missing or not the eContentType")
    digest = hashlib.new(signed.digest_name, signed.content).digest()
    if attributes.get(MESSAGE_DIGEST_ATTRIBUTE) != _der.encode_tlv(_der.OCTET_STRING, digest):
        raise CmsSignatureError("messageDigest attribute missing or not the content's digest")
    if signed.signature_hash not in (None, signed.digest_name):
        raise CmsSignatureError("signatureAlgorithm names another hash than digestAlgorithm")
    try:
        rsa_public_key(certificate).verify(
            signed.signature, signed.signed_attributes, _PKCS1, _HASHES[signed.digest_name].make()
        )
    except InvalidSignature as exc:
        raise CmsSignatureError("SignedData signature does not verify") from exc
    return certificate


def _find_signer(signer_id: bytes, candidates: Sequence[bytes]) -> bytes | None:
    element = _read(signer_id, 0, len(signer_id), 0)
    for certificate in candidates:
        if _identifies(signer_id, element, certificate):
            return certificate
    return None


def parse_certificates_only(data: bytes) -> tuple[bytes, ...]:
    """The certificates of a SignedData (a degenerate certs-only one, or any), as DER."""

    def parse() -> tuple[bytes, ...]:
        _, body = _top(data, SIGNED_DATA, "SignedData")
        for child in _children(data, body, 2):
            if child[0] == 0xA0:
                return _certificates(data, child)
        return ()

    return _guard("certs-only SignedData", parse)


# ---- EnvelopedData (RFC 5652 6) ----


class CmsRecipient:
    """An RSA key-transport recipient: RecipientIdentifier and public key, prepared once."""

    __slots__ = ("certificate", "public_key", "rid")

    def __init__(self, certificate: bytes) -> None:
        self.certificate = certificate
        self.rid = issuer_and_serial(certificate)
        self.public_key = rsa_public_key(certificate)


def build_enveloped_data(
    content: bytes, recipients: Sequence[CmsRecipient], cipher: str = "aes128"
) -> bytes:
    """ContentInfo(EnvelopedData): `content` encrypted with a fresh key under `cipher` (CBC,
    PKCS #7 padding), the key RSA-encrypted (PKCS #1 v1.5) to each recipient (RFC 5652 6)."""
    spec = CIPHERS.get(cipher)
    if spec is None:
        raise CmsUnsupportedError(f"unknown cipher {cipher!r}; known: {', '.join(CIPHERS)}")
    key = os.urandom(spec.key_size)
    iv = os.urandom(spec.block_size)
    pad = spec.block_size - len(content) % spec.block_size
    encryptor = Cipher(spec.make(key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(content + bytes((pad,)) * pad) + encryptor.finalize()
    infos = sorted(
        _der.encode_tlv(
            _der.SEQUENCE,
            _VERSION_0  # rid is issuerAndSerialNumber (RFC 5652 6.2.1)
            + recipient.rid
            + _RSA_ENCRYPTION
            + _der.encode_tlv(_der.OCTET_STRING, recipient.public_key.encrypt(key, _PKCS1)),
        )
        for recipient in recipients
    )
    encrypted_info = _der.encode_tlv(
        _der.SEQUENCE,
        DATA
        + _der.encode_tlv(_der.SEQUENCE, spec.oid + _der.encode_tlv(_der.OCTET_STRING, iv))
        + _der.encode_tlv(0x80, ciphertext),  # [0] IMPLICIT OCTET STRING
    )
    body = _VERSION_0 + _der.encode_tlv(_der.SET, b"".join(infos)) + encrypted_info
    inner = _der.encode_tlv(_der.SEQUENCE, body)
    return _der.encode_tlv(_der.SEQUENCE, ENVELOPED_DATA + _der.encode_tlv(0xA0, inner))


class Decrypted(NamedTuple):
    """The plaintext of an EnvelopedData and the content cipher it used (a CIPHERS name)."""

    content: bytes
    cipher: str


def decrypt_enveloped_data(data: bytes, certificate: bytes, key: rsa.RSAPrivateKey) -> Decrypted:
    """Decrypt ContentInfo(EnvelopedData) for the KeyTransRecipientInfo naming `certificate`."""
    encrypted_key, spec, iv, ciphertext = _guard(
        "EnvelopedData", lambda: _parse_enveloped_data(data, certificate)
    )
    try:
        content_key = key.decrypt(encrypted_key, _PKCS1)
    except ValueError as exc:
        raise CmsDecryptError("the content key does not decrypt with our key") from exc
    if len(content_key) != spec.key_size:
        raise CmsDecryptError(f"content key of {len(content_key)} bytes for {spec.name}")
    if not ciphertext or len(ciphertext) % spec.block_size:
        raise CmsDecryptError("encrypted content is not a whole number of blocks")
    decryptor = Cipher(spec.make(content_key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    pad = padded[-1]
    if not 0 < pad <= spec.block_size or padded[-pad:] != bytes((pad,)) * pad:
        raise CmsDecryptError("content padding is wrong (another key, or damaged content)")
    return Decrypted(padded[:-pad], spec.name)


def _parse_enveloped_data(data: bytes, certificate: bytes) -> tuple[bytes, _Cipher, bytes, bytes]:
    """EnvelopedData ::= SEQUENCE { version, [0] originatorInfo OPTIONAL, recipientInfos SET,
    encryptedContentInfo, [1] unprotectedAttrs OPTIONAL }: (encrypted key, cipher, IV,
    ciphertext)."""
    data, body = _top(data, ENVELOPED_DATA, "EnvelopedData")
    parts = _children(data, body, 2)
    if parts and parts[0][0] == _der.INTEGER:
        parts = parts[1:]
    if parts and parts[0][0] == 0xA0:
        parts = parts[1:]
    if len(parts) < 2 or parts[0][0] != _der.SET:
        raise MalformedCmsError("EnvelopedData is not { version, recipientInfos, ... }", body[1])
    encrypted_key = _our_encrypted_key(data, parts[0], certificate)
    spec, iv, ciphertext = _encrypted_content(data, parts[1])
    return encrypted_key, spec, iv, ciphertext


def _our_encrypted_key(data: bytes, infos: _Element, certificate: bytes) -> bytes:
    """The encryptedKey of the KeyTransRecipientInfo ::= SEQUENCE { version, rid,
    keyEncryptionAlgorithm, encryptedKey } naming `certificate` (RFC 5652 6.2.1)."""
    for info in _children(data, infos, 3):
        if info[0] != _der.SEQUENCE:  # kari [1], kekri [2], pwri [3], ori [4]: not for us
            continue
        parts = _children(data, info, 4)
        if len(parts) != 4 or parts[0][0] != _der.INTEGER:
            raise MalformedCmsError("KeyTransRecipientInfo is not four elements", info[1])
        if not _identifies(data, parts[1], certificate):
            continue
        algorithm, _ = _algorithm(data, parts[2], 5)
        if algorithm != _RSA_ENCRYPTION_OID:
            raise CmsUnsupportedError(f"key transport {_describe(algorithm)} is not rsaEncryption")
        if parts[3][0] not in (_der.OCTET_STRING, 0x24):
            raise MalformedCmsError("encryptedKey is not an OCTET STRING", parts[3][1])
        return _octets(data, parts[3], 5)
    raise CmsDecryptError("no KeyTransRecipientInfo for our certificate")


def _encrypted_content(data: bytes, element: _Element) -> tuple[_Cipher, bytes, bytes]:
    """EncryptedContentInfo ::= SEQUENCE { contentType, contentEncryptionAlgorithm,
    encryptedContent [0] IMPLICIT OCTET STRING }: (cipher, IV, ciphertext)."""
    parts = _children(data, _expect(element, _der.SEQUENCE, "EncryptedContentInfo"), 3)
    if len(parts) != 3 or parts[0][0] != _der.OID or parts[2][0] not in (0x80, 0xA0):
        raise MalformedCmsError("EncryptedContentInfo has no encrypted content", element[1])
    oid, parameters = _algorithm(data, parts[1], 4)
    spec = _CIPHERS_BY_OID.get(oid)
    if spec is None:
        raise CmsUnsupportedError(f"unsupported content cipher {_describe(oid)}", parts[1][1])
    if len(parameters) != 1 or parameters[0][0] != _der.OCTET_STRING:
        raise MalformedCmsError(f"{spec.name} parameters are not an IV", parts[1][1])
    iv = _octets(data, parameters[0], 5)
    if len(iv) != spec.block_size:
        raise MalformedCmsError(f"{spec.name} IV of {len(iv)} bytes", parts[1][1])
    return spec, iv, _octets(data, parts[2], 4)


def _describe(oid: bytes) -> str:
    """An OID TLV in dotted form, for messages."""
    try:
        return _der.decode_oid(oid[2:])
    except MalformedDerError:
        return oid.hex()
