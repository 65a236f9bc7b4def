"""SCEP (RFC 8894): the pkiMessage codec, the client side and the server side, in one module.

- Codec: a pkiMessage is a CMS SignedData whose signed attributes carry messageType, pkiStatus,
  failInfo, senderNonce, recipientNonce and transactionID (RFC 8894 3.2.1) around an
  EnvelopedData (the pkcsPKIEnvelope) holding the PKCS #10 request, an IssuerAndSubject (CertPoll)
  or a certs-only bundle (CertRep SUCCESS). Built from DER templates (`engine.wire.cms`).
- `ScepClient`: GetCACaps, GetCACert, PKCSReq / RenewalReq, CertPoll over an `exchange` callable
  with `engine.wire.http.HttpClient.request`'s signature (seam.EnrollmentClient).
- `ScepHandler`: the server side over a `CAService` (seam.Handler).

Interop, as measured against micromdm 2.1.0: scepclient envelopes with DES-CBC whatever GetCACaps
says and to every certificate GetCACert returns unless given `-ca-fingerprint`; it resends its
PKCSReq (not CertPoll) while PENDING; scepserver answers with SHA-1 signatures, single DES and a
constructed encrypted content, and copies the client's senderNonce.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from functools import lru_cache
from typing import NamedTuple, TypeVar
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from engine import _der
from engine.certificate import certificate_spki, encode_time
from engine.errors import (
    EnrollmentError,
    HttpStatusError,
    MalformedAnswerError,
    MalformedDerError,
    MalformedRequestError,
    ProtocolRefusedError,
    RejectedError,
    UnsupportedKeyError,
)
from engine.identity import User
from engine.request import split_request
from engine.wire import cms
from engine.wire.seam import (
    CAService,
    DeviceCredentials,
    HttpRequest,
    HttpResponse,
    Ticket,
    TicketStatus,
)

Exchange = Callable[..., Awaitable[HttpResponse]]
_T = TypeVar("_T")

# Signed attributes of a pkiMessage (RFC 8894 3.2.1), as DER OIDs.
MESSAGE_TYPE = _der.encode_oid("2.16.840.1.113733.1.9.2")
PKI_STATUS = _der.encode_oid("2.16.840.1.113733.1.9.3")
FAIL_INFO = _der.encode_oid("2.16.840.1.113733.1.9.4")
SENDER_NONCE = _der.encode_oid("2.16.840.1.113733.1.9.5")
RECIPIENT_NONCE = _der.encode_oid("2.16.840.1.113733.1.9.6")
TRANSACTION_ID = _der.encode_oid("2.16.840.1.113733.1.9.7")
FAIL_INFO_TEXT = _der.encode_oid("1.3.6.1.5.5.7.24.1")  # id-scep-failInfoText (RFC 8894 3.2.1.4)
CHALLENGE_PASSWORD = _der.encode_oid("1.2.840.113549.1.9.7")  # PKCS #9 (RFC 2985 5.4.1)

_PRINTABLE_STRING = 0x13
_STRING_TAGS = (_PRINTABLE_STRING, _der.UTF8_STRING, 0x16, 0x14)  # + IA5String, T61String
_NONCE_SIZE = 16
_MAX_SIGNERS = 16384  # signer certificates a client keeps (about 1 KiB each)
CA_RA_CERT = "application/x-x509-ca-ra-cert"
CA_CERT = "application/x-x509-ca-cert"
PKI_MESSAGE = "application/x-pki-message"
# What this server offers (RFC 8894 3.5.2); SHA-1 and single DES are accepted, not offered.
SERVER_CAPABILITIES = ("POSTPKIOperation", "SHA-256", "SHA-512", "AES", "DES3", "Renewal",
                       "SCEPStandard")  # fmt: skip


class MessageType(IntEnum):
    """messageType values (RFC 8894 3.2.1.2)."""

    CERT_REP = 3
    RENEWAL_REQ = 17
    PKCS_REQ = 19
    CERT_POLL = 20
    GET_CERT = 21
    GET_CRL = 22


class PkiStatus(IntEnum):
    """pkiStatus values (RFC 8894 3.2.1.3)."""

    SUCCESS = 0
    FAILURE = 2
    PENDING = 3


class FailInfo(IntEnum):
    """failInfo values (RFC 8894 3.2.1.4)."""

    BAD_ALG = 0
    BAD_MESSAGE_CHECK = 1
    BAD_REQUEST = 2
    BAD_TIME = 3
    BAD_CERT_ID = 4


_FAIL_NAMES = {
    FailInfo.BAD_ALG: "badAlg",
    FailInfo.BAD_MESSAGE_CHECK: "badMessageCheck",
    FailInfo.BAD_REQUEST: "badRequest",
    FailInfo.BAD_TIME: "badTime",
    FailInfo.BAD_CERT_ID: "badCertId",
}


def fail_info_name(value: int) -> str:
    """`badRequest (2)` and the like, for messages."""
    name = _FAIL_NAMES.get(FailInfo(value)) if value in FailInfo._value2member_map_ else None
    return f"{name or 'unknown'} ({value})"


class ScepRefusedError(RejectedError):
    """The server refuses a PKCSReq or RenewalReq before it reaches the CA (no challenge, a
    signer key or certificate that does not fit the request)."""

    reason = "scep-refused"


class MalformedPkiMessageError(cms.MalformedCmsError):
    """A CMS SignedData that is not a pkiMessage (attributes missing or malformed)."""

    reason = "malformed-pki-message"


# ---- Codec ----


_PRINTABLE_CHARACTERS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"
)


def _printable(value: str) -> bytes:
    """A PrintableString (RFC 8894 3.2.1); UTF8String for text outside its alphabet."""
    if _PRINTABLE_CHARACTERS.issuperset(value):
        return _der.encode_tlv(_PRINTABLE_STRING, value.encode("ascii"))
    return _der.encode_tlv(_der.UTF8_STRING, value.encode("utf-8"))


_TYPE_ATTRIBUTES = {
    kind: cms.encode_attribute(MESSAGE_TYPE, _printable(str(int(kind)))) for kind in MessageType
}
_STATUS_ATTRIBUTES = {
    status: cms.encode_attribute(PKI_STATUS, _printable(str(int(status)))) for status in PkiStatus
}
_FAIL_ATTRIBUTES = {
    info: cms.encode_attribute(FAIL_INFO, _printable(str(int(info)))) for info in FailInfo
}


class PkiMessage(NamedTuple):
    """A decoded pkiMessage; its signature is checked separately (`cms.verify_signed_data`)."""

    message_type: int  # a MessageType value, or another number a peer sent
    transaction_id: str
    sender_nonce: bytes
    recipient_nonce: bytes  # b"" in requests
    status: PkiStatus | None  # CertRep only
    fail_info: int | None  # CertRep FAILURE only
    envelope: bytes  # the pkcsPKIEnvelope (EnvelopedData DER), b"" when absent
    signed: cms.SignedData
    fail_text: str = ""  # failInfoText, when a FAILURE carries one


def encode_pki_message(
    message_type: MessageType,
    transaction_id: str,
    sender_nonce: bytes,
    envelope: bytes | None,
    signer: cms.CmsSigner,
    *,
    recipient_nonce: bytes | None = None,
    status: PkiStatus | None = None,
    fail_info: FailInfo | None = None,
    fail_text: str = "",
) -> bytes:
    """A signed pkiMessage (RFC 8894 3.2) around `envelope` (None: no pkcsPKIEnvelope)."""
    attributes = [
        _TYPE_ATTRIBUTES[message_type],
        cms.encode_attribute(TRANSACTION_ID, _printable(transaction_id)),
        cms.encode_attribute(SENDER_NONCE, _der.encode_tlv(_der.OCTET_STRING, sender_nonce)),
    ]
    if recipient_nonce is not None:
        nonce = _der.encode_tlv(_der.OCTET_STRING, recipient_nonce)
        attributes.append(cms.encode_attribute(RECIPIENT_NONCE, nonce))
    if status is not None:
        attributes.append(_STATUS_ATTRIBUTES[status])
    if fail_info is not None:
        attributes.append(_FAIL_ATTRIBUTES[fail_info])
    if fail_text:
        text = _der.encode_tlv(_der.UTF8_STRING, fail_text.encode("utf-8"))
        attributes.append(cms.encode_attribute(FAIL_INFO_TEXT, text))
    return cms.build_signed_data(envelope, signer, attributes)


def decode_pki_message(data: bytes) -> PkiMessage:
    """Parse a pkiMessage: the SignedData and its SCEP attributes (signature not checked).

    Raises `cms.MalformedCmsError` (`MalformedPkiMessageError` when the CMS is fine but the
    SCEP attributes are missing or malformed).
    """
    signed = cms.parse_signed_data(data)
    if signed.content_type != cms.DATA:
        raise MalformedPkiMessageError("pkiMessage content is not id-data")
    attributes = signed.attributes
    message_type = _number(attributes, MESSAGE_TYPE, "messageType")
    if message_type is None:
        raise MalformedPkiMessageError("pkiMessage without messageType")
    transaction_id = _string(attributes, TRANSACTION_ID, "transactionID")
    if not transaction_id:
        raise MalformedPkiMessageError("pkiMessage without transactionID")
    sender_nonce = _nonce(attributes, SENDER_NONCE, "senderNonce")
    if not sender_nonce:
        raise MalformedPkiMessageError("pkiMessage without senderNonce")
    recipient_nonce = _nonce(attributes, RECIPIENT_NONCE, "recipientNonce")
    status_number = _number(attributes, PKI_STATUS, "pkiStatus")
    status = None
    fail_info = None
    if message_type == MessageType.CERT_REP:
        if status_number is None or status_number not in PkiStatus._value2member_map_:
            raise MalformedPkiMessageError(f"CertRep with pkiStatus {status_number}")
        status = PkiStatus(status_number)
        if not recipient_nonce:
            raise MalformedPkiMessageError("CertRep without recipientNonce")
        fail_info = _number(attributes, FAIL_INFO, "failInfo")
        if status is PkiStatus.FAILURE and fail_info is None:
            raise MalformedPkiMessageError("CertRep FAILURE without failInfo")
    return PkiMessage(
        message_type,
        transaction_id,
        sender_nonce,
        recipient_nonce,
        status,
        fail_info,
        signed.content,
        signed,
        _string(attributes, FAIL_INFO_TEXT, "failInfoText"),
    )


def _value(attributes: dict[bytes, bytes], oid: bytes, tags: tuple[int, ...], what: str) -> bytes:
    """The content octets of a single-valued attribute of one of `tags`; b"" when absent."""
    value = attributes.get(oid)
    if value is None:
        return b""
    try:
        tag, start, end = _der.read_header(value, 0)
    except MalformedDerError as exc:
        raise MalformedPkiMessageError(f"{what}: {exc.detail}") from exc
    if tag not in tags or end != len(value):
        raise MalformedPkiMessageError(f"{what} has tag 0x{tag:02x}")
    return value[start:end]


def _string(attributes: dict[bytes, bytes], oid: bytes, what: str) -> str:
    raw = _value(attributes, oid, _STRING_TAGS, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPkiMessageError(f"{what} is not text") from exc


def _number(attributes: dict[bytes, bytes], oid: bytes, what: str) -> int | None:
    text = _string(attributes, oid, what)
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 4:
        raise MalformedPkiMessageError(f"{what} {text[:16]!r} is not a small number")
    return int(text)


def _nonce(attributes: dict[bytes, bytes], oid: bytes, what: str) -> bytes:
    nonce = _value(attributes, oid, (_der.OCTET_STRING,), what)
    if len(nonce) > 64:
        raise MalformedPkiMessageError(f"{what} of {len(nonce)} bytes")
    return nonce


def encode_issuer_and_subject(issuer: bytes, subject: bytes) -> bytes:
    """IssuerAndSubject ::= SEQUENCE { issuer Name, subject Name } (RFC 8894 3.3.3)."""
    return _der.encode_tlv(_der.SEQUENCE, issuer + subject)


def decode_issuer_and_subject(data: bytes) -> tuple[bytes, bytes]:
    """(issuer, subject) Names as DER; MalformedPkiMessageError otherwise."""
    try:
        start, end = _der.read_whole(data, _der.SEQUENCE)
        children = _der.split_children(data, start, end)
    except MalformedDerError as exc:
        raise MalformedPkiMessageError(f"IssuerAndSubject: {exc.detail}", exc.offset) from exc
    if len(children) != 2 or any(tag != _der.SEQUENCE for tag, _, _, _ in children):
        raise MalformedPkiMessageError("IssuerAndSubject is not two Names")
    (_, first, _, middle), (_, _, _, last) = children
    return data[first:middle], data[middle:last]


def challenge_password(request_der: bytes) -> str | None:
    """The challengePassword attribute of a PKCS #10 request (RFC 2985 5.4.1), or None.

    Raises `MalformedRequestError` when the request is not strict DER (RFC 2986).
    """
    return _challenge_in(split_request(request_der)[0])


def _challenge_in(info: bytes) -> str | None:
    """The challengePassword in a CertificationRequestInfo that has passed the strict walk."""
    try:
        start, end = _der.read_whole(info, _der.SEQUENCE)
        children = _der.split_children(info, start, end)
        tag, _, attributes_start, attributes_end = children[-1]
        if tag != 0xA0:
            return None
        for _, _, content, stop in _der.split_children(info, attributes_start, attributes_end):
            _, oid_end = _der.expect(info, content, _der.OID, stop)
            if info[content:oid_end] != CHALLENGE_PASSWORD:
                continue
            values_start, values_end = _der.expect(info, oid_end, _der.SET, stop)
            tag, value_start, value_end = _der.read_header(info, values_start, values_end)
            if tag not in _STRING_TAGS:
                return None
            return info[value_start:value_end].decode("utf-8", "replace")
    except MalformedDerError:
        return None
    return None


def add_challenge_password(request_der: bytes, key: rsa.RSAPrivateKey, challenge: str) -> bytes:
    """The request with a challengePassword attribute added (RFC 2985 5.4.1; any old one
    replaced), signed again with `key` (SHA-256): for a device whose request template has no
    challenge (the live flow builds requests without one). Costs one RSA signature."""
    info = split_request(request_der)[0]
    start, end = _der.read_whole(info, _der.SEQUENCE)
    children = _der.split_children(info, start, end)
    tag, attributes_at, attributes_start, attributes_end = children[-1]
    if tag != 0xA0 or len(children) != 4:
        raise MalformedRequestError("CertificationRequestInfo without attributes", start)
    kept = [
        info[at:stop]
        for _, at, content, stop in _der.split_children(info, attributes_start, attributes_end)
        if not info[content:stop].startswith(CHALLENGE_PASSWORD)
    ]
    added = cms.encode_attribute(CHALLENGE_PASSWORD, _printable(challenge))
    attributes = b"".join(sorted([*kept, added]))  # DER orders a SET OF (X.690 11.6)
    new_info = _der.encode_tlv(
        _der.SEQUENCE, info[start:attributes_at] + _der.encode_tlv(0xA0, attributes)
    )
    signature = key.sign(new_info, padding.PKCS1v15(), hashes.SHA256())
    return _der.encode_tlv(
        _der.SEQUENCE,
        new_info + _SHA256_WITH_RSA + _der.encode_tlv(_der.BIT_STRING, b"\x00" + signature),
    )


def self_signed_certificate(key: rsa.RSAPrivateKey, subject: bytes, spki: bytes) -> bytes:
    """The throwaway certificate a device signs its PKCSReq with (RFC 8894 2.3): version 1,
    issuer = subject, a random serial, valid from an hour ago for a week, SHA-256 with RSA."""
    if subject == _EMPTY_NAME:  # an issuer must not be empty (RFC 5280 4.1.2.4)
        subject = _SIGNER_NAME
    now = int(time.time())
    serial = int.from_bytes(os.urandom(16), "big") >> 1 | 1 << 120
    tbs = _der.encode_tlv(
        _der.SEQUENCE,
        b"".join(
            (
                _der.encode_integer(serial),
                _SHA256_WITH_RSA,
                subject,
                _der.encode_tlv(
                    _der.SEQUENCE, encode_time(now - 3600) + encode_time(now + 7 * 86400)
                ),
                subject,
                spki,
            )
        ),
    )
    signature = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    return _der.encode_tlv(
        _der.SEQUENCE,
        tbs + _SHA256_WITH_RSA + _der.encode_tlv(_der.BIT_STRING, b"\x00" + signature),
    )


_EMPTY_NAME = _der.encode_tlv(_der.SEQUENCE, b"")
_SIGNER_NAME = x509.Name.from_rfc4514_string("CN=SCEP SIGNER").public_bytes()
_SHA256_WITH_RSA = _der.encode_tlv(
    _der.SEQUENCE, _der.encode_oid("1.2.840.113549.1.1.11") + _der.encode_tlv(_der.NULL, b"")
)


@lru_cache(maxsize=64)
def _certificate_facts(certificate: bytes) -> tuple[bool, bool, bool, bytes, bytes] | None:
    """(is a CA, may encipher keys, has an RSA key, subject DER, issuer DER); None for bytes
    that are not a certificate cryptography reads. Once per CA certificate, not per message."""
    try:
        parsed = x509.load_der_x509_certificate(certificate)
        rsa_key = isinstance(parsed.public_key(), rsa.RSAPublicKey)
        extensions = parsed.extensions
        names = parsed.subject.public_bytes(), parsed.issuer.public_bytes()
    except (ValueError, UnsupportedAlgorithm):
        return None
    try:
        is_ca = extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        enciphers = extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    except x509.ExtensionNotFound:
        enciphers = True  # no KeyUsage: any use (RFC 5280 4.2.1.3)
    return is_ca, enciphers, rsa_key, *names


def recipient_certificate(certificates: Sequence[bytes]) -> bytes:
    """The certificate to envelope requests to: the RA (an RSA certificate with keyEncipherment
    that is not a CA), else the last RSA CA certificate (a CA without an RA, as micromdm's).
    Raises `MalformedAnswerError` when none has an RSA key."""
    fallback = None
    for certificate in certificates:
        facts = _certificate_facts(certificate)
        if facts is None or not facts[2]:
            continue
        is_ca, enciphers, _, _, _ = facts
        if enciphers and not is_ca:
            return certificate
        fallback = certificate
    if fallback is None:
        raise MalformedAnswerError("GetCACert returned no RSA certificate to encrypt to")
    return fallback


# ---- Client side ----


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A pkiMessage ready to send, and what checking and polling its answer needs."""

    message: bytes
    message_type: MessageType
    transaction_id: str
    sender_nonce: bytes
    signer: cms.CmsSigner  # the device's signer certificate and key
    key: rsa.RSAPrivateKey
    recipient: cms.CmsRecipient  # the RA (or CA) the envelope is for
    trusted: tuple[bytes, ...]  # the CA/RA certificates a CertRep may be signed by
    issuer_and_subject: bytes  # the CertPoll body
    spki: bytes  # the request's SubjectPublicKeyInfo
    cipher: str


class ScepClient:
    """The client side of SCEP (seam.EnrollmentClient) over one `exchange` callable."""

    def __init__(
        self,
        exchange: Exchange,
        path: str = "/scep",
        *,
        poll_interval: float = 1.0,
        cipher: str = "aes128",
    ) -> None:
        if cipher not in cms.CIPHERS:
            raise ValueError(f"unknown cipher {cipher!r}; known: {', '.join(cms.CIPHERS)}")
        self._exchange = exchange
        self._path = path
        self._poll_interval = poll_interval
        self._cipher = cipher
        self._capabilities: frozenset[str] | None = None
        # Each device key's signer certificate, made once as a device keeps its own: an RSA
        # signature saved per enrollment when a device enrolls again with the same key.
        self._signers: dict[bytes, tuple[float, bytes]] = {}

    async def capabilities(self) -> frozenset[str]:
        """GetCACaps (RFC 8894 3.5.2), lower-cased, fetched once per client; a server that
        does not answer it with 200 offers nothing beyond the basics."""
        if self._capabilities is None:
            answer = await self._exchange("GET", f"{self._path}?operation=GetCACaps")
            lines = answer.body.decode("utf-8", "replace").split("\n")
            found = {line.strip().lower() for line in lines} if answer.status == 200 else set()
            self._capabilities = frozenset(found - {""})
        return self._capabilities

    async def ca_certificates(self) -> tuple[bytes, ...]:
        """GetCACert (RFC 8894 4.2): one DER certificate, or a certs-only bundle of the CA
        hierarchy and the RA, in the server's order (`recipient_certificate` picks the RA)."""
        await self.capabilities()
        answer = await self._exchange("GET", f"{self._path}?operation=GetCACert")
        if answer.status != 200:
            raise HttpStatusError(answer.status, "SCEP GetCACert")
        body = answer.body
        try:
            if answer.content_type.startswith(CA_RA_CERT) or _is_content_info(body):
                certificates = cms.parse_certificates_only(body)
            else:
                _der.read_whole(body, _der.SEQUENCE)
                certificates = (body,)
        except MalformedDerError as exc:
            raise MalformedAnswerError(f"SCEP GetCACert answer: {exc}") from exc
        if not certificates:
            raise MalformedAnswerError("SCEP GetCACert answer holds no certificate")
        return certificates

    def prepare(
        self,
        device: DeviceCredentials,
        ca: tuple[bytes, ...],
        *,
        certificate: bytes | None = None,
        transaction_id: str | None = None,
    ) -> PreparedRequest:
        """The PKCSReq (or, given the device's current `certificate`, RenewalReq) pkiMessage:
        the request enveloped to the RA, signed with the device key (RFC 8894 3.3.1).

        The transactionID defaults to the hex SHA-256 of the request's public key: a device
        that enrolls again with the same key (a reused corpus key) must pass its own, or the
        server answers with the first transaction's state (a repeated transactionID)."""
        key = device.key
        if not isinstance(key, rsa.RSAPrivateKey):
            raise UnsupportedKeyError("SCEP devices use RSA keys: the answer is enveloped to them")
        slices = split_request(device.request_der)
        subject, spki = slices[1], slices[2]
        if certificate is None:
            certificate = self._signer_certificate(key, subject, spki)
            kind = MessageType.PKCS_REQ
        else:
            kind = MessageType.RENEWAL_REQ
        recipient_der = recipient_certificate(ca)
        recipient = cms.CmsRecipient(recipient_der)
        facts = _certificate_facts(recipient_der)
        # CertPoll names the issuing CA: the RA's issuer, or the CA itself without an RA.
        issuer = b"" if facts is None else (facts[3] if facts[0] else facts[4])
        cipher = self._cipher_for(self._capabilities)
        signer = cms.CmsSigner(certificate, key)
        # transactionID: a hash of the public key (RFC 8894 3.2.1.1), hex as a PrintableString;
        # a renewal for the same key hashes the old certificate too, or it would be taken for
        # the finished first enrollment (a repeated transactionID gets that state back).
        if transaction_id is None:
            renewed = certificate if kind is MessageType.RENEWAL_REQ else b""
            transaction_id = hashlib.sha256(spki + renewed).hexdigest()
        nonce = os.urandom(_NONCE_SIZE)
        envelope = cms.build_enveloped_data(device.request_der, [recipient], cipher)
        message = encode_pki_message(kind, transaction_id, nonce, envelope, signer)
        return PreparedRequest(
            message, kind, transaction_id, nonce, signer, key, recipient, tuple(ca),
            encode_issuer_and_subject(issuer, subject), spki, cipher,
        )  # fmt: skip

    def _signer_certificate(self, key: rsa.RSAPrivateKey, subject: bytes, spki: bytes) -> bytes:
        """The device's self-signed certificate for this key and subject, remade after a day
        (it is valid for a week) and forgotten beyond `_MAX_SIGNERS` devices."""
        now = time.monotonic()
        cached = self._signers.get(spki + subject)
        if cached is not None and now - cached[0] < 86400:
            return cached[1]
        if len(self._signers) >= _MAX_SIGNERS:
            self._signers.clear()
        certificate = self_signed_certificate(key, subject, spki)
        self._signers[spki + subject] = (now, certificate)
        return certificate

    def _cipher_for(self, capabilities: frozenset[str] | None) -> str:
        """The configured cipher if the server offers it (or offered nothing yet), else AES-128,
        else DES3 (RFC 8894 3.5.2)."""
        if capabilities is None:
            return self._cipher
        offered = "aes" if self._cipher.startswith("aes") else self._cipher
        if offered in capabilities:
            return self._cipher
        return "aes128" if "aes" in capabilities else "des3"

    async def submit(self, device: DeviceCredentials, prepared: object) -> Ticket:  # noqa: ARG002
        """Send the PKCSReq / RenewalReq; the CertRep as a Ticket."""
        ready = _prepared(prepared)
        return await self._round_trip(ready, ready.message, ready.sender_nonce)

    async def poll(
        self,
        device: DeviceCredentials,  # noqa: ARG002
        prepared: object,
        ticket: Ticket,  # noqa: ARG002
    ) -> Ticket:
        """CertPoll (RFC 8894 3.3.3): the same transactionID, a new senderNonce."""
        ready = _prepared(prepared)
        nonce = os.urandom(_NONCE_SIZE)
        envelope = cms.build_enveloped_data(
            ready.issuer_and_subject, [ready.recipient], ready.cipher
        )
        message = encode_pki_message(
            MessageType.CERT_POLL, ready.transaction_id, nonce, envelope, ready.signer
        )
        return await self._round_trip(ready, message, nonce)

    async def close(self) -> None:
        """Nothing to close: the exchange's owner closes its connections."""

    async def _round_trip(self, ready: PreparedRequest, message: bytes, nonce: bytes) -> Ticket:
        capabilities = await self.capabilities()
        target = f"{self._path}?operation=PKIOperation"
        if "postpkioperation" in capabilities:
            headers = (("Content-Type", PKI_MESSAGE),)
            answer = await self._exchange("POST", target, headers, message)
        else:
            encoded = quote(base64.b64encode(message).decode("ascii"), safe="")
            answer = await self._exchange("GET", f"{target}&message={encoded}")
        if answer.status != 200:
            raise HttpStatusError(answer.status, "SCEP PKIOperation")
        return read_cert_rep(ready, answer.body, nonce, self._poll_interval)


def read_cert_rep(
    ready: PreparedRequest, data: bytes, nonce: bytes, poll_interval: float = 1.0
) -> Ticket:
    """Check a CertRep against the request it answers and turn it into a Ticket.

    Signed by one of the CA/RA certificates, same transactionID, recipientNonce = the request's
    senderNonce (RFC 8894 3.2.1.5), a SUCCESS's certificate decrypted with the device key.
    Raises `MalformedAnswerError` for anything else.
    """
    try:
        reply = decode_pki_message(data)
        cms.verify_signed_data(reply.signed, ready.trusted, use_included=False)
    except cms.MalformedCmsError as exc:
        raise MalformedAnswerError(f"SCEP CertRep: {exc}") from exc
    if reply.message_type != MessageType.CERT_REP:
        raise MalformedAnswerError(f"SCEP answer is messageType {reply.message_type}, not CertRep")
    if reply.transaction_id != ready.transaction_id:
        raise MalformedAnswerError("SCEP CertRep for another transactionID")
    if reply.recipient_nonce != nonce:
        raise MalformedAnswerError("SCEP CertRep recipientNonce is not our senderNonce (replayed?)")
    tid = ready.transaction_id
    if reply.status is PkiStatus.PENDING:
        return Ticket(tid, TicketStatus.PENDING, retry_after=poll_interval)
    if reply.status is PkiStatus.FAILURE:
        detail = f"SCEP FAILURE: failInfo {fail_info_name(reply.fail_info or 0)}"
        if reply.fail_text:
            detail += f": {reply.fail_text[:200]}"
        return Ticket(
            tid, TicketStatus.REJECTED, error=ProtocolRefusedError.__name__, detail=detail
        )
    return Ticket(tid, TicketStatus.ISSUED, certificate=_issued_certificate(ready, reply))


def _issued_certificate(ready: PreparedRequest, reply: PkiMessage) -> bytes:
    """The certificate for our key out of the SUCCESS envelope (else the first one: the flow's
    public-key match then refuses it)."""
    try:
        opened = cms.decrypt_enveloped_data(reply.envelope, ready.signer.certificate, ready.key)
        certificates = cms.parse_certificates_only(opened.content)
    except cms.MalformedCmsError as exc:
        raise MalformedAnswerError(f"SCEP CertRep envelope: {exc}") from exc
    for certificate in certificates:
        try:
            if certificate_spki(certificate) == ready.spki:
                return certificate
        except MalformedDerError:
            continue
    if not certificates:
        raise MalformedAnswerError("SCEP CertRep SUCCESS without a certificate")
    return certificates[0]


def _prepared(prepared: object) -> PreparedRequest:
    if not isinstance(prepared, PreparedRequest):
        raise TypeError(f"not a prepared SCEP request: {type(prepared).__name__}")
    return prepared


def _is_content_info(body: bytes) -> bool:
    """Whether `body` starts like ContentInfo(SignedData) rather than a certificate."""
    try:
        _, start, _ = _der.read_header(body, 0)
    except MalformedDerError:
        try:  # BER with an indefinite outer length
            start = 2 if body[1] == 0x80 else -1
        except IndexError:
            return False
    return body[start : start + len(cms.SIGNED_DATA)] == cms.SIGNED_DATA


# ---- Server side ----


class _RefusalError(Exception):
    """A request answered with CertRep FAILURE (not raised out of the handler)."""

    def __init__(self, fail_info: FailInfo, kind: str, text: str) -> None:
        super().__init__(kind)
        self.fail_info = fail_info
        self.kind = kind
        self.text = text


_TEXT = "text/plain"


def _ignore(kind: str) -> None:
    """The default counter: counts nothing."""


class ScepHandler:
    """The server side of SCEP over a CAService: an async HttpRequest -> HttpResponse callable.

    `count(kind)` is called for each request answered with an error: "bad-message" (HTTP 400:
    not a pkiMessage), "unknown-operation" (400), and CertRep FAILUREs "bad-message-check"
    (signature or envelope), "bad-alg", "bad-request" (refused: challenge, user, policy, a
    rejected or failed ticket), "bad-cert-id" (CertPoll for an unknown transaction).
    """

    def __init__(
        self,
        service: CAService,
        ra_certificate: bytes,
        ra_key: rsa.RSAPrivateKey,
        *,
        count: Callable[[str], None] = _ignore,
    ) -> None:
        self._service = service
        self._ra = ra_certificate
        self._key = ra_key
        self._signer = cms.CmsSigner(ra_certificate, ra_key)
        self._count = count
        self._capabilities = ("\n".join(SERVER_CAPABILITIES) + "\n").encode()
        self._bundle: bytes | None = None
        self._issuing: x509.Certificate | None = None

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        parameters = _query(request.query)
        operation = parameters.get("operation", "")
        if operation == "GetCACaps":
            return HttpResponse(200, _TEXT, self._capabilities)
        if operation == "GetCACert":
            return HttpResponse(200, CA_RA_CERT, self._ca_bundle())
        if operation == "PKIOperation" and request.method in ("POST", "GET"):
            message = request.body if request.method == "POST" else _message(parameters)
            if message is None:
                return self._bad_request("bad-message", "message is not base64")
            return await self.pki_operation(message)
        return self._bad_request("unknown-operation", f"unknown SCEP operation {operation!r}")

    def _bad_request(self, kind: str, text: str) -> HttpResponse:
        self._count(kind)
        return HttpResponse(400, _TEXT, text.encode("utf-8", "replace") + b"\n")

    def _ca_bundle(self) -> bytes:
        if self._bundle is None:
            certificates = (*self._service.ca_certificates, self._ra)
            self._bundle = cms.build_certificates_only(certificates)
        return self._bundle

    async def pki_operation(self, data: bytes) -> HttpResponse:
        """One PKIOperation: the CertRep for a pkiMessage, or HTTP 400 when it is not one."""
        try:
            message = decode_pki_message(data)
        except cms.MalformedCmsError as exc:
            return self._bad_request("bad-message", f"not a SCEP pkiMessage: {exc}")
        try:
            signer, ticket, cipher = await self._answer(message)
        except _RefusalError as refusal:
            self._count(refusal.kind)
            return self._cert_rep(
                message, PkiStatus.FAILURE, fail_info=refusal.fail_info, fail_text=refusal.text
            )
        if ticket.status is TicketStatus.PENDING:
            return self._cert_rep(message, PkiStatus.PENDING)
        if ticket.status is not TicketStatus.ISSUED:
            self._count("bad-request")
            text = ticket.error or ticket.status.value
            return self._cert_rep(
                message, PkiStatus.FAILURE, fail_info=FailInfo.BAD_REQUEST, fail_text=text
            )
        bundle = cms.build_certificates_only([ticket.certificate])
        try:
            envelope = cms.build_enveloped_data(bundle, [cms.CmsRecipient(signer)], cipher)
        except (cms.MalformedCmsError, ValueError):  # not RSA, or too small to carry the key
            self._count("bad-alg")
            return self._cert_rep(
                message, PkiStatus.FAILURE, fail_info=FailInfo.BAD_ALG, fail_text="signer key"
            )
        return self._cert_rep(message, PkiStatus.SUCCESS, envelope=envelope)

    async def _answer(self, message: PkiMessage) -> tuple[bytes, Ticket, str]:
        """(the requester's signer certificate, the ticket, the cipher to answer with)."""
        kind = message.message_type
        if kind not in (MessageType.PKCS_REQ, MessageType.RENEWAL_REQ, MessageType.CERT_POLL):
            raise _RefusalError(FailInfo.BAD_REQUEST, "bad-request", f"messageType {kind}")
        signer = _checked(lambda: cms.verify_signed_data(message.signed))
        opened = _checked(lambda: cms.decrypt_enveloped_data(message.envelope, self._ra, self._key))
        transaction = "scep:" + message.transaction_id
        if kind == MessageType.CERT_POLL:
            try:
                decode_issuer_and_subject(opened.content)
            except cms.MalformedCmsError as exc:
                raise _RefusalError(FailInfo.BAD_REQUEST, "bad-request", exc.detail) from exc
            ticket = await self._service.poll(transaction)
            if ticket is None:
                raise _RefusalError(FailInfo.BAD_CERT_ID, "bad-cert-id", "unknown transactionID")
            return signer, ticket, opened.cipher
        request = opened.content
        try:
            user = await self._authorize(kind, signer, request)
        except EnrollmentError as exc:
            # the error's type only: its message may name users or subjects
            raise _RefusalError(FailInfo.BAD_REQUEST, "bad-request", type(exc).__name__) from exc
        ticket = await self._service.submit(transaction, request, user)
        return signer, ticket, opened.cipher

    async def _authorize(self, kind: int, signer: bytes, request: bytes) -> User:
        """The user a PKCSReq (challengePassword) or RenewalReq (a certificate we issued to the
        same subject) is for; an EnrollmentError when it is refused."""
        info, _, spki, *_ = split_request(request)
        if kind == MessageType.PKCS_REQ:
            if certificate_spki(signer) != spki:
                raise ScepRefusedError("PKCSReq signed with another key than the request's")
            password = _challenge_in(info)
            if password is None:
                raise ScepRefusedError("PKCSReq without a challengePassword")
            user = await self._service.find_user(request)
            return await self._service.authenticate(user.user_id, password)
        user = await self._service.find_user(request)
        self._check_renewal(signer, user.dn.der)
        return user

    def _check_renewal(self, signer: bytes, subject: bytes) -> None:
        """RenewalReq: the signer certificate is one our issuing CA made, valid now, for the
        user's subject (RFC 8894 3.3.1.2)."""
        if self._issuing is None:
            self._issuing = x509.load_der_x509_certificate(self._service.ca_certificates[-1])
        try:
            certificate = x509.load_der_x509_certificate(signer)
            certificate.verify_directly_issued_by(self._issuing)
            valid = certificate.not_valid_before_utc, certificate.not_valid_after_utc
            certified = certificate.subject.public_bytes()
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
            raise ScepRefusedError(f"RenewalReq signer not issued by our CA: {exc}") from exc
        if not valid[0] <= datetime.now(UTC) <= valid[1]:
            raise ScepRefusedError("RenewalReq signer certificate is not valid now")
        if certified != subject:
            raise ScepRefusedError("RenewalReq signer certificate is for another subject")

    def _cert_rep(
        self,
        message: PkiMessage,
        status: PkiStatus,
        *,
        fail_info: FailInfo | None = None,
        fail_text: str = "",
        envelope: bytes | None = None,
    ) -> HttpResponse:
        """CertRep (RFC 8894 3.3.2): signed by the RA, recipientNonce = the request's
        senderNonce, a fresh senderNonce, the same transactionID."""
        reply = encode_pki_message(
            MessageType.CERT_REP,
            message.transaction_id,
            os.urandom(_NONCE_SIZE),
            envelope,
            self._signer,
            recipient_nonce=message.sender_nonce,
            status=status,
            fail_info=fail_info,
            fail_text=fail_text,
        )
        return HttpResponse(200, PKI_MESSAGE, reply)


def _checked(call: Callable[[], _T]) -> _T:
    """Run a signature check or decryption; a failure is a CertRep FAILURE."""
    try:
        return call()
    except cms.CmsUnsupportedError as exc:
        raise _RefusalError(FailInfo.BAD_ALG, "bad-alg", exc.detail) from exc
    except cms.MalformedCmsError as exc:
        raise _RefusalError(FailInfo.BAD_MESSAGE_CHECK, "bad-message-check", exc.detail) from exc


def _query(query: str) -> dict[str, str]:
    """Query parameters, percent-decoded without turning '+' into a space: base64 has '+'."""
    found: dict[str, str] = {}
    for part in query.lstrip("?").split("&"):
        name, _, value = part.partition("=")
        found.setdefault(unquote(name), unquote(value))
    return found


def _message(parameters: dict[str, str]) -> bytes | None:
    """The GET PKIOperation message: base64, standard or URL-safe alphabet (scepclient 2.1.0
    sends URL-safe), padding optional; None when it is not base64."""
    text = parameters.get("message", "").replace(" ", "+").translate(_URL_SAFE)
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


_URL_SAFE = str.maketrans("-_", "+/")
