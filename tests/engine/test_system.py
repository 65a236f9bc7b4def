"""Engine assembly: configuration checks, CA material across processes, key types end to end."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from engine.approval import ApprovalPolicy, ReviewBoard
from engine.distribution import Distribution
from engine.errors import UnsupportedKeyError
from engine.flow import Status
from engine.population import directory_entry, simulated_enrollee
from engine.system import CAMaterial, EngineConfig, EnrollmentSystem
from tests.conftest import SEED, SystemFactory, ca_material, device_of, vector_key

APPROVAL = ApprovalPolicy(2, Distribution("fixed", mean=0.0), 1.0)


def test_ca_material_round_trips_as_bytes() -> None:
    """CA material rebuilt from its DER has the same certificates and issuing key."""
    config = EngineConfig(ca_intermediates=1)
    material = ca_material(config)
    chain = material.chain()
    assert (
        tuple(c.public_bytes(serialization.Encoding.DER) for c in chain.certificates)
        == material.certificates
    )
    assert len(material.certificates) == 3


def test_ca_material_needs_one_key_per_level() -> None:
    """A hierarchy with one intermediate needs three keys."""
    with pytest.raises(ValueError, match="need 3 CA keys"):
        CAMaterial.create(EngineConfig(ca_intermediates=1), [vector_key("p256-1")])


def test_material_repr_hides_the_key() -> None:
    """The issuing key never shows in a repr."""
    material = ca_material(EngineConfig())
    assert material.issuing_key.hex()[:40] not in repr(material)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [({"device_key": "dsa"}, UnsupportedKeyError), ({"ca_intermediates": -1}, ValueError)],
)
def test_bad_configs_are_refused(overrides: dict[str, object], error: type[Exception]) -> None:
    """Unknown key types and negative depths fail at construction."""
    with pytest.raises(error):
        EngineConfig(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("device_key", "hash_name", "vector"),
    [
        ("p384", "sha384", "p384-2"),
        ("ed25519", "sha256", "ed25519-2"),
        ("rsa3072", "sha256", "rsa3072-1"),
        ("rsa4096", "sha512", "rsa4096-1"),
    ],
)
def test_every_key_type_enrolls(
    make_system: SystemFactory, device_key: str, hash_name: str, vector: str
) -> None:
    """Each supported device key type is issued end to end."""
    system, users = make_system(1, device_key=device_key, hash_name=hash_name)
    outcome = asyncio.run(system.enroll(device_of(users[0], key=vector)))
    assert outcome.status is Status.ISSUED, outcome


@pytest.fixture
def shared_board(tmp_path: Path) -> Iterator[ReviewBoard]:
    """A shared board of two administrators, closed (and removed) after the test."""
    with ReviewBoard.shared(2, tmp_path) as board:
        yield board


def _replica(config: EngineConfig, board: ReviewBoard | None) -> EnrollmentSystem:
    entries = [
        directory_entry(simulated_enrollee(i, SEED), SEED, config.auth_iterations) for i in range(2)
    ]
    return EnrollmentSystem(config, ca_material(config), entries, review_board=board)


def test_replicas_given_one_board_share_its_administrators(shared_board: ReviewBoard) -> None:
    """Two replicas built on one board book the same administrators; closing them keeps it."""
    config = EngineConfig(approval=APPROVAL)
    first, second = _replica(config, shared_board), _replica(config, shared_board)
    for system in (first, second):
        pool = system.authority.approvals
        assert pool is not None and pool.board is shared_board
    shared_board.reserve(1.0, lambda: 0.0)
    assert (first.approvals_pending, first.approvals_pending_in_run) == (0, 1)
    assert second.approvals_pending_in_run == 1
    first.close()
    second.close()
    assert shared_board.pending == 1  # still open: the replicas did not close a board they got


def test_replica_without_a_board_has_a_private_one() -> None:
    """No board: the replica's pool gets its own, which its close releases."""
    system = _replica(EngineConfig(approval=APPROVAL), None)
    pool = system.authority.approvals
    assert pool is not None and pool.board.path is None
    system.close()
    with pytest.raises(ValueError, match="released"):
        _ = pool.board.pending


@pytest.mark.parametrize(
    ("approval", "message"),
    [
        (None, "review board was given but the configuration has no approval"),
        (ApprovalPolicy(3, Distribution("fixed", mean=0.0), 1.0), "board has 2 administrators"),
    ],
)
def test_a_board_that_does_not_fit_is_refused(
    shared_board: ReviewBoard, approval: ApprovalPolicy | None, message: str
) -> None:
    """A board without an approval policy, or with another number of administrators, is refused."""
    with pytest.raises(ValueError, match=message):
        _replica(EngineConfig(approval=approval), shared_board)
