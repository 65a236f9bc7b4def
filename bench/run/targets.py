"""Where a run's devices enroll: the embedded engine, a served one on loopback, or any CA by URL.

`target.url` (profile) or `--target`: `embedded` (the engine in each shard, the default),
`served` (`enrollbench serve` on loopback for the run), `est+https://HOST:PORT/.well-known/est`
(optionally `/LABEL`), `est+http://...`, `scep+http://HOST:PORT/PATH`.

Against a wire target the device side stays here: keys and requests (from the corpus, or live),
the chain cache (cacerts / GetCACert through it), polling, the public-key match of the returned
certificate, install. Secrets (passwords, challenges) come from environment variables or files
named in the profile, never from flags, output or results.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import multiprocessing
import os
import signal
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import rsa

from bench.errors import UsageError
from bench.profile import Profile
from engine.chaincache import ChainCache
from engine.device import Device, DeviceIdentity, DeviceProfile
from engine.errors import EnrollmentError
from engine.flow import Outcome, StepRecorder
from engine.keys import KeyFamily, PrivateKey, key_spec, load_private_key
from engine.population import device_identity, simulated_enrollee
from engine.request import RequestTemplate
from engine.stores import Database, SqliteDeviceStores
from engine.wire.est import EstClient
from engine.wire.flow import certificate_serial, enroll_over, split_certificates
from engine.wire.http import HttpClient, Phases
from engine.wire.scep import ScepClient, add_challenge_password
from engine.wire.seam import DeviceCredentials, EnrollmentClient, HttpResponse, Ticket

if TYPE_CHECKING:
    from bench.run.shard import ShardPlan

Protocol = Literal["est", "scep"]


@dataclass(frozen=True, slots=True)
class WireTarget:
    """A CA on the wire, as the generator reaches it (no secrets in here: it is recorded)."""

    url: str
    protocol: Protocol
    tls: bool
    host: str
    port: int
    path: str
    served: bool = False  # started by this run (`target.url = "served"`)
    trust: str = ""  # a CA file to trust for TLS (served: the state's chain)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def describe(self) -> dict[str, object]:
        """What a result records of the target."""
        return {
            "url": self.url,
            "kind": "served" if self.served else "remote",
            "protocol": self.protocol,
            "tls": self.tls,
            "loopback": self.loopback,
        }


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_target(url: str, trust: str = "", *, served: bool = False) -> WireTarget:
    """An `est+https://`, `est+http://` or `scep+http://` URL; UsageError naming what is wrong."""
    scheme, _, _ = url.partition("://")
    protocol, _, transport = scheme.partition("+")
    if protocol not in ("est", "scep") or transport not in ("http", "https"):
        raise UsageError(
            f"target {url!r}: expected embedded, served, est+https://, est+http:// or scep+http://"
        )
    if protocol == "scep" and transport == "https":
        raise UsageError(f"target {url!r}: SCEP runs over plain HTTP (the message is protected)")
    parts = urlsplit(url.replace(scheme, transport, 1))
    if parts.hostname is None:
        raise UsageError(f"target {url!r}: no host")
    try:
        port = parts.port or (443 if transport == "https" else 80)
    except ValueError as exc:
        raise UsageError(f"target {url!r}: {exc}") from exc
    default_path = "/.well-known/est" if protocol == "est" else "/scep"
    return WireTarget(
        url,
        "est" if protocol == "est" else "scep",
        transport == "https",
        parts.hostname,
        port,
        parts.path.rstrip("/") or default_path,
        served,
        trust,
    )


def check_target(profile: Profile, target: WireTarget) -> None:
    """Refuse what cannot work or is not allowed before anything starts."""
    family = key_spec(profile.get("device", "key")).family
    if target.protocol == "scep" and family is not KeyFamily.RSA:
        raise UsageError(
            f"SCEP devices need RSA keys (the CA envelopes its reply to the device's key); "
            f"device.key = {profile.get('device', 'key')!r} cannot enroll over SCEP: choose "
            f"rsa2048 (e.g. --set device.key='rsa2048')"
        )
    if target.loopback:
        return
    if not profile.get("target", "allow_remote"):
        raise UsageError(
            f"target {target.url}: not on loopback; allow it with --allow-remote "
            f"(runs against remote CAs are capped by target.max_rate and target.max_devices)"
        )
    load = profile.values["load"]
    cap = float(profile.get("target", "max_rate"))
    offered = float(load["rate"] if load["mode"] == "open" else load["concurrency"])
    if offered > cap:
        raise UsageError(f"remote target: load {offered:g} is above target.max_rate {cap:g}")
    if int(load["devices"]) > int(profile.get("target", "max_devices")):
        raise UsageError(
            f"remote target: {load['devices']} devices is above target.max_devices "
            f"{profile.get('target', 'max_devices')}"
        )


PROBE_TIMEOUT_S = 10.0


def probe(target: WireTarget) -> None:
    """Ask the target for its CA certificates before anything starts: a target that does not
    answer is one line naming it, not a run of failed devices."""

    async def ask() -> None:
        http = HttpClient(target.host, target.port, ssl=client_tls(target), timeout=PROBE_TIMEOUT_S)
        try:
            exchange = _Exchange(http)
            client: EnrollmentClient
            if target.protocol == "est":
                client = EstClient(exchange, target.path)
            else:
                client = ScepClient(exchange, target.path)
            await client.ca_certificates()
        finally:
            await http.close()

    try:
        asyncio.run(ask())
    except EnrollmentError as exc:
        raise UsageError(f"target {target.url} does not answer: {exc}") from exc
    except ssl.SSLError as exc:
        raise UsageError(f"target {target.url}: TLS failed: {exc.reason}") from exc


def client_tls(target: WireTarget) -> ssl.SSLContext | None:
    if not target.tls:
        return None
    context = ssl.create_default_context(cafile=target.trust or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _ChainCache(ChainCache):
    """The device side's chain cache; `peek` gives what it holds (for the run's artifacts)."""

    def peek(self) -> tuple[bytes, ...]:
        for _, joined in self._entries.values():
            return split_certificates(joined)
        return ()


class _Exchange:
    """`HttpClient.request` with this shard's phase totals (connect, TLS, wait)."""

    def __init__(self, client: HttpClient) -> None:
        self.client = client
        self.phases = Phases()

    async def __call__(
        self,
        method: str,
        target: str,
        headers: tuple[tuple[str, str], ...] = (),
        body: bytes = b"",
    ) -> HttpResponse:
        return await self.client.request(method, target, headers, body, self.phases)


class _ScepDevices:
    """The SCEP client with what its devices bring: their keys (the reply is enveloped to the
    device's key), a challengePassword in every request, and the pkiMessages prepared before
    the clock when device crypto is precomputed."""

    def __init__(
        self,
        client: EnrollmentClient,
        keys: dict[str, PrivateKey],
        prepared: dict[str, object],
        challenge: str,
    ) -> None:
        self.client = client
        self.keys = keys
        self.prepared = prepared
        self.challenge = challenge

    async def ca_certificates(self) -> tuple[bytes, ...]:
        return await self.client.ca_certificates()

    def prepare(self, device: DeviceCredentials, ca: tuple[bytes, ...]) -> object:
        ready = self.prepared.get(device.device_id)
        if ready is not None:
            return ready
        device = self._keyed(device)
        if not isinstance(device.key, rsa.RSAPrivateKey):  # pragma: no cover (check_target)
            raise UsageError("SCEP devices need RSA keys")
        request = add_challenge_password(
            device.request_der, device.key, self.challenge or device.password
        )
        return self.client.prepare(device._replace(request_der=request), ca)

    async def submit(self, device: DeviceCredentials, prepared: object) -> Ticket:
        return await self.client.submit(self._keyed(device), prepared)

    async def poll(self, device: DeviceCredentials, prepared: object, ticket: Ticket) -> Ticket:
        return await self.client.poll(self._keyed(device), prepared, ticket)

    async def close(self) -> None:
        await self.client.close()

    def _keyed(self, device: DeviceCredentials) -> DeviceCredentials:
        key = self.keys.get(device.device_id)
        return device if key is None else device._replace(key=key)


class WireSystem:
    """A shard's device side against a wire target (the shard's `System`)."""

    def __init__(self, plan: ShardPlan, directory: str, target: WireTarget) -> None:
        profile = plan.profile
        self.profile = profile
        self.target = target
        seed = profile.get("", "seed")
        config = profile.engine_config()
        self._poll_timeout = float(profile.get("target", "poll_timeout"))
        self._database = Database(Path(directory) / f"devices{plan.index}.sqlite")
        self._stores = SqliteDeviceStores(self._database)
        spec = key_spec(config.device_key)
        self._device_profile = DeviceProfile(
            spec, config.hash_name, config.key_protection, config.request_path
        )
        self._template = RequestTemplate(spec.family)
        enrollees = [simulated_enrollee(i, seed) for i in plan.device_indices]
        self.users = {e.user.user_id: e.user for e in enrollees}
        passwords = _passwords(profile, {e.user.user_id: e.password for e in enrollees})
        corpus = _corpus(plan)
        self.identities: list[DeviceIdentity] = []
        for n, enrollee in enumerate(enrollees):
            crypto = corpus[n] if corpus is not None else (None, None, None)
            identity = device_identity(enrollee, config.profile_id, *crypto)
            self.identities.append(replace(identity, password=passwords[identity.user_id]))
        self.cache = _ChainCache(config.chain_cache_ttl, time.monotonic)
        self._clients: list[HttpClient] = []
        keep_alive = profile.get("target", "connection") == "keep-alive"
        self.exchange = _Exchange(self._http(keep_alive=keep_alive))
        self.client = self._client(self.exchange)
        if target.protocol == "scep":
            self.client = self._scep_ready(self.client, profile)

    def _http(self, *, keep_alive: bool) -> HttpClient:
        client = HttpClient(
            self.target.host,
            self.target.port,
            ssl=client_tls(self.target),
            keep_alive=keep_alive,
            timeout=float(self.profile.get("target", "timeout")),
        )
        self._clients.append(client)
        return client

    def _client(self, exchange: _Exchange) -> EnrollmentClient:
        if self.target.protocol == "est":
            return EstClient(exchange, self.target.path)
        client: EnrollmentClient = ScepClient(exchange, self.target.path)
        return client

    def _scep_ready(self, client: EnrollmentClient, profile: Profile) -> EnrollmentClient:
        """SCEP: each device's request carries its challenge; with precomputed crypto the
        requests and pkiMessages are made here, before the clock (GetCACert first)."""
        challenge = _secret_env(profile.get("target", "challenge_env"))
        keys: dict[str, PrivateKey] = {}
        prepared: dict[str, object] = {}
        precomputed = profile.get("device", "crypto") == "precomputed"
        setup_client = HttpClient(self.target.host, self.target.port, ssl=client_tls(self.target))
        setup = self._client(_Exchange(setup_client))

        async def fetch() -> tuple[bytes, ...]:
            try:
                return await setup.ca_certificates()
            finally:
                await setup_client.close()

        ca = asyncio.run(fetch()) if precomputed else ()
        for n, identity in enumerate(self.identities):
            if identity.key_der is None:
                continue  # live keys: the request is built on the clock
            key = load_private_key(identity.key_der)
            if not isinstance(key, rsa.RSAPrivateKey):  # pragma: no cover (check_target)
                raise UsageError("SCEP devices need RSA keys")
            keys[identity.device_id] = key
            if identity.request_der is None:
                continue
            request = add_challenge_password(
                identity.request_der, key, challenge or identity.password
            )
            self.identities[n] = replace(identity, request_der=request)
            if precomputed:
                credentials = DeviceCredentials(
                    identity.device_id, identity.user_id, identity.password, key, request
                )
                prepared[identity.device_id] = client.prepare(credentials, ca)
        return _ScepDevices(client, keys, prepared, challenge)

    @property
    def approvals_pending(self) -> int:
        return 0  # the server's queue: scrape its metrics

    @property
    def approvals_pending_in_run(self) -> int:
        return 0

    async def enroll(self, identity: DeviceIdentity, recorder: StepRecorder) -> Outcome:
        device = Device(identity, self._device_profile, self._template, self._stores, self._stores)
        return await enroll_over(
            device,
            self.users[identity.user_id],
            self.client,
            self.cache,
            self.target.url,
            recorder,
            poll_timeout=self._poll_timeout,
        )

    def phases(self) -> dict[str, int]:
        """The HTTP client's phases over the run: connect, TLS handshake and wait (request
        written to the first byte of the answer), in ns, and the connections opened."""
        phases = self.exchange.phases
        return {
            "connect_ns": phases.connect_ns,
            "tls_ns": phases.tls_ns,
            "wait_ns": phases.wait_ns,
            "connections": phases.connections,
        }

    def installed(self, samples: Sequence[tuple[str, int]]) -> list[tuple[str, bytes]]:
        """The certificates devices installed, for the run's artifacts (user ID, DER)."""
        self._database.flush()
        found = []
        for user_id, serial in samples:
            row = self._database.read_one(
                "SELECT certificate FROM key_store WHERE device_id = ? ORDER BY rowid DESC",
                (f"device-{user_id}",),
            )
            if row is not None and certificate_serial(bytes(row[0])) == serial:
                found.append((user_id, bytes(row[0])))
        return found

    def close(self) -> None:
        self._database.close()


def _corpus(plan: ShardPlan) -> list[tuple[bytes, bytes, bytes]] | None:
    from bench.run.corpus import read_corpus  # noqa: PLC0415 (the shard's own import cycle)

    return None if plan.corpus is None else read_corpus(plan.corpus, plan.device_indices)


def _secret_env(name: str) -> str:
    if not name:
        return ""
    value = os.environ.get(name)
    if value is None:
        raise UsageError(f"the environment variable {name} (a secret the profile names) is unset")
    return value


def _passwords(profile: Profile, simulated: dict[str, str]) -> dict[str, str]:
    """Each device's password: one for all from an environment variable, per user from a
    credentials file, or the simulated users' own."""
    shared = _secret_env(profile.get("target", "password_env"))
    if shared:
        return dict.fromkeys(simulated, shared)
    path = profile.get("target", "credentials_file")
    if not path:
        return simulated
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"target.credentials_file {path}: {exc.strerror}") from exc
    found = dict(line.split(":", 1) for line in lines if ":" in line)
    return {user: found.get(user, password) for user, password in simulated.items()}


def server_workers(profile: Profile) -> int:
    """A served target's worker processes: the profile's, or one per core.

    The CA's side of an enrollment costs about three times the device side here (measured,
    P-256 over EST: ~450 µs of server CPU against ~150 µs of generator CPU), so the server gets
    every core and the generator a quarter of them (`generator_workers`), sharing the cores."""
    return int(profile.get("target", "server_workers")) or (os.cpu_count() or 1)


def generator_workers() -> int:
    """A served run's shard processes by default: a quarter of the cores, at least one."""
    return max(1, (os.cpu_count() or 1) // 4)


def _serve_main(profile: Profile, folder: Path, workers: int, protocol: str) -> None:
    """The served CA's parent process (spawned; it spawns the workers): the port of the
    protocol the run speaks, on loopback, on a free port."""
    from bench.serve.command import Server  # noqa: PLC0415 (only the served target needs it)
    from bench.serve.state import prepare_state  # noqa: PLC0415

    state = prepare_state(folder, profile)
    scep = ("127.0.0.1", 0) if protocol.startswith("scep") else None
    server = Server(
        profile, state, ("127.0.0.1", 0), scep, workers, plain_http=protocol == "est+http"
    )
    raise SystemExit(server.run())


class ServedCA:
    """`enrollbench serve` on loopback for the length of one run, in a state folder of its own."""

    READY_TIMEOUT_S = 180.0

    def __init__(self, profile: Profile, folder: Path) -> None:
        self.profile = profile
        self.folder = folder
        self.workers = server_workers(profile)
        self.protocol = str(profile.get("target", "served_protocol"))
        self.components: dict[str, str] = {}  # the real parts the server runs on (serve.json)
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(
            target=_serve_main,
            args=(profile, folder, self.workers, self.protocol),
            name="enrollbench-served-ca",
        )

    def start(self) -> WireTarget:
        """Start the server; return the target its devices enroll at."""
        self.process.start()
        listening = self.folder / "serve.json"
        deadline = time.monotonic() + self.READY_TIMEOUT_S
        while not listening.exists():
            if not self.process.is_alive():
                raise UsageError(f"the served CA did not start (exit {self.process.exitcode})")
            if time.monotonic() > deadline:
                self.stop()
                raise UsageError("the served CA did not start in time")
            time.sleep(0.05)
        urls = json.loads(listening.read_text())
        self.components = {str(k): str(v) for k, v in urls.get("components", {}).items()}
        scheme, _, _ = self.protocol.partition("+")
        url = urls["scep"] if scheme == "scep" else urls["est"]
        wire = f"{self.protocol}://{url.partition('://')[2]}"
        return parse_target(wire, str(self.folder / "ca" / "chain.pem"), served=True)

    def stop(self) -> None:
        """SIGTERM: the server finishes its requests in flight and exits."""
        if self.process.is_alive() and self.process.pid is not None:
            os.kill(self.process.pid, signal.SIGTERM)
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    @property
    def metrics_folder(self) -> Path:
        return self.folder / "metrics"

    def cpu_seconds(self) -> float:
        """CPU (user + system) the server's processes have used so far: its parent and every
        worker alive now, from /proc."""
        if self.process.pid is None:
            return 0.0
        return sum(process_cpu(pid) for pid in _process_tree(self.process.pid))


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux: /proc/PID/task/TID/children)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                queue.extend(int(child) for child in task.read_text().split())
            except OSError:
                continue
    return found


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """utime + stime of a process in seconds (fields 14 and 15 of /proc/PID/stat); 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
