"""EST (RFC 7030 as updated by RFC 8951): message codec, client side and server side.

Codec: every EST body is base64 of DER whatever a Content-Transfer-Encoding header says (RFC 8951
3.2.2); we send it unfolded (RFC 4648) and accept it folded into lines as well, as MIME-era
clients send it (`base64`, `openssl base64`). Requests are `application/pkcs10`, certificates
travel as `application/pkcs7-mime; smime-type=certs-only` (a degenerate PKCS #7 SignedData,
RFC 5652 5.1, built here from DER pieces), CSR attributes as `application/csrattrs` (RFC 7030
4.5.2).

Client side: `EstClient` implements `seam.EnrollmentClient` over an `exchange` callable with
`HttpClient.request`'s signature, so a server `Handler` can be plugged in directly.

Server side: `EstHandler` answers cacerts, simpleenroll (HTTP Basic), simplereenroll (the TLS
client certificate) and csrattrs over a `seam.CAService`. Every refusal is counted and answered;
nothing a client sends makes it raise.
"""

from __future__ import annotations

import binascii
import email.utils
import hashlib
import math
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from engine import _der
from engine.errors import (
    AuthenticationError,
    EnrollmentError,
    FailedError,
    HttpStatusError,
    MalformedAnswerError,
    MalformedDerError,
    ProtocolRefusedError,
    TargetTimeoutError,
    UnknownUserError,
)
from engine.identity import general_name_elements
from engine.request import SAN_OID_DER, split_request
from engine.wire.seam import (
    CAService,
    DeviceCredentials,
    HttpRequest,
    HttpResponse,
    Ticket,
    TicketStatus,
)

WELL_KNOWN = "/.well-known/est"
PKCS10 = "application/pkcs10"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
CSRATTRS = "application/csrattrs"
TEXT = "text/plain; charset=utf-8"
REALM = 'Basic realm="enrollbench"'

# The operations served, with the one method each takes (RFC 7030 3.2.2).
OPERATIONS: Mapping[str, str] = {
    "cacerts": "GET",
    "simpleenroll": "POST",
    "simplereenroll": "POST",
    "csrattrs": "GET",
}

# ContentInfo contentType signedData and the empty encapContentInfo of a certs-only message
# (RFC 5652 3, 5.1, 5.2; RFC 8551 3.6: no signers, no content).
_SIGNED_DATA_OID = _der.encode_oid("1.2.840.113549.1.7.2")
_DATA_CONTENT_INFO = _der.encode_tlv(_der.SEQUENCE, _der.encode_oid("1.2.840.113549.1.7.1"))
_VERSION_1 = b"\x02\x01\x01"
_EMPTY_SET = b"\x31\x00"
_CERTIFICATES = 0xA0  # certificates [0] IMPLICIT CertificateSet
_CRLS = 0xA1  # crls [1] IMPLICIT RevocationInfoChoices
_EXPLICIT_0 = 0xA0
_WHITESPACE = b" \t\r\n"
_CERTIFICATE_TAGS = bytes((_der.SEQUENCE, _der.SEQUENCE, _der.BIT_STRING))
# serial, signature, issuer, validity, subject, subjectPublicKeyInfo
_TBS_TAGS = bytes((_der.INTEGER, *[_der.SEQUENCE] * 5))
_SECONDS = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,9})?")
# Ticket errors that mean "who you are did not check out": 401, not 403.
_AUTHENTICATION_ERRORS = frozenset({AuthenticationError.__name__, UnknownUserError.__name__})

Exchange = Callable[..., Awaitable[HttpResponse]]


class Base64Error(FailedError):
    """A body that is not strict base64 (RFC 4648 4), line breaks and spaces aside."""

    reason = "bad-base64"


class PollLimitError(TargetTimeoutError):
    """A request was still pending after the client's poll limit."""

    reason = "poll-limit"


class CsrAttribute(NamedTuple):
    """One AttrOrOID of a CSR attributes answer (RFC 7030 4.5.2).

    `values` holds the DER of each attribute value; empty means the bare OID choice.
    """

    oid: str
    values: tuple[bytes, ...] = ()


# ---------------------------------------------------------------- codec


def encode_base64(der: bytes) -> bytes:
    """Base64 without line breaks (RFC 4648 4), which every RFC 8951 decoder accepts."""
    return binascii.b2a_base64(der, newline=False)


def decode_base64(body: bytes) -> bytes:
    """Decode an EST body: spaces and line breaks are ignored (folded base64), anything else
    must be canonical base64 (alphabet, padding, zero trailing bits); else `Base64Error`."""
    compact = body.translate(None, _WHITESPACE)
    if not compact:
        raise Base64Error("empty base64 body")
    try:
        der = binascii.a2b_base64(compact, strict_mode=True)
    except binascii.Error as exc:
        raise Base64Error(f"not base64: {exc}") from None
    # strict_mode still accepts non-zero bits after the last byte; canonical means they are 0.
    if binascii.b2a_base64(der, newline=False) != compact:
        raise Base64Error("not canonical base64")
    return der


def encode_certs_only(certificates: Sequence[bytes]) -> bytes:
    """A degenerate PKCS #7 SignedData carrying `certificates` (DER), itself DER.

    The certificates are sorted by their encodings, as DER orders a SET OF (X.690 11.6).
    """
    certificate_set = _der.encode_tlv(_CERTIFICATES, b"".join(sorted(certificates)))
    signed_data = _der.encode_tlv(
        _der.SEQUENCE,
        _VERSION_1 + _EMPTY_SET + _DATA_CONTENT_INFO + certificate_set + _EMPTY_SET,
    )
    return _der.encode_tlv(
        _der.SEQUENCE, _SIGNED_DATA_OID + _der.encode_tlv(_EXPLICIT_0, signed_data)
    )


def decode_certs_only(der: bytes) -> tuple[bytes, ...]:
    """The certificates of a certs-only PKCS #7 (DER, RFC 5652 5.1), in the order sent.

    Strict: DER lengths, version 1, no encapsulated content, no signers, at least one
    certificate, each a well-formed Certificate outline. CRLs, if any, are ignored.
    Raises `MalformedDerError`.
    """
    # Each level is split by one C call (engine._derc): a third of the Python walk's cost.
    outer = _der.sequence_elements(der, _der.SEQUENCE)
    if len(outer) != 2 or outer[0] != _SIGNED_DATA_OID:
        raise MalformedDerError("not a PKCS #7 signedData ContentInfo")
    explicit = _der.sequence_elements(outer[1], _EXPLICIT_0)
    if len(explicit) != 1:
        raise MalformedDerError("ContentInfo content is not one SignedData")
    fields = _der.sequence_elements(explicit[0], _der.SEQUENCE)
    # version, digestAlgorithms, encapContentInfo, [0] certificates, [1] crls, signerInfos
    if len(fields) < 4 or fields[0] != _VERSION_1:
        raise MalformedDerError("SignedData is not version 1 with its fields")
    if fields[1][0] != _der.SET or fields[2] != _DATA_CONTENT_INFO:
        raise MalformedDerError("certs-only content is not empty id-data")
    if fields[-1] != _EMPTY_SET:
        raise MalformedDerError("certs-only message has signers")
    optional = fields[3:-1]
    certificates: tuple[bytes, ...] = ()
    if optional and optional[0][0] == _CERTIFICATES:
        certificates = _certificate_elements(optional.pop(0))
    if optional and optional[0][0] == _CRLS:
        optional.pop(0)
    if optional:
        raise MalformedDerError("unexpected SignedData field")
    if not certificates:
        raise MalformedDerError("certs-only message without certificates")
    return certificates


def _certificate_elements(certificate_set: bytes) -> tuple[bytes, ...]:
    """The Certificate choices of a CertificateSet; other choices (attribute certs) refused."""
    found = tuple(_der.sequence_elements(certificate_set, _CERTIFICATES))
    for certificate in found:
        if certificate[0] != _der.SEQUENCE:
            raise MalformedDerError("CertificateSet holds a non-X.509 certificate")
        certificate_names(certificate)
    return found


def certificate_names(certificate: bytes) -> tuple[bytes, bytes]:
    """(issuer, subject) of a DER certificate, as DER Names (RFC 5280 4.1); checks its outline:
    SEQUENCE { tbsCertificate, signatureAlgorithm, signature BIT STRING }."""
    parts = _der.sequence_elements(certificate, _der.SEQUENCE)
    if len(parts) != 3 or _tags(parts) != _CERTIFICATE_TAGS:
        raise MalformedDerError("not a Certificate")
    fields = _der.sequence_elements(parts[0], _der.SEQUENCE)
    # [0] version (absent for v1), serial, signature, issuer, validity, subject, spki, ...
    first = 1 if fields and fields[0][0] == _EXPLICIT_0 else 0
    named = fields[first : first + 6]
    if _tags(named) != _TBS_TAGS:
        raise MalformedDerError("not a TBSCertificate")
    return named[2], named[4]


def _tags(elements: Sequence[bytes]) -> bytes:
    return bytes(element[0] for element in elements)


def order_chain(certificates: Sequence[bytes]) -> tuple[bytes, ...]:
    """Root first, then each certificate after its issuer, as far as the names allow; what
    does not chain (a second branch, a stranger) follows in the order received."""
    names = [certificate_names(certificate) for certificate in certificates]
    subjects = {subject for _, subject in names}
    placed = [False] * len(certificates)
    ordered: list[bytes] = []
    tops = [i for i, (issuer, subject) in enumerate(names) if issuer == subject]
    tops += [i for i, (issuer, _) in enumerate(names) if issuer not in subjects]
    for top in tops or [0]:
        current: int | None = top
        while current is not None and not placed[current]:
            placed[current] = True
            ordered.append(certificates[current])
            parent = names[current][1]
            current = next(
                (
                    i
                    for i, (issuer, subject) in enumerate(names)
                    if not placed[i] and issuer == parent and issuer != subject
                ),
                None,
            )
    ordered += [c for i, c in enumerate(certificates) if not placed[i]]
    return tuple(ordered)


def issued_certificate(certificates: Sequence[bytes]) -> bytes:
    """The end-entity certificate of an enrollment answer: the one that issued no other
    (a server may send the chain with it, RFC 7030 4.2.3)."""
    if len(certificates) == 1:
        return certificates[0]
    names = [certificate_names(certificate) for certificate in certificates]
    issuers = {issuer for issuer, subject in names if issuer != subject}
    for certificate, (issuer, subject) in zip(certificates, names, strict=True):
        if subject not in issuers and issuer != subject:
            return certificate
    return certificates[0]


def encode_csrattrs(attributes: Sequence[CsrAttribute]) -> bytes:
    """CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID (RFC 7030 4.5.2), DER."""
    parts = []
    for attribute in attributes:
        oid = _der.encode_oid(attribute.oid)
        if attribute.values:
            values = _der.encode_tlv(_der.SET, b"".join(sorted(attribute.values)))
            parts.append(_der.encode_tlv(_der.SEQUENCE, oid + values))
        else:
            parts.append(oid)
    return _der.encode_tlv(_der.SEQUENCE, b"".join(parts))


def decode_csrattrs(der: bytes) -> tuple[CsrAttribute, ...]:
    """Decode CsrAttrs strictly (each value checked as DER); raises `MalformedDerError`."""
    start, end = _der.read_whole(der, _der.SEQUENCE)
    found = []
    for tag, offset, content, stop in _der.split_children(der, start, end):
        if tag == _der.OID:
            _der.check_oid(der, offset, content, stop)
            found.append(CsrAttribute(_der.decode_oid(der[content:stop])))
        elif tag == _der.SEQUENCE:
            found.append(_decode_attribute(der, offset, content, stop))
        else:
            raise MalformedDerError("AttrOrOID is neither an OID nor an Attribute", offset)
    return tuple(found)


def _decode_attribute(der: bytes, offset: int, start: int, end: int) -> CsrAttribute:
    """Attribute ::= SEQUENCE { type OBJECT IDENTIFIER, values SET SIZE (1..MAX) OF ANY }."""
    oid_start, oid_end = _der.strict_expect(der, start, _der.OID, end)
    _der.check_oid(der, start, oid_start, oid_end)
    values_start, values_end = _der.strict_expect(der, oid_end, _der.SET, end)
    if values_end != end or values_start == values_end:
        raise MalformedDerError("Attribute needs one or more values and nothing after", offset)
    values = []
    cursor = values_start
    while cursor < values_end:
        stop = _der.check_value(der, cursor, values_end)
        values.append(der[cursor:stop])
        cursor = stop
    return CsrAttribute(_der.decode_oid(der[oid_start:oid_end]), tuple(values))


def transaction_id(request_der: bytes) -> str:
    """The transaction a request belongs to: a repeated request is the same one (RFC 7030
    4.2.3 polls by resending it)."""
    return "est:" + hashlib.sha256(request_der).hexdigest()


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """A Content-Type split into its lower-case media type and parameters (RFC 9110 8.3.1)."""
    kind, *parameters = content_type.split(";")
    found = {}
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        found[name.strip().lower()] = value.strip().strip('"').lower()
    return kind.strip().lower(), found


def parse_retry_after(value: str | None, now: float) -> float:
    """Seconds to wait from a Retry-After value: delay-seconds or an HTTP-date (RFC 9110
    10.2.3); fractions of a second are accepted. `MalformedAnswerError` when absent or bad."""
    if value is None:
        raise MalformedAnswerError("EST 202 answer without Retry-After (RFC 7030 4.2.3)")
    text = value.strip()
    if _SECONDS.fullmatch(text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        raise MalformedAnswerError(
            f"EST Retry-After is neither seconds nor a date: {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def basic_credentials(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """(user ID, password) of an `Authorization: Basic` header (RFC 7617), or None."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = binascii.a2b_base64(token.strip().encode("ascii"), strict_mode=True)
        user_id, colon, password = decoded.decode("utf-8").partition(":")
    except (ValueError, UnicodeError):  # binascii.Error is a ValueError
        return None
    return (user_id, password) if colon else None


def basic_authorization(user_id: str, password: str) -> str:
    """The `Authorization` value for HTTP Basic (RFC 7617 2, UTF-8)."""
    token = encode_base64(f"{user_id}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


# ---------------------------------------------------------------- client side


class EstClient:
    """The EST client side of one target (RFC 7030 4.1, 4.2, 4.5), over `exchange`.

    `exchange(method, target, headers, body)` is `HttpClient.request` or a server handler
    plugged in directly. A request still pending after `poll_limit` polls ends with
    `PollLimitError`.
    """

    def __init__(
        self,
        exchange: Exchange,
        base_path: str = WELL_KNOWN,
        *,
        label: str | None = None,
        poll_limit: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        root = base_path.rstrip("/") + (f"/{label}" if label else "")
        self._exchange = exchange
        self._targets = {operation: f"{root}/{operation}" for operation in OPERATIONS}
        self._poll_limit = poll_limit
        self._clock = clock
        # transaction ID -> (operation, polls so far), while the server says PENDING
        self._pending: dict[str, tuple[str, int]] = {}

    async def ca_certificates(self) -> tuple[bytes, ...]:
        """GET cacerts (RFC 7030 4.1): the CA certificates, root first."""
        answer = await self._exchange("GET", self._targets["cacerts"], (), b"")
        if answer.status != 200:
            raise HttpStatusError(answer.status, "EST cacerts")
        return order_chain(_certs_only_answer(answer, "cacerts"))

    async def csr_attributes(self) -> tuple[CsrAttribute, ...]:
        """GET csrattrs (RFC 7030 4.5): what the CA wants in requests; () if nothing."""
        answer = await self._exchange("GET", self._targets["csrattrs"], (), b"")
        if answer.status in (204, 404):
            return ()
        if answer.status != 200:
            raise HttpStatusError(answer.status, "EST csrattrs")
        if media_type(answer.content_type)[0] != CSRATTRS:
            raise MalformedAnswerError(f"EST csrattrs: content type {answer.content_type!r}")
        try:
            return decode_csrattrs(decode_base64(answer.body))
        except EnrollmentError as exc:
            raise MalformedAnswerError(f"EST csrattrs: {exc}") from exc

    def prepare(self, device: DeviceCredentials, ca: tuple[bytes, ...]) -> object:  # noqa: ARG002
        """The base64 request body (RFC 7030 4.2.1); EST needs nothing from the CA chain."""
        return encode_base64(device.request_der)

    async def submit(self, device: DeviceCredentials, prepared: object) -> Ticket:
        """POST simpleenroll with HTTP Basic (RFC 7030 4.2.1, 3.2.3)."""
        return await self._send("simpleenroll", device, prepared, 0)

    async def reenroll(self, device: DeviceCredentials, prepared: object) -> Ticket:
        """POST simplereenroll (RFC 7030 4.2.2): the exchange's TLS client certificate
        authenticates, so no Basic credentials are sent."""
        return await self._send("simplereenroll", device, prepared, 0)

    async def poll(self, device: DeviceCredentials, prepared: object, ticket: Ticket) -> Ticket:
        """Resend the same request (RFC 7030 4.2.3) to the operation that answered 202."""
        operation, polls = self._pending.get(ticket.transaction_id, ("simpleenroll", 0))
        if polls >= self._poll_limit:
            self._pending.pop(ticket.transaction_id, None)
            raise PollLimitError(f"EST {operation}: still pending after {polls} polls")
        return await self._send(operation, device, prepared, polls + 1)

    async def close(self) -> None:
        """The exchange's owner closes its connections; nothing is held here."""
        self._pending.clear()

    async def _send(
        self, operation: str, device: DeviceCredentials, prepared: object, polls: int
    ) -> Ticket:
        body = prepared if isinstance(prepared, bytes) else encode_base64(device.request_der)
        headers: tuple[tuple[str, str], ...] = (("Content-Type", PKCS10),)
        if operation == "simpleenroll":
            headers += (("Authorization", basic_authorization(device.user_id, device.password)),)
        transaction = transaction_id(device.request_der)
        answer = await self._exchange("POST", self._targets[operation], headers, body)
        ticket = self._ticket(transaction, answer, operation)
        if ticket.status is TicketStatus.PENDING:
            self._pending[transaction] = (operation, polls)
        else:
            self._pending.pop(transaction, None)
        return ticket

    def _ticket(self, transaction: str, answer: HttpResponse, operation: str) -> Ticket:
        status = answer.status
        if status == 200:
            certificate = issued_certificate(_certs_only_answer(answer, operation))
            return Ticket(transaction, TicketStatus.ISSUED, certificate)
        if status == 202:
            wait = parse_retry_after(answer.header("Retry-After"), self._clock())
            return Ticket(transaction, TicketStatus.PENDING, retry_after=wait)
        if status in (400, 401, 403):
            reason = answer.body[:200].decode("utf-8", "replace").strip()
            detail = f"EST {operation}: HTTP {status}" + (f": {reason}" if reason else "")
            refused = ProtocolRefusedError.__name__
            return Ticket(transaction, TicketStatus.REJECTED, error=refused, detail=detail)
        raise HttpStatusError(status, f"EST {operation}")


def _is_certs_only(content_type: str) -> bool:
    kind, parameters = media_type(content_type)
    return kind == "application/pkcs7-mime" and (
        parameters.get("smime-type", "certs-only") == "certs-only"
    )


def _certs_only_answer(answer: HttpResponse, operation: str) -> tuple[bytes, ...]:
    """The certificates of a certs-only answer; `MalformedAnswerError` for anything else."""
    if answer.content_type != CERTS_ONLY and not _is_certs_only(answer.content_type):
        raise MalformedAnswerError(f"EST {operation}: content type {answer.content_type!r}")
    try:
        return decode_certs_only(decode_base64(answer.body))
    except EnrollmentError as exc:
        raise MalformedAnswerError(f"EST {operation}: {exc}") from exc


# ---------------------------------------------------------------- server side


def _ignore(kind: str) -> None:
    pass


class EstHandler:
    """The EST server side over a `CAService`: an HTTP `Handler` (RFC 7030 3.2.2, 4).

    `count(kind)` is called once for every error answer, with a short kind such as
    "bad-base64" or "wrong-credentials". `labels` are the path labels accepted besides none
    (/.well-known/est/LABEL/simpleenroll). An empty `csr_attributes` answers csrattrs with
    204 (RFC 7030 4.5.2: nothing is asked of requests).
    """

    def __init__(
        self,
        service: CAService,
        *,
        count: Callable[[str], None] = _ignore,
        retry_after: int = 1,
        labels: Collection[str] = (),
        csr_attributes: Sequence[CsrAttribute] = (),
        base_path: str = WELL_KNOWN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._service = service
        self._count = count
        self._retry_after = max(1, retry_after)
        self._labels = frozenset(labels)
        self._prefix = base_path.rstrip("/") + "/"
        self._csrattrs = encode_base64(encode_csrattrs(csr_attributes)) if csr_attributes else b""
        self._clock = clock
        self._cacerts = b""
        self._issuer: x509.Certificate | None = None

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        """Answer one request; anything unexpected is a counted 500, never an exception."""
        try:
            return await self._dispatch(request)
        except Exception:  # a client must never crash a worker, whatever it sends
            return self._error(500, "internal-error", "internal error")

    async def _dispatch(self, request: HttpRequest) -> HttpResponse:
        operation = self._operation(request.path)
        if operation is None:
            return self._error(404, "not-found", "no such EST operation")
        method = OPERATIONS[operation]
        if request.method != method:
            return self._error(405, "method-not-allowed", f"use {method}", (("Allow", method),))
        if method == "GET":
            return self._ca_certificates() if operation == "cacerts" else self._csr_attributes()
        request_der = self._request_der(request)
        if isinstance(request_der, HttpResponse):
            return request_der
        if operation == "simpleenroll":
            return await self._enroll(request, request_der)
        return await self._reenroll(request, request_der)

    def _operation(self, path: str) -> str | None:
        """The operation a path names: PREFIX/op or PREFIX/LABEL/op (RFC 7030 3.2.2)."""
        if not path.startswith(self._prefix):
            return None
        label, slash, operation = path[len(self._prefix) :].rpartition("/")
        if slash and label not in self._labels:
            return None
        return operation if operation in OPERATIONS else None

    def _request_der(self, request: HttpRequest) -> bytes | HttpResponse:
        """The PKCS #10 DER of a POST body (RFC 7030 4.2.1), or the error answer."""
        content_type = request.headers.get("content-type", "")
        if content_type != PKCS10 and media_type(content_type)[0] != PKCS10:
            return self._error(415, "unsupported-media-type", f"send {PKCS10}")
        try:
            return decode_base64(request.body)
        except Base64Error:
            return self._error(400, "bad-base64", "body is not base64")

    def _ca_certificates(self) -> HttpResponse:
        if not self._cacerts:  # the hierarchy is fixed for a service's life: encode it once
            self._cacerts = encode_base64(self._service.chain_pkcs7)
        return HttpResponse(200, CERTS_ONLY, self._cacerts)

    def _csr_attributes(self) -> HttpResponse:
        if not self._csrattrs:
            return HttpResponse(204)  # nothing asked of requests (RFC 7030 4.5.2)
        return HttpResponse(200, CSRATTRS, self._csrattrs)

    async def _enroll(self, request: HttpRequest, request_der: bytes) -> HttpResponse:
        """simpleenroll: HTTP Basic decides who the user is (RFC 7030 3.2.3)."""
        credentials = basic_credentials(request.headers)
        if credentials is None:
            return self._unauthorized("no-credentials")
        try:
            user = await self._service.authenticate(*credentials)
        except (AuthenticationError, UnknownUserError):
            return self._unauthorized("wrong-credentials")
        ticket = await self._service.submit(transaction_id(request_der), request_der, user)
        return self._answer(ticket)

    async def _reenroll(self, request: HttpRequest, request_der: bytes) -> HttpResponse:
        """simplereenroll: the TLS client certificate, issued by our CA and valid now,
        authenticates; the request keeps its subject and alternative names (RFC 7030 4.2.2)."""
        refusal = self._check_renewal(request.peer_certificate, request_der)
        if refusal is not None:
            return refusal
        try:
            user = await self._service.find_user(request_der)
        except UnknownUserError:
            return self._error(403, "unknown-user", "no such user")
        except MalformedDerError:
            return self._error(400, "malformed-request", "request is not a PKCS #10 request")
        ticket = await self._service.submit(transaction_id(request_der), request_der, user)
        return self._answer(ticket)

    def _check_renewal(self, peer: bytes | None, request_der: bytes) -> HttpResponse | None:
        """The error answer for a re-enrollment that may not proceed, or None."""
        if peer is None:
            return self._error(403, "no-client-certificate", "client certificate required")
        held = self._check_peer(peer)
        if held is None:
            return self._error(403, "bad-client-certificate", "client certificate refused")
        try:
            parts = split_request(request_der)
        except MalformedDerError:
            return self._error(400, "malformed-request", "request is not a PKCS #10 request")
        subject, extensions = parts[1], parts[7]
        # A request may leave its alternative names out (the CA writes the directory's).
        requested_san = extensions.get(SAN_OID_DER)
        if subject != held[0] or (
            requested_san is not None and _names_of(requested_san[1]) != held[1]
        ):
            return self._error(403, "subject-changed", "subject differs from the certificate")
        return None

    def _check_peer(self, certificate_der: bytes) -> tuple[bytes, frozenset[bytes]] | None:
        """(subject, SAN GeneralNames) of a client certificate that our issuing CA signed and
        that is valid now; None otherwise."""
        if self._issuer is None:
            issuing = self._service.ca_certificates[-1]
            self._issuer = x509.load_der_x509_certificate(issuing)
        try:
            subject = certificate_names(certificate_der)[1]
            certificate = x509.load_der_x509_certificate(certificate_der)
            certificate.verify_directly_issued_by(self._issuer)
            extensions = certificate.extensions
        except (MalformedDerError, ValueError, TypeError, InvalidSignature):
            return None
        now = datetime.fromtimestamp(self._clock(), UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            return None
        try:
            san = extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return subject, frozenset()
        names = _names_of(san.value.public_bytes())
        return None if names is None else (subject, names)

    def _answer(self, ticket: Ticket) -> HttpResponse:
        """The HTTP answer for where a transaction stands (RFC 7030 4.2.3)."""
        if ticket.status is TicketStatus.ISSUED and ticket.certificate:
            body = encode_base64(encode_certs_only((ticket.certificate,)))
            return HttpResponse(200, CERTS_ONLY, body)
        if ticket.status is TicketStatus.PENDING:
            # delay-seconds is a whole number (RFC 9110 10.2.3): round up, at least one second.
            wait = math.ceil(ticket.retry_after) if ticket.retry_after > 0 else self._retry_after
            return HttpResponse(202, headers=(("Retry-After", str(max(1, wait))),))
        if ticket.status is TicketStatus.REJECTED:
            if ticket.error in _AUTHENTICATION_ERRORS:
                return self._unauthorized("wrong-credentials")
            return self._error(403, "rejected", f"rejected: {ticket.error or 'policy'}")
        if ticket.status is TicketStatus.FAILED and ticket.error.startswith("Malformed"):
            return self._error(400, "malformed-request", "request is not a PKCS #10 request")
        return self._error(500, "enrollment-failed", f"failed: {ticket.error or 'error'}")

    def _unauthorized(self, kind: str) -> HttpResponse:
        return self._error(401, kind, "authentication required", (("WWW-Authenticate", REALM),))

    def _error(
        self, status: int, kind: str, reason: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> HttpResponse:
        self._count(kind)
        return HttpResponse(status, TEXT, reason.encode() + b"\n", headers)


def _names_of(san_value: bytes) -> frozenset[bytes] | None:
    """The GeneralNames of a SAN extnValue as a set of DER elements; None if it is not DER."""
    try:
        return frozenset(general_name_elements(san_value))
    except MalformedDerError:
        return None
