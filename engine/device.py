"""The device: its CA profile manager (steps 1, 5, 6), persistent store and key store (step 14)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engine.identity import User
from engine.keys import (
    KeySpec,
    PrivateKey,
    Signer,
    encrypt_private_key,
    generate_private_key,
    load_private_key,
    private_key_to_der,
)
from engine.request import RequestContent, RequestTemplate, build_request_with_builder
from engine.stores import KeyStore, PersistentStore

KeyProtection = Literal["pkcs8-encrypted", "none"]
RequestPath = Literal["template", "builder"]


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """One simulated device: who enrolls it, under which CA profile, and any precomputed crypto.

    `secret` protects the stored key pair (step 5). `key_der` (PKCS #8) replaces live key
    generation, `request_der` building the request, `protected_key` encrypting the key pair:
    all three come from a seeded corpus built before the clock starts.
    """

    device_id: str
    user_id: str
    password: str = field(repr=False)
    profile_id: str
    secret: bytes = field(repr=False)
    key_der: bytes | None = field(default=None, repr=False)
    request_der: bytes | None = None
    protected_key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """What the IT policy's CA profile tells every device to do."""

    key: KeySpec
    hash_name: str | None
    key_protection: KeyProtection = "pkcs8-encrypted"
    request_path: RequestPath = "template"


class Device:
    """One device's CA profile manager and stores, for one enrollment."""

    __slots__ = (
        "_protected_key",
        "_request_template",
        "_signer",
        "_stores",
        "chain",
        "identity",
        "profile",
        "statuses",
    )

    def __init__(
        self,
        identity: DeviceIdentity,
        profile: DeviceProfile,
        template: RequestTemplate,
        persistent: PersistentStore,
        key_store: KeyStore,
    ) -> None:
        self.identity = identity
        self.profile = profile
        self._request_template = template
        self._stores = (persistent, key_store)
        self._signer: Signer | None = None
        self._protected_key = b""
        self.chain = b""
        self.statuses: list[str] = []

    def generate_key(self) -> None:
        """Step 1: a fresh key pair, or the corpus key for this device.

        A fully precomputed device (request and protected key from the corpus) never needs its
        key loaded: nothing in the flow would use it.
        """
        identity = self.identity
        if identity.key_der is None:
            self._signer = Signer(generate_private_key(self.profile.key), self.profile.hash_name)
        elif identity.request_der is None or identity.protected_key is None:
            self._signer = Signer(load_private_key(identity.key_der), self.profile.hash_name)

    async def store_key_pair(self, user: User) -> None:
        """Step 5: protect the key pair and store it with the DN and CA profile ID."""
        if self.identity.protected_key is not None:
            self._protected_key = self.identity.protected_key
        elif self.profile.key_protection == "none":
            self._protected_key = private_key_to_der(self._require_signer().key)
        else:
            self._protected_key = encrypt_private_key(
                self._require_signer().key, self.identity.secret
            )
        await self._stores[0].save(
            self.identity.device_id, self._protected_key, user.dn.text, self.identity.profile_id
        )

    def build_request(self, user: User) -> bytes:
        """Step 6: the PKCS #10 request for the looked-up DN, signed with the device key."""
        if self.identity.request_der is not None:
            return self.identity.request_der
        content = RequestContent(user.dn, user.email, user.upn)
        if self.profile.request_path == "builder":
            return build_request_with_builder(self._require_signer(), content)
        return self._request_template.build(self._require_signer(), content)

    @property
    def key(self) -> PrivateKey | None:
        """The device's private key, when step 1 loaded or made one."""
        return None if self._signer is None else self._signer.key

    def receive_status(self, status: str) -> None:
        """Steps 10-11: status updates from the connection service."""
        self.statuses.append(status)

    async def install(self, certificate: bytes) -> None:
        """Step 14: add the certificate and private key to the key store."""
        await self._stores[1].install(self.identity.device_id, certificate, self._protected_key)

    def _require_signer(self) -> Signer:
        if self._signer is None:
            raise RuntimeError("the device has no key pair yet (step 1 did not run)")
        return self._signer
