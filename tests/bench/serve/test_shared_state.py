"""One CA service over N workers: one serial space, one store of transactions, one pool of
administrators, one approval queue that a person can decide (`enrollbench approve`)."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AttributeOID

from engine.wire.est import (
    PKCS10,
    basic_authorization,
    decode_base64,
    decode_certs_only,
    encode_base64,
    transaction_id,
)
from engine.wire.http import HttpClient
from engine.wire.scep import ScepClient
from engine.wire.seam import DeviceCredentials, Ticket, TicketStatus
from tests.bench.serve.conftest import (
    ENROLLBENCH,
    PROFILE,
    Served,
    ServerFactory,
    csr,
    device,
    enroll_all,
    pinned,
    run,
    serving,
    user_dn,
    user_id,
    wait_for,
)

REVIEW_SECONDS = 0.3
# decide_at is the board's monotonic booking moved to the wall clock by two adjacent clock
# reads: off by the time between them (sub-microsecond, unless the worker is preempted there)
CLOCKS = 0.01
WIRE_VECTORS = Path(__file__).parents[2] / "engine" / "wire" / "vectors"
APPROVAL = (
    "--set", "approval.mode='administrator'",
    "--set", "approval.administrators=1",
    "--set", f"approval.delay={{kind='fixed', mean={REVIEW_SECONDS}}}",
)  # fmt: skip
MANUAL = ("--set", "approval.mode='administrator'", "--set", "serve.approval='manual'")


class Answer:
    """An EST answer read off a raw connection."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def certificate(self) -> bytes:
        assert self.status == 200, self.status
        [certificate] = decode_certs_only(decode_base64(self.body))
        return certificate


def enroll_on(
    connection: http.client.HTTPConnection, served: Served, index: int, request: bytes
) -> Answer:
    """POST simpleenroll on one (kept-alive) connection, as a device or its poll (a resend)."""
    who = user_id(index)
    headers = {
        "Content-Type": PKCS10,
        "Authorization": basic_authorization(who, served.credentials()[who]),
    }
    connection.request("POST", "/.well-known/est/simpleenroll", encode_base64(request), headers)
    answer = connection.getresponse()
    return Answer(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())


def transaction(served: Served, transaction: str) -> tuple[str, float, float]:
    """(status, created, decide_at) of one transaction in the store."""
    connection = sqlite3.connect(served.store)
    try:
        row = connection.execute(
            "SELECT status, created, decide_at FROM transactions WHERE id = ?", (transaction,)
        ).fetchone()
    finally:
        connection.close()
    assert row is not None
    return str(row[0]), float(row[1]), float(row[2])


def published_for(served: Served, index: int) -> list[bytes]:
    """Certificates the store published for user `index`."""
    dn = user_dn(index).rfc4514_string()
    found = []
    for certificate in served.published().values():
        if x509.load_der_x509_certificate(certificate).subject.rfc4514_string() == dn:
            found.append(certificate)
    return found


def serial_of(certificate: bytes) -> int:
    return x509.load_der_x509_certificate(certificate).serial_number


def test_serials_are_unique_across_workers(server: ServerFactory) -> None:
    """200 enrollments, each on a new connection (SO_REUSEPORT spreads them over the two
    workers, which both served some): 200 certificates, 200 distinct serials, all published."""
    served = server(workers=2)
    devices = [device(served, n % 300) for n in range(200)]
    tickets = run(enroll_all(served, devices, keep_alive=False, concurrency=16))
    assert {t.status for t in tickets} == {TicketStatus.ISSUED}
    serials = {serial_of(t.certificate) for t in tickets}
    assert len(serials) == 200
    published = served.published()
    assert {int.from_bytes(s, "big") for s in published} == serials
    assert set(published.values()) == {t.certificate for t in tickets}
    snapshots = served.state / "metrics"

    def served_by_each() -> bool:
        counts = []
        for path in sorted(snapshots.glob("worker-*.json")):
            counters = json.loads(path.read_text())["counters"]
            counts.append(sum(n for name, _, n in counters if name == "requests"))
        return len(counts) == 2 and all(counts) and sum(counts) == 200

    assert wait_for(served_by_each)


@pytest.fixture(scope="module")
def approving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Two workers, one simulated administrator taking exactly REVIEW_SECONDS a review."""
    with serving(tmp_path_factory.mktemp("approving") / "state", *APPROVAL, workers=2) as served:
        yield served


def test_pending_request_found_by_the_other_worker_and_issued_once(approving: Served) -> None:
    """A request sent to one worker and polled (resent) on the other is the same transaction,
    never queued again; after its review the other worker issues it, once; resent after that
    it is a new enrollment (queued for a review of its own), not a second answer."""
    served, index = approving, 10
    connections = pinned(served)
    first, other = connections.values()
    request = csr(index)
    answer = enroll_on(first, served, index, request)
    assert answer.status == 202 and int(answer.headers["retry-after"]) >= 1
    tid = transaction_id(request)
    status, created, decide_at = transaction(served, tid)
    assert status == "pending" and decide_at >= created + REVIEW_SECONDS - CLOCKS
    # the other worker finds it (202 while under review; 200 had the review ended already)
    issued = enroll_on(other, served, index, request)
    assert transaction(served, tid)[1:] == (created, decide_at)  # the same, not queued anew
    if issued.status == 202:
        wait_for(lambda: time.time() > decide_at + 0.05, timeout=5)
        issued = enroll_on(other, served, index, request)
    assert issued.status == 200
    assert published_for(served, index) == [issued.certificate]
    assert transaction(served, tid)[0] == "issued"
    again = enroll_on(first, served, index, request)
    assert again.status == 202 and transaction(served, tid)[1] > created
    assert published_for(served, index) == [issued.certificate]
    for connection in connections.values():
        connection.close()


def test_reviews_never_exceed_the_administrators(approving: Served) -> None:
    """Five requests at once to a pool of one administrator with a fixed review time: their
    decisions are booked at least one review apart, and each is then issued exactly once."""
    served = approving
    indices = list(range(20, 25))
    requests = {n: csr(n) for n in indices}
    devices = [device(served, n, requests[n]) for n in indices]
    tickets = run(enroll_all(served, devices, keep_alive=False, concurrency=5))
    assert {t.status for t in tickets} == {TicketStatus.PENDING}
    decisions = sorted(transaction(served, transaction_id(r))[2] for r in requests.values())
    gaps = [later - earlier for earlier, later in itertools.pairwise(decisions)]
    assert min(gaps) >= REVIEW_SECONDS - CLOCKS, gaps
    wait_for(lambda: time.time() > decisions[-1] + 0.05, timeout=10)
    polled = run(enroll_all(served, devices, keep_alive=False, concurrency=5))
    assert {t.status for t in polled} == {TicketStatus.ISSUED}
    for n, ticket in zip(indices, polled, strict=True):
        assert published_for(served, n) == [ticket.certificate]


def approve(state: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENROLLBENCH), "approve", PROFILE, "--state", str(state), *arguments, *MANUAL],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_manual_approval_and_denial(server: ServerFactory) -> None:
    """With serve.approval='manual' requests wait for `enrollbench approve`: listed with their
    IDs, then one approved (issued on its next poll) and one denied (403 on its next poll)."""
    served = server(*MANUAL, workers=2)
    connection = http.client.HTTPConnection("127.0.0.1", served.est_port, timeout=30)
    requests = {30: csr(30), 31: csr(31)}
    for index, request in requests.items():
        assert enroll_on(connection, served, index, request).status == 202
    listed = approve(served.state)
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()}
    ids = {index: transaction_id(request) for index, request in requests.items()}
    assert lines == {ids[30]: user_id(30), ids[31]: user_id(31)}
    assert enroll_on(connection, served, 30, requests[30]).status == 202  # still waiting

    approved = approve(served.state, ids[30])
    denied = approve(served.state, ids[31], "--deny")
    assert (approved.returncode, denied.returncode) == (0, 0), approved.stderr + denied.stderr
    # decided: no longer listed (though not yet collected), and a decision in effect is final
    assert approve(served.state).stdout == ""
    assert approve(served.state, ids[30], "--deny").returncode == 2
    issued = enroll_on(connection, served, 30, requests[30])
    refused = enroll_on(connection, served, 31, requests[31])
    assert published_for(served, 30) == [issued.certificate]
    assert refused.status == 403 and b"ApprovalDeniedError" in refused.body
    assert published_for(served, 31) == []
    unknown = approve(served.state, "est:" + "0" * 64)
    assert unknown.returncode == 2 and "no such pending request" in unknown.stderr
    connection.close()


def scep_device(served: Served, index: int, key_name: str) -> DeviceCredentials:
    """An RSA device (fixed vector key) whose request carries its user's password as the
    challengePassword (RFC 8894 3.3.1)."""
    key = serialization.load_pem_private_key((WIRE_VECTORS / f"{key_name}.pem").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    who = user_id(index)
    password = served.credentials()[who]
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(user_dn(index))
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, password.encode())
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    return DeviceCredentials(f"device-{who}", who, password, key, request)


def test_scep_pending_then_certpoll_on_new_connections(approving: Served) -> None:
    """SCEP PKCSReq to the approval queue: PENDING; CertPolls on new connections (either
    worker: an unknown transaction would be FAILURE badCertId) stay PENDING until the review
    ends; then 6 CertPolls at once all get SUCCESS with the one certificate issued."""
    served, index = approving, 50
    credentials = scep_device(served, index, "rsa2048-device-2")
    tid = "serve-test-50"

    async def scenario() -> tuple[list[Ticket], list[Ticket]]:
        http = HttpClient("127.0.0.1", served.scep_port, keep_alive=False, timeout=30)
        client = ScepClient(http.request)
        try:
            ca = await client.ca_certificates()
            prepared = client.prepare(credentials, ca, transaction_id=tid)
            tickets = [await client.submit(credentials, prepared)]
            for _ in range(4):
                tickets.append(await client.poll(credentials, prepared, tickets[-1]))
            decide_at = transaction(served, "scep:" + tid)[2]
            while time.time() < decide_at + 0.05:
                await asyncio.sleep(0.05)
            polls = [client.poll(credentials, prepared, tickets[-1]) for _ in range(6)]
            return tickets, list(await asyncio.gather(*polls))
        finally:
            await http.close()

    early, late = run(scenario())
    # the PKCSReq is queued (its review takes REVIEW_SECONDS); each CertPoll finds it (an
    # unknown transaction is FAILURE), PENDING until the review has ended, then the certificate
    statuses = [t.status for t in early + late]
    issued_from = statuses.index(TicketStatus.ISSUED)
    assert statuses[0] is TicketStatus.PENDING
    assert statuses == [TicketStatus.PENDING] * issued_from + [TicketStatus.ISSUED] * (
        len(statuses) - issued_from
    )
    assert len({t.certificate for t in (early + late)[issued_from:]}) == 1
    assert published_for(served, index) == [late[0].certificate]
    status, created, decide_at = transaction(served, "scep:" + tid)
    assert status == "issued" and decide_at >= created + REVIEW_SECONDS - CLOCKS


def test_reviews_under_way_survive_a_restart(server: ServerFactory, tmp_path: Path) -> None:
    """One administrator, 10 s reviews: a request queued before a restart keeps the
    administrator busy after it, so one queued after the restart is decided a review later."""
    options = ("--set", "approval.mode='administrator'", "--set", "approval.administrators=1",
               "--set", "approval.delay={kind='fixed', mean=10.0}")  # fmt: skip
    first = server(*options, workers=1)
    before = csr(60)
    [ticket] = run(enroll_all(first, [device(first, 60, before)]))
    assert ticket.status is TicketStatus.PENDING
    decided_first = transaction(first, transaction_id(before))[2]
    assert first.stop() == 0
    second = server(*options, workers=1, state=tmp_path / "state")
    after = csr(61)
    [ticket] = run(enroll_all(second, [device(second, 61, after)]))
    assert ticket.status is TicketStatus.PENDING
    assert transaction(second, transaction_id(after))[2] >= decided_first + 10.0 - CLOCKS
    assert second.stop() == 0
