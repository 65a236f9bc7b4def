"""Bad input to a running server: each gets the protocol's error answer, is counted in /metrics,
and leaves the workers up; a garbage corpus sent during a real run disturbs none of its devices."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AttributeOID

from engine.population import simulated_enrollee
from engine.wire import scep
from engine.wire.est import PKCS10, basic_authorization, encode_base64
from engine.wire.http import HttpClient
from engine.wire.seam import DeviceCredentials, Ticket, TicketStatus
from tests.bench.serve.conftest import (
    ENROLLBENCH,
    PROFILE,
    SEED,
    Served,
    connect,
    csr,
    serving,
    user_id,
    wait_for,
)

WIRE_VECTORS = Path(__file__).parents[2] / "engine" / "wire" / "vectors"
MAX_BODY = 4096
REQUEST_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Two workers, small limits (4 KiB bodies, 1 s to send a request), SCEP on its port."""
    state = tmp_path_factory.mktemp("bad-input") / "state"
    limits = ("--max-body", str(MAX_BODY), "--request-timeout", str(REQUEST_TIMEOUT))
    with serving(state, *limits, workers=2) as server:
        server.info["worker_pids"] = sorted(server.worker_pids())
        yield server


def exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    """Send raw bytes on a new connection; everything the server sends back until it closes
    (or, when it keeps the connection, the first answer)."""
    with connect(port) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer[9:12])


def est_post(operation: str, body: bytes, content_type: str = PKCS10, auth: str = "") -> bytes:
    headers = f"Content-Type: {content_type}\r\n" + (f"Authorization: {auth}\r\n" if auth else "")
    return (
        f"POST /.well-known/est/{operation} HTTP/1.1\r\nHost: x\r\n{headers}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def good_auth(index: int = 0) -> str:
    return basic_authorization(user_id(index), simulated_enrollee(index, SEED).password)


def refused(served: Served, protocol: str, kind: str) -> float:
    key = f'enrollbench_refused_total{{kind="{kind}",protocol="{protocol}"}}'
    for line in served.metrics().splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_counted_and_up(served: Served, protocol: str, kind: str, times: int = 1) -> None:
    """The refusal is in /metrics (summed over workers), and the same workers still serve."""
    assert wait_for(lambda: refused(served, protocol, kind) == times), (kind, times)
    assert served.health()["status"] == "ok"
    assert sorted(served.worker_pids()) == served.info["worker_pids"]


EST_CASES = [
    # (what, raw request, status, counted kind)
    ("malformed HTTP", b"GARBAGE / HTTP/9.9\r\n\x00\r\n\r\n", 400, "malformed-http"),
    ("wrong content type", est_post("simpleenroll", b"MII=", "text/plain"), 415,
     "unsupported-media-type"),
    ("bad base64", est_post("simpleenroll", b"not*base64!"), 400, "bad-base64"),
    ("not a PKCS #10 request", est_post("simpleenroll", encode_base64(b"\x30\x03\x02\x01\x00"),
     auth=good_auth()), 400, "malformed-request"),
    ("wrong password", est_post("simpleenroll", encode_base64(csr(1)),
     auth=basic_authorization(user_id(1), "wrong")), 401, "wrong-credentials"),
    ("no credentials", est_post("simpleenroll", encode_base64(csr(1))), 401, "no-credentials"),
    ("unknown operation", b"GET /.well-known/est/fullcmc HTTP/1.1\r\nHost: x\r\n\r\n", 404,
     "not-found"),
    ("wrong method", b"DELETE /.well-known/est/cacerts HTTP/1.1\r\nHost: x\r\n\r\n", 405,
     "method-not-allowed"),
    ("body over the limit", est_post("simpleenroll", b"A" * (MAX_BODY + 1)), 413,
     "body-too-large"),
    ("head over the limit", b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431,
     "head-too-large"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "status", "kind"), [case[1:] for case in EST_CASES], ids=[c[0] for c in EST_CASES]
)
def test_bad_est_input(served: Served, data: bytes, status: int, kind: str) -> None:
    """Answered with the EST/HTTP error status, counted once, workers unchanged."""
    answer = exchange(served.est_port, data)
    assert status_of(answer) == status
    assert_counted_and_up(served, "est", kind)


SCEP_CASES = [
    ("bad CMS to PKIOperation", b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\n"
     b"Content-Type: application/x-pki-message\r\nContent-Length: 6\r\n\r\n\x30\x05garb", 400,
     "bad-message"),
    ("bad base64 in a GET PKIOperation",
     b"GET /scep?operation=PKIOperation&message=%25%25%25 HTTP/1.1\r\nHost: x\r\n\r\n", 400,
     "bad-message"),
    ("unknown operation", b"GET /scep?operation=GetNothing HTTP/1.1\r\nHost: x\r\n\r\n", 400,
     "unknown-operation"),
    ("malformed HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "malformed-http"),
]  # fmt: skip


def test_bad_scep_input(served: Served) -> None:
    """Answered 400, counted once per request, workers unchanged."""
    for _, data, status, _ in SCEP_CASES:
        assert status_of(exchange(served.scep_port, data)) == status
    assert_counted_and_up(served, "scep", "bad-message", times=2)
    assert_counted_and_up(served, "scep", "unknown-operation")
    assert_counted_and_up(served, "scep", "malformed-http")


def test_wrong_scep_challenge(served: Served) -> None:
    """A well-formed PKCSReq with a wrong challengePassword: CertRep FAILURE badRequest naming
    AuthenticationError, counted, nothing issued."""
    key = serialization.load_pem_private_key(
        (WIRE_VECTORS / "rsa2048-device-1.pem").read_bytes(), None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    user = simulated_enrollee(3, SEED).user
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name.from_rfc4514_string(user.dn.text))
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"not-the-challenge")
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    device = DeviceCredentials("device-3", user.user_id, "not-the-challenge", key, request)

    async def enroll() -> Ticket:
        http = HttpClient("127.0.0.1", served.scep_port, timeout=30)
        try:
            client = scep.ScepClient(http.request)
            prepared = client.prepare(device, await client.ca_certificates())
            return await client.submit(device, prepared)
        finally:
            await http.close()

    ticket = asyncio.run(asyncio.wait_for(enroll(), 60))
    assert ticket.status is TicketStatus.REJECTED and ticket.detail.endswith("AuthenticationError")
    assert_counted_and_up(served, "scep", "bad-request")
    assert served.published() == {}


def test_slow_client_gets_408(served: Served) -> None:
    """A request head that never ends is answered 408 after the request timeout and counted;
    another client is served meanwhile."""
    with connect(served.est_port) as sock:
        sock.sendall(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: x\r\n")
        assert served.get("/.well-known/est/cacerts")[0] == 200  # not held up by the slow one
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert status_of(answer) == 408
    assert_counted_and_up(served, "est", "slow-client")


# ---- garbage during a real run ----


def garbage_corpus(seed: int, est_port: int, scep_port: int) -> list[tuple[int, bytes]]:
    """Malformed requests, each answered with exactly one counted error: (port, bytes)."""
    rng = random.Random(seed)
    corpus: list[tuple[int, bytes]] = []
    for _ in range(60):
        # a NUL first byte is never the start of a method: 400 whatever follows
        corpus.append(
            (rng.choice((est_port, scep_port)), b"\x00" + rng.randbytes(rng.randrange(1, 300)))
        )
    for n in range(200):
        mangled = bytearray(csr(n % 300))
        mangled[rng.randrange(len(mangled))] ^= 1 << rng.randrange(8)
        corpus.append((est_port, est_post("simpleenroll", rng.randbytes(40), "text/plain")))
        corpus.append(
            (est_port, est_post("simpleenroll", b"%%" + rng.randbytes(20).hex().encode()))
        )
        corpus.append(
            (
                est_port,
                est_post(
                    "simpleenroll",
                    encode_base64(bytes(mangled)),
                    auth=basic_authorization(user_id(n % 300), "x"),
                ),
            )
        )
        corpus.append(
            (
                scep_port,
                b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 64\r\n\r\n" + rng.randbytes(64),
            )
        )
    rng.shuffle(corpus)
    return corpus  # fmt: skip


def test_garbage_during_a_run_disturbs_no_device(tmp_path: Path) -> None:
    """While `enrollbench run smoke` enrolls against the server, four connections' worth of
    garbage (new connection each) is answered with errors and counted one for one; every
    device of the run is issued, every serial it got is in the store, no worker died."""
    with serving(tmp_path / "state", workers=2) as server:
        pids = server.worker_pids()
        out = tmp_path / "run.json"
        target = f"est+http://127.0.0.1:{server.est_port}/.well-known/est"
        command = [str(ENROLLBENCH), "run", PROFILE, "--target", target, "--duration", "3",
                   "--quiet", "--out", str(out)]  # fmt: skip
        corpus = garbage_corpus(8, server.est_port, server.scep_port)
        sent: list[int] = []
        stop = threading.Event()

        failures: list[BaseException] = []

        def sender(share: list[tuple[int, bytes]]) -> None:
            try:
                for port, data in share:
                    if stop.is_set():
                        return
                    sent.append(status_of(exchange(port, data)))
                    time.sleep(0.002)
            except BaseException as exc:  # a thread's failure must fail the test
                failures.append(exc)

        runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # garbage only once the run's devices are enrolling
            assert wait_for(lambda: len(server.published()) > 0 or runner.poll() is not None, 60)
            threads = [threading.Thread(target=sender, args=(corpus[n::4],)) for n in range(4)]
            for thread in threads:
                thread.start()
            _, errors = runner.communicate(timeout=120)
        finally:
            stop.set()
            if runner.poll() is None:
                runner.kill()
        for thread in threads:
            thread.join(60)
        assert failures == []
        assert runner.returncode == 0, errors.decode()
        assert len(sent) >= 100 and all(400 <= status < 500 for status in sent)
        result = json.loads(out.read_text())
        outcomes = result["outcomes"]
        assert outcomes["started"] > 0 and outcomes["issued"] == outcomes["started"]
        assert (outcomes["rejected"], outcomes["failed"], outcomes["accounted"]) == ({}, {}, True)
        serials = out.with_suffix(".serials").read_text().split()
        assert len(serials) == outcomes["issued"]
        published = {serial.hex().lstrip("0") for serial in server.published()}
        assert {s.lstrip("0") for s in serials} <= published

        def all_counted() -> bool:
            total = 0.0
            for line in server.metrics().splitlines():
                if line.startswith("enrollbench_refused_total"):
                    total += float(line.rsplit(" ", 1)[1])
            return total == len(sent)

        assert wait_for(all_counted)
        assert server.worker_pids() == pids
