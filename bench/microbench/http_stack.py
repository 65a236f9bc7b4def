"""What the HTTP stack costs: engine.wire.http against aiohttp on a do-nothing endpoint.

    python -m bench.microbench.http_stack [--rounds 7] [--requests 20000] [--concurrency 32]
                                          [--pin 0 | --client-cpus 0 --server-cpus 1]
                                          [--fleet [--fleet-requests 1000]] [--quiet 0.2]

A POST of 2 KB answered with 1.2 KB, keep-alive, `--concurrency` requests in flight. Each server
runs in its own child process on uvloop, the client in this one (on uvloop too): our client
against our server (A), aiohttp's client against aiohttp's server (B, access log off), and our
stack again against a second server process of its own (A', for the A/A line that says how far
a ratio can be trusted). Blocks alternate A B A' (reversed every other round so no side always
runs first); each block reports requests/s and CPU microseconds per request, client (this
process's `time.process_time`) and server (the child's utime+stime from /proc) apart, and how
many CPUs the rest of the machine kept busy meanwhile (a noisy block shows). Printed:
each side's medians, and per round the ratios ours/aiohttp and A/A' with their min and max.

`--fleet` compares instead our stack with TLS 1.3 and a new connection per request (a fleet of
devices) against it plain with keep-alive (a gateway), with the client's mean phases.

aiohttp is not a dependency of enrollbench: install it into the environment to measure B
(`pip install aiohttp`); without it only A and A' run. `--pin 0` pins all processes to CPU 0
(client and server then share one core, as they would beside each other on a loaded box);
`--client-cpus 0 --server-cpus 1` gives each its own. Unpinned on 2 vCPUs the scheduler sometimes
puts client and server on one core and sometimes not, and a block's rate moves 2-4x with it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.wire.http import HttpClient, HttpServer, Phases
from engine.wire.seam import HttpRequest, HttpResponse

REQUEST_BODY = b"r" * 2048
ANSWER_BODY = b"a" * 1200
CONTENT_TYPE = "application/octet-stream"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Send = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Block:
    """One block's figures for one side."""

    side: str
    requests: int
    seconds: float
    client_cpu: float  # seconds
    server_cpu: float  # seconds
    others_cpu: float = 0.0  # seconds the rest of the machine was busy meanwhile (noise)

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def client_us(self) -> float:
        return self.client_cpu / self.requests * 1e6

    @property
    def server_us(self) -> float:
        return self.server_cpu / self.requests * 1e6

    @property
    def total_us(self) -> float:
        return self.client_us + self.server_us


def machine_busy() -> float:
    """CPU seconds all cores have been busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


def process_cpu(pid: int) -> float:
    """utime + stime of a process, seconds (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# -- servers (child processes) --------------------------------------------------------------------


async def _do_nothing(request: HttpRequest) -> HttpResponse:
    del request
    return HttpResponse(200, CONTENT_TYPE, ANSWER_BODY)


async def _serve_ours(sock: socket.socket, tls: ssl.SSLContext | None, stop: asyncio.Event) -> None:
    server = await HttpServer.start(_do_nothing, sock, ssl=tls)
    await stop.wait()
    await server.stop(grace=1.0)


async def _serve_aiohttp(sock: socket.socket, stop: asyncio.Event) -> None:
    from aiohttp import web  # noqa: PLC0415 (not a dependency: only this side needs it)

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER_BODY, content_type=CONTENT_TYPE)

    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    await stop.wait()
    await runner.cleanup()


def serve(stack: str, tls_dir: str | None) -> None:
    """Child: bind an ephemeral port, print it, serve until SIGTERM."""
    import uvloop  # noqa: PLC0415 (the child needs it, importing the module must not)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    print(sock.getsockname()[1], flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        if stack == "aiohttp":
            await _serve_aiohttp(sock, stop)
        else:
            await _serve_ours(sock, _server_tls(Path(tls_dir)) if tls_dir else None, stop)

    uvloop.run(main())


class ServerProcess:
    """A server child: its pid (for /proc) and port."""

    def __init__(self, stack: str, tls_dir: Path | None, pin: set[int] | None) -> None:
        command = [sys.executable, "-m", "bench.microbench.http_stack", "--serve", stack]
        if tls_dir is not None:
            command += ["--tls-dir", str(tls_dir)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)  # noqa: S603
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.process.kill()
            raise RuntimeError(f"{stack} server did not start")
        self.port = int(line)
        self.pid = self.process.pid
        if pin:
            os.sched_setaffinity(self.pid, pin)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- TLS material (fleet mode) --------------------------------------------------------------------


def write_tls_material(folder: Path) -> None:
    """A self-signed P-256 server certificate for 127.0.0.1 (a benchmark, not a unit test)."""
    from cryptography import x509  # noqa: PLC0415 (fleet mode only)
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _server_tls(folder: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


def _client_tls(folder: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(folder / "cert.pem"))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


# -- clients --------------------------------------------------------------------------------------


def ours_sender(client: HttpClient, phases: Phases) -> Send:
    headers = (("Content-Type", CONTENT_TYPE),)

    async def send() -> None:
        answer = await client.request("POST", "/", headers, REQUEST_BODY, phases)
        if answer.status != 200 or len(answer.body) != len(ANSWER_BODY):
            raise RuntimeError(f"unexpected answer {answer.status}")

    return send


def aiohttp_sender(session: Any, url: str) -> Send:
    headers = {"Content-Type": CONTENT_TYPE}

    async def send() -> None:
        async with session.post(url, data=REQUEST_BODY, headers=headers) as answer:
            body = await answer.read()
            if answer.status != 200 or len(body) != len(ANSWER_BODY):
                raise RuntimeError(f"unexpected answer {answer.status}")

    return send


async def run_block(side: str, send: Send, pid: int, requests: int, concurrency: int) -> Block:
    """`requests` sends by `concurrency` workers; wall time and both processes' CPU."""
    shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    async def worker(count: int) -> None:
        for _ in range(count):
            await send()

    busy_before, server_before = machine_busy(), process_cpu(pid)
    cpu_before = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(worker(share) for share in shares))
    seconds = time.perf_counter() - start
    client_cpu = time.process_time() - cpu_before
    server_cpu = process_cpu(pid) - server_before
    others = max(machine_busy() - busy_before - client_cpu - server_cpu, 0.0)
    return Block(side, requests, seconds, client_cpu, server_cpu, others)


# -- the comparison -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Side:
    """One side of the comparison: a label, its server, how to send."""

    label: str
    server: ServerProcess
    send: Send
    requests: int  # per block


async def _open_sides(
    options: argparse.Namespace, stack: AsyncExitStack, tls_dir: Path, pin: set[int] | None
) -> tuple[list[Side], dict[str, Phases]]:
    phases: dict[str, Phases] = {}

    def server(kind: str, tls: bool = False) -> ServerProcess:
        process = ServerProcess(kind, tls_dir if tls else None, pin)
        stack.callback(process.close)
        return process

    async def ours(label: str, tls: bool, keep_alive: bool, requests: int) -> Side:
        process = server("ours", tls)
        context = _client_tls(tls_dir) if tls else None
        client = HttpClient(
            "127.0.0.1",
            process.port,
            ssl=context,
            server_hostname="localhost",
            keep_alive=keep_alive,
        )
        stack.push_async_callback(client.close)
        phases[label] = Phases()
        return Side(label, process, ours_sender(client, phases[label]), requests)

    if options.fleet:
        return [
            await ours("keep-alive", False, True, options.requests),
            await ours("tls-per-request", True, False, options.fleet_requests),
            await ours("keep-alive'", False, True, options.requests),
        ], phases
    sides = [await ours("ours", False, True, options.requests)]
    try:
        import aiohttp  # noqa: PLC0415 (optional: measured only when installed)
    except ImportError:
        print("aiohttp is not installed (pip install aiohttp): measuring ours against ours only")
    else:
        process = server("aiohttp")
        connector = aiohttp.TCPConnector(limit=options.concurrency)
        session = aiohttp.ClientSession(connector=connector)
        stack.push_async_callback(session.close)
        url = f"http://127.0.0.1:{process.port}/"
        sides.append(Side("aiohttp", process, aiohttp_sender(session, url), options.requests))
    sides.append(await ours("ours'", False, True, options.requests))
    return sides, phases


async def compare(options: argparse.Namespace) -> list[list[Block]]:
    """Rounds of alternating blocks; every round has one block per side."""
    client_cpus = set(options.client_cpus or options.pin or ())
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    pin = set(options.server_cpus or options.pin or ()) or None
    with tempfile.TemporaryDirectory(prefix="http-stack-") as folder:
        tls_dir = Path(folder)
        if options.fleet:
            write_tls_material(tls_dir)
        async with AsyncExitStack() as stack:
            sides, phases = await _open_sides(options, stack, tls_dir, pin)
            for side in sides:  # warm-up: connections, caches, the allocator
                warmup = min(options.warmup, side.requests)
                await run_block(side.label, side.send, side.server.pid, warmup, options.concurrency)
            for phase in phases.values():  # count the measured blocks only
                phase.connect_ns = phase.tls_ns = phase.wait_ns = phase.connections = 0
            rounds, attempts = await _measure_rounds(sides, options)
            _print_phases(phases, {s.label: attempts * s.requests for s in sides})
    return rounds


async def _measure_rounds(
    sides: Sequence[Side], options: argparse.Namespace
) -> tuple[list[list[Block]], int]:
    """`options.rounds` rounds; with --quiet, a round the rest of the machine disturbed (more
    than that many CPUs busy beside us in any block) is discarded and run again (at most 3x)."""
    labels = [side.label for side in sides]
    rounds: list[list[Block]] = []
    attempts = 0
    while len(rounds) < options.rounds and attempts < 3 * options.rounds:
        order = sides if attempts % 2 == 0 else sides[::-1]  # no side always runs first
        attempts += 1
        blocks = [
            await run_block(s.label, s.send, s.server.pid, s.requests, options.concurrency)
            for s in order
        ]
        blocks.sort(key=lambda block: labels.index(block.side))
        noisy = options.quiet is not None and any(
            block.others_cpu / block.seconds > options.quiet for block in blocks
        )
        print(("discarded: " if noisy else "") + "  ".join(map(_block_line, blocks)), flush=True)
        if not noisy:
            rounds.append(blocks)
    if attempts > len(rounds):
        print(f"{attempts - len(rounds)} of {attempts} rounds discarded as disturbed")
    if not rounds:
        raise SystemExit("every round was disturbed: no figures")
    return rounds, attempts


def _block_line(block: Block) -> str:
    return (
        f"{block.side}: {block.per_second:7.0f}/s cpu client {block.client_us:5.1f} "
        f"server {block.server_us:5.1f} µs (others {block.others_cpu / block.seconds:4.2f} CPUs)"
    )


def _print_phases(phases: dict[str, Phases], counts: dict[str, int]) -> None:
    """Each side's mean client phases over every measured block (`counts` requests)."""
    for label, phase in phases.items():
        count = counts[label]
        print(
            f"{label} client phases per request: connect {phase.connect_ns / count / 1e3:.1f} µs, "
            f"TLS {phase.tls_ns / count / 1e3:.1f} µs, wait {phase.wait_ns / count / 1e3:.1f} µs, "
            f"{phase.connections} connections"
        )


METRICS: tuple[tuple[str, Callable[[Block], float]], ...] = (
    ("requests/s", lambda b: b.per_second),
    ("client CPU µs/request", lambda b: b.client_us),
    ("server CPU µs/request", lambda b: b.server_us),
    ("total CPU µs/request", lambda b: b.total_us),
)


def summarize(rounds: Sequence[Sequence[Block]]) -> list[str]:
    """Each side's medians, then per-round ratios of the first side to every other side."""
    labels = [block.side for block in rounds[0]]
    lines = []
    for index, label in enumerate(labels):
        medians = ", ".join(
            f"{name} {statistics.median(metric(r[index]) for r in rounds):.1f}"
            for name, metric in METRICS
        )
        lines.append(f"median {label}: {medians}")
    for index in range(1, len(labels)):
        for name, metric in METRICS:
            # a block too short for the server's 10 ms CPU clock ticks reads 0: no ratio
            ratios = [metric(r[0]) / metric(r[index]) for r in rounds if metric(r[index]) > 0]
            head = f"ratio {labels[0]}/{labels[index]} {name}:"
            if not ratios:
                lines.append(f"{head} n/a (blocks too short to measure)")
                continue
            lines.append(
                f"{head} median {statistics.median(ratios):.3f}"
                f" (min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} rounds)"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.microbench.http_stack")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per block")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2000, help="requests per side, unmeasured")
    parser.add_argument("--pin", type=int, nargs="+", help="CPUs for client and servers")
    parser.add_argument("--client-cpus", type=int, nargs="+", help="CPUs for the client")
    parser.add_argument("--server-cpus", type=int, nargs="+", help="CPUs for the servers")
    parser.add_argument("--fleet", action="store_true", help="TLS per request vs keep-alive")
    parser.add_argument(
        "--fleet-requests", type=int, default=1000, help="requests per TLS-per-request block"
    )
    parser.add_argument(
        "--quiet", type=float, help="discard rounds where other processes kept this many CPUs busy"
    )
    parser.add_argument("--serve", choices=["ours", "aiohttp"], help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.serve:
        serve(options.serve, options.tls_dir)
        return 0
    import uvloop  # noqa: PLC0415 (the measuring process only)

    print(
        f"POST {len(REQUEST_BODY)} B -> {len(ANSWER_BODY)} B, {options.concurrency} in flight, "
        f"{options.requests} requests per block, {options.rounds} rounds, uvloop, "
        f"client CPUs {options.client_cpus or options.pin or 'any'}, "
        f"server CPUs {options.server_cpus or options.pin or 'any'}"
    )
    rounds = uvloop.run(compare(options))
    for line in summarize(rounds):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
