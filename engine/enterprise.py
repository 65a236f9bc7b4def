"""The enterprise server: DN lookup (steps 3-4), device key records (step 7), matching (step 13)."""

from __future__ import annotations

from engine.certificate import certificate_spki
from engine.errors import KeyMismatchError
from engine.identity import User
from engine.request import ParsedRequest, parse_request
from engine.stores import ConfigurationDatabase, MessagingDirectory


class EnterpriseServer:
    """Looks up users, records each device's public key, and checks certificates against it."""

    def __init__(self, messaging: MessagingDirectory, configuration: ConfigurationDatabase) -> None:
        self._messaging = messaging
        self._configuration = configuration

    async def lookup_user(self, user_id: str) -> User:
        """Step 4: the user's DN (and alternative names) from the messaging directory."""
        return await self._messaging.lookup_user(user_id)

    async def relay_request(self, device_id: str, request: bytes) -> ParsedRequest:
        """Step 7: parse the device's request on its way through and store its public key."""
        parsed = parse_request(request)
        await self._configuration.store_key(device_id, parsed.key.spki)
        return parsed

    async def check_certificate(self, device_id: str, certificate: bytes) -> None:
        """Step 13: deliver only a certificate whose public key is the one stored for the device."""
        stored = await self._configuration.stored_key(device_id)
        if stored is None or certificate_spki(certificate) != stored:
            raise KeyMismatchError(device_id)
