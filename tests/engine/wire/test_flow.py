"""The client flow over the wire: chain first, one round trip, polls, the device's key match."""

from __future__ import annotations

import asyncio

import pytest
from cryptography import x509

from engine.chaincache import ChainCache
from engine.device import Device, DeviceProfile
from engine.errors import TargetUnavailableError
from engine.flow import Outcome, Status, Step
from engine.keys import key_spec
from engine.population import simulated_enrollee
from engine.request import RequestTemplate
from engine.service import SharedCAService, seed_users
from engine.stores import Database, SqliteDeviceStores
from engine.system import EngineConfig
from engine.wire.flow import (
    certificate_serial,
    enroll_over,
    join_certificates,
    split_certificates,
)
from engine.wire.seam import DeviceCredentials, Ticket, TicketStatus
from tests.conftest import SEED, ca_material, device_of

CONFIG = EngineConfig(auth_iterations=1)
MATERIAL = ca_material(CONFIG)
ENROLLEE = simulated_enrollee(1, SEED)


class _Client:
    """A client whose answers are scripted: a sequence of tickets (or an error to raise)."""

    def __init__(self, answers: list[Ticket | Exception]) -> None:
        self.answers = answers
        self.fetches = 0
        self.sent: list[str] = []

    async def ca_certificates(self) -> tuple[bytes, ...]:
        self.fetches += 1
        return MATERIAL.certificates

    def prepare(self, device: DeviceCredentials, ca: tuple[bytes, ...]) -> object:
        assert ca == MATERIAL.certificates  # the chain came before the request
        return device.request_der

    async def submit(self, device: DeviceCredentials, prepared: object) -> Ticket:
        self.sent.append("submit")
        return self._next()

    async def poll(self, device: DeviceCredentials, prepared: object, ticket: Ticket) -> Ticket:
        self.sent.append("poll")
        return self._next()

    async def close(self) -> None:
        pass

    def _next(self) -> Ticket:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class _Marks:
    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.finished = False

    def start(self, step: Step) -> None:
        self.steps.append(step)

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def issued_for_device(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A certificate our CA issued for the device's own request (and its key)."""
    path = tmp_path_factory.mktemp("svc") / "s.sqlite"
    seed_users(path, [])
    service = SharedCAService(CONFIG, MATERIAL, path)
    request = _device(tmp_path_factory.mktemp("dev")).build_request(ENROLLEE.user)
    ticket = asyncio.run(service.submit("t", request, ENROLLEE.user))
    service.close()
    return ticket.certificate


def _device(folder: object, key: str = "p256-4") -> Device:
    stores = SqliteDeviceStores(Database(":memory:"))
    spec = key_spec("p256")
    device = Device(
        device_of(ENROLLEE, key),
        DeviceProfile(spec, "sha256"),
        RequestTemplate(spec.family),
        stores,
        stores,
    )
    device.generate_key()
    return device


def _enroll(client: _Client, device: Device, marks: _Marks | None = None) -> Outcome:
    cache = ChainCache(300.0, lambda: 0.0)
    return asyncio.run(
        enroll_over(device, ENROLLEE.user, client, cache, "t", marks or _Marks(), poll_timeout=5)
    )


def test_issued_in_the_wire_order(issued_for_device: bytes, tmp_path: object) -> None:
    """Chain, key pair, request, one round trip, match, install; the serial is the cert's."""
    marks = _Marks()
    client = _Client([Ticket("t", TicketStatus.ISSUED, issued_for_device)])
    outcome = _enroll(client, _device(tmp_path), marks)
    assert outcome.status is Status.ISSUED
    serial = x509.load_der_x509_certificate(issued_for_device).serial_number
    assert outcome.serial == serial
    assert marks.steps == [
        Step.GENERATE_KEY,
        Step.FETCH_CHAIN,
        Step.DELIVER_CHAIN,
        Step.STORE_KEY_PAIR,
        Step.BUILD_REQUEST,
        Step.SEND_REQUEST,
        Step.ISSUE,
        Step.MATCH_AND_DELIVER,
        Step.INSTALL,
    ]
    assert marks.finished


def test_pending_is_polled_until_issued(issued_for_device: bytes, tmp_path: object) -> None:
    """PENDING twice, then ISSUED: two polls after the submission."""
    pending = Ticket("t", TicketStatus.PENDING, retry_after=0.01)
    client = _Client([pending, pending, Ticket("t", TicketStatus.ISSUED, issued_for_device)])
    outcome = _enroll(client, _device(tmp_path))
    assert outcome.status is Status.ISSUED
    assert client.sent == ["submit", "poll", "poll"]


def test_certificate_for_another_key_is_never_installed(
    issued_for_device: bytes, tmp_path: object
) -> None:
    """A certificate for someone else's key ends the enrollment rejected at the match."""
    client = _Client([Ticket("t", TicketStatus.ISSUED, issued_for_device)])
    marks = _Marks()
    outcome = _enroll(client, _device(tmp_path, "p256-5"), marks)
    assert (outcome.status, outcome.error, outcome.step) == (
        Status.REJECTED,
        "KeyMismatchError",
        Step.MATCH_AND_DELIVER,
    )
    assert Step.INSTALL not in marks.steps


def test_refusal_and_transport_errors_become_typed_outcomes(tmp_path: object) -> None:
    """A refused ticket is rejected; a transport error is failed with its type; no raise."""
    refused = _Client([Ticket("t", TicketStatus.REJECTED, error="AuthenticationError")])
    outcome = _enroll(refused, _device(tmp_path))
    assert (outcome.status, outcome.error) == (
        Status.REJECTED,
        "ProtocolRefusedError",
    )
    assert "AuthenticationError" in outcome.detail
    down = _Client([TargetUnavailableError("refused")])
    outcome = _enroll(down, _device(tmp_path))
    assert (outcome.status, outcome.error, outcome.step) == (
        Status.FAILED,
        "TargetUnavailableError",
        Step.SEND_REQUEST,
    )


def test_polling_stops_at_the_timeout(tmp_path: object) -> None:
    """A request pending past the poll timeout fails with TargetTimeoutError."""
    client = _Client([Ticket("t", TicketStatus.PENDING, retry_after=10.0)])
    outcome = _enroll(client, _device(tmp_path))
    assert (outcome.status, outcome.error) == (
        Status.FAILED,
        "TargetTimeoutError",
    )


def test_garbage_certificate_fails_with_a_type(tmp_path: object) -> None:
    """An answer that is not a certificate fails the enrollment, typed."""
    client = _Client([Ticket("t", TicketStatus.ISSUED, b"\x30\x03\x02\x01\x01")])
    outcome = _enroll(client, _device(tmp_path))
    assert outcome.status is Status.FAILED
    assert outcome.error in {"MalformedDerError", "MalformedAnswerError"}


def test_certificates_join_and_split(issued_for_device: bytes) -> None:
    """The chain cache's joined form splits back into the same certificates."""
    certificates = (*MATERIAL.certificates, issued_for_device)
    assert split_certificates(join_certificates(certificates)) == certificates
    expected = x509.load_der_x509_certificate(issued_for_device).serial_number
    assert certificate_serial(issued_for_device) == expected
