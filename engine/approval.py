"""Simulated CA administrators who approve or reject pending requests (the seed's main flow).

Each administrator reviews one request at a time, in arrival order; a review takes a delay drawn
from the profile's distribution and approves with the profile's approval rate. Waiting costs no
CPU: it is an `asyncio.sleep` on the event loop.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

from engine.distribution import Distribution
from engine.errors import ApprovalDeniedError


@dataclass(frozen=True, slots=True)
class ApprovalPolicy:
    """How administrators behave: how many, how long a review takes, how often they approve."""

    administrators: int
    delay: Distribution
    approval_rate: float

    def __post_init__(self) -> None:
        if self.administrators < 1:
            raise ValueError("at least one administrator is needed")
        if not 0.0 <= self.approval_rate <= 1.0:
            raise ValueError("approval_rate must lie in [0, 1]")


class AdministratorPool:
    """A pool of administrators; `review` waits for one of them and returns or raises."""

    def __init__(self, policy: ApprovalPolicy, rng: random.Random) -> None:
        self._policy = policy
        self._rng = rng
        self._draw_delay: Callable[[], float] = policy.delay.sampler(rng)
        self._free = list(range(policy.administrators))
        self._seats: asyncio.Semaphore | None = None
        self.pending = 0
        self.approved = 0
        self.denied = 0

    async def review(self, device_id: str) -> None:
        """Wait until an administrator has reviewed the request; raise if they reject it."""
        if self._seats is None:  # created lazily, inside the running loop
            self._seats = asyncio.Semaphore(self._policy.administrators)
        self.pending += 1
        try:
            async with self._seats:
                administrator = self._free.pop()
                try:
                    await asyncio.sleep(self._draw_delay())
                    approve = self._rng.random() < self._policy.approval_rate
                finally:
                    self._free.append(administrator)
        finally:
            self.pending -= 1
        if not approve:
            self.denied += 1
            raise ApprovalDeniedError(device_id, administrator)
        self.approved += 1
