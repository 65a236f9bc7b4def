"""The 14 steps of one device's enrollment, in the seed's order, with step boundaries reported.

`enroll` never raises: every enrollment ends in exactly one `Outcome` (issued, rejected with a
policy reason, or failed with an error type). Timing is not read here; the injected recorder sees
each step's start and end and decides what to measure.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, NamedTuple, Protocol

from engine.errors import EnrollmentError, RejectedError

if TYPE_CHECKING:
    from engine.connection import ConnectionService
    from engine.device import Device
    from engine.enterprise import EnterpriseServer


class Step(IntEnum):
    """The seed's numbered steps (administrator-approval variant; auto-issue skips the wait)."""

    GENERATE_KEY = 1
    AUTHENTICATE = 2
    REQUEST_DN = 3
    LOOKUP_DN = 4
    STORE_KEY_PAIR = 5
    BUILD_REQUEST = 6
    SEND_REQUEST = 7
    FETCH_CHAIN = 8
    DELIVER_CHAIN = 9
    SUBMIT = 10
    ISSUE = 11
    RETRIEVE = 12
    MATCH_AND_DELIVER = 13
    INSTALL = 14

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class Status(StrEnum):
    ISSUED = "issued"
    REJECTED = "rejected"
    FAILED = "failed"


class Outcome(NamedTuple):
    """How one enrollment ended, and at which step (a NamedTuple: cheap, immutable)."""

    device_id: str
    status: Status
    step: Step
    reason: str = ""
    error: str = ""
    detail: str = ""
    serial: int | None = None


class StepRecorder(Protocol):
    """Receives step boundaries; the bench implements it with its clock.

    Steps run back to back, so one boundary both ends a step and starts the next: `start(step)`
    is called as each step starts (and the previous one ends), `finish()` when the last step of
    an issued enrollment ends. A failed enrollment never calls `finish`.
    """

    def start(self, step: Step) -> None: ...

    def finish(self) -> None: ...


class NullRecorder:
    """Records nothing."""

    def start(self, step: Step) -> None:
        pass

    def finish(self) -> None:
        pass


NULL_RECORDER = NullRecorder()


def ended(device_id: str, step: Step, exc: Exception) -> Outcome:
    """The outcome of an enrollment that raised `exc` at `step`: rejected with a policy's
    reason, failed with an engine error's type, or failed "unexpected" with only the type of
    anything else (an arbitrary message could carry secrets)."""
    if isinstance(exc, RejectedError):
        return Outcome(device_id, Status.REJECTED, step, exc.reason, type(exc).__name__, str(exc))
    if isinstance(exc, EnrollmentError):
        return Outcome(device_id, Status.FAILED, step, exc.reason, type(exc).__name__, str(exc))
    return Outcome(device_id, Status.FAILED, step, "unexpected", type(exc).__name__)


async def enroll(  # noqa: PLR0915 (the 14 steps, written out in the seed's order)
    device: Device,
    connection: ConnectionService,
    enterprise: EnterpriseServer,
    link: Callable[[], Awaitable[None]] | None,
    recorder: StepRecorder = NULL_RECORDER,
) -> Outcome:
    """Run one device through the 14 steps; return its outcome, never raise.

    `link` is one hop over the device's wireless link (None: no simulated latency). The steps
    are written out in order, one boundary each, so the step that fails is always known.
    """
    identity = device.identity
    device_id = identity.device_id
    mark = recorder.start
    step = Step.GENERATE_KEY
    try:
        mark(step)
        device.generate_key()
        step = Step.AUTHENTICATE
        mark(step)
        await connection.authenticate(identity.user_id, identity.password)
        step = Step.REQUEST_DN
        mark(step)
        if link is not None:
            await link()
        step = Step.LOOKUP_DN
        mark(step)
        user = await enterprise.lookup_user(identity.user_id)
        if link is not None:
            await link()
        step = Step.STORE_KEY_PAIR
        mark(step)
        await device.store_key_pair(user)
        step = Step.BUILD_REQUEST
        mark(step)
        request_der = device.build_request(user)
        step = Step.SEND_REQUEST
        mark(step)
        if link is not None:
            await link()
        connection.authority(identity.profile_id)
        request = await enterprise.relay_request(device_id, request_der)
        step = Step.FETCH_CHAIN
        mark(step)
        chain = await connection.chain(identity.profile_id)
        step = Step.DELIVER_CHAIN
        mark(step)
        if link is not None:
            await link()
        device.chain = chain
        step = Step.SUBMIT
        mark(step)
        connection.acknowledge(device.receive_status)
        step = Step.ISSUE
        mark(step)
        issued = await connection.forward(
            device_id, identity.profile_id, request, user, device.receive_status
        )
        step = Step.RETRIEVE
        mark(step)
        certificate = await connection.retrieve(issued)
        step = Step.MATCH_AND_DELIVER
        mark(step)
        await enterprise.check_certificate(device_id, certificate)
        if link is not None:
            await link()
        step = Step.INSTALL
        mark(step)
        await device.install(certificate)
    except Exception as exc:
        return ended(device_id, step, exc)
    recorder.finish()
    return Outcome(device_id, Status.ISSUED, Step.INSTALL, serial=issued.serial)
