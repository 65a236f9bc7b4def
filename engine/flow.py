"""The 14 steps of one device's enrollment, in the seed's order, with step boundaries reported.

`enroll` never raises: every enrollment ends in exactly one `Outcome` (issued, rejected with a
policy reason, or failed with an error type). Timing is not read here; the injected recorder sees
each step's start and end and decides what to measure.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Protocol

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


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one enrollment ended, and at which step."""

    device_id: str
    status: Status
    step: Step
    reason: str = ""
    error: str = ""
    detail: str = ""
    serial: int | None = None


class StepRecorder(Protocol):
    """Receives step boundaries; the bench implements it with its clock."""

    def start(self, step: Step) -> None: ...

    def end(self, step: Step) -> None: ...


class NullRecorder:
    """Records nothing."""

    def start(self, step: Step) -> None:
        pass

    def end(self, step: Step) -> None:
        pass


NULL_RECORDER = NullRecorder()


class _Steps:
    """Tracks the current step; `begin` ends the previous one."""

    __slots__ = ("current", "recorder")

    def __init__(self, recorder: StepRecorder) -> None:
        self.recorder = recorder
        self.current = Step.GENERATE_KEY

    def begin(self, step: Step) -> None:
        if step is not Step.GENERATE_KEY:
            self.recorder.end(self.current)
        self.current = step
        self.recorder.start(step)


async def enroll(
    device: Device,
    connection: ConnectionService,
    enterprise: EnterpriseServer,
    link: Callable[[], Awaitable[None]],
    recorder: StepRecorder = NULL_RECORDER,
) -> Outcome:
    """Run one device through the 14 steps; return its outcome, never raise."""
    steps = _Steps(recorder)
    device_id = device.identity.device_id
    try:
        serial = await _run_steps(device, connection, enterprise, link, steps)
    except RejectedError as exc:
        return Outcome(
            device_id, Status.REJECTED, steps.current, exc.reason, type(exc).__name__, str(exc)
        )
    except EnrollmentError as exc:
        return Outcome(
            device_id, Status.FAILED, steps.current, exc.reason, type(exc).__name__, str(exc)
        )
    except Exception as exc:
        # Only the type is kept: an arbitrary message could carry secrets.
        return Outcome(device_id, Status.FAILED, steps.current, "unexpected", type(exc).__name__)
    recorder.end(Step.INSTALL)
    return Outcome(device_id, Status.ISSUED, Step.INSTALL, serial=serial)


async def _run_steps(
    device: Device,
    connection: ConnectionService,
    enterprise: EnterpriseServer,
    link: Callable[[], Awaitable[None]],
    steps: _Steps,
) -> int:
    identity = device.identity
    steps.begin(Step.GENERATE_KEY)
    device.generate_key()
    steps.begin(Step.AUTHENTICATE)
    await connection.authenticate(identity.user_id, identity.password)
    steps.begin(Step.REQUEST_DN)
    await link()
    steps.begin(Step.LOOKUP_DN)
    user = await enterprise.lookup_user(identity.user_id)
    await link()
    steps.begin(Step.STORE_KEY_PAIR)
    await device.store_key_pair(user)
    steps.begin(Step.BUILD_REQUEST)
    request_der = device.build_request(user)
    steps.begin(Step.SEND_REQUEST)
    await link()
    connection.authority(identity.profile_id)
    request = await enterprise.relay_request(identity.device_id, request_der)
    steps.begin(Step.FETCH_CHAIN)
    chain = await connection.chain(identity.profile_id)
    steps.begin(Step.DELIVER_CHAIN)
    await link()
    device.chain = chain
    steps.begin(Step.SUBMIT)
    notify = device.receive_status
    steps.begin(Step.ISSUE)
    issued = await connection.submit(identity.device_id, identity.profile_id, request, user, notify)
    steps.begin(Step.RETRIEVE)
    certificate = await connection.retrieve(issued)
    steps.begin(Step.MATCH_AND_DELIVER)
    await enterprise.check_certificate(identity.device_id, certificate)
    await link()
    steps.begin(Step.INSTALL)
    await device.install(certificate)
    return issued.serial
