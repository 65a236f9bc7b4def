"""The connection service: authenticates users, caches chains, talks to the CA (steps 2, 7-12)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from engine.ca import CertificationAuthority, Issued
from engine.chaincache import ChainCache
from engine.errors import UnknownProfileError
from engine.identity import User
from engine.request import ParsedRequest
from engine.stores import Directory


class ConnectionService:
    """Between devices and the CAs: one instance serves every CA profile."""

    def __init__(
        self,
        directory: Directory,
        authorities: dict[str, CertificationAuthority],
        cache: ChainCache,
        fetch_delay: Callable[[], float],
    ) -> None:
        self._directory = directory
        self._authorities = authorities
        self.cache = cache
        self._fetch_delay = fetch_delay

    async def authenticate(self, user_id: str, password: str) -> None:
        """Step 2: a simple bind as the user against the directory."""
        await self._directory.authenticate(user_id, password)

    def authority(self, profile_id: str) -> CertificationAuthority:
        """Step 7: the CA that serves a profile ID; an unknown ID rejects the request."""
        authority = self._authorities.get(profile_id)
        if authority is None:
            raise UnknownProfileError(profile_id)
        return authority

    async def chain(self, profile_id: str) -> bytes:
        """Step 8: the profile's chain, from the cache or fetched from its CA on a miss."""
        authority = self.authority(profile_id)

        async def fetch() -> bytes:
            delay = self._fetch_delay()
            if delay > 0:
                await asyncio.sleep(delay)
            return await authority.fetch_chain()

        return await self.cache.get(profile_id, fetch)

    @staticmethod
    def acknowledge(notify: Callable[[str], None]) -> None:
        """Step 10: a status update to the device: its request is on its way to the CA."""
        notify("submitted")

    async def forward(
        self,
        device_id: str,
        profile_id: str,
        request: ParsedRequest,
        user: User,
        notify: Callable[[str], None],
    ) -> Issued:
        """Steps 10-11: the request to the profile's CA, which notifies as it progresses."""
        return await self.authority(profile_id).process(device_id, request, user, notify)

    async def retrieve(self, issued: Issued) -> bytes:
        """Step 12: fetch the certificate the CA published to the directory."""
        return await self._directory.retrieve(issued.dn, issued.serial)
