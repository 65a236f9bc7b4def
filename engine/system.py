"""Assemble one engine replica from its configuration, once, before the clock starts.

`EngineConfig` is the engine's view of a profile. `CAMaterial` is a CA hierarchy as DER, so a
parent process can build it once and every shard process load the same one. `EnrollmentSystem`
wires the actors together and runs enrollments.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from engine.approval import AdministratorPool, ApprovalPolicy, ReviewBoard
from engine.auth import DEFAULT_ITERATIONS, Verifier
from engine.ca import CAChain, CertificationAuthority, IssuancePolicy, build_hierarchy
from engine.chaincache import ChainCache
from engine.connection import ConnectionService
from engine.device import Device, DeviceIdentity, DeviceProfile, KeyProtection, RequestPath
from engine.distribution import Distribution
from engine.enterprise import EnterpriseServer
from engine.flow import NULL_RECORDER, Outcome, StepRecorder, enroll
from engine.identity import User
from engine.keys import (
    KEY_SPECS,
    CaSigner,
    PrivateKey,
    PublicKey,
    key_spec,
    load_private_key,
    private_key_to_der,
)
from engine.request import RequestTemplate
from engine.stores import (
    ConfigurationDatabase,
    Database,
    IssuedStore,
    RecordingDirectory,
    SqliteConfigurationDatabase,
    SqliteDeviceStores,
    SqliteDirectory,
    UserDirectory,
)

_NO_DELAY = Distribution("fixed", mean=0.0)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine needs to know about a CA profile and its environment."""

    profile_id: str = "enrollbench"
    device_key: str = "p256"
    hash_name: str = "sha256"
    ca_key: str = "p256"
    ca_intermediates: int = 0
    allowed_keys: frozenset[str] = frozenset(KEY_SPECS)
    approval: ApprovalPolicy | None = None
    chain_cache_ttl: float = 300.0
    warm_cache: bool = True
    ca_fetch_latency: Distribution = _NO_DELAY
    auth_iterations: int = DEFAULT_ITERATIONS
    key_protection: KeyProtection = "pkcs8-encrypted"
    request_path: RequestPath = "template"
    link_latency: Distribution = _NO_DELAY
    validity_days: int = 365
    database: str = ":memory:"
    seed: int = 0

    def __post_init__(self) -> None:
        key_spec(self.device_key)
        key_spec(self.ca_key)
        if self.ca_intermediates < 0 or self.validity_days < 1:
            raise ValueError("ca_intermediates must be >= 0 and validity_days >= 1")


@dataclass(frozen=True, slots=True)
class CAMaterial:
    """A CA hierarchy as bytes: certificates (root first) and the issuing key as PKCS #8
    (empty when the issuing key is in a token, whose signer the CA is then given)."""

    certificates: tuple[bytes, ...]
    issuing_key: bytes = field(repr=False)

    @classmethod
    def create(
        cls,
        config: EngineConfig,
        keys: Sequence[PrivateKey],
        issuing_public: PublicKey | None = None,
    ) -> CAMaterial:
        """Build the hierarchy from `keys` (root first: ca_intermediates + 2 keys), or from
        the root and intermediates and a token's `issuing_public` key (ca_intermediates + 1)."""
        wanted = config.ca_intermediates + (1 if issuing_public is not None else 2)
        if len(keys) != wanted:
            raise ValueError(f"need {wanted} CA keys, got {len(keys)}")
        chain = build_hierarchy(
            config.profile_id, keys, config.hash_name, datetime.now(UTC), issuing_public
        )
        key = chain.issuing_key
        return cls(
            tuple(c.public_bytes(serialization.Encoding.DER) for c in chain.certificates),
            b"" if key is None else private_key_to_der(key),
        )

    def chain(self) -> CAChain:
        certificates = tuple(x509.load_der_x509_certificate(der) for der in self.certificates)
        key = load_private_key(self.issuing_key) if self.issuing_key else None
        return CAChain(certificates, key)


class EnrollmentSystem:
    """One engine replica: directory, configuration database, CA, connection service, server.

    `ca_signer`: the issuing CA's key where it is not in memory (a PKCS #11 token).
    `directory`, `configuration`, `issued`: real servers in place of the embedded SQLite ones
    (an LDAP directory already holding the users; PostgreSQL for the device keys and the CA's
    issued certificates, which then keeps serials unique before the directory publishes).
    `review_board`: the administrators of the whole run when several replicas (processes) share
    one pool: a `ReviewBoard.shared(config.approval.administrators)` made by the parent, or a
    pickled handle on it. None gives this replica a private pool of its own. The replica never
    closes a board passed in (its creator does); a board requires `config.approval` with the
    same number of administrators, and `monotonic` must stay `time.monotonic` when shared.
    """

    def __init__(
        self,
        config: EngineConfig,
        material: CAMaterial,
        users: Iterable[tuple[User, Verifier]],
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        *,
        review_board: ReviewBoard | None = None,
        ca_signer: CaSigner | None = None,
        directory: UserDirectory | None = None,
        configuration: ConfigurationDatabase | None = None,
        issued: IssuedStore | None = None,
    ) -> None:
        self.config = config
        rng = random.Random(config.seed)
        approvals = _administrators(config.approval, review_board, rng, monotonic)
        self.database = Database(config.database)
        if directory is None:  # the embedded directory: SQLite, seeded with the users
            sqlite_directory = SqliteDirectory(self.database)
            sqlite_directory.seed(users)
            directory = sqlite_directory
        if issued is not None:
            directory = RecordingDirectory(directory, issued)
        self.directory: UserDirectory = directory
        self.configuration: ConfigurationDatabase = (
            configuration
            if configuration is not None
            else SqliteConfigurationDatabase(self.database)
        )
        self.device_stores = SqliteDeviceStores(self.database)
        spec = key_spec(config.device_key)
        self.authority = CertificationAuthority(
            config.profile_id,
            material.chain(),
            config.hash_name,
            spec.family,
            IssuancePolicy(config.allowed_keys),
            config.validity_days * 86_400,
            self.directory,
            wall_clock,
            approvals,
            ca_signer,
        )
        cache = ChainCache(config.chain_cache_ttl, monotonic)
        if config.warm_cache:
            cache.put(config.profile_id, self.authority.chain_der)
        self.connection = ConnectionService(
            self.directory,
            {config.profile_id: self.authority},
            cache,
            config.ca_fetch_latency.sampler(random.Random(rng.random())),
        )
        self.enterprise = EnterpriseServer(self.directory, self.configuration)
        self._device_profile = DeviceProfile(
            spec, config.hash_name, config.key_protection, config.request_path
        )
        self._template = RequestTemplate(spec.family)
        self._link_delay = config.link_latency.sampler(random.Random(rng.random()))
        self._link = None if config.link_latency.never_waits else self._hop

    def device(self, identity: DeviceIdentity) -> Device:
        """A device for one enrollment."""
        return Device(
            identity, self._device_profile, self._template, self.device_stores, self.device_stores
        )

    async def _hop(self) -> None:
        """One hop over the simulated wireless link: a wait, no CPU."""
        delay = self._link_delay()
        if delay > 0:
            await asyncio.sleep(delay)

    async def enroll(
        self, identity: DeviceIdentity, recorder: StepRecorder = NULL_RECORDER
    ) -> Outcome:
        """Run one device's enrollment to its outcome."""
        return await enroll(
            self.device(identity), self.connection, self.enterprise, self._link, recorder
        )

    @property
    def approvals_pending(self) -> int:
        """Requests of this replica waiting for or under review."""
        pool = self.authority.approvals
        return 0 if pool is None else pool.pending

    @property
    def approvals_pending_in_run(self) -> int:
        """Requests waiting for or under review in every replica sharing this one's board."""
        pool = self.authority.approvals
        return 0 if pool is None else pool.board.pending

    def close(self) -> None:
        self.database.close()
        if self.authority.approvals is not None:
            self.authority.approvals.close()


def _administrators(
    policy: ApprovalPolicy | None,
    board: ReviewBoard | None,
    rng: random.Random,
    monotonic: Callable[[], float],
) -> AdministratorPool | None:
    """The replica's window on the administrators (it draws from `rng` only under approval)."""
    if policy is None:
        if board is not None:
            raise ValueError("a review board was given but the configuration has no approval")
        return None
    return AdministratorPool(policy, random.Random(rng.random()), board, monotonic)
