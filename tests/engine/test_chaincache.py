"""The chain cache: hits, TTL expiry, one fetch in flight per profile, errors shared."""

from __future__ import annotations

import asyncio

import pytest

from engine.chaincache import ChainCache
from engine.errors import ChainFetchError


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_hit_within_ttl_and_refetch_after() -> None:
    """A warm entry is a hit until its TTL passes; then one fetch refreshes it."""
    clock = _Clock()
    cache = ChainCache(10.0, clock)
    cache.put("p", b"old")
    fetches: list[str] = []

    async def fetch() -> bytes:
        fetches.append("p")
        return b"new"

    assert asyncio.run(cache.get("p", fetch)) == b"old"
    clock.now = 10.5
    assert asyncio.run(cache.get("p", fetch)) == b"new"
    assert (cache.counts.hits, cache.counts.misses, fetches) == (1, 1, ["p"])


def test_concurrent_misses_share_one_fetch() -> None:
    """Fifty simultaneous misses make exactly one fetch and all get its chain."""
    cache = ChainCache(10.0, _Clock())
    calls = 0

    async def fetch() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return b"chain"

    async def many() -> list[bytes]:
        return list(await asyncio.gather(*(cache.get("p", fetch) for _ in range(50))))

    assert asyncio.run(many()) == [b"chain"] * 50
    assert (calls, cache.counts.fetches, cache.counts.joined) == (1, 1, 49)


def test_failed_fetch_reaches_every_waiter_and_is_not_cached() -> None:
    """A fetch error becomes ChainFetchError for all waiters; the next get fetches again."""
    cache = ChainCache(10.0, _Clock())
    attempts = 0

    async def flaky() -> bytes:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        if attempts == 1:
            raise OSError("CA unreachable")
        return b"chain"

    async def many() -> list[object]:
        return list(
            await asyncio.gather(*(cache.get("p", flaky) for _ in range(5)), return_exceptions=True)
        )

    results = asyncio.run(many())
    assert all(isinstance(r, ChainFetchError) for r in results)
    assert asyncio.run(cache.get("p", flaky)) == b"chain"


def test_ttl_must_be_positive() -> None:
    """A zero TTL is a configuration error."""
    with pytest.raises(ValueError, match="TTL"):
        ChainCache(0, _Clock())
