"""bench.serve.command: the parent process (workers restarted, a clean stop) and what a kill
leaves behind; `Supervisor` without processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import cast

import pytest

from bench.errors import UsageError
from bench.serve.command import Supervisor, parse_address
from engine.errors import WireError
from engine.wire.est import (
    PKCS10,
    basic_authorization,
    decode_base64,
    decode_certs_only,
    encode_base64,
)
from engine.wire.seam import Ticket, TicketStatus
from tests.bench.serve.conftest import (
    ENROLLBENCH,
    PROFILE,
    Served,
    ServerFactory,
    connect,
    csr,
    device,
    enroll_all,
    run,
    user_id,
    wait_for,
)


class FakeProcess:
    """What Supervisor reads of a worker process."""

    def __init__(self, alive: bool = True, exitcode: int | None = None) -> None:
        self.alive = alive
        self.exitcode = exitcode

    def is_alive(self) -> bool:
        return self.alive


def supervised(limit: int) -> tuple[Supervisor, list[int]]:
    started: list[int] = []

    def start(index: int) -> BaseProcess:
        started.append(index)
        return cast(BaseProcess, FakeProcess())

    return Supervisor(start, limit), started


def test_supervisor_restarts_dead_workers_only() -> None:
    """A dead worker is started again in its slot; live ones are left alone."""
    supervisor, started = supervised(limit=3)
    processes = {0: FakeProcess(), 1: FakeProcess(False, -9), 2: FakeProcess()}
    assert supervisor.check(cast(dict[int, BaseProcess], processes))
    assert started == [1] and supervisor.restarts == 1
    assert all(p.is_alive() for p in processes.values())


def test_supervisor_gives_up_after_its_limit(capsys: pytest.CaptureFixture[str]) -> None:
    """Restarts beyond the limit end the supervision (a worker that always dies is not looped)."""
    supervisor, started = supervised(limit=2)
    for _ in range(2):
        assert supervisor.check({0: cast(BaseProcess, FakeProcess(False, 1))})
    assert not supervisor.check({0: cast(BaseProcess, FakeProcess(False, 1))})
    assert started == [0, 0]
    assert "2 restarts already: stopping" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:8443", ("::1", 8443))],
)
def test_parse_address(text: str, address: tuple[str, int]) -> None:
    """HOST:PORT, IPv6 in brackets."""
    assert parse_address(text, "--listen") == address


@pytest.mark.parametrize("text", ["8443", "host:", "host:99999", ":80", "host:x"])
def test_parse_address_refuses(text: str) -> None:
    """Anything but HOST:PORT with a port up to 65535 is a usage error naming the flag."""
    with pytest.raises(UsageError, match="--listen"):
        parse_address(text, "--listen")


def test_a_killed_worker_is_restarted(server: ServerFactory) -> None:
    """SIGKILL one worker: the server starts another in its place, which serves; the server
    still stops cleanly."""
    served = server(workers=2)
    before = served.worker_pids()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        try:  # a connection queued on the dying worker is reset; the new one takes a while
            pids = served.worker_pids()
        except (OSError, AssertionError):
            return False
        return victim not in pids and len(pids) == 2

    assert wait_for(replaced, timeout=30)
    tickets = run(enroll_all(served, [device(served, n) for n in range(20)], keep_alive=False))
    assert {t.status for t in tickets} == {TicketStatus.ISSUED}
    assert "restarting it (1/10)" in served.errors()
    assert served.stop() == 0


def test_after_sigkill_every_answered_certificate_is_in_the_store(server: ServerFactory) -> None:
    """Devices enroll (16 in flight, new connections) until 60 certificates have come back;
    then the whole server is SIGKILLed mid-flight. Every certificate a device received is in
    store.sqlite; requests cut off fail as wire errors, never as anything else."""
    served = server(workers=2)
    received: list[Ticket] = []
    killed = asyncio.Event()

    async def scenario() -> list[Ticket | BaseException]:
        async def watch(ticket: Ticket) -> Ticket:
            received.append(ticket)
            if len(received) == 60 and not killed.is_set():
                killed.set()
                served.kill_group()
            return ticket

        async def one(n: int) -> Ticket:
            # bounded: a connection reset between connect and send waits out the client's
            # timeout (engine.wire.http sends on the closed connection, reported)
            credentials = [device(served, n)]
            [ticket] = await enroll_all(served, credentials, keep_alive=False, timeout=5)
            return await watch(ticket)

        gate = asyncio.Semaphore(16)

        async def gated(n: int) -> Ticket:
            async with gate:
                if killed.is_set():
                    raise WireError("not sent: the server is gone")
                return await one(n)

        return list(await asyncio.gather(*(gated(n) for n in range(300)), return_exceptions=True))

    outcomes = run(scenario())
    issued = [o.certificate for o in outcomes if isinstance(o, Ticket)]
    errors = [o for o in outcomes if not isinstance(o, Ticket)]
    assert len(issued) >= 60 and all(isinstance(e, WireError) for e in errors), errors[:3]
    assert {t.status for t in received} == {TicketStatus.ISSUED}
    assert set(issued) <= set(served.published().values())


def partial_enrollment(served: Served, index: int) -> tuple[socket.socket, bytes]:
    """A connection that has sent a simpleenroll head and half its body; the rest to send."""
    body = encode_base64(csr(index))
    password = served.credentials()[user_id(index)]
    head = (
        "POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {PKCS10}\r\n"
        f"Authorization: {basic_authorization(user_id(index), password)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = connect(served.est_port)
    half = len(body) // 2
    sock.sendall(head + body[:half])
    return sock, body[half:]


def read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_finishes_requests_in_flight_then_exits_0(server: ServerFactory) -> None:
    """Three requests half sent, then SIGTERM: the server stops accepting (new connections are
    refused), the three finish sending and are answered with their certificates and
    `Connection: close`, and the server exits 0."""
    served = server(workers=2)
    port = served.est_port
    partial = [partial_enrollment(served, n) for n in (40, 41, 42)]
    try:
        served.signal(signal.SIGTERM)
        assert wait_for(lambda: refuses_connections(port), timeout=20)
        for sock, rest in partial:
            sock.sendall(rest)
        answers = [read_answer(sock) for sock, _ in partial]
    finally:
        for sock, _ in partial:
            sock.close()
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head, head
        [certificate] = decode_certs_only(decode_base64(body))
        assert certificate in served.published().values()
    assert served.process.wait(40) == 0
    assert not (served.state / "serve.json").exists()


def test_sigint_stops_cleanly(server: ServerFactory) -> None:
    """SIGINT (Ctrl-C reaches the whole group): the server stops its workers and exits 0."""
    served = server(workers=2)
    pids = served.worker_pids()
    os.killpg(served.process.pid, signal.SIGINT)
    assert served.process.wait(40) == 0
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's parent may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_workers_stop_when_their_server_is_killed(server: ServerFactory) -> None:
    """SIGKILL the server process alone: its workers notice they are orphans, stop serving
    and exit (nobody would supervise them or free the ports)."""
    served = server(workers=2)
    pids = served.worker_pids()
    served.process.kill()
    served.process.wait(30)
    assert wait_for(lambda: not any(_running(pid) for pid in pids), timeout=30)
    assert refuses_connections(served.est_port)


def test_a_port_another_server_serves_is_refused(server: ServerFactory, tmp_path: Path) -> None:
    """A second server on the first one's port (SO_REUSEPORT would let it join, and the kernel
    would spread devices over two CAs) stops with a one-line error; so does a taken port."""
    served = server(workers=1)
    port = served.est_port
    second = subprocess.run(
        [str(ENROLLBENCH), "serve", PROFILE, "--listen", f"127.0.0.1:{port}",
         "--scep-listen", "off", "--workers", "1", "--state", str(tmp_path / "other")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert second.returncode == 2
    assert second.stderr.strip() == (
        f"enrollbench: error: --listen 127.0.0.1:{port}: another server listens there"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        third = subprocess.run(
            [str(ENROLLBENCH), "serve", PROFILE, "--listen", "127.0.0.1:0",
             "--scep-listen", f"127.0.0.1:{taken.getsockname()[1]}", "--workers", "1",
             "--state", str(tmp_path / "other")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert third.returncode == 2 and "Traceback" not in third.stderr
    assert "--scep-listen" in third.stderr and "in use" in third.stderr
    assert served.health()["status"] == "ok"


def test_one_server_per_state_folder(server: ServerFactory) -> None:
    """A second server on the same state folder stops with a one-line error and leaves the
    first one's serve.json and metrics alone."""
    served = server(workers=1)
    listening = (served.state / "serve.json").read_text()
    second = subprocess.run(
        [str(ENROLLBENCH), "serve", PROFILE, "--listen", "127.0.0.1:0", "--scep-listen", "off",
         "--workers", "1", "--state", str(served.state)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert second.returncode == 2
    assert second.stderr.strip().endswith("is in use by another enrollbench serve")
    assert (served.state / "serve.json").read_text() == listening
    assert list((served.state / "metrics").glob("worker-*.json"))
    assert served.stop() == 0
