"""The 14-step flow: outcomes for good and bad input, each bad device isolated from the rest."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import pytest

from engine.approval import ApprovalPolicy
from engine.device import DeviceIdentity
from engine.distribution import Distribution
from engine.flow import Outcome, Status, Step, enroll
from engine.identity import DistinguishedName
from engine.keys import Signer, private_key_to_der
from engine.request import RequestContent, RequestTemplate
from engine.system import EnrollmentSystem
from tests.conftest import SystemFactory, device_of, vector_key


def _run(system: EnrollmentSystem, identities: Sequence[DeviceIdentity]) -> list[Outcome]:
    async def all_of() -> list[Outcome]:
        return list(await asyncio.gather(*(system.enroll(i) for i in identities)))

    return asyncio.run(all_of())


class _Steps:
    def __init__(self) -> None:
        self.events: list[tuple[str, Step]] = []

    def start(self, step: Step) -> None:
        self.events.append(("start", step))

    def finish(self) -> None:
        self.events.append(("finish", Step.INSTALL))


def test_steps_run_in_the_seeds_order(make_system: SystemFactory) -> None:
    """The recorder sees all 14 steps start in order, then the finish."""
    system, users = make_system(1)
    recorder = _Steps()
    outcome = asyncio.run(system.enroll(device_of(users[0]), recorder))
    assert outcome.status is Status.ISSUED
    expected = [("start", step) for step in Step] + [("finish", Step.INSTALL)]
    assert recorder.events == expected


def test_issued_device_has_certificate_in_key_store(make_system: SystemFactory) -> None:
    """Step 14 stores the certificate step 11 published; step 9 delivered the chain."""
    system, users = make_system(1)
    device = system.device(device_of(users[0]))
    outcome = asyncio.run(enroll(device, system.connection, system.enterprise, system._link))
    published = asyncio.run(system.directory.retrieve(users[0].user.dn.text, outcome.serial or 0))
    system.database.flush()
    row = system.database.read_one("SELECT certificate FROM key_store", ())
    assert row == (published,)
    assert device.chain == system.authority.chain_der
    assert device.statuses == ["submitted", "issued"]


def test_live_key_generation_works(make_system: SystemFactory) -> None:
    """A device without a corpus key generates one (EC here: unit tests never make RSA keys)."""
    system, users = make_system(2)
    outcomes = _run(system, [device_of(u, key_der=None) for u in users])
    assert [o.status for o in outcomes] == [Status.ISSUED] * 2


def _bad_request(user_dn: DistinguishedName, key: str, email: str, upn: str) -> bytes:
    signer = Signer(vector_key(key), "sha256")
    return RequestTemplate(signer.algorithm.family).build(
        signer, RequestContent(user_dn, email, upn)
    )


def _assert_isolated(outcomes: list[Outcome], bad: Outcome) -> None:
    assert bad.status is not Status.ISSUED
    assert all(o.status is Status.ISSUED for o in outcomes if o is not bad)


@pytest.mark.parametrize(
    ("mutate", "status", "reason", "error"),
    [
        ("truncated", Status.FAILED, "malformed-request", "MalformedRequestError"),
        ("garbage", Status.FAILED, "malformed-request", "MalformedRequestError"),
        ("bad-signature", Status.REJECTED, "bad-signature", "SignatureInvalidError"),
        ("unsupported-curve", Status.REJECTED, "unsupported-key", "UnsupportedKeyError"),
        ("rsa1024", Status.REJECTED, "weak-key", "WeakKeyError"),
        ("foreign-subject", Status.REJECTED, "subject-mismatch", "SubjectMismatchError"),
        ("unknown-profile", Status.REJECTED, "unknown-ca-profile", "UnknownProfileError"),
        ("wrong-password", Status.REJECTED, "wrong-credentials", "AuthenticationError"),
        ("unknown-user", Status.REJECTED, "wrong-credentials", "AuthenticationError"),
    ],
)
def test_bad_device_ends_alone(
    make_system: SystemFactory, mutate: str, status: Status, reason: str, error: str
) -> None:
    """Each kind of bad input ends that device with its typed reason; the others are issued."""
    system, users = make_system(4)
    identities = [device_of(u) for u in users]
    victim, other = users[1].user, users[2].user
    good = _bad_request(victim.dn, "p256-5", victim.email, victim.upn)
    requests = {
        "truncated": good[:-7],
        "garbage": b"\x30\x82\xff\xffgarbage",
        "bad-signature": good[:-4] + bytes([good[-4] ^ 1]) + good[-3:],
        "unsupported-curve": _bad_request(victim.dn, "secp256k1-1", victim.email, victim.upn),
        "rsa1024": _bad_request(victim.dn, "rsa1024-1", victim.email, victim.upn),
        "foreign-subject": _bad_request(other.dn, "p256-5", victim.email, victim.upn),
    }
    fields: dict[str, object] = {}
    if mutate in requests:
        fields["request_der"] = requests[mutate]
    elif mutate == "unknown-profile":
        fields["profile_id"] = "no-such-profile"
    elif mutate == "wrong-password":
        fields["password"] = "not-the-password"
    else:
        fields["user_id"] = "nobody"
    identities[1] = replace(device_of(users[1]), **fields)  # type: ignore[arg-type]
    outcomes = _run(system, identities)
    bad = outcomes[1]
    assert (bad.status, bad.reason, bad.error) == (status, reason, error)
    _assert_isolated(outcomes, bad)


def test_certificate_for_another_key_never_reaches_the_device(
    make_system: SystemFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory returning another device's certificate ends in KeyMismatchError at step 13."""
    system, users = make_system(3)
    identities = [
        device_of(u, key=k) for u, k in zip(users, ["p256-4", "p256-5", "p256-4"], strict=True)
    ]
    first = _run(system, identities[:1])[0]
    foreign = asyncio.run(system.directory.retrieve(users[0].user.dn.text, first.serial or 0))
    original = system.directory.retrieve

    async def swapped(dn: str, serial: int) -> bytes:
        return foreign if dn == users[1].user.dn.text else await original(dn, serial)

    monkeypatch.setattr(system.directory, "retrieve", swapped)
    outcomes = _run(system, identities[1:])
    bad = outcomes[0]
    assert (bad.status, bad.error, bad.step) == (
        Status.REJECTED,
        "KeyMismatchError",
        Step.MATCH_AND_DELIVER,
    )
    assert users[1].user.user_id in bad.detail
    _assert_isolated(outcomes, bad)
    system.database.flush()
    row = system.database.read_one(
        "SELECT count(*) FROM key_store WHERE device_id = ?", (identities[1].device_id,)
    )
    assert row == (0,)


def test_certificate_missing_from_directory_fails_that_device(
    make_system: SystemFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish that never lands ends that device failed at step 12."""
    system, users = make_system(3)
    original = system.directory.publish

    async def lossy(dn: str, serial: int, certificate: bytes) -> None:
        if dn != users[0].user.dn.text:
            await original(dn, serial, certificate)

    monkeypatch.setattr(system.directory, "publish", lossy)
    outcomes = _run(system, [device_of(u) for u in users])
    bad = outcomes[0]
    assert (bad.status, bad.reason, bad.step) == (
        Status.FAILED,
        "certificate-not-found",
        Step.RETRIEVE,
    )
    _assert_isolated(outcomes, bad)


def test_unexpected_exception_fails_only_that_device(
    make_system: SystemFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug-like exception in a store is counted by type; its message is not kept."""
    system, users = make_system(3)
    original = system.configuration.store_key

    async def broken(device_id: str, spki: bytes) -> None:
        if device_id.endswith("0000000"):
            raise RuntimeError("secret material")
        await original(device_id, spki)

    monkeypatch.setattr(system.configuration, "store_key", broken)
    outcomes = _run(system, [device_of(u) for u in users])
    assert (outcomes[0].status, outcomes[0].error, outcomes[0].detail) == (
        Status.FAILED,
        "RuntimeError",
        "",
    )
    _assert_isolated(outcomes, outcomes[0])


def test_administrator_rejections_are_counted(make_system: SystemFactory) -> None:
    """With a 50% approval rate, each device is issued or rejected by an administrator."""
    approval = ApprovalPolicy(2, Distribution("uniform", low=0.0, high=0.002), 0.5)
    system, users = make_system(40, approval=approval, seed=3)
    outcomes = _run(system, [device_of(u) for u in users])
    counts = Counter((o.status, o.reason) for o in outcomes)
    assert set(counts) == {(Status.ISSUED, ""), (Status.REJECTED, "administrator-rejected")}
    assert sum(counts.values()) == 40
    pool = system.authority.approvals
    assert pool is not None and pool.pending == 0
    assert pool.denied == counts[(Status.REJECTED, "administrator-rejected")]


def test_approval_waits_overlap(make_system: SystemFactory) -> None:
    """Devices waiting for administrators wait together on the loop: all 30 are pending at once."""
    approval = ApprovalPolicy(30, Distribution("fixed", mean=0.5), 1.0)
    system, users = make_system(30, approval=approval)
    pool = system.authority.approvals
    assert pool is not None
    peak = 0
    original = pool.review

    async def watched(device_id: str) -> None:
        nonlocal peak
        task = asyncio.ensure_future(original(device_id))
        await asyncio.sleep(0)
        peak = max(peak, pool.pending)
        await task

    pool.review = watched  # type: ignore[method-assign]
    outcomes = _run(system, [device_of(u) for u in users])
    assert all(o.status is Status.ISSUED for o in outcomes)
    assert peak == 30


def test_device_statuses_include_pending_approval(make_system: SystemFactory) -> None:
    """Under approval, the device hears submitted, pending-approval, issued."""
    approval = ApprovalPolicy(1, Distribution("fixed", mean=0.0), 1.0)
    system, users = make_system(1, approval=approval)
    device = system.device(device_of(users[0]))
    asyncio.run(enroll(device, system.connection, system.enterprise, system._link))
    assert device.statuses == ["submitted", "pending-approval", "issued"]


@pytest.mark.parametrize("protection", ["pkcs8-encrypted", "none"])
def test_persistent_store_protects_the_key(make_system: SystemFactory, protection: str) -> None:
    """Step 5 stores the encrypted key (plain PKCS #8 if the profile says none), DN, profile."""
    system, users = make_system(1, key_protection=protection)
    identity = device_of(users[0])
    asyncio.run(system.enroll(identity))
    system.database.flush()
    row = system.database.read_one("SELECT protected_key, dn, profile_id FROM persistent_store", ())
    assert row is not None
    plain = private_key_to_der(vector_key("p256-4"))
    assert (row[0] == plain) is (protection == "none")
    assert row[1:] == (users[0].user.dn.text, "enrollbench")


def test_cold_cache_fetches_once_for_many_devices(make_system: SystemFactory) -> None:
    """With a cold cache, 20 devices missing at once cause one fetch from the CA."""
    system, users = make_system(
        20, warm_cache=False, ca_fetch_latency=Distribution("fixed", mean=0.5)
    )
    outcomes = _run(system, [device_of(u) for u in users])
    assert all(o.status is Status.ISSUED for o in outcomes)
    counts = system.connection.cache.counts
    assert (counts.fetches, counts.misses, counts.hits) == (1, 20, 0)


def test_builder_request_path_enrolls(make_system: SystemFactory) -> None:
    """The reference (builder) request path produces requests the CA accepts."""
    system, users = make_system(2, request_path="builder")
    assert [o.status for o in _run(system, [device_of(u) for u in users])] == [Status.ISSUED] * 2
