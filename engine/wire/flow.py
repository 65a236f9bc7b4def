"""One device's enrollment against a CA over the wire, through any protocol's client side.

Over the wire the seed's steps regroup (README, "Targets"):
- the device fetches the CA certificates first (steps 8-9, through its chain cache): SCEP must
  encrypt its request to the CA before sending it;
- authentication (2), the DN lookup (3-4), submission (10), issuance (11) and retrieval (12) ride
  on the request's round trip (step 7, `send-request`); the server measures them on its side;
- `issue` on the client is the time spent waiting and polling while an administrator decides;
- the public-key match (13) moves to the device: the certificate must carry the public key of
  the device's own request, or it is `KeyMismatchError` and never installed.

`enroll_over` never raises; every enrollment ends in one `Outcome`, as `engine.flow.enroll`'s do.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from engine import _der
from engine.certificate import certificate_spki
from engine.errors import (
    KeyMismatchError,
    MalformedAnswerError,
    ProtocolRefusedError,
    TargetTimeoutError,
    WireError,
)
from engine.flow import NULL_RECORDER, Outcome, Status, Step, StepRecorder, ended
from engine.request import split_request
from engine.wire.seam import DeviceCredentials, EnrollmentClient, Ticket, TicketStatus

if TYPE_CHECKING:
    from engine.chaincache import ChainCache
    from engine.device import Device
    from engine.identity import User

# The steps a wire enrollment marks on the client, in the order it runs them.
CLIENT_STEPS = (
    Step.GENERATE_KEY,
    Step.FETCH_CHAIN,
    Step.DELIVER_CHAIN,
    Step.STORE_KEY_PAIR,
    Step.BUILD_REQUEST,
    Step.SEND_REQUEST,
    Step.ISSUE,
    Step.MATCH_AND_DELIVER,
    Step.INSTALL,
)
# The steps done by the server inside the request's round trip (send-request).
ROUND_TRIP_STEPS = (
    Step.AUTHENTICATE,
    Step.REQUEST_DN,
    Step.LOOKUP_DN,
    Step.SUBMIT,
    Step.RETRIEVE,
)


def join_certificates(certificates: tuple[bytes, ...]) -> bytes:
    """CA certificates as one byte string for the chain cache (each DER is self-delimiting)."""
    return b"".join(certificates)


def split_certificates(joined: bytes) -> tuple[bytes, ...]:
    """The inverse of `join_certificates`."""
    return tuple(joined[at:end] for _, at, _, end in _der.split_children(joined, 0, len(joined)))


async def enroll_over(
    device: Device,
    user: User,
    client: EnrollmentClient,
    cache: ChainCache,
    cache_key: str,
    recorder: StepRecorder = NULL_RECORDER,
    *,
    poll_timeout: float = 3600.0,
) -> Outcome:
    """Run one device's enrollment against `client`'s target; return its outcome."""
    identity = device.identity
    mark = recorder.start
    step = Step.GENERATE_KEY
    try:
        mark(step)
        device.generate_key()
        step = Step.FETCH_CHAIN
        mark(step)
        joined = await cache.get(cache_key, lambda: _fetch(client))
        step = Step.DELIVER_CHAIN
        mark(step)
        device.chain = joined
        step = Step.STORE_KEY_PAIR
        mark(step)
        await device.store_key_pair(user)
        step = Step.BUILD_REQUEST
        mark(step)
        request_der = device.build_request(user)
        credentials = DeviceCredentials(
            identity.device_id, identity.user_id, identity.password, device.key, request_der
        )
        prepared = client.prepare(credentials, split_certificates(joined))
        step = Step.SEND_REQUEST
        mark(step)
        ticket = await client.submit(credentials, prepared)
        step = Step.ISSUE
        mark(step)
        ticket = await _wait(client, credentials, prepared, ticket, poll_timeout)
        step = Step.MATCH_AND_DELIVER
        mark(step)
        if certificate_spki(ticket.certificate) != split_request(request_der)[2]:
            raise KeyMismatchError(identity.device_id)
        serial = certificate_serial(ticket.certificate)
        step = Step.INSTALL
        mark(step)
        await device.install(ticket.certificate)
    except Exception as exc:
        return ended(identity.device_id, step, exc)
    recorder.finish()
    return Outcome(identity.device_id, Status.ISSUED, Step.INSTALL, serial=serial)


def certificate_serial(der: bytes) -> int:
    """The serial number of a DER certificate (RFC 5280 4.1.2.2), read without parsing it all."""
    try:
        start, end = _der.read_whole(der, _der.SEQUENCE)
        tbs = _der.split_children(der, start, end)[0]
        fields = _der.split_children(der, tbs[2], tbs[3])
        first = 1 if fields[0][0] == 0xA0 else 0  # [0] EXPLICIT version
        tag, _, value_start, value_end = fields[first]
    except IndexError as exc:
        raise MalformedAnswerError("the certificate has no serial number") from exc
    if tag != _der.INTEGER:
        raise MalformedAnswerError("the certificate's serial number is not an INTEGER")
    return int.from_bytes(der[value_start:value_end], "big", signed=True)


async def _fetch(client: EnrollmentClient) -> bytes:
    return join_certificates(await client.ca_certificates())


async def _wait(
    client: EnrollmentClient,
    credentials: DeviceCredentials,
    prepared: object,
    ticket: Ticket,
    timeout: float,
) -> Ticket:
    """Poll while the ticket is pending; return it issued, or raise what ended it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while ticket.status is TicketStatus.PENDING:
        if loop.time() + ticket.retry_after > deadline:
            raise TargetTimeoutError(f"still pending after {timeout:g} s of polling")
        await asyncio.sleep(ticket.retry_after)
        ticket = await client.poll(credentials, prepared, ticket)
    if ticket.status is TicketStatus.ISSUED:
        return ticket
    if ticket.status is TicketStatus.REJECTED:
        raise ProtocolRefusedError(_describe(ticket))
    raise WireError(_describe(ticket))


def _describe(ticket: Ticket) -> str:
    what = ticket.error or ticket.status.value
    return f"{what}: {ticket.detail}" if ticket.detail else what
