"""`enrollbench serve` and `enrollbench approve`: run the CA service; decide pending requests.

serve: prepares the state folder, holds the ports (bound without listening, so the kernel never
hands it a connection), starts N workers that each listen on them with SO_REUSEPORT, writes
`serve.json` when every worker is ready, restarts a worker that dies, and on SIGINT/SIGTERM
asks every worker to finish its requests in flight and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from bench.errors import UsageError
from bench.profile import Profile, load_profile
from bench.run.components import Components, components_for
from bench.run.runner import embedded_hsm
from bench.run.shard import HsmKey
from bench.serve import metrics
from bench.serve.state import BringYourOwnCA, ServerState, prepare_state, write_private
from bench.serve.worker import WorkerPlan, listening_socket, worker_main
from engine.approval import ReviewBoard
from engine.service import SharedCAService, SubjectPolicy
from engine.wire.http import HttpLimits

READY_TIMEOUT_S = 120.0
DEFAULT_EST = "127.0.0.1:8443"
DEFAULT_SCEP = "127.0.0.1:8080"
# A worker that dies is restarted, but not in a loop: this many restarts end the server.
MAX_RESTARTS = 10
_DEFAULT_LIMITS = HttpLimits()


def default_state(profile_name: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "enrollbench" / f"serve-{profile_name}"


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) with a port from 0 to 65535."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8443")
    return host, int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", help="a shipped profile name or a .toml path")
    parser.add_argument("--listen", default=DEFAULT_EST, help="EST address (HOST:PORT; 0: any)")
    parser.add_argument(
        "--scep-listen", default=DEFAULT_SCEP, help="SCEP address (plain HTTP); 'off' for none"
    )
    parser.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    parser.add_argument("--state", type=Path, help="state folder (default under XDG_STATE_HOME)")
    parser.add_argument(
        "--plain-http", action="store_true", help="serve EST without TLS (est+http://)"
    )
    parser.add_argument(
        "--ca-cert",
        type=Path,
        action="append",
        default=[],
        help="bring your own CA: a PEM/DER certificate (repeat, issuing CA last)",
    )
    parser.add_argument("--ca-key", type=Path, help="bring your own CA: its PEM key")
    parser.add_argument(
        "--ca-p12",
        type=Path,
        help="bring your own CA as PKCS #12 (password in $ENROLLBENCH_CA_PASSWORD)",
    )
    parser.add_argument(
        "--max-body",
        type=int,
        default=_DEFAULT_LIMITS.max_body,
        help="largest request body accepted, bytes (larger: 413)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=_DEFAULT_LIMITS.request_timeout,
        help="seconds a client has to send a whole request (slower: 408)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def command(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile, list(args.set))
    workers = args.workers or os.cpu_count() or 1
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    est = parse_address(args.listen, "--listen")
    scep = None if args.scep_listen == "off" else parse_address(args.scep_listen, "--scep-listen")
    own = None
    if args.ca_cert or args.ca_key or args.ca_p12:
        own = BringYourOwnCA(tuple(args.ca_cert), args.ca_key, args.ca_p12)
    if args.max_body < 1 or not 0 < args.request_timeout <= 3600:
        raise UsageError("--max-body must be positive, --request-timeout in (0, 3600] s")
    limits = HttpLimits(max_body=args.max_body, request_timeout=args.request_timeout)
    state = prepare_state(args.state or default_state(profile.name), profile, own)
    server = Server(profile, state, est, scep, workers, plain_http=args.plain_http, limits=limits)
    return server.run()


def hold_port(address: tuple[str, int], flag: str) -> socket.socket:
    """Bind the port the workers will share (SO_REUSEPORT), without listening.

    SO_REUSEPORT would also let this server join a port another server of the same user
    already serves, and the kernel would spread devices over two CAs: a port that accepts a
    connection before our workers exist is refused."""
    try:
        holder = listening_socket(address, listen=False)
    except OSError as exc:
        raise UsageError(f"{flag} {_host(address[0])}:{address[1]}: {exc.strerror}") from exc
    host, port = holder.getsockname()[:2]
    if address[1] and _accepts(str(host), int(port)):
        holder.close()
        raise UsageError(f"{flag} {_host(address[0])}:{port}: another server listens there")
    return holder


# an unspecified address is asked on loopback
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 (looked up, not bound)


def _accepts(host: str, port: int) -> bool:
    """Whether something listens on host:port (an unspecified host is asked on loopback)."""
    host = _LOOPBACK.get(host, host)
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class Server:
    """The parent process: ports held, workers started and watched, a clean stop."""

    def __init__(
        self,
        profile: Profile,
        state: ServerState,
        est: tuple[str, int],
        scep: tuple[str, int] | None,
        workers: int,
        *,
        plain_http: bool,
        limits: HttpLimits | None = None,
    ) -> None:
        self.profile = profile
        self.state = state
        self.workers = workers
        self.plain_http = plain_http
        self.limits = limits or HttpLimits()
        self.holders = [hold_port(est, "--listen")]
        if scep is not None:
            try:
                self.holders.append(hold_port(scep, "--scep-listen"))
            except UsageError:
                self.holders[0].close()
                raise
        self.est = self._bound(0)
        self.scep = self._bound(1) if scep is not None else None
        self.stopping = False
        self.components = Components()
        self.hsm: HsmKey | None = None
        self.board: ReviewBoard | None = None
        approval = profile.get("approval", "mode") == "administrator"
        self.manual = approval and profile.get("serve", "approval") == "manual"
        if approval and not self.manual:
            self.board = ReviewBoard.shared(profile.get("approval", "administrators"), state.folder)
            resume_reviews(self.board, state.store)

    def _bound(self, n: int) -> tuple[str, int]:
        host, port = self.holders[n].getsockname()[:2]
        return str(host), int(port)

    def plan(self, index: int) -> WorkerPlan:
        return WorkerPlan(
            index,
            self.state.folder,
            self.profile,
            self.est,
            self.scep,
            self.plain_http,
            SubjectPolicy(self.profile.get("serve", "subject_policy")),
            self.manual,
            self.board,
            self.limits,
            self.components,
            self.hsm,
        )

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM (exit 0) or until workers die too often (exit 1)."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        lock = self._lock_state()
        # an earlier server's leftovers must not be read as this one's (killed, it left them)
        self.state.listening.unlink(missing_ok=True)
        metrics.clear(self.state.metrics)
        context = multiprocessing.get_context("spawn")
        processes: dict[int, BaseProcess] = {}
        with (
            tempfile.TemporaryDirectory(prefix="enrollbench-serve-") as scratch,
            contextlib.ExitStack() as parts,
        ):

            def start(index: int) -> BaseProcess:
                return self._start(context, index, Path(scratch))

            try:
                self._start_parts(parts, Path(scratch))
                for index in range(self.workers):
                    processes[index] = start(index)
                if not self._wait_ready(processes, Path(scratch)):
                    return 0  # stopped while starting
                self._announce()
                supervisor = Supervisor(start)
                while not self.stopping and supervisor.check(processes):
                    time.sleep(0.2)
                return 0 if self.stopping else 1
            finally:
                # always: a worker left running would keep this process from exiting
                self._stop_workers(processes)
                self.state.listening.unlink(missing_ok=True)
                self.state.database.unlink(missing_ok=True)
                if self.board is not None:
                    self.board.close()
                for holder in self.holders:
                    holder.close()
                os.close(lock)  # releases the state folder

    def _start_parts(self, stack: contextlib.ExitStack, scratch: Path) -> None:
        """Start (or reach) the profile's real components for the server's lifetime, stopped
        with `stack` after the workers; one down is a UsageError naming it (exit 2)."""
        self.components = stack.enter_context(components_for(self.profile, scratch / "parts"))
        if self.components.postgresql is not None:
            write_private(self.state.database, self.components.postgresql.encode())
        if self.profile.get("ca", "signing") == "softhsm":
            self.hsm = embedded_hsm(scratch / "softhsm", self.state.material())

    def _lock_state(self) -> int:
        """One server per state folder: a second would clear the first's metrics and
        serve.json (the store itself is safe to share). The lock dies with the process."""
        path = self.state.folder / "serve.lock"
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            for holder in self.holders:
                holder.close()
            raise UsageError(
                f"{self.state.folder} is in use by another enrollbench serve"
            ) from None
        return descriptor

    def _stop_workers(self, processes: dict[int, BaseProcess]) -> None:
        """SIGTERM each worker (it finishes its requests in flight), then wait for them."""
        for process in processes.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in processes.values():
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join(5)

    def _stop(self, *_: Any) -> None:
        self.stopping = True

    def _start(self, context: Any, index: int, scratch: Path) -> BaseProcess:
        ready = scratch / f"ready-{index}"
        ready.unlink(missing_ok=True)
        process: BaseProcess = context.Process(
            target=worker_main, args=(self.plan(index), ready), name=f"enrollbench-serve-{index}"
        )
        process.start()
        return process

    def _wait_ready(self, processes: dict[int, BaseProcess], scratch: Path) -> bool:
        """True when every worker listens; False when told to stop first."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all((scratch / f"ready-{i}").exists() for i in processes):
            if self.stopping:
                return False
            for index, process in processes.items():
                if not process.is_alive():
                    raise UsageError(f"serve: worker {index} failed to start ({process.exitcode})")
            if time.monotonic() > deadline:
                raise UsageError("serve: the workers did not start in time")
            time.sleep(0.02)
        return True

    def _announce(self) -> None:
        scheme = "http" if self.plain_http else "https"
        host, port = self.est
        urls = {"est": f"{scheme}://{_host(host)}:{port}/.well-known/est"}
        if self.scep is not None:
            urls["scep"] = f"http://{_host(self.scep[0])}:{self.scep[1]}/scep"
        listening = {
            **urls,
            "pid": os.getpid(),
            "workers": self.workers,
            "plain_http": self.plain_http,
            "ca_chain": str(self.state.chain_pem),
            "credentials": str(self.state.credentials),
            "scep_ra_sha256": self.state.ra_fingerprint(),
            # the real parts in use and where (no credentials), as a run's result records them
            "components": {
                **self.components.describe(),
                "ca_key": "memory" if self.hsm is None else "softhsm (PKCS #11)",
            },
        }
        scratch = self.state.listening.with_suffix(".tmp")
        scratch.write_text(json.dumps(listening, indent=1))
        os.replace(scratch, self.state.listening)
        print(
            f"enrollbench serve: {self.profile.name} with {self.workers} workers\n"
            f"  EST   {urls['est']}\n"
            + (f"  SCEP  {urls['scep']}\n" if "scep" in urls else "")
            + f"  health and metrics: /health, /metrics on each port\n"
            f"  CA chain     {self.state.chain_pem}\n"
            f"  credentials  {self.state.credentials}\n"
            f"  SCEP RA SHA-256 {listening['scep_ra_sha256']}\n"
            f"  state        {self.state.folder}",
            flush=True,
        )


def resume_reviews(board: ReviewBoard, store: Path) -> int:
    """Reviews an earlier server booked that are still under way keep their administrators
    busy on the new board: FCFS gives each administrator's last review the latest decision
    times, so the `administrators` latest pending ones are booked, one per administrator."""
    connection = sqlite3.connect(str(store), timeout=30.0)
    try:
        now = time.time()
        rows = connection.execute(
            "SELECT decide_at FROM transactions WHERE status = 'pending' "
            "AND approve IS NOT NULL AND decide_at > ? ORDER BY decide_at DESC LIMIT ?",
            (now, board.administrators),
        ).fetchall()
    except sqlite3.OperationalError:  # a store from before transactions were kept
        rows = []
    finally:
        connection.close()
    for (decide_at,) in rows:
        board.reserve(float(decide_at) - time.time(), time.monotonic)
        board.release()  # the request is pending in the store, not on this board
    return len(rows)


class Supervisor:
    """Restarts a worker that died, but not in a loop: after `limit` restarts it gives up."""

    def __init__(self, start: Callable[[int], BaseProcess], limit: int = MAX_RESTARTS) -> None:
        self.start = start
        self.limit = limit
        self.restarts = 0

    def check(self, processes: dict[int, BaseProcess]) -> bool:
        """Restart the dead workers in `processes`; False when the limit is exceeded."""
        for index, process in list(processes.items()):
            if process.is_alive():
                continue
            self.restarts += 1
            if self.restarts > self.limit:
                print(
                    f"enrollbench serve: worker {index} exited ({process.exitcode}); "
                    f"{self.limit} restarts already: stopping",
                    file=sys.stderr,
                )
                return False
            print(
                f"enrollbench serve: worker {index} exited ({process.exitcode}); "
                f"restarting it ({self.restarts}/{self.limit})",
                file=sys.stderr,
            )
            processes[index] = self.start(index)
        return True


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def add_approve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", help="the profile the server runs")
    parser.add_argument("--state", type=Path, help="the server's state folder")
    parser.add_argument("transactions", nargs="*", help="transaction IDs to decide (none: list)")
    parser.add_argument("--deny", action="store_true", help="deny instead of approve")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    # `approve PROFILE --state DIR ID...`: plain argparse binds the (empty) ID list to the
    # first positional run and refuses IDs after an option; intermixed parsing takes them
    parser.parse_known_args = _Intermixed(parser)  # type: ignore[method-assign, assignment]


class _Intermixed:
    """A subparser's parse_known_args that parses positionals and options intermixed (the
    stdlib's intermixed parse calls parse_known_args itself: that inner call is the plain one)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.busy = False

    def __call__(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self.busy:
            return argparse.ArgumentParser.parse_known_args(self.parser, args, namespace)
        self.busy = True
        try:
            return self.parser.parse_known_intermixed_args(args, namespace)
        finally:
            self.busy = False


def approve_command(args: argparse.Namespace) -> int:
    """List pending requests, or approve (or deny) the ones named, in the server's store."""
    profile = load_profile(args.profile, list(args.set))
    state = ServerState(args.state or default_state(profile.name))
    if not state.store.exists():
        raise UsageError(f"no server state in {state.folder}")
    store = _database_store(profile, state)
    service = SharedCAService(
        profile.engine_config(), state.material(), state.store, manual=True, store=store
    )

    async def decide() -> int:
        try:
            return await _decide(service, args.transactions, approve=not args.deny)
        finally:
            if store is not None:
                await store.close()

    try:
        return asyncio.run(decide())
    finally:
        service.close()


def _database_store(profile: Profile, state: ServerState) -> Any:
    """The PostgreSQL store of the server running on `state`, or None for its SQLite file."""
    if profile.get("components", "database") != "postgresql":
        return None
    if not state.database.exists():
        raise UsageError(f"no server with a PostgreSQL database runs on {state.folder}")
    from engine.pgstores import PgDatabase, PgServiceStore  # noqa: PLC0415 (PostgreSQL only)

    return PgServiceStore(PgDatabase(state.database.read_text(), max_size=1))


async def _decide(service: SharedCAService, transactions: Sequence[str], *, approve: bool) -> int:
    if not transactions:
        for transaction, user, since in await service.pending_async():
            waited = time.time() - since
            print(f"{transaction}  {user}  waiting {waited:.0f} s")
        return 0
    missing = [t for t in transactions if not await service.decide_async(t, approve)]
    for transaction in missing:
        print(f"enrollbench: {transaction}: no such pending request", file=sys.stderr)
    return 2 if missing else 0
