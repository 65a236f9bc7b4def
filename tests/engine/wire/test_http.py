"""engine.wire.http: the lean HTTP/1.1 server and client, over real loopback sockets."""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import shutil
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import (
    ConnectionLostError,
    MalformedAnswerError,
    TargetTimeoutError,
    TargetUnavailableError,
)
from engine.wire.http import HttpClient, HttpLimits, HttpServer, Phases, handler_exchange
from engine.wire.seam import Handler, HttpRequest, HttpResponse
from tests.conftest import vector_key

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
TEST_TIMEOUT = 30.0  # every test's event loop work is bounded by this


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run[Any]:
    """Run a coroutine to completion on a fresh loop of either kind, bounded in time."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(coro, TEST_TIMEOUT)

        with asyncio.Runner(loop_factory=factory) as loop_runner:
            return loop_runner.run(bounded())

    return runner


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


async def echo(request: HttpRequest) -> HttpResponse:
    """Answers with what it was asked, so a test can see what the server parsed."""
    text = f"{request.method} {request.path} {request.query} {len(request.body)}"
    headers = (("X-Echo", text),)
    return HttpResponse(200, "text/plain", request.body or text.encode(), headers)


class Served(NamedTuple):
    server: HttpServer
    port: int
    counts: list[str]


@asynccontextmanager
async def serving(
    handler: Handler = echo,
    limits: HttpLimits = HttpLimits(),  # noqa: B008
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Served]:
    counts: list[str] = []
    sock = listening_socket()
    server = await HttpServer.start(handler, sock, ssl=tls, limits=limits, count=counts.append)
    try:
        yield Served(server, sock.getsockname()[1], counts)
    finally:
        await server.stop(grace=1.0)


async def exchange_raw(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    """Send raw bytes, read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if half_close:
        writer.write_eof()
    try:
        return await reader.read(-1)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def statuses(answer: bytes) -> list[int]:
    """The status codes of the answers in a byte stream, in order."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


# -- round trips --------------------------------------------------------------------------------


def test_round_trip(run: Run[Any]) -> None:
    """A POST reaches the handler as method, path, query, lower-case headers and body."""
    seen: list[HttpRequest] = []

    async def record(request: HttpRequest) -> HttpResponse:
        seen.append(request)
        return HttpResponse(201, "application/x", b"answer", (("Retry-After", "3"),))

    async def scenario() -> HttpResponse:
        async with serving(record) as served:
            client = HttpClient("127.0.0.1", served.port)
            try:
                return await client.request("POST", "/a/b?x=1", [("X-Thing", "v")], b"body")
            finally:
                await client.close()

    answer = run(scenario())
    assert (answer.status, answer.content_type, answer.body) == (201, "application/x", b"answer")
    assert answer.header("retry-after") == "3"
    assert answer.header("date") is not None
    assert answer.header("content-length") == "6"
    request = seen[0]
    assert (request.method, request.path, request.query, request.body) == (
        "POST",
        "/a/b",
        "x=1",
        b"body",
    )
    assert request.headers["x-thing"] == "v"
    assert request.peer_certificate is None


def test_keep_alive_reuses_one_connection(run: Run[Any]) -> None:
    """Sequential requests on a keep-alive client share one connection."""

    async def scenario() -> tuple[Phases, int]:
        async with serving() as served:
            client = HttpClient("127.0.0.1", served.port)
            phases = Phases()
            for _ in range(5):
                assert (await client.request("GET", "/", phases=phases)).status == 200
            open_now = len(served.server.connections)
            await client.close()
            return phases, open_now

    phases, open_now = run(scenario())
    assert phases.connections == 1
    assert open_now == 1


def test_new_connection_per_request(run: Run[Any]) -> None:
    """keep_alive=False opens a connection per request and asks the server to close it."""

    async def scenario() -> tuple[Phases, list[HttpResponse]]:
        async with serving() as served:
            client = HttpClient("127.0.0.1", served.port, keep_alive=False)
            phases = Phases()
            answers = [await client.request("GET", "/", phases=phases) for _ in range(3)]
            await client.close()
            return phases, answers

    phases, answers = run(scenario())
    assert phases.connections == 3
    assert all(answer.header("connection") == "close" for answer in answers)


def test_http10_closes(run: Run[Any]) -> None:
    """An HTTP/1.0 request is answered, then the server closes the connection."""

    async def scenario() -> bytes:
        async with serving() as served:
            return await exchange_raw(served.port, b"GET /old HTTP/1.0\r\n\r\n")

    answer = run(scenario())
    assert statuses(answer) == [200]
    assert b"Connection: close\r\n" in answer


def test_pipelined_requests_answered_in_order(run: Run[Any]) -> None:
    """Pipelined requests (one chunked) are answered in order even if the first is slowest."""

    async def slow_first(request: HttpRequest) -> HttpResponse:
        if request.path == "/1":
            await asyncio.sleep(0.05)
        return HttpResponse(200, "text/plain", f"{request.path}:{request.body.decode()}".encode())

    requests = (
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nde\r\n1\r\nf\r\n0\r\n\r\n"
        b"GET /4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )

    async def scenario() -> bytes:
        async with serving(slow_first) as served:
            return await exchange_raw(served.port, requests)

    answer = run(scenario())
    assert statuses(answer) == [200, 200, 200, 200]
    # each answer's body runs up to the next status line
    bodies = [part.split(b"HTTP/1.1 ")[0] for part in answer.split(b"\r\n\r\n")[1:]]
    assert bodies == [b"/1:", b"/2:abc", b"/3:def", b"/4:"]


def test_head_has_no_body(run: Run[Any]) -> None:
    """HEAD answers carry the body's Content-Length but no body; the connection stays usable."""

    async def scenario() -> tuple[bytes, HttpResponse, HttpResponse, Phases]:
        async with serving() as served:
            raw = await exchange_raw(served.port, b"HEAD /h HTTP/1.1\r\nConnection: close\r\n\r\n")
            client = HttpClient("127.0.0.1", served.port)
            phases = Phases()
            head = await client.request("HEAD", "/h", phases=phases)
            get = await client.request("GET", "/h", phases=phases)
            await client.close()
            return raw, head, get, phases

    raw, head, get, phases = run(scenario())
    assert raw.endswith(b"\r\n\r\n")
    assert b"Content-Length: 10\r\n" in raw  # "HEAD /h  0"
    assert head.status == 200
    assert head.body == b""
    assert get.body == b"GET /h  0"
    assert phases.connections == 1


def test_many_pipelined_requests_all_answered(run: Run[Any]) -> None:
    """A flood of pipelined requests (reading pauses and resumes) is answered whole, in order."""
    count = 300
    flood = b"".join(b"GET /%d HTTP/1.1\r\n\r\n" % i for i in range(count - 1))
    flood += b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\n"

    async def scenario() -> bytes:
        async with serving() as served:
            return await exchange_raw(served.port, flood)

    answer = run(scenario())
    assert statuses(answer) == [200] * count
    paths = re.findall(rb"X-Echo: GET (/\w+) ", answer)
    assert paths == [b"/%d" % i for i in range(count - 1)] + [b"/last"]


def test_pipelined_bodies_answered_while_reading_pauses_on_bytes(run: Run[Any]) -> None:
    """Pipelined bodies that together exceed max_body are each served, in order."""
    posts = b"".join(
        b"POST /%d HTTP/1.1\r\nContent-Length: 900\r\n\r\n" % i + bytes([65 + i]) * 900
        for i in range(10)
    )

    async def scenario() -> bytes:
        async with serving(limits=HttpLimits(max_body=1000)) as served:
            return await exchange_raw(served.port, posts, half_close=True)

    answer = run(scenario())
    assert statuses(answer) == [200] * 10
    assert [body[:1] for body in re.findall(rb"\r\n\r\n([A-Z]+)", answer)] == [
        bytes([65 + i]) for i in range(10)
    ]


def test_expect_continue_invites_the_body(run: Run[Any]) -> None:
    """Expect: 100-continue gets an interim 100 before the body is sent, then the answer."""

    async def scenario() -> tuple[bytes, bytes]:
        async with serving() as served:
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(b"POST /e HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            interim = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"body")
            writer.write_eof()
            final = await reader.read(-1)
            writer.close()
            return interim, final

    interim, final = run(scenario())
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert statuses(final) == [200]
    assert final.endswith(b"\r\n\r\nbody")


def test_curl_posts_a_large_body(run: Run[Any], tmp_path: Path) -> None:
    """curl (a client nobody here wrote) POSTs 4 KB (it sends Expect: 100-continue) and reads it."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    body = tmp_path / "body"
    body.write_bytes(b"q" * 4096)

    async def scenario() -> bytes:
        async with serving() as served:
            process = await asyncio.create_subprocess_exec(
                curl,
                "-sS",
                "--http1.1",
                "--max-time",
                "10",
                "--data-binary",
                f"@{body}",
                "-H",
                "Content-Type: application/pkcs10",
                f"http://127.0.0.1:{served.port}/c",
                stdout=asyncio.subprocess.PIPE,
            )
            output, _ = await process.communicate()
            assert process.returncode == 0
            return output

    assert run(scenario()) == b"q" * 4096


def test_upgrade_request_is_served_then_closed(run: Run[Any]) -> None:
    """An upgrade we do not offer is answered as plain HTTP and the connection closed."""
    upgrade = b"GET /u HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nPRI * HTTP/2.0"

    async def scenario() -> bytes:
        async with serving() as served:
            return await exchange_raw(served.port, upgrade)

    answer = run(scenario())
    assert statuses(answer) == [200]
    assert b"Connection: close" in answer


def test_upgrade_request_with_body_is_refused(run: Run[Any]) -> None:
    """An upgrade request with a body (which llhttp would not read) is refused with 400."""
    upgrade = (
        b"POST /u HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nContent-Length: 3\r\n\r\nabc"
    )

    async def scenario() -> tuple[bytes, list[str]]:
        async with serving() as served:
            return await exchange_raw(served.port, upgrade), served.counts

    answer, counts = run(scenario())
    assert statuses(answer) == [400]
    assert counts == ["malformed-http"]


def test_a_slow_client_does_not_delay_others(run: Run[Any]) -> None:
    """While one connection holds half a request, another is served."""

    async def scenario() -> HttpResponse:
        async with serving() as served:
            _, stalled = await asyncio.open_connection("127.0.0.1", served.port)
            stalled.write(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
            client = HttpClient("127.0.0.1", served.port, timeout=5.0)
            answer = await client.request("GET", "/other")
            await client.close()
            stalled.close()
            return answer

    assert run(scenario()).status == 200


def test_handler_exchange_calls_the_handler() -> None:
    """handler_exchange adapts a Handler to HttpClient.request's signature, without sockets."""
    exchange = handler_exchange(echo)

    async def call() -> HttpResponse:
        return await exchange("GET", "/p?q=1", [("A", "b")])

    answer = asyncio.run(call())
    assert answer.body == b"GET /p q=1 0"


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_http_is_400_and_close(run: Run[Any], garbage: bytes) -> None:
    """Malformed HTTP gets 400, the connection closes, 'malformed-http' is counted."""

    async def scenario() -> tuple[bytes, list[str]]:
        async with serving() as served:
            return await exchange_raw(served.port, garbage), served.counts

    answer, counts = run(scenario())
    assert statuses(answer) == [400]
    assert b"Connection: close" in answer
    assert counts == ["malformed-http"]


def test_earlier_pipelined_answers_precede_a_refusal(run: Run[Any]) -> None:
    """A good request before garbage on the same connection is still answered, then 400."""

    async def scenario() -> bytes:
        async with serving() as served:
            return await exchange_raw(served.port, b"GET /ok HTTP/1.1\r\n\r\nBROKEN\x00\r\n\r\n")

    assert statuses(run(scenario())) == [200, 400]


@pytest.mark.parametrize(
    "head",
    [
        b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 50) for i in range(60)),
        b"GET / HTTP/1.1\r\nX-Long: " + b"v" * 5000,  # never ends: caught mid-header
    ],
)
def test_head_over_limit_is_431(run: Run[Any], head: bytes) -> None:
    """A head over max_head gets 431 and close, counted as 'head-too-large'."""

    async def scenario() -> tuple[bytes, list[str]]:
        async with serving(limits=HttpLimits(max_head=2048)) as served:
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            for start in range(0, len(head), 1000):  # in pieces: the limit holds across reads
                writer.write(head[start : start + 1000])
                await writer.drain()
                await asyncio.sleep(0.01)
            answer = await reader.read(-1)
            writer.close()
            return answer, served.counts

    answer, counts = run(scenario())
    assert statuses(answer) == [431]
    assert counts == ["head-too-large"]


def test_head_under_limit_in_tiny_reads_is_served(run: Run[Any]) -> None:
    """A head under max_head that arrives a few bytes at a time is not mistaken for a big one."""
    head = b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * 1400 + b"\r\nConnection: close\r\n\r\n"

    async def scenario() -> bytes:
        async with serving(limits=HttpLimits(max_head=2048)) as served:
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            for start in range(0, len(head), 40):
                writer.write(head[start : start + 40])
                await writer.drain()
                await asyncio.sleep(0.001)
            answer = await reader.read(-1)
            writer.close()
            return answer

    assert statuses(run(scenario())) == [200]


def test_body_over_limit_refused_on_content_length(run: Run[Any]) -> None:
    """A Content-Length over max_body gets 413 before any of the body is sent."""
    handled: list[HttpRequest] = []

    async def record(request: HttpRequest) -> HttpResponse:
        handled.append(request)
        return HttpResponse(200)

    async def scenario() -> tuple[bytes, list[str]]:
        async with serving(record, limits=HttpLimits(max_body=1000)) as served:
            head = b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n"
            return await exchange_raw(served.port, head), served.counts

    answer, counts = run(scenario())
    assert statuses(answer) == [413]
    assert counts == ["body-too-large"]
    assert handled == []


def test_chunked_body_over_limit_is_413(run: Run[Any]) -> None:
    """A chunked body that grows past max_body gets 413 and close."""
    chunk = b"400\r\n" + b"z" * 1024 + b"\r\n"

    async def scenario() -> tuple[bytes, list[str]]:
        async with serving(limits=HttpLimits(max_body=4096)) as served:
            data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 8
            return await exchange_raw(served.port, data), served.counts

    answer, counts = run(scenario())
    assert statuses(answer) == [413]
    assert counts == ["body-too-large"]


def test_slow_client_gets_408(run: Run[Any]) -> None:
    """A client sending a byte a second misses request_timeout: 408, close, 'slow-client'."""
    request = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"

    async def scenario() -> tuple[bytes, list[str]]:
        async with serving(limits=HttpLimits(request_timeout=1.5)) as served:
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)

            async def trickle() -> None:
                for byte in request:
                    writer.write(bytes([byte]))
                    await asyncio.sleep(1.0)

            sender = asyncio.create_task(trickle())
            answer = await reader.read(-1)
            sender.cancel()
            writer.close()
            return answer, served.counts

    answer, counts = run(scenario())
    assert statuses(answer) == [408]
    assert counts == ["slow-client"]


def test_idle_keep_alive_closed_quietly(run: Run[Any]) -> None:
    """A keep-alive connection idle past idle_timeout is closed without an answer or a count."""

    async def scenario() -> tuple[bytes, list[str]]:
        async with serving(limits=HttpLimits(idle_timeout=0.3)) as served:
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            answer = await reader.read(-1)  # the answer, then EOF once idle
            writer.close()
            return answer, served.counts

    answer, counts = run(scenario())
    assert statuses(answer) == [200]
    assert counts == []


def test_client_that_stops_reading_is_dropped(run: Run[Any]) -> None:
    """A client that pipelines but never reads the answers is cut off after idle_timeout."""
    big = b"b" * (1 << 20)

    async def large(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, body=big)

    async def scenario() -> int:
        async with serving(large, limits=HttpLimits(idle_timeout=0.3)) as served:
            _, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.transport.set_write_buffer_limits(high=1 << 24)
            writer.write(b"GET / HTTP/1.1\r\n\r\n" * 30)  # 30 MB of answers nobody reads
            while served.server.connections:  # bounded by the test's timeout
                await asyncio.sleep(0.05)
            writer.close()
            return len(served.server.connections)

    assert run(scenario()) == 0


def test_handler_error_is_500_and_logs_only_the_type(
    run: Run[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A raising handler gets 500, 'handler-error'; the log names the type, not the message."""

    async def broken(request: HttpRequest) -> HttpResponse:
        if request.path == "/boom":
            raise KeyError("secret-password")
        if request.path == "/cancelled":  # something it awaited was cancelled
            raise asyncio.CancelledError
        if request.path == "/bad-header":
            return HttpResponse(200, headers=(("X-Split", "a\r\nSet-Cookie: b"),))
        return HttpResponse(200)

    paths = ("/boom", "/", "/cancelled", "/bad-header", "/")

    async def scenario() -> tuple[list[int], list[str]]:
        async with serving(broken) as served:
            client = HttpClient("127.0.0.1", served.port)
            phases = Phases()
            codes = [(await client.request("GET", p, phases=phases)).status for p in paths]
            await client.close()
            assert phases.connections == 1  # the connection survives a handler's failure
            return codes, served.counts

    with caplog.at_level(logging.ERROR, logger="engine.wire.http"):
        codes, counts = run(scenario())
    assert codes == [500, 200, 500, 500, 200]
    assert counts == ["handler-error"] * 3
    assert "KeyError" in caplog.text
    assert "secret-password" not in caplog.text


# -- TLS ------------------------------------------------------------------------------------------


class Pki(NamedTuple):
    ca_pem: Path
    server_chain: Path
    server_key: Path
    client_chain: Path
    client_key: Path
    client_der: bytes


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, ca_key: Any
) -> x509.Certificate:
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A P-256 CA, a server and a client certificate, from the fixed key vectors."""
    folder = tmp_path_factory.mktemp("pki")
    keys = [vector_key(name) for name in ("p256-3", "p256-4", "p256-5")]
    assert all(isinstance(key, ec.EllipticCurvePrivateKey) for key in keys)
    ca_key, server_key, client_key = (
        key for key in keys if isinstance(key, ec.EllipticCurvePrivateKey)
    )
    ca = _certificate("test CA", ca_key, None, ca_key)
    server = _certificate("localhost", server_key, ca, ca_key)
    client = _certificate("device-1", client_key, ca, ca_key)

    def write(name: str, data: bytes) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    return Pki(
        write("ca.pem", pem(ca)),
        write("server.pem", pem(server)),
        write("server.key", key_pem(server_key)),
        write("client.pem", pem(client)),
        write("client.key", key_pem(client_key)),
        client.public_bytes(serialization.Encoding.DER),
    )


def server_context(pki: Pki, ask_client: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(pki.server_chain, pki.server_key)
    if ask_client:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(pki.ca_pem)
    return context


def client_context(pki: Pki, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    if with_certificate:
        context.load_cert_chain(pki.client_chain, pki.client_key)
    return context


@pytest.mark.parametrize(("ask_client", "show"), [(False, False), (True, False), (True, True)])
def test_tls_peer_certificate(run: Run[Any], pki: Pki, ask_client: bool, show: bool) -> None:
    """Over TLS the handler sees the client certificate's DER when asked for and shown."""
    seen: list[bytes | None] = []

    async def record(request: HttpRequest) -> HttpResponse:
        seen.append(request.peer_certificate)
        return HttpResponse(200, body=b"tls")

    async def scenario() -> tuple[HttpResponse, Phases]:
        tls = server_context(pki, ask_client)
        async with serving(record, tls=tls) as served:
            client = HttpClient(
                "127.0.0.1",
                served.port,
                ssl=client_context(pki, show),
                server_hostname="localhost",
            )
            phases = Phases()
            answer = await client.request("GET", "/", phases=phases)
            await client.request("GET", "/", phases=phases)
            await client.close()
            return answer, phases

    answer, phases = run(scenario())
    assert answer.body == b"tls"
    assert seen == [pki.client_der if show else None] * 2
    assert phases.connections == 1
    assert phases.tls_ns > 0  # recorded apart from the connect


def test_tls_untrusted_server_is_unavailable(run: Run[Any], pki: Pki) -> None:
    """A server certificate the client does not trust ends as TargetUnavailableError."""

    async def scenario() -> None:
        async with serving(tls=server_context(pki, False)) as served:
            client = HttpClient("127.0.0.1", served.port, ssl=ssl.create_default_context())
            await client.request("GET", "/")

    with pytest.raises(TargetUnavailableError, match="TLS"):
        run(scenario())


def test_tls_required_client_certificate_missing_is_a_wire_error(run: Run[Any], pki: Pki) -> None:
    """A server that requires a client certificate refuses a client without one, typed."""

    async def scenario() -> None:
        tls = server_context(pki, True)
        tls.verify_mode = ssl.CERT_REQUIRED
        async with serving(tls=tls) as served:
            context = client_context(pki, False)
            client = HttpClient("127.0.0.1", served.port, ssl=context, server_hostname="localhost")
            await client.request("GET", "/")

    with pytest.raises((ConnectionLostError, TargetUnavailableError)):
        run(scenario())


# -- graceful stop --------------------------------------------------------------------------------


def test_stop_finishes_the_request_in_flight(run: Run[Any]) -> None:
    """stop() stops accepting, lets the request in flight finish, then closes it."""
    release = asyncio.Event()
    entered = asyncio.Event()

    async def waits(request: HttpRequest) -> HttpResponse:
        entered.set()
        await release.wait()
        return HttpResponse(200, body=b"done")

    async def scenario() -> tuple[HttpResponse, int, type[Exception] | None]:
        sock = listening_socket()
        port = sock.getsockname()[1]
        server = await HttpServer.start(waits, sock)
        client = HttpClient("127.0.0.1", port)
        pending = asyncio.create_task(client.request("POST", "/", body=b"x"))
        await entered.wait()
        stopping = asyncio.create_task(server.stop(grace=10.0))
        await asyncio.sleep(0.05)
        in_flight = server.in_flight
        refused: type[Exception] | None = None
        try:
            await HttpClient("127.0.0.1", port, timeout=2.0).request("GET", "/")
        except (TargetUnavailableError, ConnectionLostError, TargetTimeoutError) as exc:
            refused = type(exc)
        release.set()
        answer = await pending
        await stopping
        await client.close()
        return answer, in_flight, refused

    # fresh events per loop: asyncio.Event binds to the loop that first waits on it
    answer, in_flight, refused = run(scenario())
    assert answer.body == b"done"
    assert answer.header("connection") == "close"
    assert in_flight == 1
    assert refused is not None


# -- client errors --------------------------------------------------------------------------------


def test_refused_port_is_target_unavailable(run: Run[Any]) -> None:
    """Nothing listening: TargetUnavailableError."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(TargetUnavailableError):
        run(HttpClient("127.0.0.1", port).request("GET", "/"))


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
Script = Callable[[int, int], bytes | None]


@asynccontextmanager
async def raw_server(answer: Script) -> AsyncIterator[int]:
    """A hand-written peer: answer(connection_no, request_no) gives the bytes to send back;
    bytes that are not a whole OK answer are sent and then the connection is closed;
    b"" closes at once, None stays silent."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        try:
            for request_no in range(1, 100):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                data = answer(number, request_no)
                if data is None:
                    await asyncio.sleep(TEST_TIMEOUT)
                    return
                writer.write(data)
                await writer.drain()
                if data != OK:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def test_server_closing_mid_answer_is_connection_lost(run: Run[Any]) -> None:
    """Half an answer, then close: ConnectionLostError."""

    async def scenario() -> None:
        partial = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
        async with raw_server(lambda c, r: partial) as port:
            client = HttpClient("127.0.0.1", port)
            await client.request("GET", "/")

    with pytest.raises(ConnectionLostError):
        run(scenario())


def test_garbage_answer_is_malformed(run: Run[Any]) -> None:
    """Bytes that are not HTTP: MalformedAnswerError."""

    async def scenario() -> None:
        async with raw_server(lambda c, r: b"SSH-2.0-OpenSSH\r\n\r\n") as port:
            await HttpClient("127.0.0.1", port).request("GET", "/")

    with pytest.raises(MalformedAnswerError):
        run(scenario())


def test_answer_body_over_max_is_malformed(run: Run[Any]) -> None:
    """An answer body over max_body: MalformedAnswerError."""
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 100

    async def scenario() -> None:
        async with raw_server(lambda c, r: big) as port:
            await HttpClient("127.0.0.1", port, max_body=50).request("GET", "/")

    with pytest.raises(MalformedAnswerError):
        run(scenario())


def test_silent_server_times_out(run: Run[Any]) -> None:
    """A server that never answers: TargetTimeoutError after the client's timeout."""

    async def scenario() -> None:
        async with raw_server(lambda c, r: None) as port:
            await HttpClient("127.0.0.1", port, timeout=0.3).request("GET", "/")

    with pytest.raises(TargetTimeoutError):
        run(scenario())


def test_silent_tls_handshake_times_out(run: Run[Any], pki: Pki) -> None:
    """A peer that accepts but never answers the ClientHello: TargetTimeoutError."""

    async def scenario() -> None:
        async with raw_server(lambda c, r: None) as port:
            context = client_context(pki, False)
            await HttpClient("127.0.0.1", port, ssl=context, timeout=0.3).request("GET", "/")

    with pytest.raises(TargetTimeoutError, match="TLS"):
        run(scenario())


def test_answer_until_close_is_read_whole(run: Run[Any]) -> None:
    """An answer without Content-Length ends at the server's close (RFC 9112 6.3)."""
    legacy = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"

    async def scenario() -> HttpResponse:
        async with raw_server(lambda c, r: legacy) as port:
            return await HttpClient("127.0.0.1", port).request("GET", "/")

    assert run(scenario()).body == b"until the end"


def test_extra_bytes_after_an_answer_retire_the_connection(run: Run[Any]) -> None:
    """A peer that sends more than the answer asked for is not reused."""

    def answer(connection: int, request: int) -> bytes:
        return OK + OK if connection == 1 else OK

    async def scenario() -> Phases:
        async with raw_server(answer) as port:
            client = HttpClient("127.0.0.1", port)
            phases = Phases()
            for _ in range(2):
                assert (await client.request("GET", "/", phases=phases)).body == b"ok"
            await client.close()
            return phases

    assert run(scenario()).connections == 2


def test_stale_pooled_connection_is_retried_once(run: Run[Any]) -> None:
    """A pooled connection the server dropped without answering is retried on a new one."""

    def answer(connection: int, request: int) -> bytes:
        return OK if connection > 1 or request == 1 else b""  # drops its second request

    async def scenario() -> tuple[list[HttpResponse], Phases]:
        async with raw_server(answer) as port:
            client = HttpClient("127.0.0.1", port)
            phases = Phases()
            answers = [await client.request("GET", "/", phases=phases) for _ in range(2)]
            await client.close()
            return answers, phases

    answers, phases = run(scenario())
    assert [a.body for a in answers] == [b"ok", b"ok"]
    assert phases.connections == 2


def test_partial_answer_on_pooled_connection_is_not_retried(run: Run[Any]) -> None:
    """A reused connection that dies after part of its answer raises ConnectionLostError."""
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab"

    def answer(connection: int, request: int) -> bytes:
        return OK if request == 1 else partial

    async def scenario() -> None:
        async with raw_server(answer) as port:
            client = HttpClient("127.0.0.1", port)
            await client.request("GET", "/")
            await client.request("GET", "/")

    with pytest.raises(ConnectionLostError):
        run(scenario())


# -- random bytes (Hypothesis) --------------------------------------------------------------------


class ThreadServer:
    """Our server on its own loop in a thread, so Hypothesis examples can use plain sockets."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.errors: list[dict[str, Any]] = []
        self.counts: list[str] = []
        loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        self.thread = threading.Thread(target=loop.run_forever, daemon=True)
        self.thread.start()
        self.sock = listening_socket()
        self.port = self.sock.getsockname()[1]
        limits = HttpLimits(max_head=4096, max_body=4096, request_timeout=2.0)
        start = HttpServer.start(echo, self.sock, limits=limits, count=self.counts.append)
        self.server = asyncio.run_coroutine_threadsafe(start, loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(1.0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def thread_server(request: pytest.FixtureRequest) -> Iterator[ThreadServer]:
    loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    server = ThreadServer(loop)
    yield server
    server.close()


def blocking_exchange(port: int, data: bytes) -> bytes:
    """Send, half-close, read everything until the server closes (bounded by a timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may refuse and close before we finish sending
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


REQUEST_PIECES = st.lists(
    st.sampled_from(
        [
            b"GET / HTTP/1.1\r\n",
            b"POST /x?y HTTP/1.1\r\n",
            b"HEAD / HTTP/1.0\r\n",
            b"Content-Length: 3\r\n",
            b"Content-Length: -1\r\n",
            b"Content-Length: 99999999999999999999\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Connection: close\r\n",
            b"Upgrade: h2c\r\nConnection: upgrade\r\n",
            b"\r\n",
            b"abc",
            b"3\r\nabc\r\n0\r\n\r\n",
            b"\x00\xff",
            b"X" * 5000,
        ]
    ),
    max_size=12,
).map(b"".join)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.one_of(st.binary(max_size=600), REQUEST_PIECES))
def test_random_bytes_never_break_the_server(thread_server: ThreadServer, data: bytes) -> None:
    """Any bytes get answers (served or refused) and a close; nothing escapes the protocol."""
    answer = blocking_exchange(thread_server.port, data)
    assert set(statuses(answer)) <= {200, 400, 408, 413, 431}
    assert answer == b"" or answer.startswith(b"HTTP/1.1 ")
    good = blocking_exchange(thread_server.port, b"GET /fine HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert statuses(good) == [200]
    assert thread_server.errors == []
