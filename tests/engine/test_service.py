"""The shared CA service: issuance, open transactions, approvals and state across workers."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.approval import ApprovalPolicy, ReviewBoard
from engine.distribution import Distribution
from engine.errors import FailedError, MalformedDerError, UnknownUserError
from engine.identity import User
from engine.keys import Signer, key_spec, load_private_key
from engine.population import directory_entry, simulated_enrollee
from engine.request import RequestContent, RequestTemplate, parse_request
from engine.service import SharedCAService, SubjectPolicy, common_name, seed_users
from engine.system import EngineConfig
from engine.wire.seam import TicketStatus
from tests.conftest import SEED, ca_material, vector_key

CONFIG = EngineConfig(auth_iterations=1)


def _request(user: User, vector: str = "p256-4") -> bytes:
    """A P-256 request for `user` signed with a fixed key."""
    content = RequestContent(user.dn, user.email, user.upn)
    signer = Signer(vector_key(vector), "sha256")
    return RequestTemplate(key_spec("p256").family).build(signer, content)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A service store with five users."""
    path = tmp_path / "state.sqlite"
    seed_users(path, [directory_entry(simulated_enrollee(i, SEED), SEED, 1) for i in range(5)])
    return path


def _service(path: Path, config: EngineConfig = CONFIG, **kwargs: object) -> SharedCAService:
    return SharedCAService(config, ca_material(config), path, **kwargs)  # type: ignore[arg-type]


def _user(index: int) -> User:
    return simulated_enrollee(index, SEED).user


def test_auto_issue_commits_before_answering(store: Path) -> None:
    """An issued certificate is in the store, seen by a second worker's connection."""
    a, b = _service(store), _service(store)
    ticket = asyncio.run(a.submit("t1", _request(_user(1)), _user(1)))
    assert ticket.status is TicketStatus.ISSUED
    certificate = x509.load_der_x509_certificate(ticket.certificate)
    assert b.counts()["published"] == 1
    assert certificate.subject.rfc4514_string() == _user(1).dn.text
    a.close()
    b.close()


def test_serials_unique_across_workers(store: Path) -> None:
    """Two workers issuing 50 certificates each never share a serial."""
    workers = [_service(store), _service(store)]

    async def issue() -> list[int]:
        serials = []
        for n in range(50):
            for w, service in enumerate(workers):
                ticket = await service.submit(f"t{w}-{n}", _request(_user(2)), _user(2))
                assert ticket.status is TicketStatus.ISSUED
                serials.append(x509.load_der_x509_certificate(ticket.certificate).serial_number)
        return serials

    serials = asyncio.run(issue())
    assert len(set(serials)) == 100
    assert workers[0].counts()["published"] == 100
    for service in workers:
        service.close()


def test_repeat_while_open_then_new_transaction(store: Path) -> None:
    """A repeated ID gets the open transaction's state; once answered, it starts a new one."""
    config = EngineConfig(
        auth_iterations=1, approval=ApprovalPolicy(1, Distribution("fixed", mean=0.0), 1.0)
    )
    with ReviewBoard.shared(1, store.parent) as board:
        service = _service(store, config, review_board=board)
        request = _request(_user(1))
        first = asyncio.run(service.submit("t", request, _user(1)))
        assert first.status is TicketStatus.PENDING
        issued = asyncio.run(service.submit("t", request, _user(1)))
        assert issued.status is TicketStatus.ISSUED
        again = asyncio.run(service.submit("t", request, _user(1)))
        assert again.status is TicketStatus.PENDING  # a new enrollment of the same device
        service.close()


def test_poll_on_another_worker_issues_once(store: Path) -> None:
    """A request queued by one worker is issued by a poll to another, exactly once."""
    config = EngineConfig(
        auth_iterations=1, approval=ApprovalPolicy(2, Distribution("fixed", mean=0.0), 1.0)
    )
    with ReviewBoard.shared(2, store.parent) as board:
        a = _service(store, config, review_board=board)
        b = _service(store, config, review_board=board)
        pending = asyncio.run(a.submit("t", _request(_user(3)), _user(3)))
        assert pending.status is TicketStatus.PENDING
        polled = asyncio.run(b.poll("t"))
        assert polled is not None
        assert polled.status is TicketStatus.ISSUED
        assert a.counts()["published"] == 1
        assert asyncio.run(a.poll("unknown")) is None
        a.close()
        b.close()


def test_denied_request_is_rejected(store: Path) -> None:
    """An administrator who denies ends the transaction rejected."""
    config = EngineConfig(
        auth_iterations=1, approval=ApprovalPolicy(1, Distribution("fixed", mean=0.0), 0.0)
    )
    with ReviewBoard.shared(1, store.parent) as board:
        service = _service(store, config, review_board=board)
        asyncio.run(service.submit("t", _request(_user(1)), _user(1)))
        ticket = asyncio.run(service.poll("t"))
        assert ticket is not None
        assert (ticket.status, ticket.error) == (TicketStatus.REJECTED, "ApprovalDeniedError")
        service.close()


def test_manual_approval_waits_for_a_decision(store: Path) -> None:
    """Manual mode: pending until `decide`, then issued."""
    config = EngineConfig(
        auth_iterations=1, approval=ApprovalPolicy(1, Distribution("fixed", mean=0.0), 1.0)
    )
    service = _service(store, config, manual=True)
    asyncio.run(service.submit("t", _request(_user(1)), _user(1)))
    polled = asyncio.run(service.poll("t"))
    assert polled is not None
    assert polled.status is TicketStatus.PENDING
    assert [p[:2] for p in service.pending()] == [("t", _user(1).user_id)]
    assert service.decide("t", approve=True)
    assert not service.decide("nothing", approve=True)
    polled = asyncio.run(service.poll("t"))
    assert polled is not None
    assert polled.status is TicketStatus.ISSUED
    service.close()


def test_refusals_are_tickets_not_exceptions(store: Path) -> None:
    """Garbage is FAILED, another user's request REJECTED; nothing raises."""
    service = _service(store)
    garbage = asyncio.run(service.submit("g", b"\x30\x03\x02\x01", _user(1)))
    assert (garbage.status, garbage.error) == (TicketStatus.FAILED, "MalformedRequestError")
    other = asyncio.run(service.submit("o", _request(_user(2)), _user(1)))
    assert (other.status, other.error) == (TicketStatus.REJECTED, "SubjectMismatchError")
    service.close()


def test_directory_subject_policy_writes_the_directory_dn(store: Path) -> None:
    """Under the directory policy another subject is replaced by the user's DN."""
    service = _service(store, subject_policy=SubjectPolicy.DIRECTORY)
    ticket = asyncio.run(service.submit("o", _request(_user(2)), _user(1)))
    assert ticket.status is TicketStatus.ISSUED
    subject = x509.load_der_x509_certificate(ticket.certificate).subject
    assert subject.rfc4514_string() == _user(1).dn.text
    service.close()


def test_find_user_and_authenticate(store: Path) -> None:
    """The CN names the user; a right password authenticates, a wrong one does not."""
    service = _service(store)
    found = asyncio.run(service.find_user(_request(_user(4))))
    assert found.user_id == _user(4).user_id
    enrollee = simulated_enrollee(4, SEED)
    assert asyncio.run(service.authenticate(enrollee.user.user_id, enrollee.password)) == found
    with pytest.raises(Exception, match="authentication failed"):
        asyncio.run(service.authenticate(enrollee.user.user_id, "wrong"))
    service.close()


def test_common_name_reads_the_first_cn() -> None:
    """The CN of a directory DN is its user ID; a Name without CN gives None."""
    assert common_name(_user(3).dn.der) == _user(3).user_id
    no_cn = x509.Name.from_rfc4514_string("O=Example").public_bytes()
    assert common_name(no_cn) is None


def _sha224_request(user: User) -> bytes:
    """A request signed with ecdsa-with-SHA224, an algorithm the CA does not accept."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name.from_rfc4514_string(user.dn.text)
    )
    request = builder.sign(vector_key("p256-4"), hashes.SHA224())
    return request.public_bytes(serialization.Encoding.DER)


def test_find_user_reads_only_the_subject(store: Path) -> None:
    """A request with a signature algorithm the CA refuses still names its user; the refusal
    is submit's REJECTED ticket (EST simplereenroll answered 500 for it before)."""
    service = _service(store)
    request = _sha224_request(_user(1))
    assert asyncio.run(service.find_user(request)) == _user(1)
    ticket = asyncio.run(service.submit("t-sha224", request, _user(1)))
    assert (ticket.status, ticket.error) == (TicketStatus.REJECTED, "UnsupportedKeyError")
    service.close()


@settings(
    max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 40))
def test_find_user_and_submit_never_raise_on_mutated_requests(
    tmp_path_factory: pytest.TempPathFactory, position: int, value: int, cut: int
) -> None:
    """A request with a byte changed or cut: find_user raises UnknownUserError or
    MalformedDerError only (the CAService contract); submit never raises."""
    store = _mutation_store(tmp_path_factory)
    request = bytearray(_request(_user(1)))
    request[position % len(request)] = value
    if cut:
        del request[position % len(request) :][:cut]
    service = _service(store)
    try:
        with contextlib.suppress(UnknownUserError, MalformedDerError):
            asyncio.run(service.find_user(bytes(request)))
        ticket = asyncio.run(service.submit(f"m{position}-{value}-{cut}", bytes(request), _user(1)))
        assert ticket.status in set(TicketStatus)
    finally:
        service.close()


_STORES: dict[str, Path] = {}


def _mutation_store(factory: pytest.TempPathFactory) -> Path:
    """One store for all the mutation examples (seeding users per example is slow)."""
    if "store" not in _STORES:
        path = factory.mktemp("mutations") / "state.sqlite"
        seed_users(path, [directory_entry(simulated_enrollee(i, SEED), SEED, 1) for i in range(3)])
        _STORES["store"] = path
    return _STORES["store"]


def test_a_decided_request_no_longer_awaits_an_administrator(store: Path) -> None:
    """Once decided, a request leaves the list `enrollbench approve` shows and the awaiting
    count (the approvals_pending gauge) though its device has not collected it yet, and a
    second decision is refused."""
    config = EngineConfig(
        auth_iterations=1, approval=ApprovalPolicy(1, Distribution("fixed", mean=0.0), 1.0)
    )
    service = _service(store, config, manual=True)
    asyncio.run(service.submit("t", _request(_user(1)), _user(1)))
    assert service.counts()["awaiting"] == 1
    assert service.decide("t", approve=False)
    assert service.pending() == []
    assert (service.counts()["awaiting"], service.counts()["pending"]) == (0, 1)
    assert not service.decide("t", approve=True)
    polled = asyncio.run(service.poll("t"))
    assert polled is not None and polled.error == "ApprovalDeniedError"
    service.close()


def test_a_simulated_review_awaits_until_it_ends(store: Path) -> None:
    """Under simulated administrators a request awaits until its review ends (a person may
    decide it first); after that it is decided, listed no more, and a person cannot change it."""
    config = EngineConfig(
        auth_iterations=1, approval=ApprovalPolicy(1, Distribution("fixed", mean=5.0), 1.0)
    )
    now = [1000.0]
    board = ReviewBoard.private(1)
    service = _service(store, config, review_board=board, wall_clock=lambda: now[0])
    for name in ("a", "b"):
        asyncio.run(service.submit(name, _request(_user(1)), _user(1)))
    assert [p[0] for p in service.pending()] == ["a", "b"]
    assert service.decide("b", approve=False)  # before its review ends: a person decides
    now[0] += 5.5  # a's review (5 s) has ended
    assert service.pending() == [] and service.counts()["awaiting"] == 0
    assert not service.decide("a", approve=False)
    polled = asyncio.run(service.poll("a"))
    assert polled is not None and polled.status is TicketStatus.ISSUED
    service.close()
    board.close()


def test_serials_colliding_every_draw_fail_the_request(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A serial the store holds, drawn again and again, is a FAILED ticket, not an exception."""
    service = _service(store)
    first = asyncio.run(service.submit("t1", _request(_user(1)), _user(1)))
    assert first.status is TicketStatus.ISSUED
    issue = service.authority.issue
    repeated = issue(service._policy_view(parse_request(_request(_user(1))), _user(1)), _user(1))
    monkeypatch.setattr(service.authority, "issue", lambda request, user: repeated)
    asyncio.run(service.submit("t0", _request(_user(1)), _user(1)))  # takes the serial
    ticket = asyncio.run(service.submit("t2", _request(_user(1)), _user(1)))
    assert (ticket.status, ticket.error) == (TicketStatus.FAILED, "DuplicateSerialError")
    assert service.counts()["published"] == 2
    service.close()


class _Directory:
    """A directory given to the service: its users in memory, its publications recorded."""

    def __init__(self, users: list[User], fail_publish: bool = False) -> None:
        self.users = {user.user_id: user for user in users}
        self.binds: list[str] = []
        self.published: list[tuple[str, int, bytes]] = []
        self.fail_publish = fail_publish

    async def lookup_user(self, user_id: str) -> User:
        if user_id not in self.users:
            raise UnknownUserError(user_id)
        return self.users[user_id]

    async def authenticate(self, user_id: str, password: str) -> None:
        self.binds.append(user_id)

    async def publish(self, dn: str, serial: int, certificate: bytes) -> None:
        if self.fail_publish:
            raise _DirectoryDownError("directory down")
        self.published.append((dn, serial, certificate))

    async def retrieve(self, dn: str, serial: int) -> bytes:
        raise NotImplementedError


class _DirectoryDownError(FailedError):
    reason = "directory-unavailable"


def test_a_directory_given_serves_users_and_gets_each_publication(tmp_path: Path) -> None:
    """With `directory=`, binds and lookups go to it (no SQLite users needed) and each
    certificate is published there after the store committed it."""
    directory = _Directory([_user(1)])
    service = _service(tmp_path / "state.sqlite", directory=directory)

    async def enroll() -> tuple[User, bytes]:
        user = await service.authenticate(_user(1).user_id, "any")
        request = _request(user)
        found = await service.find_user(request)
        ticket = await service.submit("t1", request, found)
        assert ticket.status is TicketStatus.ISSUED
        return found, ticket.certificate

    user, certificate = asyncio.run(enroll())
    assert user == _user(1) and directory.binds == [user.user_id]
    serial = x509.load_der_x509_certificate(certificate).serial_number
    assert directory.published == [(user.dn.text, serial, certificate)]
    assert service.counts()["published"] == 1
    service.close()


def test_a_directory_failing_to_publish_fails_the_request_with_its_type(tmp_path: Path) -> None:
    """A directory that cannot take the certificate: a FAILED ticket naming its error."""
    service = _service(tmp_path / "state.sqlite", directory=_Directory([_user(1)], True))
    ticket = asyncio.run(service.submit("t1", _request(_user(1)), _user(1)))
    assert (ticket.status, ticket.error) == (TicketStatus.FAILED, "_DirectoryDownError")
    service.close()


class _CountingSigner:
    """A CA signer that counts its signatures (a token's session stands behind the real one)."""

    def __init__(self, signer: Signer) -> None:
        self._signer = signer
        self.algorithm = signer.algorithm
        self.spki = signer.spki
        self.calls = 0

    def sign(self, data: bytes) -> bytes:
        self.calls += 1
        return self._signer.sign(data)

    def signed(self, content: bytes) -> bytes:
        self.calls += 1
        return self._signer.signed(content)


def test_a_ca_signer_given_signs_every_certificate(store: Path) -> None:
    """With `ca_signer=`, certificates are signed through it and verify under the issuing CA;
    a signer of another key is refused at construction."""
    material = ca_material(CONFIG)
    signer = _CountingSigner(Signer(load_private_key(material.issuing_key), CONFIG.hash_name))
    service = _service(store, ca_signer=signer)
    ticket = asyncio.run(service.submit("t1", _request(_user(1)), _user(1)))
    assert ticket.status is TicketStatus.ISSUED and signer.calls == 1
    issuing = x509.load_der_x509_certificate(material.certificates[-1])
    x509.load_der_x509_certificate(ticket.certificate).verify_directly_issued_by(issuing)
    service.close()
    other = Signer(vector_key("p256-4"), CONFIG.hash_name)
    with pytest.raises(ValueError, match="issuing certificate's key"):
        _service(store, ca_signer=other)
