"""One worker process of `enrollbench serve`: its own event loop (uvloop) and service handle,
its own listening sockets on the shared ports (SO_REUSEPORT), EST and SCEP handlers, metrics.

Every worker is the same; the kernel spreads connections over them. Their state is shared
through the state folder (the store, the administrators' board, the metrics snapshots).
SIGTERM or SIGINT: stop accepting, finish the requests in flight, write the metrics, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.profile import Profile
from bench.run.components import Components
from bench.run.shard import HsmKey
from bench.serve.metrics import Metrics, render
from bench.serve.state import ServerState
from engine import _der
from engine.approval import ReviewBoard
from engine.flow import Step
from engine.keys import KeyFamily, key_spec, signature_algorithm
from engine.request import EXTENSION_REQUEST_OID, SAN_OID
from engine.service import SharedCAService, SubjectPolicy
from engine.wire.est import CsrAttribute, EstHandler
from engine.wire.http import HttpLimits, HttpServer
from engine.wire.seam import Handler, HttpRequest, HttpResponse

METRICS_SECONDS = 1.0
STOP_GRACE_SECONDS = 10.0
# RFC 5480 2.1.1.1 named curves, the value of an id-ecPublicKey CSR attribute (RFC 7030 A.4)
_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_CURVES = {"p256": "1.2.840.10045.3.1.7", "p384": "1.3.132.0.34"}
_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
_ED25519 = "1.3.101.112"


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """What one worker needs (pickled to a spawned process)."""

    index: int
    state: Path
    profile: Profile
    est_address: tuple[str, int] | None
    scep_address: tuple[str, int] | None
    plain_http: bool
    subject_policy: SubjectPolicy
    manual: bool
    board: ReviewBoard | None
    limits: HttpLimits = field(default_factory=HttpLimits)
    # the real parts the server started or reached (their secrets reach the worker only
    # through this pickled plan) and the token holding the issuing CA's key
    components: Components = field(default_factory=Components)
    hsm: HsmKey | None = None


def listening_socket(address: tuple[str, int], *, listen: bool) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT; the parent binds one without listening to hold
    the port (a socket that does not listen gets no connections), each worker one that does."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    if listen:
        sock.listen(1024)
        sock.setblocking(False)
    return sock


def csr_attributes(profile: Profile, policy: SubjectPolicy) -> tuple[CsrAttribute, ...]:
    """What the CA asks of requests (EST csrattrs, RFC 7030 4.5.2, laid out as its A.4
    example): the profile's device key type, the signature algorithm under the profile's hash,
    and, when the CA copies a requested subjectAltName (subject policy `match`), that extension.
    """
    config = profile.engine_config()
    spec = key_spec(config.device_key)
    identifier = signature_algorithm(spec.family, config.hash_name).identifier
    oid = _der.sequence_elements(identifier, _der.SEQUENCE)[0]
    attributes = [CsrAttribute(_der.decode_oid(oid[2:]))]
    if spec.family is KeyFamily.EC:
        curve = _der.encode_oid(_CURVES[spec.name])
        attributes.insert(0, CsrAttribute(_EC_PUBLIC_KEY, (curve,)))
    else:
        family = _RSA_ENCRYPTION if spec.family is KeyFamily.RSA else _ED25519
        if family != attributes[0].oid:
            attributes.insert(0, CsrAttribute(family))
    if policy is SubjectPolicy.MATCH:
        wanted = (_der.encode_oid(SAN_OID),)
        attributes.append(CsrAttribute(EXTENSION_REQUEST_OID, wanted))
    return tuple(attributes)


def tls_context(state: ServerState) -> ssl.SSLContext:
    """TLS 1.3 with the state's server certificate; a client certificate is asked for, not
    required (simplereenroll is authenticated by one, simpleenroll by a password)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    certificate, key = state.tls_files()
    context.load_cert_chain(certificate, key)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(state.chain_pem)
    return context


class Worker:
    """The handlers of one worker, with its metrics around them."""

    def __init__(self, plan: WorkerPlan) -> None:
        self.plan = plan
        self.state = ServerState(plan.state)
        self.metrics = Metrics(self.state.metrics, plan.index)
        config = plan.profile.engine_config()
        self.parts = _parts(plan, config.hash_name)
        self.service = SharedCAService(
            config,
            self.state.material(),
            self.state.store,
            review_board=plan.board,
            subject_policy=plan.subject_policy,
            manual=plan.manual,
            observe=self._observe_step,
            **self.parts,
        )
        self.est: Handler = EstHandler(
            self.service,
            count=self._counter("est"),
            csr_attributes=csr_attributes(plan.profile, plan.subject_policy),
        )
        self.scep: Handler | None = None
        if plan.scep_address is not None:
            from engine.wire.scep import ScepHandler  # noqa: PLC0415 (only with a SCEP port)

            ra_certificate, ra_key = self.state.ra()
            self.scep = ScepHandler(
                self.service, ra_certificate, ra_key, count=self._counter("scep")
            )
        self.servers: list[HttpServer] = []

    def _observe_step(self, step: Step, nanoseconds: int) -> None:
        self.metrics.observe("step", step.label, nanoseconds)

    def _counter(self, protocol: str) -> Callable[[str], None]:
        def count(kind: str) -> None:
            self.metrics.count("refused", protocol=protocol, kind=kind)

        return count

    def routes(self, protocol: str) -> Handler:
        """The handler of one port: its protocol, plus /health and /metrics."""
        handler = self.est if protocol == "est" or self.scep is None else self.scep

        async def route(request: HttpRequest) -> HttpResponse:
            # health and scrapes are not the protocol's requests: neither counted nor timed
            if request.path == "/health":
                return HttpResponse(200, "application/json", self.health())
            if request.path == "/metrics":
                return HttpResponse(200, "text/plain; version=0.0.4", await self.exposition())
            began = time.perf_counter_ns()
            answer = await handler(request)
            self.metrics.count("requests", protocol=protocol, status=str(answer.status))
            self.metrics.observe("request", protocol, time.perf_counter_ns() - began)
            return answer

        return route

    def health(self) -> bytes:
        """Which worker answered (a client can tell SO_REUSEPORT's choice, and a restart)."""
        status = {"status": "ok", "worker": self.plan.index, "pid": os.getpid()}
        return json.dumps(status).encode()

    async def exposition(self) -> bytes:
        self.metrics.flush()  # this worker's own counts current; the others' a second behind
        counts = await self.service.counts_async()
        gauges = {
            "approvals_pending": float(counts.get("awaiting", 0)),
            "certificates_published": float(counts.get("published", 0)),
            "workers_reporting": float(len(list(self.state.metrics.glob("worker-*.json")))),
        }
        return render(self.state.metrics, gauges).encode()

    async def run(self, stop: asyncio.Event) -> None:
        plan = self.plan
        server_tls = None if plan.plain_http else tls_context(self.state)
        ports = [("est", plan.est_address, server_tls), ("scep", plan.scep_address, None)]
        for protocol, address, context in ports:
            if address is None:
                continue
            sock = listening_socket(address, listen=True)
            self.servers.append(
                await HttpServer.start(
                    self.routes(protocol),
                    sock,
                    ssl=context,
                    limits=plan.limits,
                    count=self._counter(protocol),
                )
            )
        flusher = asyncio.get_running_loop().create_task(self._flush_metrics(stop))
        self.metrics.flush()
        await stop.wait()
        await asyncio.gather(*(s.stop(STOP_GRACE_SECONDS) for s in self.servers))
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        self.metrics.flush()
        self.service.close()
        await _close_parts(self.parts)

    async def _flush_metrics(self, stop: asyncio.Event) -> None:
        parent = os.getppid()
        while True:
            await asyncio.sleep(METRICS_SECONDS)
            self.metrics.flush()
            if os.getppid() != parent:
                # the server was killed (SIGKILL leaves no time to stop us): an orphan
                # worker must not keep serving a port nobody supervises
                stop.set()


def _parts(plan: WorkerPlan, hash_name: str) -> dict[str, Any]:
    """This worker's own clients of the real parts (SharedCAService's keyword arguments): the
    directory and the database connect on first use inside the worker's loop; the token's
    session opens now, so a key that cannot be used stops the worker before it is ready."""
    parts: dict[str, Any] = {}
    components = plan.components
    if components.ldap is not None:
        from engine.ldap_directory import LdapDirectory  # noqa: PLC0415 (LDAP servers only)

        parts["directory"] = LdapDirectory(components.ldap)
    if components.postgresql is not None:
        from engine.pgstores import PgDatabase, PgServiceStore  # noqa: PLC0415

        parts["store"] = PgServiceStore(PgDatabase(components.postgresql))
    if plan.hsm is not None:
        from engine.hsm import HsmSigner  # noqa: PLC0415 (HSM-held keys only)

        hsm = plan.hsm
        parts["ca_signer"] = HsmSigner.open(hsm.module, hsm.uri, hsm.pin, hash_name)
    return parts


async def _close_parts(parts: dict[str, Any]) -> None:
    """Close the clients `_parts` made (the service leaves what it was given open)."""
    if "store" in parts:
        await parts["store"].close()
    if "directory" in parts:
        parts["directory"].close()


def worker_main(plan: WorkerPlan, ready: Path) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGINT as SIGTERM
    loop = _new_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    worker = Worker(plan)

    async def main() -> None:
        task = asyncio.ensure_future(worker.run(stop))
        while len(worker.servers) < _ports(plan):
            if task.done():
                await task  # a worker that cannot listen never reports ready: its error
                return
            await asyncio.sleep(0.01)
        ready.write_text(json.dumps({"worker": plan.index}))
        await task

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def _ports(plan: WorkerPlan) -> int:
    return (plan.est_address is not None) + (plan.scep_address is not None)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # noqa: PLC0415 (optional: not on every platform)
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
