"""A lean HTTP/1.1 server and client on asyncio Protocols and httptools (llhttp).

The CA server (`enrollbench serve`) and the load generator both speak HTTP through this module.
It is lean on purpose: aiohttp costs about 270 µs of CPU per loopback request here (client and
server together), which alone would halve served throughput. Protocols, not streams (streams
add a task switch and buffer copies per read), so it runs unchanged on uvloop.

Server: keep-alive (HTTP/1.1 by default, HTTP/1.0 only when asked), pipelined requests answered
in order, Content-Length and chunked request bodies, HEAD. Bad input never escapes a connection:
malformed HTTP -> 400, head over the limit -> 431, body over the limit -> 413 (refused on its
Content-Length before any of it is read), a request not fully in within `request_timeout` -> 408;
each answer closes its connection and calls `count(kind)` ("malformed-http", "head-too-large",
"body-too-large", "slow-client"). A handler that raises -> 500 and "handler-error", its
exception type logged, never its message (it may carry request data). An idle keep-alive
connection, or one whose client stopped reading its answers, is closed after `idle_timeout`.
`Expect: 100-continue` is honoured; an Upgrade is answered as plain HTTP, then closed.

Client: a pool of keep-alive connections, or a new connection per request (a fleet); TLS is
started on a connected socket so that the handshake is timed apart from the TCP connect
(`Phases`); only the typed `WireError`s of `engine.errors` come out of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools

from engine.errors import (
    ConnectionLostError,
    MalformedAnswerError,
    TargetTimeoutError,
    TargetUnavailableError,
)
from engine.wire.seam import Handler, HttpRequest, HttpResponse

__all__ = [
    "Exchange",
    "HttpClient",
    "HttpLimits",
    "HttpServer",
    "Phases",
    "handler_exchange",
]

logger = logging.getLogger(__name__)

# exchange(method, target, headers, body, phases): HttpClient.request, or a Handler adapted to it
Exchange = Callable[..., Awaitable[HttpResponse]]


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What the server accepts from one client before it refuses."""

    max_head: int = 16_384  # request line + headers, bytes
    max_body: int = 1 << 20  # bytes; larger -> 413 and close
    request_timeout: float = 10.0  # a whole request (head + body) must arrive within this
    idle_timeout: float = 30.0  # a keep-alive connection idle this long is closed quietly


def _ignore(kind: str) -> None:
    """The default `count`: refusals go uncounted."""


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------

_REASONS = {int(status): status.phrase for status in HTTPStatus}
_MAX_QUEUED = 32  # pipelined requests parsed ahead of the answers before reading pauses
_LINGER = 2.0  # seconds a refused connection keeps draining input so the client reads the answer


class _DateCache:
    """The Date header, formatted once a second (formatting costs more than a request's parse)."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True)
        return self._value


_DATE = _DateCache()


class _Refusal:
    """A request the stack answers itself (queued behind earlier answers, then close)."""

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status


class _StopParsingError(Exception):
    """Raised in a parser callback to stop parsing (httptools re-raises it as a parser error)."""


_Work = tuple[HttpRequest, bool] | _Refusal  # a parsed request and whether to keep alive


def _encode_answer(response: HttpResponse, keep_alive: bool, head: bool) -> bytes:
    """The answer's bytes: status line, Date, Content-Length, Content-Type, extra headers."""
    status = response.status
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Date: {_DATE.now()}\r\nContent-Length: {len(response.body)}\r\n"
    ]
    if response.content_type:
        lines.append(f"Content-Type: {response.content_type}\r\n")
    for name, value in response.headers:
        # a value echoing request data must not split the answer (RFC 9112 section 2.2)
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError("header with a line break")
        lines.append(f"{name}: {value}\r\n")
    lines.append("Connection: keep-alive\r\n\r\n" if keep_alive else "Connection: close\r\n\r\n")
    encoded = "".join(lines).encode("latin-1")
    return encoded if head else encoded + response.body


class _ServerConnection(asyncio.Protocol):
    """One client connection: parses requests, answers them in order, enforces the limits."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._limits = server.limits
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._peer_certificate: bytes | None = None
        self._queue: deque[_Work] = deque()
        self._task: asyncio.Task[None] | None = None
        self._in_message = False  # a request has begun and is not complete
        self._in_head = False  # ... and its head is not complete
        self._started = 0.0  # loop time the current request began
        self._idle_since = 0.0
        self._messages = 0  # requests begun on this connection
        self._head_bytes = 0  # the current head's size, as the parser's callbacks report it
        self._head_raw = 0  # ... as counted from reads that held nothing but that head
        self._body_bytes = 0
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._method = ""
        self._refused = False  # a refusal is queued: input is discarded from now on
        self._linger_until = 0.0  # a refused connection's close deadline (0: not lingering)
        self._last = False  # the last request this connection serves is parsed (upgrade, EOF)
        self._eof = False
        self._lost = False
        self._paused_reading = False
        self._queued_bytes = 0  # body bytes of the requests parsed but not yet answered
        self._can_write: asyncio.Future[None] | None = None  # set while the transport is full
        self._write_paused_at = 0.0

    # -- transport events ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._peer_certificate = ssl_object.getpeercert(binary_form=True)
        self._idle_since = self._loop.time()
        self._server.connections.add(self)
        if self._server.draining:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        del exc  # a reset or a clean close end a server connection alike
        self._lost = True
        self._server.connections.discard(self)
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def eof_received(self) -> bool:
        # the client half-closed: answer what it sent in full, then close (RFC 9112 9.6)
        self._eof = True
        if self._in_message:
            self._drop_partial()
        return self._task is not None  # False closes the transport now

    def pause_writing(self) -> None:
        self._can_write = self._loop.create_future()
        self._write_paused_at = self._loop.time()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        self._can_write = None

    def data_received(self, data: bytes) -> None:
        if self._refused or self._last:
            return  # refused (draining input until close) or past an upgrade request
        head_open, message = self._in_head, self._messages
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # an upgrade we do not offer: answer the request as plain HTTP, then close
            self._last = True
        except httptools.HttpParserError:
            # a callback's _StopParsingError comes back as HttpParserCallbackError
            if not self._refused:
                self._refuse(400, "malformed-http")
        except Exception as exc:  # never let a connection's trouble reach the loop
            logger.error("HTTP connection dropped on %s", type(exc).__name__)
            self._abort()
            return
        if head_open and self._in_head and message == self._messages and not self._refused:
            # the whole read was one head's: a header httptools still accumulates is not
            # counted by the callbacks yet (a head in tiny reads must not be counted twice)
            self._head_raw += len(data)
            if self._head_raw > self._limits.max_head:
                self._refuse(431, "head-too-large")

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = self._in_head = True
        self._started = self._loop.time()
        self._messages += 1
        self._head_bytes = self._head_raw = self._body_bytes = 0
        self._url = b""
        self._headers = {}
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url) + 16)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        # repeated fields combine into one list (RFC 9110 5.3)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._method = self._parser.get_method().decode("ascii", "replace")
        headers = self._headers
        length = headers.get("content-length")
        # refused before reading: a client must not make us buffer what we will not accept
        if length is not None and length.isdigit() and int(length) > self._limits.max_body:
            self._refuse(413, "body-too-large")
            raise _StopParsingError
        has_body = (length is not None and length != "0") or "transfer-encoding" in headers
        if has_body and self._parser.should_upgrade():
            # llhttp hands an upgrade request's body over as the new protocol's bytes: we
            # offer no upgrade and cannot serve it whole, so it is refused as bad HTTP
            self._refuse(400, "malformed-http")
            raise _StopParsingError
        if has_body and headers.get("expect", "").lower() == "100-continue":
            self._continue()

    def _continue(self) -> None:
        """Invite the body now (curl waits a second for this before a body over 1 KB).

        Only when no answer is owed on this connection: an interim answer must not overtake
        the answers to earlier pipelined requests (RFC 9110 15.2)."""
        owed = self._queue or self._task is not None
        if self._transport is not None and not owed and self._parser.get_http_version() == "1.1":
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body:  # chunked: no length to refuse on
            self._refuse(413, "body-too-large")
            raise _StopParsingError
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        request = self._make_request()
        keep_alive = self._parser.should_keep_alive() and not self._last
        self._queue.append((request, keep_alive))
        self._queued_bytes += len(request.body)
        self._body = []
        if not self._paused_reading and self._transport and self._backlogged():
            self._paused_reading = True  # a pipelining client gets no more than we answer
            self._transport.pause_reading()
        self._start_serving()

    def _backlogged(self) -> bool:
        """Too much parsed ahead of the answers (a count, or bodies: memory per connection)."""
        return len(self._queue) >= _MAX_QUEUED or self._queued_bytes > self._limits.max_body

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._limits.max_head:
            self._refuse(431, "head-too-large")
            raise _StopParsingError

    def _make_request(self) -> HttpRequest:
        url = self._url
        if not url.startswith(b"/"):
            url = _origin_form(url)
        path, _, query = url.partition(b"?")
        query = query.partition(b"#")[0]
        return HttpRequest(
            method=self._method,
            path=path.decode("latin-1"),
            query=query.decode("latin-1"),
            headers=self._headers,
            body=b"".join(self._body),
            peer_certificate=self._peer_certificate,
        )

    # -- answering ----------------------------------------------------------------------------

    def _start_serving(self) -> None:
        if self._task is None and self._queue:
            self._task = self._loop.create_task(self._serve())

    async def _serve(self) -> None:
        try:
            while self._queue and not self._lost:
                work = self._queue[0]
                if isinstance(work, _Refusal):
                    self._write_refusal(work.status)
                    return
                request, keep_alive = work
                response = await self._answer(request)
                self._queue.popleft()
                self._queued_bytes -= len(request.body)
                if self._lost:
                    return
                # decided after the handler: a stop() or an EOF may have come meanwhile
                ending = (self._eof or self._last) and not self._queue
                keep_alive = keep_alive and not self._server.draining and not ending
                assert self._transport is not None
                self._transport.write(self._encode(response, keep_alive, request.method))
                if not keep_alive:
                    self._transport.close()
                    return
                if self._paused_reading and not self._backlogged():
                    self._paused_reading = False
                    self._transport.resume_reading()
                if self._can_write is not None:
                    await self._can_write  # the client does not read: do not buffer for it
        finally:
            self._task = None
            self._idle_since = self._loop.time()
            if self._last and not self._queue and self._transport is not None:
                self._transport.close()

    async def _answer(self, request: HttpRequest) -> HttpResponse:
        server = self._server
        server.in_flight += 1
        try:
            return await server.handler(request)
        except Exception as exc:
            self._handler_failed(exc)
            return HttpResponse(500)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this connection is being torn down
            self._handler_failed(exc)  # something the handler awaited was cancelled
            return HttpResponse(500)
        finally:
            server.in_flight -= 1

    def _encode(self, response: HttpResponse, keep_alive: bool, method: str) -> bytes:
        try:
            return _encode_answer(response, keep_alive, method == "HEAD")
        except Exception as exc:  # a header the handler built cannot be sent
            self._handler_failed(exc)
            return _encode_answer(HttpResponse(500), keep_alive, method == "HEAD")

    def _handler_failed(self, exc: BaseException) -> None:
        # the type only: a message may quote the request (passwords, keys)
        logger.error("HTTP handler raised %s", type(exc).__name__)
        self._server.count("handler-error")

    def _refuse(self, status: int, kind: str) -> None:
        """Queue `status` behind the answers owed, discard further input, then close."""
        if self._refused:
            return
        self._refused = True
        self._in_message = self._in_head = False
        self._server.count(kind)
        self._queue.append(_Refusal(status))
        self._start_serving()

    def _write_refusal(self, status: int) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(_encode_answer(HttpResponse(status), keep_alive=False, head=False))
        if transport.can_write_eof():
            # keep reading (and discarding) a while: closing with unread input sends a reset,
            # which can destroy the answer before the client reads it
            transport.write_eof()
            self._linger_until = self._loop.time() + _LINGER
            if self._paused_reading:
                self._paused_reading = False
                transport.resume_reading()
        else:
            transport.close()

    def _drop_partial(self) -> None:
        self._in_message = self._in_head = False
        self._last = True

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- timers (the server's sweeper calls these) --------------------------------------------

    def check(self, now: float) -> None:
        """Enforce the request timeout, the idle timeout (also on a client that stopped reading
        its answers) and the refusal linger."""
        if self._lost or self._transport is None:
            return
        if self._can_write is not None and now - self._write_paused_at > self._limits.idle_timeout:
            self._transport.abort()  # it stopped reading its answers: nothing more will reach it
            return
        if self._linger_until:
            if now >= self._linger_until:
                self._transport.close()
            return
        if self._refused:
            return
        if self._in_message:
            # while reading is paused (answers owed) the client is not the slow one
            if now - self._started > self._limits.request_timeout and not self._paused_reading:
                self._refuse(408, "slow-client")
        elif (
            self._task is None
            and not self._queue
            and now - self._idle_since > self._limits.idle_timeout
        ):
            self._transport.close()

    def close_if_idle(self) -> None:
        """Close now unless a request is being received or answered (graceful stop)."""
        if self._transport is not None and not self._in_message and self._task is None:
            self._transport.close()

    def abort(self) -> None:
        self._abort()


def _origin_form(url: bytes) -> bytes:
    """The path and query of an absolute-form or odd request target (RFC 9112 3.2)."""
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return b"/"
    path = parsed.path or b"/"
    return path + b"?" + parsed.query if parsed.query else path


class HttpServer:
    """HTTP/1.1 on an already-bound, listening socket (the caller sets SO_REUSEPORT)."""

    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits,
        count: Callable[[str], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.count = count
        self.loop = loop
        self.in_flight = 0  # requests being handled now
        self.draining = False
        self.connections: set[_ServerConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        handler: Handler,
        sock: socket.socket,
        *,
        ssl: ssl_module.SSLContext | None = None,
        limits: HttpLimits = HttpLimits(),  # frozen: one shared default is safe
        count: Callable[[str], None] = _ignore,
    ) -> HttpServer:
        """Serve `handler` on `sock` until `stop`."""
        loop = asyncio.get_running_loop()
        server = cls(handler, limits, count, loop)
        server._server = await loop.create_server(
            lambda: _ServerConnection(server),
            sock=sock,
            ssl=ssl,
            ssl_handshake_timeout=limits.request_timeout if ssl is not None else None,
        )
        server._sweeper = loop.create_task(server._sweep())
        return server

    async def _sweep(self) -> None:
        # one timer for all connections: no timer armed or cancelled per request
        limits = self.limits
        period = min(max(min(limits.request_timeout, limits.idle_timeout) / 4, 0.05), 1.0)
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for connection in list(self.connections):
                try:
                    connection.check(now)
                except Exception as exc:  # a failing count() must not end all timeouts
                    logger.error("HTTP timeout check failed on %s", type(exc).__name__)
                    connection.abort()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (up to `grace` s), then close all."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close_if_idle()
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            await self._server.wait_closed()


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------


class Phases:
    """Where a client's time went; the client ADDS to it, so one object can span requests."""

    __slots__ = ("connect_ns", "connections", "tls_ns", "wait_ns")

    def __init__(self) -> None:
        self.connect_ns = 0  # TCP connect
        self.tls_ns = 0  # TLS handshake
        self.wait_ns = 0  # request written -> first byte of the answer
        self.connections = 0  # new connections opened

    def __repr__(self) -> str:
        return (
            f"Phases(connect_ns={self.connect_ns}, tls_ns={self.tls_ns}, "
            f"wait_ns={self.wait_ns}, connections={self.connections})"
        )


class _StaleConnectionError(Exception):
    """A reused connection closed before any byte of the answer: safe to retry once."""


class _ClientConnection(asyncio.Protocol):
    """One connection to the target; one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_body: int) -> None:
        self._loop = loop
        self._max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = False
        self.first_byte_ns = 0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[HttpResponse] | None = None
        self._head_request = False
        self._received = False
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._status = 0
        self._until_close = False  # no Content-Length, not chunked: the body ends at EOF
        self._stopped = False  # a callback stopped the parser on purpose

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._until_close and exc is None:
            self._finish(keep_alive=False)
        elif not self._received:
            waiter.set_exception(_StaleConnectionError())
        else:
            waiter.set_exception(ConnectionLostError("connection closed before the answer ended"))

    def send(self, data: bytes, head_request: bool) -> asyncio.Future[HttpResponse]:
        """Write one request; the future gets its answer."""
        assert self.transport is not None
        self._waiter = waiter = self._loop.create_future()
        self._head_request = head_request
        self._received = False
        self._headers = []
        self._body = []
        self._body_bytes = 0
        self._until_close = False
        self._stopped = False
        if self.closed:  # lost between connect (or the pool) and now: nothing was sent
            waiter.set_exception(_StaleConnectionError())
            return waiter
        self.transport.write(data)
        return waiter

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.close()  # bytes nobody asked for: this connection cannot be trusted again
            return
        if not self._received:
            self._received = True
            self.first_byte_ns = time.perf_counter_ns()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self._stopped:
                return  # a callback stopped the parser on purpose
            self._fail(MalformedAnswerError(f"not an HTTP/1.1 answer: {type(exc).__name__}"))

    def on_message_begin(self) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # more than the one answer asked for: never reuse this connection

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        if 100 <= self._status < 200:
            return  # an interim answer (100 Continue): the real one follows
        if self._head_request or self._status in (204, 304):
            # no body whatever the headers say (RFC 9112 6.3); llhttp would wait for one
            self._finish(keep_alive=self._parser.should_keep_alive())
            self._parser = httptools.HttpResponseParser(self)
            self._stopped = True
            raise _StopParsingError
        names = {name.lower() for name, _ in self._headers}
        self._until_close = "content-length" not in names and "transfer-encoding" not in names

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._max_body:
            self._fail(MalformedAnswerError(f"answer body over {self._max_body} bytes"))
            self._stopped = True
            raise _StopParsingError
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            self._headers = []
            return
        if self._waiter is not None and not self._waiter.done():
            self._finish(keep_alive=self._parser.should_keep_alive())

    def _finish(self, keep_alive: bool) -> None:
        assert self._waiter is not None
        self.keep_alive = keep_alive
        content_type = ""
        for name, value in self._headers:
            if name.lower() == "content-type":
                content_type = value
                break
        response = HttpResponse(
            self._status, content_type, b"".join(self._body), tuple(self._headers)
        )
        self._waiter.set_result(response)

    def _fail(self, error: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self.close()

    def time_out(self) -> None:
        self._fail(TargetTimeoutError("no answer in time"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class HttpClient:
    """HTTP/1.1 requests to one target: pooled keep-alive connections or one per request."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        keep_alive: bool = True,
        timeout: float = 30.0,
        max_body: int = 1 << 22,
    ) -> None:
        self._host = host
        self._port = port
        self._ssl = ssl
        self._server_hostname = server_hostname or host if ssl is not None else None
        self._keep_alive = keep_alive
        self._timeout = timeout
        self._max_body = max_body
        self._idle: list[_ClientConnection] = []
        self._closed = False
        default_port = 443 if ssl is not None else 80
        self._host_header = host if port == default_port else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            self._host_header = f"[{host}]:{port}"

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        phases: Phases | None = None,
    ) -> HttpResponse:
        """Send one request and return its answer; only `WireError`s for transport trouble."""
        data = self._encode(method, target, headers, body)
        head_request = method == "HEAD"
        connection = self._take_idle()
        if connection is not None:
            try:
                return await self._exchange(connection, data, head_request, phases)
            except _StaleConnectionError:
                pass  # the server closed it while idle: once more on a fresh connection
        connection = await self._connect(phases)
        try:
            return await self._exchange(connection, data, head_request, phases)
        except _StaleConnectionError:
            raise ConnectionLostError("connection closed before any answer") from None

    async def close(self) -> None:
        """Close every pooled connection; connections in use close when their answer is in."""
        self._closed = True
        while self._idle:
            connection = self._idle.pop()
            if connection.transport is not None:
                connection.transport.close()

    def _take_idle(self) -> _ClientConnection | None:
        while self._idle:
            connection = self._idle.pop()  # most recent first: least likely to be stale
            if not connection.closed and not _closing(connection):
                return connection
        return None

    def _encode(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        names = set()
        for name, value in headers:
            names.add(name.lower())
            lines.append(f"{name}: {value}\r\n")
        if "host" not in names:
            lines.append(f"Host: {self._host_header}\r\n")
        if "content-length" not in names and (body or method not in ("GET", "HEAD")):
            lines.append(f"Content-Length: {len(body)}\r\n")
        if not self._keep_alive:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1") + body

    async def _exchange(
        self,
        connection: _ClientConnection,
        data: bytes,
        head_request: bool,
        phases: Phases | None,
    ) -> HttpResponse:
        loop = asyncio.get_running_loop()
        waiter = connection.send(data, head_request)
        sent_ns = time.perf_counter_ns()
        timer = loop.call_later(self._timeout, connection.time_out)
        try:
            response = await waiter
        except BaseException:
            connection.close()
            raise
        finally:
            timer.cancel()
        if phases is not None:
            phases.wait_ns += connection.first_byte_ns - sent_ns
        if self._keep_alive and connection.keep_alive and not connection.closed:
            if self._closed:
                connection.close()
            else:
                self._idle.append(connection)
        elif connection.transport is not None:
            connection.transport.close()
        return response

    async def _connect(self, phases: Phases | None) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        connection = _ClientConnection(loop, self._max_body)
        start = time.perf_counter_ns()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: connection, self._host, self._port),
                self._timeout,
            )
        except TimeoutError:
            raise TargetTimeoutError(f"connect to {self._host}:{self._port} timed out") from None
        except OSError as exc:
            raise TargetUnavailableError(
                f"cannot connect to {self._host}:{self._port}: {exc.strerror or exc}"
            ) from exc
        connected = time.perf_counter_ns()
        if phases is not None:
            phases.connect_ns += connected - start
            phases.connections += 1
        if self._ssl is not None:
            await self._start_tls(connection, transport)
            if phases is not None:
                phases.tls_ns += time.perf_counter_ns() - connected
        return connection

    async def _start_tls(self, connection: _ClientConnection, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        assert self._ssl is not None
        try:
            tls = await asyncio.wait_for(
                loop.start_tls(
                    transport,
                    connection,
                    self._ssl,
                    server_hostname=self._server_hostname,
                    ssl_handshake_timeout=self._timeout,
                ),
                self._timeout,
            )
        except TimeoutError:
            transport.abort()
            raise TargetTimeoutError(f"TLS handshake with {self._host} timed out") from None
        except ssl_module.SSLError as exc:
            transport.abort()
            raise TargetUnavailableError(f"TLS handshake with {self._host} failed: {exc}") from exc
        except (ConnectionError, OSError) as exc:
            transport.abort()
            raise ConnectionLostError(f"connection lost in the TLS handshake: {exc}") from exc
        if tls is None:
            transport.abort()
            raise ConnectionLostError("connection lost in the TLS handshake")
        connection.transport = tls


def _closing(connection: _ClientConnection) -> bool:
    transport = connection.transport
    return transport is None or transport.is_closing()


def handler_exchange(handler: Handler, peer_certificate: bytes | None = None) -> Exchange:
    """An `Exchange` that calls a server `Handler` directly: protocol tests without sockets."""

    async def exchange(
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        phases: Phases | None = None,
    ) -> HttpResponse:
        del phases  # nothing on a wire to time
        path, _, query = target.partition("?")
        lowered: Mapping[str, str] = {name.lower(): value for name, value in headers}
        request = HttpRequest(method, path, query, lowered, body, peer_certificate)
        return await handler(request)

    return exchange
