"""The connection service's CA chain cache (step 8), keyed by CA profile ID.

A hit returns the pre-serialized PKCS #7 chain. A miss fetches from the CA; however many devices
miss at once, one fetch per profile is in flight and the others wait for it. Entries expire after
a TTL measured on an injected monotonic clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from engine.errors import ChainFetchError, EnrollmentError


@dataclass(slots=True)
class CacheCounts:
    """Hit, miss and fetch counts; misses that joined an in-flight fetch are `joined`."""

    hits: int = 0
    misses: int = 0
    fetches: int = 0
    joined: int = 0


class ChainCache:
    """Chains by profile ID with a TTL and single-flight fetching."""

    def __init__(self, ttl_seconds: float, clock: Callable[[], float]) -> None:
        if ttl_seconds <= 0:
            raise ValueError("the chain cache TTL must be positive")
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: dict[str, tuple[float, bytes]] = {}
        self._in_flight: dict[str, asyncio.Future[bytes]] = {}
        self.counts = CacheCounts()

    def put(self, profile_id: str, chain: bytes) -> None:
        """Store a chain (a warm start fills the cache before the clock starts)."""
        self._entries[profile_id] = (self._clock() + self._ttl, chain)

    async def get(self, profile_id: str, fetch: Callable[[], Awaitable[bytes]]) -> bytes:
        """The chain for `profile_id`, from the cache or from one shared fetch."""
        entry = self._entries.get(profile_id)
        if entry is not None and entry[0] > self._clock():
            self.counts.hits += 1
            return entry[1]
        self.counts.misses += 1
        waiting = self._in_flight.get(profile_id)
        if waiting is not None:
            self.counts.joined += 1
            return await asyncio.shield(waiting)
        return await self._fetch(profile_id, fetch)

    async def _fetch(self, profile_id: str, fetch: Callable[[], Awaitable[bytes]]) -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._in_flight[profile_id] = future
        self.counts.fetches += 1
        try:
            chain = await fetch()
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, EnrollmentError)
                else ChainFetchError(f"fetching the chain of {profile_id!r} failed: {exc!r}")
            )
            future.set_exception(error)
            future.exception()  # retrieved here, so an unjoined failure is not logged as lost
            if error is exc:
                raise
            raise error from exc
        finally:
            del self._in_flight[profile_id]
        self.put(profile_id, chain)
        future.set_result(chain)
        return chain
