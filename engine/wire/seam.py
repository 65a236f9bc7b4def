"""The protocol-neutral seam between the flow and the enrollment protocols (EST, SCEP, ...).

Over the wire the seed's steps regroup: the device fetches the CA chain before it builds its
request (SCEP encrypts to the CA), authentication rides on the request, and the public-key match
of step 13 moves to the device. A protocol is one module pair under `engine/wire/`:
its client side implements `EnrollmentClient` (used by `engine.wire.flow`), its server side is an
HTTP `Handler` over a `CAService` (hosted by `engine.server`). Nothing else changes when one is
added.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from engine.identity import User
    from engine.keys import PrivateKey


class HttpRequest(NamedTuple):
    """One HTTP request as a server handler sees it (header names lower-case)."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    peer_certificate: bytes | None = None  # the TLS client certificate (DER), if one was shown


class HttpResponse(NamedTuple):
    """One HTTP answer (a server handler returns it; a client receives it)."""

    status: int
    content_type: str = ""
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        """The first header called `name` (case-insensitive), or None."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class TicketStatus(StrEnum):
    ISSUED = "issued"
    PENDING = "pending"  # an administrator has not decided yet: poll again
    REJECTED = "rejected"  # a policy said no (error names the reason's type)
    FAILED = "failed"  # the request could not be processed (malformed, internal error)


class Ticket(NamedTuple):
    """Where one enrollment transaction stands, on the server and as the client learns it."""

    transaction_id: str
    status: TicketStatus
    certificate: bytes = b""  # DER, when ISSUED
    error: str = ""  # an EnrollmentError subclass name, when REJECTED or FAILED
    detail: str = ""
    retry_after: float = 0.0  # seconds, when PENDING


class CAService(Protocol):
    """The server side of the flow as one service: what every protocol's server handler calls.

    Implemented by `engine.service.SharedCAService` (one serial space, store, directory and
    approval queue shared by every worker process).
    """

    @property
    def ca_certificates(self) -> tuple[bytes, ...]:
        """The CA hierarchy as DER, root first, issuing CA last."""

    @property
    def chain_pkcs7(self) -> bytes:
        """The hierarchy as a PKCS #7 certs-only bundle, DER."""

    async def authenticate(self, user_id: str, password: str) -> User:
        """Step 2: the user, if the password is theirs; AuthenticationError/UnknownUserError."""

    async def find_user(self, request_der: bytes) -> User:
        """The user a request is for (SCEP): from the subject's CN (the user ID) or its e-mail
        SAN; UnknownUserError if none; MalformedRequestError on bad DER."""

    async def submit(self, transaction_id: str, request_der: bytes, user: User) -> Ticket:
        """Steps 4, 7, 10-12 on the server: parse, record the key, check policy, then issue and
        publish (committed before this returns), or queue for an administrator (PENDING).
        Never raises for anything in the request: a bad request is a FAILED or REJECTED ticket.
        A repeated transaction ID returns that transaction's current state."""

    async def poll(self, transaction_id: str) -> Ticket | None:
        """The transaction's current state (issuing it now if its administrator has approved
        meanwhile); None for an unknown transaction."""


class DeviceCredentials(NamedTuple):
    """What a device presents to a protocol's client side for one enrollment."""

    device_id: str
    user_id: str
    password: str
    key: PrivateKey | None  # the device key, when the protocol needs it (SCEP decrypts with it)
    request_der: bytes  # the PKCS #10 request (SCEP: it carries the challengePassword)


class EnrollmentClient(Protocol):
    """The client side of one enrollment protocol, against one target."""

    async def ca_certificates(self) -> tuple[bytes, ...]:
        """Steps 8-9: the CA certificates (EST cacerts, SCEP GetCACert), DER, root first."""

    def prepare(self, device: DeviceCredentials, ca: tuple[bytes, ...]) -> object:
        """Step 6's protocol part: the message to send (SCEP: the pkiMessage). May be done
        before the clock starts (precomputed)."""

    async def submit(self, device: DeviceCredentials, prepared: object) -> Ticket:
        """Step 7's round trip (authentication, lookup, issuance ride on it)."""

    async def poll(self, device: DeviceCredentials, prepared: object, ticket: Ticket) -> Ticket:
        """Ask again about a PENDING ticket (EST: resend; SCEP: CertPoll)."""

    async def close(self) -> None:
        """Close connections."""
