"""`enrollbench serve` as the tests run it: a real server process on loopback ports, with helpers
to enroll, scrape and read its store. Every server is stopped when its test ends."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from engine.population import simulated_enrollee
from engine.wire.est import EstClient
from engine.wire.http import HttpClient
from engine.wire.seam import DeviceCredentials, Ticket
from tests.conftest import vector_key

# the console script of the environment running the tests, never one found on PATH
ENROLLBENCH = Path(sys.executable).parent / "enrollbench"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 40.0
PROFILE = "smoke"  # 300 simulated users, seed 1, a P-256 CA
SEED = 1
T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run a coroutine on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


class Served:
    """One `enrollbench serve` process (a session leader: its group is it and its workers)."""

    def __init__(self, process: subprocess.Popen[bytes], state: Path, log: Path) -> None:
        self.process = process
        self.state = state
        self.log = log
        self.info = self._wait_listening()

    def _wait_listening(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        listening = self.state / "serve.json"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}: {self.errors()}")
            with contextlib.suppress(OSError, ValueError):
                info: dict[str, Any] = json.loads(listening.read_text())
                if info["pid"] == self.process.pid:  # not a killed predecessor's file
                    return info
            time.sleep(0.05)
        raise AssertionError(f"serve did not start in {START_TIMEOUT} s: {self.errors()}")

    def errors(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def est_port(self) -> int:
        return int(str(self.info["est"]).split(":")[2].split("/")[0])

    @property
    def scep_port(self) -> int:
        return int(str(self.info["scep"]).split(":")[2].split("/")[0])

    @property
    def store(self) -> Path:
        return self.state / "store.sqlite"

    def credentials(self) -> dict[str, str]:
        lines = (self.state / "credentials").read_text().splitlines()
        return dict(line.split(":", 1) for line in lines)

    def get(self, path: str, port: int | None = None) -> tuple[int, bytes]:
        """A GET on a new connection: (status, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", port or self.est_port, timeout=30)
        try:
            connection.request("GET", path)
            answer = connection.getresponse()
            return answer.status, answer.read()
        finally:
            connection.close()

    def health(self, port: int | None = None) -> dict[str, Any]:
        status, body = self.get("/health", port)
        assert status == 200
        found: dict[str, Any] = json.loads(body)
        return found

    def worker_pids(self, port: int | None = None) -> set[int]:
        """Every worker's pid, asked over new connections until each has answered once
        (SO_REUSEPORT spreads new connections; 2**-200 odds of missing one of two)."""
        workers = int(self.info["workers"])
        found: set[int] = set()
        for _ in range(200):
            found.add(int(self.health(port)["pid"]))
            if len(found) == workers:
                return found
        raise AssertionError(f"only {len(found)} of {workers} workers answered")

    def metrics(self, port: int | None = None) -> str:
        status, body = self.get("/metrics", port)
        assert status == 200
        return body.decode()

    def published(self) -> dict[bytes, bytes]:
        """The store's published certificates: serial -> DER."""
        connection = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True)
        try:
            rows = connection.execute("SELECT serial, certificate FROM published").fetchall()
        finally:
            connection.close()
        return {bytes(serial): bytes(certificate) for serial, certificate in rows}

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def kill_group(self) -> None:
        """SIGKILL the server and its workers at once (no chance to clean up)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(STOP_TIMEOUT)

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(STOP_TIMEOUT)


ServerFactory = Callable[..., Served]


def start_server(
    state: Path, *options: str, workers: int = 2, profile: str = PROFILE, plain: bool = True
) -> Served:
    """`enrollbench serve PROFILE` on free loopback ports with its state in `state`."""
    log = state.parent / f"{state.name}-serve-{time.monotonic_ns()}.log"
    command = [
        str(ENROLLBENCH), "serve", profile, "--listen", "127.0.0.1:0",
        "--scep-listen", "127.0.0.1:0", "--workers", str(workers), "--state", str(state),
        *(["--plain-http"] if plain else []), *options,
    ]  # fmt: skip
    with log.open("wb") as errors:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True
        )
    try:
        return Served(process, state, log)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT)
        raise


@contextlib.contextmanager
def serving(state: Path, *options: str, **keywords: Any) -> Iterator[Served]:
    """A server for a block; killed (group-wide) if the block did not stop it."""
    served = start_server(state, *options, **keywords)
    try:
        yield served
    finally:
        if served.process.poll() is None:
            served.kill_group()
        else:  # the group's workers too, should one have outlived its parent
            with contextlib.suppress(ProcessLookupError):
                os.killpg(served.process.pid, signal.SIGKILL)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers for one test (`server(*options, workers=2)`); all killed afterwards."""
    started: list[contextlib.ExitStack] = []

    def factory(*options: str, state: Path | None = None, **keywords: Any) -> Served:
        stack = contextlib.ExitStack()
        started.append(stack)
        return stack.enter_context(serving(state or tmp_path / "state", *options, **keywords))

    yield factory
    for stack in reversed(started):
        stack.close()


def pinned(served: Served) -> dict[int, http.client.HTTPConnection]:
    """One kept-alive connection to each worker (by pid), found by asking /health on new
    connections until every worker has answered one."""
    found: dict[int, http.client.HTTPConnection] = {}
    for _ in range(200):
        connection = http.client.HTTPConnection("127.0.0.1", served.est_port, timeout=30)
        connection.request("GET", "/health")
        pid = int(json.loads(connection.getresponse().read())["pid"])
        if pid in found:
            connection.close()
        else:
            found[pid] = connection
        if len(found) == served.info["workers"]:
            return found
    raise AssertionError("a worker never answered")


# ---- devices and their requests ----


@cache
def user_dn(index: int) -> x509.Name:
    return x509.Name.from_rfc4514_string(simulated_enrollee(index, SEED).user.dn.text)


def user_id(index: int) -> str:
    return simulated_enrollee(index, SEED).user.user_id


def csr(index: int, key: str = "p256-4") -> bytes:
    """A PKCS #10 request with user `index`'s directory DN, signed by a vector key (ECDSA
    signatures are randomised: every call is a new request, so a new EST transaction)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(user_dn(index))
    request = builder.sign(vector_key(key), hashes.SHA256())
    return request.public_bytes(serialization.Encoding.DER)


def device(served: Served, index: int, request_der: bytes | None = None) -> DeviceCredentials:
    who = user_id(index)
    password = served.credentials()[who]
    request = request_der if request_der is not None else csr(index)
    return DeviceCredentials(f"device-{who}", who, password, None, request)


async def enroll_all(
    served: Served,
    devices: Sequence[DeviceCredentials],
    *,
    keep_alive: bool = True,
    concurrency: int = 8,
    timeout: float = 30.0,
) -> list[Ticket]:
    """simpleenroll each device once (EST over plain HTTP); the tickets in order."""
    http = HttpClient("127.0.0.1", served.est_port, keep_alive=keep_alive, timeout=timeout)
    client = EstClient(http.request)
    gate = asyncio.Semaphore(concurrency)

    async def one(credentials: DeviceCredentials) -> Ticket:
        async with gate:
            return await client.submit(credentials, client.prepare(credentials, ()))

    try:
        return list(await asyncio.gather(*(one(d) for d in devices)))
    finally:
        await http.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, every: float = 0.1) -> bool:
    """Poll `predicate` until true or `timeout`; its last value (the test asserts it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(every)
    return True


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)
