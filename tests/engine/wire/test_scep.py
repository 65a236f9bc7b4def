"""SCEP (RFC 8894): our client against our handler in process, and both against micromdm 2.1.0."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import AttributeOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder
from pyasn1_modules import rfc5652
from pytest_benchmark.fixture import BenchmarkFixture

from engine import _der
from engine.approval import ApprovalPolicy
from engine.certificate import certificate_spki
from engine.distribution import Distribution
from engine.errors import (
    AuthenticationError,
    HttpStatusError,
    MalformedAnswerError,
    UnknownUserError,
)
from engine.identity import DistinguishedName, User
from engine.keys import KeyFamily, Signer
from engine.population import directory_entry, simulated_enrollee
from engine.request import RequestContent, RequestTemplate
from engine.service import SharedCAService, seed_users
from engine.system import EngineConfig
from engine.wire import cms, scep
from engine.wire.http import HttpClient, HttpServer
from engine.wire.seam import DeviceCredentials, HttpRequest, HttpResponse, Ticket, TicketStatus
from tests.conftest import SEED, ca_material, require_tool, vector_key
from tests.engine.wire.test_cms import WIRE_VECTORS, ca_certificate, ca_der, mutated, wire_key

_START = datetime(2026, 1, 1, tzinfo=UTC)
_T = TypeVar("_T")
PASSWORD = "correct horse"


@pytest.fixture
def ra_certificate() -> bytes:
    """The RA certificate (see `ra_der`)."""
    return ra_der()


@cache
def ra_der() -> bytes:
    """An RSA RA certificate beside the P-256 CA: keyEncipherment, not a CA."""
    ca_key = vector_key("p256-1")
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test SCEP RA")]))
        .issuer_name(ca_certificate().subject)
        .public_key(wire_key("rsa2048-ra").public_key())
        .serial_number(20)
        .not_valid_before(_START)
        .not_valid_after(_START + timedelta(days=3650))
        .add_extension(usage, critical=True)
        .sign(ca_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


class FakeService:
    """A small CAService: users by CN, per-user policy (issue, pending, reject)."""

    def __init__(self, policy: dict[str, str]) -> None:
        self.policy = policy
        self.users = {
            name: User(name, DistinguishedName.from_text(f"CN={name}"), f"{name}@x.test", name)
            for name in policy
        }
        self.tickets: dict[str, Ticket] = {}
        self.requests: dict[str, bytes] = {}
        self.approved: set[str] = set()
        self.serial = 100

    @property
    def ca_certificates(self) -> tuple[bytes, ...]:
        return (ca_der(),)

    @property
    def chain_pkcs7(self) -> bytes:
        return cms.build_certificates_only(self.ca_certificates)

    async def authenticate(self, user_id: str, password: str) -> User:
        if user_id not in self.users or password != PASSWORD:
            raise AuthenticationError(user_id)
        return self.users[user_id]

    async def find_user(self, request_der: bytes) -> User:
        request = x509.load_der_x509_csr(request_der)
        names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
        if name not in self.users:
            raise UnknownUserError(name)
        return self.users[name]

    async def submit(self, transaction_id: str, request_der: bytes, user: User) -> Ticket:
        if transaction_id in self.tickets:
            return self.tickets[transaction_id]
        self.requests[transaction_id] = request_der
        rule = self.policy[user.user_id]
        if rule == "reject":
            ticket = Ticket(transaction_id, TicketStatus.REJECTED, error="ApprovalDeniedError")
        elif rule == "pending" and transaction_id not in self.approved:
            ticket = Ticket(transaction_id, TicketStatus.PENDING, retry_after=1.0)
        else:
            ticket = self._issue(transaction_id, request_der)
        self.tickets[transaction_id] = ticket
        return ticket

    async def poll(self, transaction_id: str) -> Ticket | None:
        ticket = self.tickets.get(transaction_id)
        pending = ticket is not None and ticket.status is TicketStatus.PENDING
        if pending and transaction_id in self.approved:
            ticket = self._issue(transaction_id, self.requests[transaction_id])
            self.tickets[transaction_id] = ticket
        return ticket

    def _issue(self, transaction_id: str, request_der: bytes) -> Ticket:
        request = x509.load_der_x509_csr(request_der)
        ca_key = vector_key("p256-1")
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        self.serial += 1
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(request.subject)
            .issuer_name(ca_certificate().subject)
            .public_key(request.public_key())
            .serial_number(self.serial)
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        der = certificate.public_bytes(serialization.Encoding.DER)
        return Ticket(transaction_id, TicketStatus.ISSUED, certificate=der)


def csr(key_name: str, common_name: str, challenge: str | None = PASSWORD) -> bytes:
    """A PKCS #10 request for a fixed RSA key with a challengePassword."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    if challenge is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    request = builder.sign(wire_key(key_name), hashes.SHA256())
    return request.public_bytes(serialization.Encoding.DER)


def credentials(
    key_name: str, common_name: str, challenge: str | None = PASSWORD
) -> DeviceCredentials:
    return DeviceCredentials(
        f"device-{common_name}", common_name, PASSWORD, wire_key(key_name),
        csr(key_name, common_name, challenge),
    )  # fmt: skip


Exchange = Callable[..., Awaitable[HttpResponse]]


def in_process(handler: scep.ScepHandler) -> Exchange:
    """An exchange that calls the handler directly (no sockets)."""

    async def exchange(
        method: str,
        target: str,
        headers: tuple[tuple[str, str], ...] = (),
        body: bytes = b"",
        phases: object = None,
    ) -> HttpResponse:
        path, _, query = target.partition("?")
        request = HttpRequest(method, path, query, {k.lower(): v for k, v in headers}, body)
        return await handler(request)

    return exchange


class Setup:
    """A fake service, our handler over it (counting), and a client talking to it."""

    def __init__(self, ra: bytes, policy: dict[str, str], **client: object) -> None:
        self.service = FakeService(policy)
        self.counted: list[str] = []
        self.handler = scep.ScepHandler(
            self.service, ra, wire_key("rsa2048-ra"), count=self.counted.append
        )
        self.exchange = in_process(self.handler)
        self.client = scep.ScepClient(self.exchange, **client)  # type: ignore[arg-type]

    async def enroll(self, device: DeviceCredentials) -> tuple[scep.PreparedRequest, Ticket]:
        ca = await self.client.ca_certificates()
        prepared = self.client.prepare(device, ca)
        return prepared, await self.client.submit(device, prepared)


def chains_to_ca(certificate: bytes) -> bool:
    """The certificate verifies as directly issued by the test CA."""
    x509.load_der_x509_certificate(certificate).verify_directly_issued_by(ca_certificate())
    return True


# ---- codec ----


def test_pki_message_round_trip(ra_certificate: bytes) -> None:
    """Every attribute we encode decodes back; the signature verifies with the RA."""
    signer = cms.CmsSigner(ra_certificate, wire_key("rsa2048-ra"))
    encoded = scep.encode_pki_message(
        scep.MessageType.CERT_REP, "tid-7", b"s" * 16, None, signer,
        recipient_nonce=b"r" * 16, status=scep.PkiStatus.FAILURE,
        fail_info=scep.FailInfo.BAD_CERT_ID,
    )  # fmt: skip
    message = scep.decode_pki_message(encoded)
    assert message[:7] == (3, "tid-7", b"s" * 16, b"r" * 16, scep.PkiStatus.FAILURE, 4, b"")
    assert cms.verify_signed_data(message.signed, [ra_certificate], use_included=False)


def test_pki_message_requires_scep_attributes(ra_certificate: bytes) -> None:
    """A SignedData without messageType is not a pkiMessage."""
    signer = cms.CmsSigner(ra_certificate, wire_key("rsa2048-ra"))
    with pytest.raises(scep.MalformedPkiMessageError, match="messageType"):
        scep.decode_pki_message(cms.build_signed_data(b"x", signer))


def test_issuer_and_subject_round_trip() -> None:
    """IssuerAndSubject encodes two Names and decodes them back."""
    issuer, subject = (
        DistinguishedName.from_text("CN=a").der,
        DistinguishedName.from_text("CN=b").der,
    )
    assert scep.decode_issuer_and_subject(scep.encode_issuer_and_subject(issuer, subject)) == (
        issuer,
        subject,
    )
    with pytest.raises(scep.MalformedPkiMessageError):
        scep.decode_issuer_and_subject(b"\x30\x00")


def test_challenge_password_is_read_from_the_request() -> None:
    """The challengePassword attribute comes out of the CSR; None when absent."""
    assert scep.challenge_password(csr("rsa2048-device-1", "alice")) == PASSWORD
    assert scep.challenge_password(csr("rsa2048-device-1", "alice", None)) is None


def test_recipient_is_the_ra_else_the_rsa_ca(ra_certificate: bytes) -> None:
    """The RA is picked over the CA; a lone RSA certificate is used; an EC-only list is refused."""
    assert scep.recipient_certificate((ca_der(), ra_certificate)) == ra_certificate
    other = x509.load_der_x509_certificate(ra_certificate)
    assert scep.recipient_certificate((ra_certificate,)) == other.public_bytes(
        serialization.Encoding.DER
    )
    with pytest.raises(MalformedAnswerError, match="no RSA certificate"):
        scep.recipient_certificate((ca_der(),))


def test_self_signed_certificate_verifies() -> None:
    """The device's signer certificate is self-signed with its key, for the request's subject."""
    request = x509.load_der_x509_csr(csr("rsa2048-device-1", "alice"))
    spki = request.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der = scep.self_signed_certificate(
        wire_key("rsa2048-device-1"), request.subject.public_bytes(), spki
    )
    certificate = x509.load_der_x509_certificate(der)
    certificate.verify_directly_issued_by(certificate)
    assert certificate.subject == request.subject


# ---- our client against our handler, in process ----


def test_get_ca_caps_and_ca_cert(ra_certificate: bytes) -> None:
    """GetCACaps lists what we offer; GetCACert is the CA hierarchy then the RA."""
    setup = Setup(ra_certificate, {})
    caps = asyncio.run(setup.client.capabilities())
    assert {"postpkioperation", "aes", "des3", "sha-256", "renewal", "scepstandard"} <= caps
    assert asyncio.run(setup.client.ca_certificates()) == (ca_der(), ra_certificate)


def test_issued(ra_certificate: bytes) -> None:
    """PKCSReq -> SUCCESS: the certificate is for our key and chains to the CA."""
    setup = Setup(ra_certificate, {"alice": "issue"})
    device = credentials("rsa2048-device-1", "alice")
    prepared, ticket = asyncio.run(setup.enroll(device))
    assert ticket.status is TicketStatus.ISSUED
    assert chains_to_ca(ticket.certificate)
    assert certificate_spki(ticket.certificate) == prepared.spki
    spki = prepared.spki
    assert ticket.transaction_id == hashlib.sha256(spki).hexdigest() == prepared.transaction_id
    assert "scep:" + prepared.transaction_id in setup.service.tickets
    assert prepared.cipher == "aes128"
    assert setup.counted == []


def test_pending_then_poll_then_issued(ra_certificate: bytes) -> None:
    """PENDING, CertPoll still PENDING, then SUCCESS once approved."""
    setup = Setup(ra_certificate, {"bob": "pending"}, poll_interval=2.5)
    device = credentials("rsa2048-device-2", "bob")

    async def run() -> list[Ticket]:
        prepared, first = await setup.enroll(device)
        second = await setup.client.poll(device, prepared, first)
        setup.service.approved.add("scep:" + prepared.transaction_id)
        third = await setup.client.poll(device, prepared, second)
        return [first, second, third]

    first, second, third = asyncio.run(run())
    assert first.status is second.status is TicketStatus.PENDING
    assert first.retry_after == 2.5
    assert third.status is TicketStatus.ISSUED
    assert chains_to_ca(third.certificate)


def test_rejected_is_failure_bad_request(ra_certificate: bytes) -> None:
    """A rejected ticket is CertRep FAILURE badRequest: REJECTED, ProtocolRefusedError."""
    setup = Setup(ra_certificate, {"carol": "reject"})
    _, ticket = asyncio.run(setup.enroll(credentials("rsa2048-device-3", "carol")))
    assert ticket.status is TicketStatus.REJECTED
    assert ticket.error == "ProtocolRefusedError"
    assert ticket.detail == "SCEP FAILURE: failInfo badRequest (2): ApprovalDeniedError"
    assert setup.counted == ["bad-request"]


def test_wrong_challenge_is_refused(ra_certificate: bytes) -> None:
    """A wrong challengePassword never reaches the CA: FAILURE badRequest."""
    setup = Setup(ra_certificate, {"alice": "issue"})
    _, ticket = asyncio.run(setup.enroll(credentials("rsa2048-device-1", "alice", "wrong")))
    assert ticket.status is TicketStatus.REJECTED
    assert ticket.detail.endswith("badRequest (2): AuthenticationError")  # failInfoText
    assert setup.service.tickets == {}
    assert setup.counted == ["bad-request"]


def test_missing_challenge_and_unknown_user_are_refused(ra_certificate: bytes) -> None:
    """No challengePassword, or a CN that is no user: FAILURE badRequest."""
    setup = Setup(ra_certificate, {"alice": "issue"})
    for device in (
        credentials("rsa2048-device-1", "alice", None),
        credentials("rsa2048-device-1", "mallory"),
    ):
        _, ticket = asyncio.run(setup.enroll(device))
        assert ticket.status is TicketStatus.REJECTED
    assert setup.counted == ["bad-request", "bad-request"]


def test_unknown_poll_is_bad_cert_id(ra_certificate: bytes) -> None:
    """CertPoll for a transaction the CA never saw: FAILURE badCertId."""
    setup = Setup(ra_certificate, {"alice": "issue"})
    device = credentials("rsa2048-device-1", "alice")

    async def run() -> Ticket:
        prepared = setup.client.prepare(device, await setup.client.ca_certificates())
        return await setup.client.poll(device, prepared, Ticket("", TicketStatus.PENDING))

    ticket = asyncio.run(run())
    assert ticket.status is TicketStatus.REJECTED
    assert "badCertId (4)" in ticket.detail
    assert setup.counted == ["bad-cert-id"]


def test_repeated_transaction_id_gets_the_current_state(ra_certificate: bytes) -> None:
    """The same PKCSReq sent again is answered with the transaction's certificate, not a new one."""
    setup = Setup(ra_certificate, {"alice": "issue"})
    device = credentials("rsa2048-device-1", "alice")

    async def run() -> tuple[Ticket, Ticket]:
        prepared, first = await setup.enroll(device)
        return first, await setup.client.submit(device, prepared)

    first, again = asyncio.run(run())
    assert again.status is TicketStatus.ISSUED
    assert again.certificate == first.certificate
    assert len(setup.service.tickets) == 1


def test_replayed_answer_is_detected_by_the_nonce(ra_certificate: bytes) -> None:
    """A CertRep for an earlier message of the same transaction fails the recipientNonce check."""
    setup = Setup(ra_certificate, {"bob": "pending"})
    device = credentials("rsa2048-device-2", "bob")
    answers: list[HttpResponse] = []

    async def replaying(method: str, target: str, *args: object) -> HttpResponse:
        answer = await setup.exchange(method, target, *args)
        if "PKIOperation" not in target:
            return answer
        answers.append(answer)
        return answers[0]  # always the first CertRep: a replay

    client = scep.ScepClient(replaying)

    async def run() -> None:
        prepared = client.prepare(device, await client.ca_certificates())
        first = await client.submit(device, prepared)
        assert first.status is TicketStatus.PENDING
        await client.poll(device, prepared, first)

    with pytest.raises(MalformedAnswerError, match="recipientNonce"):
        asyncio.run(run())


def test_answer_signed_by_someone_else_is_refused(ra_certificate: bytes) -> None:
    """A CertRep whose signer is not among the CA/RA certificates is a MalformedAnswerError."""
    setup = Setup(ra_certificate, {"alice": "issue"})
    device = credentials("rsa2048-device-1", "alice")

    async def run() -> None:
        ca = await setup.client.ca_certificates()
        prepared = setup.client.prepare(device, ca)
        await setup.client.submit(device, replace(prepared, trusted=(ca_der(),)))

    with pytest.raises(MalformedAnswerError, match="no certificate for the SignedData's signer"):
        asyncio.run(run())


def test_des_request_is_answered_with_des(ra_certificate: bytes) -> None:
    """A PKCSReq enveloped with DES-CBC (as scepclient 2.1.0 sends) gets a DES-CBC SUCCESS."""
    setup = Setup(ra_certificate, {"alice": "issue"})
    device = credentials("rsa2048-device-1", "alice")
    key = wire_key("rsa2048-device-1")
    request = x509.load_der_x509_csr(device.request_der)
    spki = request.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signer_certificate = scep.self_signed_certificate(key, request.subject.public_bytes(), spki)
    signer = cms.CmsSigner(signer_certificate, key, "sha1")
    envelope = cms.build_enveloped_data(
        device.request_der, [cms.CmsRecipient(ra_certificate)], "des"
    )
    message = scep.encode_pki_message(scep.MessageType.PKCS_REQ, "T1", b"n" * 16, envelope, signer)
    answer = asyncio.run(setup.handler.pki_operation(message))
    reply = scep.decode_pki_message(answer.body)
    assert (reply.status, reply.transaction_id, reply.recipient_nonce) == (
        scep.PkiStatus.SUCCESS, "T1", b"n" * 16,
    )  # fmt: skip
    assert reply.sender_nonce != b"n" * 16
    opened = cms.decrypt_enveloped_data(reply.envelope, signer_certificate, key)
    assert opened.cipher == "des"
    assert chains_to_ca(cms.parse_certificates_only(opened.content)[0])


def test_get_pki_operation(ra_certificate: bytes) -> None:
    """Without POSTPKIOperation in GetCACaps the client uses GET with a base64 message."""
    setup = Setup(ra_certificate, {"alice": "issue"})
    methods: list[str] = []

    async def no_post(method: str, target: str, *args: object) -> HttpResponse:
        answer = await setup.exchange(method, target, *args)
        methods.append(method)
        if target.endswith("GetCACaps"):
            return answer._replace(body=answer.body.replace(b"POSTPKIOperation\n", b""))
        return answer

    client = scep.ScepClient(no_post)
    device = credentials("rsa2048-device-1", "alice")

    async def run() -> Ticket:
        return await client.submit(device, client.prepare(device, await client.ca_certificates()))

    assert asyncio.run(run()).status is TicketStatus.ISSUED
    assert methods == ["GET", "GET", "GET"]


def test_get_with_url_safe_base64(ra_certificate: bytes) -> None:
    """GET PKIOperation accepts URL-safe base64 without padding, percent-encoded."""
    setup = Setup(ra_certificate, {"alice": "issue"})
    device = credentials("rsa2048-device-1", "alice")
    prepared = setup.client.prepare(device, (ca_der(), ra_certificate))
    text = base64.urlsafe_b64encode(prepared.message).decode().rstrip("=")
    request = HttpRequest("GET", "/scep", f"operation=PKIOperation&message={quote(text)}", {}, b"")
    answer = asyncio.run(setup.handler(request))
    assert scep.decode_pki_message(answer.body).status is scep.PkiStatus.SUCCESS


def test_renewal(ra_certificate: bytes) -> None:
    """RenewalReq signed with the issued certificate gets a new certificate."""
    setup = Setup(ra_certificate, {"alice": "issue"})
    device = credentials("rsa2048-device-1", "alice")

    async def run() -> tuple[Ticket, Ticket]:
        _, first = await setup.enroll(device)
        ca = await setup.client.ca_certificates()
        renewal = setup.client.prepare(device, ca, certificate=first.certificate)
        assert renewal.message_type is scep.MessageType.RENEWAL_REQ
        return first, await setup.client.submit(device, renewal)

    first, renewed = asyncio.run(run())
    assert renewed.status is TicketStatus.ISSUED
    assert renewed.certificate != first.certificate
    assert chains_to_ca(renewed.certificate)


def test_renewal_with_a_foreign_certificate_is_refused(ra_certificate: bytes) -> None:
    """RenewalReq signed by a certificate our CA did not issue: FAILURE badRequest."""
    setup = Setup(ra_certificate, {"alice": "issue"})
    device = credentials("rsa2048-device-1", "alice")
    request = x509.load_der_x509_csr(device.request_der)
    spki = request.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    foreign = scep.self_signed_certificate(device.key, request.subject.public_bytes(), spki)  # type: ignore[arg-type]

    async def run() -> Ticket:
        ca = await setup.client.ca_certificates()
        return await setup.client.submit(
            device, setup.client.prepare(device, ca, certificate=foreign)
        )

    assert asyncio.run(run()).status is TicketStatus.REJECTED
    assert setup.counted == ["bad-request"]


def test_bad_signature_is_bad_message_check(ra_certificate: bytes) -> None:
    """A pkiMessage whose signature does not verify: FAILURE badMessageCheck."""
    setup = Setup(ra_certificate, {"alice": "issue"})
    prepared = setup.client.prepare(
        credentials("rsa2048-device-1", "alice"), (ca_der(), ra_certificate)
    )
    message = bytearray(prepared.message)
    message[-3] ^= 0x40  # inside the signature, the last element
    answer = asyncio.run(setup.handler.pki_operation(bytes(message)))
    reply = scep.decode_pki_message(answer.body)
    assert (reply.status, reply.fail_info) == (
        scep.PkiStatus.FAILURE,
        scep.FailInfo.BAD_MESSAGE_CHECK,
    )
    assert setup.counted == ["bad-message-check"]


def test_garbage_and_unknown_operations_are_400(ra_certificate: bytes) -> None:
    """Not a pkiMessage, bad base64, an unknown operation: HTTP 400, counted."""
    setup = Setup(ra_certificate, {})
    requests = [
        HttpRequest("POST", "/scep", "operation=PKIOperation", {}, b"garbage"),
        HttpRequest("GET", "/scep", "operation=PKIOperation&message=%%%", {}, b""),
        HttpRequest("GET", "/scep", "operation=GetNextCACert", {}, b""),
        HttpRequest("PUT", "/scep", "operation=PKIOperation", {}, b""),
    ]
    statuses = [asyncio.run(setup.handler(request)).status for request in requests]
    assert statuses == [400, 400, 400, 400]
    assert setup.counted == ["bad-message", "bad-message", "unknown-operation", "unknown-operation"]


def test_http_error_from_the_target(ra_certificate: bytes) -> None:
    """A GetCACert answered with 500 is an HttpStatusError."""

    async def failing(method: str, target: str, *args: object) -> HttpResponse:
        return HttpResponse(500, "text/plain", b"down")

    with pytest.raises(HttpStatusError):
        asyncio.run(scep.ScepClient(failing).ca_certificates())


@cache
def _mutation_target() -> tuple[scep.ScepHandler, bytes]:
    setup = Setup(ra_der(), {"alice": "issue"})
    prepared = setup.client.prepare(credentials("rsa2048-device-1", "alice"), (ca_der(), ra_der()))
    return setup.handler, prepared.message


@settings(
    max_examples=120, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(st.data())
def test_mutated_requests_never_crash_the_handler(data: st.DataObject) -> None:
    """Any damaged pkiMessage gets HTTP 400 or a CertRep, never an exception."""
    handler, message = _mutation_target()
    damaged = data.draw(mutated(message))
    answer = asyncio.run(
        handler(HttpRequest("POST", "/scep", "operation=PKIOperation", {}, damaged))
    )
    assert answer.status in (200, 400)
    if answer.status == 200:
        assert scep.decode_pki_message(answer.body).message_type == scep.MessageType.CERT_REP


@settings(
    max_examples=120, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(st.data())
def test_mutated_answers_are_malformed_answer_errors(data: st.DataObject) -> None:
    """A damaged CertRep is a MalformedAnswerError on the client, or still a valid answer."""
    handler = _benchmark_setup()[1]
    prepared = _prepared_for_mutation()
    answer = _drive(handler.pki_operation(prepared.message)).body
    damaged = data.draw(mutated(answer))
    try:
        ticket = scep.read_cert_rep(prepared, damaged, prepared.sender_nonce)
    except MalformedAnswerError:
        return
    assert ticket.status is TicketStatus.ISSUED
    assert certificate_spki(ticket.certificate) == prepared.spki


@cache
def _prepared_for_mutation() -> scep.PreparedRequest:
    client, _, device = _benchmark_setup()
    return client.prepare(device, (ca_der(), ra_der()))


def test_pki_message_attributes_with_pyasn1() -> None:
    """The PKCSReq's signed attributes decode with rfc5652 as RFC 8894 types: PrintableString
    messageType and transactionID, a 16-byte OCTET STRING senderNonce."""
    prepared = _prepared_for_mutation()
    info, _ = decoder.decode(prepared.message, asn1Spec=rfc5652.ContentInfo())
    data, _ = decoder.decode(info["content"], asn1Spec=rfc5652.SignedData())
    attributes = {
        str(a["attrType"]): a["attrValues"][0] for a in data["signerInfos"][0]["signedAttrs"]
    }
    assert bytes(attributes["2.16.840.1.113733.1.9.2"]) == _der.encode_tlv(0x13, b"19")
    assert bytes(attributes["2.16.840.1.113733.1.9.7"]) == _der.encode_tlv(
        0x13, prepared.transaction_id.encode()
    )
    assert bytes(attributes["2.16.840.1.113733.1.9.5"]) == _der.encode_tlv(
        0x04, prepared.sender_nonce
    )
    envelope, _ = decoder.decode(
        bytes(data["encapContentInfo"]["eContent"]), asn1Spec=rfc5652.ContentInfo()
    )
    assert str(envelope["contentType"]) == "1.2.840.113549.1.7.3"


@pytest.mark.server
def test_openssl_opens_our_pkcsreq(tmp_path: Path) -> None:
    """openssl verifies the PKCSReq, decrypts its envelope with the RA key, and the request
    inside passes `openssl req -verify`."""
    openssl = require_tool("openssl")
    prepared = _prepared_for_mutation()
    (tmp_path / "message.der").write_bytes(prepared.message)
    (tmp_path / "ra.pem").write_bytes(
        x509.load_der_x509_certificate(ra_der()).public_bytes(serialization.Encoding.PEM)
    )
    (tmp_path / "ra.key").write_bytes((WIRE_VECTORS / "rsa2048-ra.pem").read_bytes())

    def run(*args: str) -> None:
        result = subprocess.run(
            [openssl, *args], capture_output=True, timeout=30, check=False, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")

    run(
        "cms",
        "-verify",
        "-noverify",
        "-inform",
        "DER",
        "-in",
        "message.der",
        "-out",
        "envelope.der",
    )
    run(
        "cms",
        "-decrypt",
        "-inform",
        "DER",
        "-in",
        "envelope.der",
        "-recip",
        "ra.pem",
        "-inkey",
        "ra.key",
        "-out",
        "request.der",
    )
    run("req", "-inform", "DER", "-in", "request.der", "-verify", "-noout")


# ---- against the real engine.service.SharedCAService ----


def shared_service(tmp_path: Path, **config: Any) -> SharedCAService:
    """The real CA service (P-256 CA from the fixed vectors, RSA devices) with three users."""
    path = tmp_path / "state.sqlite"
    seed_users(path, [directory_entry(simulated_enrollee(i, SEED), SEED, 1) for i in range(3)])
    engine_config = EngineConfig(auth_iterations=1, device_key="rsa2048", **config)
    return SharedCAService(engine_config, ca_material(engine_config), path, manual=True)


def shared_credentials(
    index: int, key_name: str, challenge: str | None = None
) -> DeviceCredentials:
    """A simulated user's device: the user's DN and the password as challengePassword."""
    enrollee = simulated_enrollee(index, SEED)
    password = enrollee.password if challenge is None else challenge
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name.from_rfc4514_string(enrollee.user.dn.text))
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, password.encode())
        .sign(wire_key(key_name), hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    return DeviceCredentials(
        f"d{index}", enrollee.user.user_id, enrollee.password, wire_key(key_name), request
    )


def test_against_the_shared_service(tmp_path: Path) -> None:
    """ScepClient -> ScepHandler -> SharedCAService: issued for our key, chaining to the CA."""
    service = shared_service(tmp_path, ca_intermediates=1)
    try:
        handler = scep.ScepHandler(service, ra_der(), wire_key("rsa2048-ra"))
        client = scep.ScepClient(in_process(handler))
        device = shared_credentials(1, "rsa2048-device-1")

        async def run() -> tuple[tuple[bytes, ...], Ticket]:
            ca = await client.ca_certificates()
            return ca, await client.submit(device, client.prepare(device, ca))

        ca, ticket = asyncio.run(run())
        assert ca == (*service.ca_certificates, ra_der())
        assert ticket.status is TicketStatus.ISSUED
        issued = x509.load_der_x509_certificate(ticket.certificate)
        issued.verify_directly_issued_by(x509.load_der_x509_certificate(ca[-2]))
        assert issued.public_key() == wire_key("rsa2048-device-1").public_key()
    finally:
        service.close()


def test_shared_service_wrong_challenge(tmp_path: Path) -> None:
    """The real service refuses a wrong challengePassword: FAILURE badRequest."""
    service = shared_service(tmp_path)
    try:
        counted: list[str] = []
        handler = scep.ScepHandler(service, ra_der(), wire_key("rsa2048-ra"), count=counted.append)
        client = scep.ScepClient(in_process(handler))
        device = shared_credentials(2, "rsa2048-device-2", challenge="wrong")
        ticket = asyncio.run(client.submit(device, client.prepare(device, (ra_der(),))))
        assert ticket.status is TicketStatus.REJECTED
        assert ticket.detail.endswith("AuthenticationError")
        assert counted == ["bad-request"]
    finally:
        service.close()


def test_shared_service_manual_approval_over_scep(tmp_path: Path) -> None:
    """PENDING until an administrator approves; the CertPoll after it is SUCCESS."""
    approval = ApprovalPolicy(1, Distribution("fixed", mean=0.0), 1.0)
    service = shared_service(tmp_path, approval=approval)
    try:
        handler = scep.ScepHandler(service, ra_der(), wire_key("rsa2048-ra"))
        client = scep.ScepClient(in_process(handler))
        device = shared_credentials(0, "rsa2048-device-3")

        async def run() -> list[Ticket]:
            prepared = client.prepare(device, await client.ca_certificates())
            first = await client.submit(device, prepared)
            waiting = await client.poll(device, prepared, first)
            assert service.decide("scep:" + prepared.transaction_id, approve=True)
            return [first, waiting, await client.poll(device, prepared, waiting)]

        first, waiting, final = asyncio.run(run())
        assert first.status is waiting.status is TicketStatus.PENDING
        assert final.status is TicketStatus.ISSUED
        assert x509.load_der_x509_certificate(final.certificate).public_key() == (
            wire_key("rsa2048-device-3").public_key()
        )
    finally:
        service.close()


def test_add_challenge_password_to_the_engines_request(tmp_path: Path) -> None:
    """The engine's own request template (no challenge) gets one added, stays strict DER with a
    valid signature, and the real service issues it over SCEP."""
    enrollee = simulated_enrollee(1, SEED)
    key = wire_key("rsa2048-device-4")
    plain = RequestTemplate(KeyFamily.RSA).build(
        Signer(key, "sha256"),
        RequestContent(enrollee.user.dn, enrollee.user.email, enrollee.user.upn),
    )
    assert scep.challenge_password(plain) is None
    request = scep.add_challenge_password(plain, key, enrollee.password)
    assert scep.challenge_password(request) == enrollee.password
    assert x509.load_der_x509_csr(request).is_signature_valid
    again = scep.add_challenge_password(request, key, "replaced")
    assert scep.challenge_password(again) == "replaced"
    assert again.count(scep.CHALLENGE_PASSWORD) == 1
    service = shared_service(tmp_path)
    try:
        client = scep.ScepClient(
            in_process(scep.ScepHandler(service, ra_der(), wire_key("rsa2048-ra")))
        )
        device = DeviceCredentials("d1", enrollee.user.user_id, enrollee.password, key, request)
        ticket = asyncio.run(client.submit(device, client.prepare(device, (ra_der(),))))
        assert ticket.status is TicketStatus.ISSUED
    finally:
        service.close()


# ---- interop with micromdm 2.1.0 (Debian `scep`), one request in flight ----


def _pkcs1_key(path: Path, key_name: str) -> Path:
    """A fixed key as "RSA PRIVATE KEY" PEM: the only form scepclient loads."""
    path.write_bytes(
        wire_key(key_name).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return path


def _openssl_verifies(ca_pem: Path, certificate: bytes, directory: Path) -> bool:
    """`openssl verify -CAfile` accepts the certificate (DER or PEM)."""
    path = directory / "verify-me.pem"
    if not certificate.startswith(b"-----"):
        certificate = x509.load_der_x509_certificate(certificate).public_bytes(
            serialization.Encoding.PEM
        )
    path.write_bytes(certificate)
    result = subprocess.run(
        [require_tool("openssl"), "verify", "-CAfile", str(ca_pem), str(path)],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return result.returncode == 0 and result.stdout.strip().endswith(b": OK")


@pytest.mark.server
def test_scepclient_enrolls_against_our_handler(tmp_path: Path) -> None:
    """micromdm's scepclient enrolls over HTTP against our handler; its certificate verifies
    with openssl against our CA. It sends DES-CBC, whatever GetCACaps offers."""
    tool = require_tool("scepclient")
    setup = Setup(ra_der(), {"alice": "issue"})
    bodies: list[bytes] = []

    async def recording(request: HttpRequest) -> HttpResponse:
        if request.method == "POST":
            bodies.append(request.body)
        return await setup.handler(request)

    key = _pkcs1_key(tmp_path / "key.pem", "rsa2048-device-3")
    fingerprint = hashlib.sha256(ra_der()).hexdigest()

    async def run() -> tuple[int, bytes]:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        server = await HttpServer.start(recording, listener)
        port = listener.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            tool, "-server-url", f"http://127.0.0.1:{port}/scep", "-private-key", str(key),
            "-cn", "alice", "-challenge", PASSWORD, "-ca-fingerprint", fingerprint,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await server.stop(grace=1.0)
        return process.returncode or 0, output

    returncode, output = asyncio.run(run())
    assert returncode == 0, output.decode(errors="replace")
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(ca_certificate().public_bytes(serialization.Encoding.PEM))
    issued = (tmp_path / "client.pem").read_bytes()
    assert _openssl_verifies(ca_pem, issued, tmp_path)
    subject = x509.load_pem_x509_certificate(issued).subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    (request,) = bodies
    sent = scep.decode_pki_message(request)
    opened = cms.decrypt_enveloped_data(sent.envelope, ra_der(), wire_key("rsa2048-ra"))
    assert (sent.message_type, sent.signed.digest_name, opened.cipher) == (19, "sha1", "des")
    assert setup.counted == []


@pytest.fixture
def scepserver(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """micromdm's scepserver on a fresh depot (`scepserver ca -init`), challenge "s3cret";
    (port, CA PEM). Stopped afterwards."""
    tool = require_tool("scepserver")
    depot = tmp_path / "depot"
    subprocess.run(
        [tool, "ca", "-init", "-depot", str(depot), "-keySize", "2048"],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "scepserver.log").open("wb")
    process = subprocess.Popen(
        [tool, "-depot", str(depot), "-port", str(port), "-challenge", "s3cret"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_for_port(port, process)
        yield port, depot / "ca.pem"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if process.poll() is not None:
            pytest.fail(f"scepserver exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail("scepserver did not listen within 10 s")


@pytest.mark.server
def test_our_client_enrolls_against_scepserver(
    tmp_path: Path, scepserver: tuple[int, Path]
) -> None:
    """Our ScepClient enrolls three devices, one at a time, against micromdm's scepserver; each
    certificate verifies against its CA. Its answers are SHA-1 signed and single-DES enveloped."""
    port, ca_pem = scepserver
    answers: list[HttpResponse] = []

    async def run() -> list[tuple[scep.PreparedRequest, Ticket]]:
        http = HttpClient("127.0.0.1", port, timeout=30.0)

        async def exchange(*args: object) -> HttpResponse:
            answer = await http.request(*args)  # type: ignore[arg-type]
            answers.append(answer)
            return answer

        client = scep.ScepClient(exchange)
        results = []
        try:
            ca = await client.ca_certificates()
            for n, key_name in enumerate(
                ("rsa2048-device-2", "rsa2048-device-3", "rsa2048-device-4")
            ):
                device = credentials(key_name, f"interop-{n}", "s3cret")
                prepared = client.prepare(device, ca)
                results.append((prepared, await client.submit(device, prepared)))
        finally:
            await http.close()
        return results

    results = asyncio.run(run())
    for prepared, ticket in results:
        assert ticket.status is TicketStatus.ISSUED, ticket
        assert certificate_spki(ticket.certificate) == prepared.spki
        assert _openssl_verifies(ca_pem, ticket.certificate, tmp_path)
    assert results[0][0].cipher == "aes128"  # it offers AES, and decrypts what we send
    prepared, _ = results[0]
    reply = scep.decode_pki_message(answers[2].body)
    opened = cms.decrypt_enveloped_data(reply.envelope, prepared.signer.certificate, prepared.key)
    assert (reply.signed.digest_name, opened.cipher) == ("sha1", "des")
    assert reply.sender_nonce == prepared.sender_nonce  # it copies ours


@pytest.mark.server
def test_scepserver_refuses_a_wrong_challenge(scepserver: tuple[int, Path]) -> None:
    """A wrong challenge at scepserver is CertRep FAILURE: REJECTED, ProtocolRefusedError."""
    port, _ = scepserver

    async def run() -> Ticket:
        http = HttpClient("127.0.0.1", port, timeout=30.0)
        client = scep.ScepClient(http.request)
        try:
            device = credentials("rsa2048-device-2", "interop-wrong", "not it")
            return await client.submit(
                device, client.prepare(device, await client.ca_certificates())
            )
        finally:
            await http.close()

    ticket = asyncio.run(run())
    assert (ticket.status, ticket.error) == (TicketStatus.REJECTED, "ProtocolRefusedError")
    assert "badRequest" in ticket.detail


# ---- benchmarks (pytest-benchmark; a single run when benchmarks are disabled) ----


class _IssuedService(FakeService):
    """A CA that answers every request with one pre-made certificate: what remains is SCEP."""

    def __init__(self, certificate: bytes) -> None:
        super().__init__({"alice": "issue"})
        self.certificate = certificate

    async def submit(self, transaction_id: str, request_der: bytes, user: User) -> Ticket:
        return Ticket(transaction_id, TicketStatus.ISSUED, certificate=self.certificate)


def _drive(coroutine: Coroutine[object, object, _T]) -> _T:
    """Run a coroutine that never waits, without an event loop's overhead."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise AssertionError("the coroutine waited")


@cache
def _benchmark_setup() -> tuple[scep.ScepClient, scep.ScepHandler, DeviceCredentials]:
    device = credentials("rsa2048-device-1", "alice")
    issued = FakeService({"alice": "issue"})._issue("t", device.request_der).certificate
    service = _IssuedService(issued)
    handler = scep.ScepHandler(service, ra_der(), wire_key("rsa2048-ra"))
    client = scep.ScepClient(in_process(handler))
    _drive(client.capabilities())
    return client, handler, device


def test_benchmark_client_prepare(benchmark: BenchmarkFixture) -> None:
    """Client CPU to build a device's first PKCSReq: self-signed certificate, envelope,
    signature."""
    _, handler, device = _benchmark_setup()
    ca = (ca_der(), ra_der())

    def fresh_client() -> tuple[
        tuple[scep.ScepClient, DeviceCredentials, tuple[bytes, ...]], dict[str, object]
    ]:
        client = scep.ScepClient(in_process(handler))
        _drive(client.capabilities())
        return (client, device, ca), {}

    prepared = benchmark.pedantic(  # type: ignore[no-untyped-call]
        lambda client, device, ca: client.prepare(device, ca), setup=fresh_client, rounds=300
    )
    assert prepared.message_type is scep.MessageType.PKCS_REQ


def test_benchmark_client_prepare_again(benchmark: BenchmarkFixture) -> None:
    """Client CPU for a PKCSReq of a device that enrolled before (its signer certificate kept)."""
    client, _, device = _benchmark_setup()
    ca = (ca_der(), ra_der())
    first = client.prepare(device, ca)
    prepared = benchmark(client.prepare, device, ca)
    assert prepared.signer.certificate == first.signer.certificate
    assert prepared.sender_nonce != first.sender_nonce


def test_benchmark_server_pki_operation(benchmark: BenchmarkFixture) -> None:
    """Server CPU for one PKCSReq with a CA that costs nothing: parse, verify, decrypt,
    challenge, CertRep envelope and signature."""
    client, handler, device = _benchmark_setup()
    message = client.prepare(device, (ca_der(), ra_der())).message
    answer = benchmark(lambda: _drive(handler.pki_operation(message)))
    assert scep.decode_pki_message(answer.body).status is scep.PkiStatus.SUCCESS


def test_benchmark_client_reads_cert_rep(benchmark: BenchmarkFixture) -> None:
    """Client CPU to check and open a CertRep SUCCESS: verify, nonce, decrypt, pick."""
    client, handler, device = _benchmark_setup()
    prepared = client.prepare(device, (ca_der(), ra_der()))
    answer = _drive(handler.pki_operation(prepared.message)).body
    ticket = benchmark(scep.read_cert_rep, prepared, answer, prepared.sender_nonce)
    assert ticket.status is TicketStatus.ISSUED


def test_benchmark_rsa_private_operation(benchmark: BenchmarkFixture) -> None:
    """The yardstick: one raw RSA-2048 PKCS #1 v1.5 signature (SCEP's unavoidable cost is two
    private operations per side and enrollment)."""
    key = wire_key("rsa2048-ra")
    signature = benchmark(key.sign, b"yardstick", padding.PKCS1v15(), hashes.SHA256())
    assert len(signature) == 256
