"""EST (engine.wire.est): codec, client against handler in process and over HttpServer/HttpClient
(TLS client certificates for simplereenroll), the real CA service, and curl/openssl as peers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import socket
import ssl
import subprocess
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder as der_decoder
from pyasn1_modules import rfc2315

from engine import _der
from engine.approval import ApprovalPolicy
from engine.distribution import Distribution
from engine.errors import (
    AuthenticationError,
    EnrollmentError,
    HttpStatusError,
    MalformedAnswerError,
    MalformedDerError,
    MalformedRequestError,
    UnknownUserError,
)
from engine.identity import DistinguishedName, User
from engine.keys import Signer, key_spec
from engine.population import directory_entry, simulated_enrollee
from engine.request import RequestContent, RequestTemplate
from engine.service import SharedCAService, seed_users
from engine.system import EngineConfig
from engine.wire.est import (
    CERTS_ONLY,
    PKCS10,
    REALM,
    Base64Error,
    CsrAttribute,
    EstClient,
    EstHandler,
    PollLimitError,
    basic_authorization,
    basic_credentials,
    certificate_names,
    decode_base64,
    decode_certs_only,
    decode_csrattrs,
    encode_base64,
    encode_certs_only,
    encode_csrattrs,
    issued_certificate,
    media_type,
    order_chain,
    parse_retry_after,
    transaction_id,
)
from engine.wire.http import HttpClient, HttpServer, handler_exchange
from engine.wire.seam import (
    DeviceCredentials,
    Handler,
    HttpRequest,
    HttpResponse,
    Ticket,
    TicketStatus,
)
from tests.conftest import SEED, VECTORS, ca_material, require_tool, vector_key

PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}
USERS = {
    user_id: User(
        user_id,
        DistinguishedName.from_text(f"CN={user_id},O=enrollbench"),
        f"{user_id}@example.com",
        f"{user_id}@example.com",
    )
    for user_id in PASSWORDS
}
FOREVER = (datetime(2020, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
ROOT_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "enrollbench"),
        x509.NameAttribute(NameOID.COMMON_NAME, "EST test CA"),
    ]
)
# RFC 7030 appendix A.4: challengePassword, ecPublicKey on secp384r1, extensionRequest asking for
# macAddress, ecdsa-with-SHA384.
RFC7030_CSRATTRS = (
    "MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJBgcrBgEBAQEWBggqhkjOPQQDAw=="
)


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def ec_key(name: str) -> ec.EllipticCurvePrivateKey:
    key = vector_key(name)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def make_certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    serial: int,
    *,
    ca: bool = False,
    validity: tuple[datetime, datetime] = FOREVER,
    san: x509.SubjectAlternativeName | None = None,
) -> x509.Certificate:
    """A certificate made with cryptography's builder (the test's CA)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(serial)
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(signer, hashes.SHA256())


CA_KEY = ec_key("p256-1")
CA_CERT = make_certificate(ROOT_NAME, CA_KEY.public_key(), ROOT_NAME, CA_KEY, 1, ca=True)
# A stranger with the very same name: only the signature tells them apart.
FOREIGN_KEY = ec_key("p256-2")
FOREIGN_CERT = make_certificate(
    ROOT_NAME, FOREIGN_KEY.public_key(), ROOT_NAME, FOREIGN_KEY, 1, ca=True
)


def request_for(
    user_id: str, key_name: str = "p256-4", *, san: x509.SubjectAlternativeName | None = None
) -> bytes:
    """A PKCS #10 request with the user's directory DN, signed by a vector key."""
    subject = x509.Name.from_rfc4514_string(USERS[user_id].dn.text)
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    csr = builder.sign(ec_key(key_name), hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def device(
    user_id: str = "alice", request_der: bytes | None = None, **fields: str
) -> DeviceCredentials:
    password = fields.get("password", PASSWORDS[user_id])
    request = request_der if request_der is not None else request_for(user_id)
    return DeviceCredentials(f"device-{user_id}", user_id, password, None, request)


class FakeService:
    """A small CAService: cryptography's builder issues at once, or after `approve`."""

    def __init__(self, *, approval: bool = False) -> None:
        self.ca_certificates = (der(CA_CERT),)
        self.chain_pkcs7 = pkcs7.serialize_certificates([CA_CERT], serialization.Encoding.DER)
        self.approval = approval
        self.tickets: dict[str, Ticket] = {}
        self.requests: dict[str, x509.CertificateSigningRequest] = {}
        self.submitted: list[str] = []
        self.serial = 100

    async def authenticate(self, user_id: str, password: str) -> User:
        if user_id not in USERS:
            raise UnknownUserError(user_id)
        if password != PASSWORDS[user_id]:
            raise AuthenticationError(user_id)
        return USERS[user_id]

    async def find_user(self, request_der: bytes) -> User:
        try:
            csr = x509.load_der_x509_csr(request_der)
        except ValueError as exc:
            raise MalformedRequestError("not a request", 0) from exc
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        user_id = str(names[0].value) if names else ""
        if user_id not in USERS:
            raise UnknownUserError(user_id)
        return USERS[user_id]

    async def submit(self, transaction_id: str, request_der: bytes, user: User) -> Ticket:
        self.submitted.append(transaction_id)
        if transaction_id in self.tickets:
            return self.tickets[transaction_id]
        try:
            csr = x509.load_der_x509_csr(request_der)
        except ValueError:
            ticket = Ticket(transaction_id, TicketStatus.FAILED, error="MalformedRequestError")
        else:
            ticket = self._decide(transaction_id, csr, user)
        self.tickets[transaction_id] = ticket
        return ticket

    async def poll(self, transaction_id: str) -> Ticket | None:
        return self.tickets.get(transaction_id)

    def approve(self, transaction_id: str) -> None:
        self.tickets[transaction_id] = self._issue(transaction_id, self.requests[transaction_id])

    def _decide(
        self, transaction_id: str, csr: x509.CertificateSigningRequest, user: User
    ) -> Ticket:
        if csr.subject.public_bytes() != user.dn.der:
            return Ticket(transaction_id, TicketStatus.REJECTED, error="SubjectMismatchError")
        self.requests[transaction_id] = csr
        if self.approval:
            return Ticket(transaction_id, TicketStatus.PENDING, retry_after=2.5)
        return self._issue(transaction_id, csr)

    def _issue(self, transaction_id: str, csr: x509.CertificateSigningRequest) -> Ticket:
        self.serial += 1
        key = csr.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        certificate = make_certificate(csr.subject, key, ROOT_NAME, CA_KEY, self.serial)
        return Ticket(transaction_id, TicketStatus.ISSUED, der(certificate))


class Counter:
    """Collects the kinds an EstHandler counts."""

    def __init__(self) -> None:
        self.kinds: list[str] = []

    def __call__(self, kind: str) -> None:
        self.kinds.append(kind)


def setup(
    *, approval: bool = False, peer: bytes | None = None, **options: Any
) -> tuple[FakeService, EstHandler, EstClient, Counter]:
    service = FakeService(approval=approval)
    counter = Counter()
    handler = EstHandler(service, count=counter, **options)
    return service, handler, EstClient(handler_exchange(handler, peer)), counter


T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def post(
    path: str = "/.well-known/est/simpleenroll",
    body: bytes | None = None,
    *,
    content_type: str = PKCS10,
    user: tuple[str, str] | None = ("alice", PASSWORDS["alice"]),
    method: str = "POST",
    peer: bytes | None = None,
) -> HttpRequest:
    """A raw request as the HTTP stack would hand it over."""
    headers = {"content-type": content_type}
    if user is not None:
        headers["authorization"] = basic_authorization(*user)
    payload = encode_base64(request_for("alice")) if body is None else body
    return HttpRequest(method, path, "", headers, payload, peer)


# ---------------------------------------------------------------- codec


def test_base64_accepts_line_breaks_and_spaces() -> None:
    """RFC 8951: decoders accept base64 folded into lines, CRLF or LF."""
    data = bytes(range(256))
    folded = base64.encodebytes(data).replace(b"\n", b"\r\n") + b"  \n"
    assert decode_base64(folded) == data
    assert decode_base64(encode_base64(data)) == data


@pytest.mark.parametrize(
    "body", [b"", b"  \r\n", b"QQ", b"QR==", b"QQ==QQ==", b"QU*D", b"=QQ=", "é".encode()]
)
def test_base64_refuses_anything_else(body: bytes) -> None:
    """Missing padding, non-zero trailing bits, stray characters or an empty body: Base64Error."""
    with pytest.raises(Base64Error):
        decode_base64(body)


@pytest.mark.server
def test_certs_only_is_read_by_cryptography_openssl_and_pyasn1() -> None:
    """Our degenerate PKCS #7 is what cryptography, OpenSSL and pyasn1-modules read."""
    leaf = der(issued_for("alice"))
    message = encode_certs_only([der(CA_CERT), leaf])
    loaded = pkcs7.load_der_pkcs7_certificates(message)
    assert sorted(der(c) for c in loaded) == sorted([der(CA_CERT), leaf])
    content_info, rest = der_decoder.decode(message, asn1Spec=rfc2315.ContentInfo())
    assert rest == b""
    assert content_info["contentType"] == rfc2315.signedData
    printed = tool("openssl", "pkcs7", "-inform", "DER", "-print_certs", "-noout", data=message)
    assert printed.count(b"subject=") == 2


def test_certs_only_round_trip_and_cryptography_output() -> None:
    """decode reads our encoding and cryptography's serializer alike."""
    certificates = (der(CA_CERT), der(issued_for("bob")))
    assert sorted(decode_certs_only(encode_certs_only(certificates))) == sorted(certificates)
    theirs = pkcs7.serialize_certificates([CA_CERT], serialization.Encoding.DER)
    assert decode_certs_only(theirs) == (der(CA_CERT),)


def signed_data(
    *,
    version: bytes = b"\x02\x01\x01",
    content: bytes = _der.encode_tlv(_der.SEQUENCE, _der.encode_oid("1.2.840.113549.1.7.1")),
    certificates: bytes | None = None,
    signers: bytes = b"\x31\x00",
) -> bytes:
    """A ContentInfo/SignedData put together by hand, to vary one part at a time."""
    if certificates is None:
        certificates = _der.encode_tlv(0xA0, der(CA_CERT))
    inner = version + b"\x31\x00" + content + certificates + signers
    return _der.encode_tlv(
        _der.SEQUENCE,
        _der.encode_oid("1.2.840.113549.1.7.2")
        + _der.encode_tlv(0xA0, _der.encode_tlv(_der.SEQUENCE, inner)),
    )


def test_signed_data_helper_matches_the_encoder() -> None:
    """The hand-built message with default parts is byte for byte what the encoder makes."""
    assert signed_data() == encode_certs_only([der(CA_CERT)])


@pytest.mark.parametrize(
    "message",
    [
        signed_data() + b"\x00",
        signed_data(version=b"\x02\x01\x03"),
        signed_data(signers=b"\x31\x02\x05\x00"),
        signed_data(certificates=b""),
        signed_data(certificates=_der.encode_tlv(0xA0, b"\xa1\x00")),
        signed_data(
            content=_der.encode_tlv(
                _der.SEQUENCE,
                _der.encode_oid("1.2.840.113549.1.7.1") + b"\xa0\x02\x04\x00",
            )
        ),
        signed_data(certificates=_der.encode_tlv(0xA0, der(CA_CERT)[:-1] + b"\x00\x00")),
    ],
    ids=["trailing", "version", "signers", "no-certs", "attr-cert", "content", "bad-cert"],
)
def test_certs_only_strict(message: bytes) -> None:
    """Trailing bytes, another version, signers, content, no or odd certificates: refused."""
    with pytest.raises(MalformedDerError):
        decode_certs_only(message)


def chain() -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    """Root, intermediate and leaf from vector keys."""
    middle_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EST intermediate")])
    middle_key = ec_key("p256-3")
    middle = make_certificate(middle_name, middle_key.public_key(), ROOT_NAME, CA_KEY, 2, ca=True)
    leaf_key = ec_key("p256-5").public_key()
    leaf = make_certificate(
        x509.Name.from_rfc4514_string(USERS["alice"].dn.text), leaf_key, middle_name, middle_key, 3
    )
    return CA_CERT, middle, leaf


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0), (2, 0, 1)])
def test_order_chain_puts_the_root_first(order: tuple[int, int, int]) -> None:
    """Whatever order a server sends, the chain comes back root, intermediate, leaf."""
    certificates = [der(c) for c in chain()]
    shuffled = [certificates[i] for i in order]
    assert order_chain(shuffled) == tuple(certificates)


def test_issued_certificate_is_the_leaf_of_a_chain_answer() -> None:
    """An enrollment answer that carries the chain too yields the end-entity certificate."""
    root, middle, leaf = (der(c) for c in chain())
    assert issued_certificate([root, leaf, middle]) == leaf
    assert issued_certificate([leaf]) == leaf


def test_certificate_names() -> None:
    """Issuer and subject are sliced as the DER Names cryptography reports."""
    _, middle, leaf = chain()
    issuer, subject = certificate_names(der(leaf))
    assert issuer == middle.subject.public_bytes()
    assert subject == leaf.subject.public_bytes()


def test_csrattrs_reads_the_rfc7030_example() -> None:
    """RFC 7030 A.4's CSR attributes decode to two OIDs and two attributes, and re-encode."""
    attributes = decode_csrattrs(base64.b64decode(RFC7030_CSRATTRS))
    assert attributes == (
        CsrAttribute("1.2.840.113549.1.9.7"),
        CsrAttribute("1.2.840.10045.2.1", (bytes.fromhex("06052b81040022"),)),
        CsrAttribute("1.2.840.113549.1.9.14", (bytes.fromhex("06072b060101010116"),)),
        CsrAttribute("1.2.840.10045.4.3.3"),
    )
    assert encode_base64(encode_csrattrs(attributes)).decode() == RFC7030_CSRATTRS


@pytest.mark.parametrize(
    "der_hex",
    ["3003020101", "30053003060100", "3009300706032a03043100", "30020600", "300206"],
)
def test_csrattrs_strict(der_hex: str) -> None:
    """A non-OID choice, an attribute without values, a bad OID or truncation: refused."""
    with pytest.raises(MalformedDerError):
        decode_csrattrs(bytes.fromhex(der_hex))


def test_retry_after_seconds_and_http_date() -> None:
    """Retry-After is delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("3", now) == 3.0
    assert parse_retry_after(" 0.25 ", now) == 0.25
    later = format_datetime(datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC), usegmt=True)
    assert parse_retry_after(later, now) == 30.0
    assert parse_retry_after("Wed, 31 Dec 2025 12:00:00 GMT", now) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-1", "1e3"])
def test_retry_after_bad_values(value: str | None) -> None:
    """A 202 without a usable Retry-After is a malformed answer."""
    with pytest.raises(MalformedAnswerError):
        parse_retry_after(value, 0.0)


def test_basic_credentials() -> None:
    """Basic credentials split at the first colon; other schemes and garbage give None."""
    assert basic_credentials({"authorization": basic_authorization("alice", "a:b")}) == (
        "alice",
        "a:b",
    )
    assert basic_credentials({}) is None
    assert basic_credentials({"authorization": "Bearer abc"}) is None
    assert basic_credentials({"authorization": "Basic !!!"}) is None
    assert (
        basic_credentials({"authorization": "Basic " + encode_base64(b"nocolon").decode()}) is None
    )


def test_media_type() -> None:
    """Content types compare case-insensitively, parameters apart."""
    assert media_type('Application/PKCS7-MIME; smime-type="certs-only"') == (
        "application/pkcs7-mime",
        {"smime-type": "certs-only"},
    )


def test_transaction_id_is_the_request_hash() -> None:
    """The transaction ID is 'est:' and the SHA-256 of the request DER."""
    request = request_for("alice")
    assert transaction_id(request) == "est:" + hashlib.sha256(request).hexdigest()


# ---------------------------------------------------------------- client against handler


def issued_for(user_id: str, key_name: str = "p256-4", serial: int = 7) -> x509.Certificate:
    """A certificate our test CA issued for a user's DN and a vector key."""
    key = ec_key(key_name).public_key()
    return make_certificate(
        x509.Name.from_rfc4514_string(USERS[user_id].dn.text), key, ROOT_NAME, CA_KEY, serial
    )


def test_cacerts() -> None:
    """GET cacerts gives the CA certificates, as DER."""
    _, _, client, counter = setup()
    assert run(client.ca_certificates()) == (der(CA_CERT),)
    assert counter.kinds == []


def test_enrollment_issued() -> None:
    """simpleenroll with the right password returns the certificate for the device's key."""
    service, _, client, counter = setup()
    credentials = device("alice")
    prepared = client.prepare(credentials, service.ca_certificates)
    ticket = run(client.submit(credentials, prepared))
    assert isinstance(ticket, Ticket)
    assert ticket.status is TicketStatus.ISSUED
    certificate = x509.load_der_x509_certificate(ticket.certificate)
    assert certificate.public_key() == ec_key("p256-4").public_key()
    assert ticket.transaction_id == transaction_id(credentials.request_der)
    assert counter.kinds == []


def test_pending_then_issued_after_poll() -> None:
    """202 with Retry-After is PENDING (2.5 s rounds up to 3); a poll after approval issues."""
    service, _, client, _ = setup(approval=True)
    credentials = device("alice")
    prepared = client.prepare(credentials, ())
    first = run(client.submit(credentials, prepared))
    assert isinstance(first, Ticket)
    assert (first.status, first.retry_after) == (TicketStatus.PENDING, 3.0)
    again = run(client.poll(credentials, prepared, first))
    assert isinstance(again, Ticket)
    assert again.status is TicketStatus.PENDING
    service.approve(first.transaction_id)
    final = run(client.poll(credentials, prepared, first))
    assert isinstance(final, Ticket)
    assert final.status is TicketStatus.ISSUED
    assert service.submitted == [first.transaction_id] * 3


def test_pending_answer_has_retry_after_header() -> None:
    """The handler's 202 carries Retry-After in whole seconds, its default without a hint."""
    service, handler, _, _ = setup(approval=True, retry_after=4)
    request = post()
    answer = run(handler(request))
    assert isinstance(answer, HttpResponse)
    assert (answer.status, answer.header("retry-after")) == (202, "3")
    service.tickets = {k: v._replace(retry_after=0.0) for k, v in service.tickets.items()}
    answer = run(handler(request))
    assert isinstance(answer, HttpResponse)
    assert answer.header("Retry-After") == "4"


def test_poll_limit() -> None:
    """A request still pending after poll_limit polls ends with PollLimitError."""
    service = FakeService(approval=True)
    client = EstClient(handler_exchange(EstHandler(service)), poll_limit=1)
    credentials = device("alice")
    first = run(client.submit(credentials, client.prepare(credentials, ())))
    assert isinstance(first, Ticket)
    run(client.poll(credentials, None, first))
    with pytest.raises(PollLimitError):
        run(client.poll(credentials, None, first))


def test_wrong_password_is_401_and_rejected() -> None:
    """A wrong password answers 401 with a Basic challenge; the client sees REJECTED."""
    _, handler, client, counter = setup()
    answer = run(handler(post(user=("alice", "wrong"))))
    assert isinstance(answer, HttpResponse)
    assert (answer.status, answer.header("WWW-Authenticate")) == (401, REALM)
    assert b"wrong" not in answer.body
    ticket = run(client.submit(device("alice", password="wrong"), None))
    assert isinstance(ticket, Ticket)
    assert (ticket.status, ticket.error) == (TicketStatus.REJECTED, "ProtocolRefusedError")
    assert "401" in ticket.detail
    assert counter.kinds == ["wrong-credentials", "wrong-credentials"]


def test_unknown_user_is_401() -> None:
    """An unknown user gets the same 401 as a wrong password."""
    _, handler, _, counter = setup()
    answer = run(handler(post(user=("mallory", "x"))))
    assert isinstance(answer, HttpResponse)
    assert answer.status == 401
    assert counter.kinds == ["wrong-credentials"]


def test_policy_rejection_is_403() -> None:
    """A request for another user's DN is refused with 403 and a short reason."""
    _, _, client, counter = setup()
    ticket = run(client.submit(device("bob", request_der=request_for("alice")), None))
    assert isinstance(ticket, Ticket)
    assert ticket.status is TicketStatus.REJECTED
    assert "403" in ticket.detail
    assert "SubjectMismatchError" in ticket.detail
    assert counter.kinds == ["rejected"]


@pytest.mark.parametrize(
    ("request_", "status", "kind"),
    [
        (post(user=None), 401, "no-credentials"),
        (post(body=b"not base64!"), 400, "bad-base64"),
        (post(content_type="application/octet-stream"), 415, "unsupported-media-type"),
        (post(body=encode_base64(b"\x30\x03\x02\x01\x00")), 400, "malformed-request"),
        (post("/.well-known/est/serverkeygen"), 404, "not-found"),
        (post("/.well-known/est/nolabel/simpleenroll"), 404, "not-found"),
        (post("/elsewhere/simpleenroll"), 404, "not-found"),
        (post(method="GET"), 405, "method-not-allowed"),
        (post("/.well-known/est/cacerts"), 405, "method-not-allowed"),
        (post("/.well-known/est/simplereenroll"), 403, "no-client-certificate"),
    ],
    ids=[
        "no-auth",
        "base64",
        "type",
        "garbage-der",
        "op",
        "label",
        "prefix",
        "get",
        "post-cacerts",
        "reenroll-no-cert",
    ],
)
def test_bad_requests(request_: HttpRequest, status: int, kind: str) -> None:
    """Each bad request gets its status, a text reason and exactly one count of its kind."""
    _, handler, _, counter = setup()
    answer = run(handler(request_))
    assert isinstance(answer, HttpResponse)
    assert answer.status == status
    assert answer.content_type.startswith("text/plain")
    assert counter.kinds == [kind]


def test_wrong_method_names_the_allowed_one() -> None:
    """405 carries Allow."""
    _, handler, _, _ = setup()
    answer = run(handler(post(method="GET")))
    assert isinstance(answer, HttpResponse)
    assert answer.header("Allow") == "POST"


def test_label() -> None:
    """A configured label routes to the same service (/.well-known/est/LABEL/simpleenroll)."""
    service = FakeService()
    handler = EstHandler(service, labels=("p256",))
    client = EstClient(handler_exchange(handler), label="p256")
    ticket = run(client.submit(device("alice"), None))
    assert isinstance(ticket, Ticket)
    assert ticket.status is TicketStatus.ISSUED


def test_repeated_request_is_the_same_transaction() -> None:
    """Sending the same request again reaches the same transaction and its certificate."""
    service, _, client, _ = setup()
    credentials = device("alice")
    first = run(client.submit(credentials, None))
    second = run(client.submit(credentials, client.prepare(credentials, ())))
    assert isinstance(first, Ticket)
    assert isinstance(second, Ticket)
    assert first == second
    assert len(set(service.submitted)) == 1
    assert len(service.submitted) == 2


def test_client_statuses_and_malformed_answers() -> None:
    """Other statuses raise HttpStatusError; bad content types or bodies MalformedAnswerError."""
    good = encode_base64(encode_certs_only([der(CA_CERT)]))
    cases: list[tuple[HttpResponse, type[EnrollmentError]]] = [
        (HttpResponse(500, "text/plain", b"boom"), HttpStatusError),
        (HttpResponse(200, "text/html", good), MalformedAnswerError),
        (
            HttpResponse(200, "application/pkcs7-mime; smime-type=signed-data", good),
            MalformedAnswerError,
        ),
        (HttpResponse(200, CERTS_ONLY, b"%%%"), MalformedAnswerError),
        (HttpResponse(200, CERTS_ONLY, encode_base64(b"\x30\x00")), MalformedAnswerError),
        (HttpResponse(202), MalformedAnswerError),
    ]
    for answer, error in cases:

        async def exchange(*_: object, answer: HttpResponse = answer) -> HttpResponse:
            return answer

        client = EstClient(exchange)
        with pytest.raises(error):
            run(client.submit(device("alice"), None))


def test_client_ignores_content_transfer_encoding_and_reads_folded_base64() -> None:
    """RFC 8951: a Content-Transfer-Encoding header changes nothing; folded base64 is read."""
    folded = base64.encodebytes(encode_certs_only([der(CA_CERT)]))

    async def exchange(*_: object) -> HttpResponse:
        return HttpResponse(200, CERTS_ONLY, folded, (("Content-Transfer-Encoding", "base64"),))

    assert run(EstClient(exchange).ca_certificates()) == (der(CA_CERT),)


def test_csrattrs() -> None:
    """csrattrs: 204 when nothing is asked, the configured attributes otherwise."""
    _, _, client, _ = setup()
    assert run(client.csr_attributes()) == ()
    wanted = decode_csrattrs(base64.b64decode(RFC7030_CSRATTRS))
    _, _, client, _ = setup(csr_attributes=wanted)
    assert run(client.csr_attributes()) == wanted


def test_handler_never_raises_on_service_errors() -> None:
    """A service that breaks answers 500 and counts it; nothing escapes the handler."""

    class Broken(FakeService):
        async def authenticate(self, user_id: str, password: str) -> User:
            raise RuntimeError("database gone")

    counter = Counter()
    answer = run(EstHandler(Broken(), count=counter)(post()))
    assert isinstance(answer, HttpResponse)
    assert answer.status == 500
    assert b"database" not in answer.body
    assert counter.kinds == ["internal-error"]


# ---------------------------------------------------------------- re-enrollment


def reenroll(peer: bytes, request: bytes, **options: Any) -> tuple[Ticket, Counter]:
    _, _, client, counter = setup(peer=peer, **options)
    return run(client.reenroll(device("alice", request_der=request), None)), counter


def test_reenroll_with_a_certificate_we_issued() -> None:
    """simplereenroll with our certificate and the same subject (new key) is issued."""
    ticket, counter = reenroll(der(issued_for("alice")), request_for("alice", "p256-5"))
    assert isinstance(ticket, Ticket)
    assert ticket.status is TicketStatus.ISSUED
    assert x509.load_der_x509_certificate(ticket.certificate).public_key() == (
        ec_key("p256-5").public_key()
    )
    assert counter.kinds == []


def test_reenroll_refuses_a_foreign_certificate() -> None:
    """A certificate from another CA with our CA's very name is refused (signature checked)."""
    key = ec_key("p256-4").public_key()
    subject = x509.Name.from_rfc4514_string(USERS["alice"].dn.text)
    foreign = make_certificate(subject, key, ROOT_NAME, FOREIGN_KEY, 9)
    ticket, counter = reenroll(der(foreign), request_for("alice", "p256-5"))
    assert isinstance(ticket, Ticket)
    assert ticket.status is TicketStatus.REJECTED
    assert "403" in ticket.detail
    assert counter.kinds == ["bad-client-certificate"]


def test_reenroll_refuses_a_changed_subject() -> None:
    """RFC 7030 4.2.2: the new request keeps the certificate's subject."""
    ticket, counter = reenroll(der(issued_for("alice")), request_for("bob", "p256-5"))
    assert isinstance(ticket, Ticket)
    assert ticket.status is TicketStatus.REJECTED
    assert counter.kinds == ["subject-changed"]


def test_reenroll_refuses_changed_alternative_names() -> None:
    """A request naming other alternative names than the certificate's is refused."""
    names = x509.SubjectAlternativeName([x509.RFC822Name("alice@example.com")])
    other = x509.SubjectAlternativeName([x509.RFC822Name("root@example.com")])
    key = ec_key("p256-4").public_key()
    subject = x509.Name.from_rfc4514_string(USERS["alice"].dn.text)
    held = der(make_certificate(subject, key, ROOT_NAME, CA_KEY, 11, san=names))
    same, _ = reenroll(held, request_for("alice", "p256-5", san=names))
    changed, counter = reenroll(held, request_for("alice", "p256-5", san=other))
    assert isinstance(same, Ticket)
    assert isinstance(changed, Ticket)
    assert (same.status, changed.status) == (TicketStatus.ISSUED, TicketStatus.REJECTED)
    assert counter.kinds == ["subject-changed"]


def test_reenroll_refuses_an_expired_certificate() -> None:
    """A certificate that is not valid now does not authenticate."""
    later = datetime(2101, 1, 1, tzinfo=UTC).timestamp()
    ticket, counter = reenroll(
        der(issued_for("alice")), request_for("alice", "p256-5"), clock=lambda: later
    )
    assert isinstance(ticket, Ticket)
    assert ticket.status is TicketStatus.REJECTED
    assert counter.kinds == ["bad-client-certificate"]


def test_reenroll_refuses_garbage_as_a_certificate() -> None:
    """Bytes that are not a certificate are a refused client certificate, not a crash."""
    ticket, counter = reenroll(b"\x30\x03\x02\x01\x00", request_for("alice", "p256-5"))
    assert isinstance(ticket, Ticket)
    assert counter.kinds == ["bad-client-certificate"]


# ---------------------------------------------------------------- Hypothesis


@given(st.binary(max_size=300))
def test_decode_base64_only_typed_errors(body: bytes) -> None:
    """Any bytes decode or raise Base64Error."""
    try:
        decoded = decode_base64(body)
    except Base64Error:
        return
    assert encode_base64(decoded) == body.translate(None, b" \t\r\n")


GOOD_MESSAGE = encode_certs_only([der(CA_CERT)])


@given(st.binary(max_size=400))
def test_decode_certs_only_random_bytes(data: bytes) -> None:
    """Random bytes decode or raise MalformedDerError, nothing else."""
    with contextlib.suppress(MalformedDerError):
        decode_certs_only(data)


@given(st.integers(0, len(GOOD_MESSAGE) - 1), st.integers(0, 255), st.integers(0, 40))
def test_decode_certs_only_mutations(index: int, value: int, cut: int) -> None:
    """A valid message with one byte changed and its tail cut: certificates or MalformedDerError."""
    data = bytearray(GOOD_MESSAGE)
    data[index] = value
    try:
        certificates = decode_certs_only(bytes(data[: len(data) - cut]))
    except MalformedDerError:
        return
    assert all(certificate_names(c) for c in certificates)


@given(st.binary(max_size=200))
def test_decode_csrattrs_random_bytes(data: bytes) -> None:
    """Random bytes decode or raise MalformedDerError."""
    with contextlib.suppress(MalformedDerError):
        decode_csrattrs(data)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["GET", "POST", "PUT", ""]),
    st.sampled_from(["/.well-known/est/simpleenroll", "/.well-known/est/cacerts",
                     "/.well-known/est/simplereenroll", "/.well-known/est/x/csrattrs", "/", ""]),
    st.dictionaries(st.sampled_from(["content-type", "authorization"]), st.text(max_size=40)),
    st.binary(max_size=200),
    st.one_of(st.none(), st.binary(max_size=50)),
)  # fmt: skip
def test_handler_never_raises(
    method: str, path: str, headers: dict[str, str], body: bytes, peer: bytes | None
) -> None:
    """Whatever a client sends, the handler answers with a status (never an exception), and
    counts each error answer exactly once."""
    counter = Counter()
    handler = EstHandler(FakeService(), count=counter)
    answer = asyncio.run(handler(HttpRequest(method, path, "", headers, body, peer)))
    assert answer.status in {200, 204, 400, 401, 403, 404, 405, 415}
    assert len(counter.kinds) == (1 if answer.status >= 400 else 0)


# ---------------------------------------------------------------- curl and openssl as the client


def listening_socket() -> socket.socket:
    """A loopback socket bound to a free port, listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def curl_against(
    handler: Handler, *arguments: str, output: Path | None = None
) -> tuple[str, bytes]:
    """Serve `handler` on loopback and run curl with `arguments` ("URL" becomes the server's
    address), the body saved to `output`; return curl's HTTP status and the headers."""
    curl = require_tool("curl")
    body = str(output or "/dev/null")

    async def scenario() -> tuple[str, bytes]:
        sock = listening_socket()
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = await HttpServer.start(handler, sock)
        try:
            command = [a.replace("URL", base) for a in arguments]
            process = await asyncio.create_subprocess_exec(
                curl, "-sS", "-D", "-", "-o", body, "-w", "\n%{http_code}", *command,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            printed, _ = await asyncio.wait_for(process.communicate(), 30)
        finally:
            await server.stop(grace=1.0)
        headers, _, status = printed.rpartition(b"\n")
        return status.decode(), headers

    return run(scenario())


def tool(*command: str, data: bytes | None = None) -> bytes:
    """Run a command-line tool (found with require_tool) and return its output."""
    path = require_tool(command[0])
    done = subprocess.run([path, *command[1:]], input=data, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


@pytest.mark.server
def test_curl_and_openssl_enroll(tmp_path: Path) -> None:
    """openssl req + curl (base64 body, Basic auth) enroll; the answer decodes with base64 -d
    and openssl pkcs7, and openssl verify accepts it against the CA."""
    csr = tmp_path / "csr.der"
    tool("openssl", "req", "-new", "-key", str(VECTORS / "p256-4.pem"),
         "-subj", "/O=enrollbench/CN=alice", "-outform", "DER", "-out", str(csr))  # fmt: skip
    (tmp_path / "csr.b64").write_bytes(tool("base64", str(csr)))  # folded at 76 columns
    (tmp_path / "ca.pem").write_bytes(CA_CERT.public_bytes(serialization.Encoding.PEM))
    service, counter = FakeService(), Counter()
    answer = tmp_path / "answer.b64"
    status, _ = curl_against(
        EstHandler(service, count=counter),
        "--data-binary", f"@{tmp_path / 'csr.b64'}", "-H", "Content-Type: application/pkcs10",
        "-u", f"alice:{PASSWORDS['alice']}", "URL/.well-known/est/simpleenroll", output=answer,
    )  # fmt: skip
    assert (status, counter.kinds) == ("200", [])
    pkcs7_der = tool("base64", "-d", data=answer.read_bytes())
    (tmp_path / "cert.pem").write_bytes(
        tool("openssl", "pkcs7", "-inform", "DER", "-print_certs", data=pkcs7_der)
    )
    verified = tool("openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"),
                    str(tmp_path / "cert.pem"))  # fmt: skip
    assert verified.strip().endswith(b": OK")
    certificate = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    assert certificate.public_key() == ec_key("p256-4").public_key()


@pytest.mark.server
def test_curl_without_credentials_gets_a_basic_challenge(tmp_path: Path) -> None:
    """curl without -u is answered 401 with WWW-Authenticate: Basic realm="enrollbench"."""
    body = tmp_path / "csr.b64"
    body.write_bytes(encode_base64(request_for("alice")))
    counter = Counter()
    status, headers = curl_against(
        EstHandler(FakeService(), count=counter),
        "--data-binary", f"@{body}", "-H", "Content-Type: application/pkcs10",
        "URL/.well-known/est/simpleenroll",
    )  # fmt: skip
    assert status == "401"
    assert b'www-authenticate: basic realm="enrollbench"' in headers.lower()
    assert counter.kinds == ["no-credentials"]


@pytest.mark.server
def test_curl_cacerts_reads_with_openssl_pkcs7(tmp_path: Path) -> None:
    """curl GET cacerts | base64 -d | openssl pkcs7 -print_certs gives the CA certificate."""
    answer = tmp_path / "cacerts.b64"
    status, headers = curl_against(
        EstHandler(FakeService()), "URL/.well-known/est/cacerts", output=answer
    )
    assert status == "200"
    assert b"content-type: application/pkcs7-mime; smime-type=certs-only" in headers.lower()
    printed = tool(
        "openssl", "pkcs7", "-inform", "DER", "-print_certs",
        data=tool("base64", "-d", data=answer.read_bytes()),
    )  # fmt: skip
    assert x509.load_pem_x509_certificates(printed) == [CA_CERT]


# ---------------------------------------------------------------- against engine.service


def shared_service(tmp_path: Path, **config: Any) -> SharedCAService:
    """The real CA service over a fresh store with three seeded users (fixed CA vectors)."""
    path = tmp_path / "state.sqlite"
    seed_users(path, [directory_entry(simulated_enrollee(i, SEED), SEED, 1) for i in range(3)])
    engine_config = EngineConfig(auth_iterations=1, **config)
    return SharedCAService(engine_config, ca_material(engine_config), path, manual=True)


def service_request(user: User, vector: str = "p256-4") -> bytes:
    """The engine's own request template for a user, signed by a vector key."""
    content = RequestContent(user.dn, user.email, user.upn)
    return RequestTemplate(key_spec("p256").family).build(
        Signer(vector_key(vector), "sha256"), content
    )


def test_against_the_shared_service(tmp_path: Path) -> None:
    """EstClient -> EstHandler -> SharedCAService: chain root first, issued, verifying."""
    service = shared_service(tmp_path, ca_intermediates=1)
    try:
        client = EstClient(handler_exchange(EstHandler(service)))
        chain = run(client.ca_certificates())
        assert chain == service.ca_certificates
        enrollee = simulated_enrollee(1, SEED)
        credentials = DeviceCredentials(
            "d1", enrollee.user.user_id, enrollee.password, None, service_request(enrollee.user)
        )
        ticket = run(client.submit(credentials, client.prepare(credentials, chain)))
        assert ticket.status is TicketStatus.ISSUED
        issued = x509.load_der_x509_certificate(ticket.certificate)
        issued.verify_directly_issued_by(x509.load_der_x509_certificate(chain[-1]))
        assert issued.public_key() == ec_key("p256-4").public_key()
    finally:
        service.close()


def test_shared_service_wrong_password_and_garbage(tmp_path: Path) -> None:
    """The real service's refusals come out as 401 and 400."""
    service = shared_service(tmp_path)
    try:
        counter = Counter()
        handler = EstHandler(service, count=counter)
        user_id = simulated_enrollee(1, SEED).user.user_id
        wrong = run(handler(post(user=(user_id, "wrong"))))
        password = simulated_enrollee(1, SEED).password
        garbage = run(
            handler(post(body=encode_base64(b"\x30\x03\x02\x01\x00"), user=(user_id, password)))
        )
        assert (wrong.status, garbage.status) == (401, 400)
        assert counter.kinds == ["wrong-credentials", "malformed-request"]
    finally:
        service.close()


def test_shared_service_manual_approval_over_est(tmp_path: Path) -> None:
    """Pending over EST (202) until an administrator decides; the resent request is issued."""
    approval = ApprovalPolicy(1, Distribution("fixed", mean=0.0), 1.0)
    service = shared_service(tmp_path, approval=approval)
    try:
        client = EstClient(handler_exchange(EstHandler(service)))
        enrollee = simulated_enrollee(2, SEED)
        credentials = DeviceCredentials(
            "d2", enrollee.user.user_id, enrollee.password, None, service_request(enrollee.user)
        )
        prepared = client.prepare(credentials, ())
        first = run(client.submit(credentials, prepared))
        assert first.status is TicketStatus.PENDING
        assert first.retry_after >= 1.0
        assert service.decide(first.transaction_id, approve=True)
        final = run(client.poll(credentials, prepared, first))
        assert final.status is TicketStatus.ISSUED
    finally:
        service.close()


def test_shared_service_reenroll(tmp_path: Path) -> None:
    """A certificate the real service issued authenticates simplereenroll for a new key."""
    service = shared_service(tmp_path)
    try:
        enrollee = simulated_enrollee(1, SEED)
        first = DeviceCredentials(
            "d1", enrollee.user.user_id, enrollee.password, None, service_request(enrollee.user)
        )
        handler = EstHandler(service)
        issued = run(EstClient(handler_exchange(handler)).submit(first, None))
        assert issued.status is TicketStatus.ISSUED
        renewing = EstClient(handler_exchange(handler, issued.certificate))
        second = first._replace(request_der=service_request(enrollee.user, "p256-5"))
        renewed = run(renewing.reenroll(second, None))
        assert renewed.status is TicketStatus.ISSUED
        assert x509.load_der_x509_certificate(renewed.certificate).public_key() == (
            ec_key("p256-5").public_key()
        )
    finally:
        service.close()


# ---------------------------------------------------------------- over engine.wire.http


def tls_contexts(tmp_path: Path, client_certificate: bytes | None) -> tuple[ssl.SSLContext, ...]:
    """Server (TLS 1.3, client certificate asked for, as `serve` does) and client contexts;
    the client shows `client_certificate` with the p256-4 device key when given one."""
    server_key = ec_key("p256-3")
    localhost = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    server = make_certificate(
        server_name, server_key.public_key(), ROOT_NAME, CA_KEY, 50, san=localhost
    )
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(CA_CERT.public_bytes(pem))
    (tmp_path / "server.pem").write_bytes(server.public_bytes(pem))
    (tmp_path / "server.key").write_bytes((VECTORS / "p256-3.pem").read_bytes())
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.minimum_version = ssl.TLSVersion.TLSv1_3
    server_context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    server_context.verify_mode = ssl.CERT_OPTIONAL
    server_context.load_verify_locations(tmp_path / "ca.pem")
    client_context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    if client_certificate is not None:
        certificate = x509.load_der_x509_certificate(client_certificate)
        (tmp_path / "client.pem").write_bytes(certificate.public_bytes(pem))
        client_context.load_cert_chain(tmp_path / "client.pem", VECTORS / "p256-4.pem")
    return server_context, client_context


def over_loopback(
    handler: EstHandler,
    work: Callable[[EstClient], Coroutine[Any, Any, T]],
    contexts: tuple[ssl.SSLContext, ...] = (),
) -> T:
    """Serve `handler` with HttpServer on loopback and run `work` with an EstClient over an
    HttpClient (TLS when `contexts` are given)."""

    async def scenario() -> T:
        sock = listening_socket()
        port = sock.getsockname()[1]
        server_tls, client_tls = contexts or (None, None)
        server = await HttpServer.start(handler, sock, ssl=server_tls)
        http = HttpClient("127.0.0.1", port, ssl=client_tls)
        try:
            return await work(EstClient(http.request))
        finally:
            await http.close()
            await server.stop(grace=1.0)

    return run(scenario())


def test_enroll_over_loopback_http() -> None:
    """EstClient over HttpClient against EstHandler on HttpServer: chain, then a certificate."""
    credentials = device("alice")

    async def work(client: EstClient) -> tuple[tuple[bytes, ...], Ticket]:
        chain = await client.ca_certificates()
        return chain, await client.submit(credentials, client.prepare(credentials, chain))

    chain, ticket = over_loopback(EstHandler(FakeService()), work)
    assert chain == (der(CA_CERT),)
    assert ticket.status is TicketStatus.ISSUED


def test_reenroll_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    """Over TLS 1.3 the certificate the client shows reaches the handler, which renews it."""
    held = der(issued_for("alice"))
    credentials = device("alice", request_der=request_for("alice", "p256-5"))

    async def work(client: EstClient) -> Ticket:
        return await client.reenroll(credentials, None)

    counter = Counter()
    handler = EstHandler(FakeService(), count=counter)
    ticket = over_loopback(handler, work, tls_contexts(tmp_path, held))
    assert ticket.status is TicketStatus.ISSUED
    refused = over_loopback(handler, work, tls_contexts(tmp_path, None))
    assert (refused.status, counter.kinds) == (TicketStatus.REJECTED, ["no-client-certificate"])
