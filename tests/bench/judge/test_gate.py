"""The CI gate: A against A passes; ~10% extra CPU in issuance fails layers 1 and 2."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.errors import UsageError
from bench.judge import gate, gate_driver
from bench.suite import parse_rule
from engine.flow import Outcome, Status, Step
from tests.bench.conftest import CLI, measured_result, run_cli
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[3]
SLOW_ISSUE = """

_original_issue = CertificationAuthority.issue


def _slow_issue(self: CertificationAuthority, request: ParsedRequest, user: User) -> Issued:
    issued = _original_issue(self, request, user)
    sum(i * i for i in range(340))  # about 10% more CPU per enrollment
    return issued


CertificationAuthority.issue = _slow_issue  # type: ignore[method-assign]
"""
FAILING_ISSUE = """

def _failing_issue(self: CertificationAuthority, request: ParsedRequest, user: User) -> Issued:
    from engine.errors import FailedError

    raise FailedError("fails fast")


CertificationAuthority.issue = _failing_issue  # type: ignore[method-assign]
"""


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A clone of this repository at HEAD: the gate's current tree, HEAD its baseline."""
    require_tool("git")
    target = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    return target


def _gate(clone: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("gate", "--baseline", "HEAD", "--current", str(clone), *extra, timeout=900)


def test_a_against_a_passes(clone: Path) -> None:
    """The same code on both sides passes both layers."""
    require_tool("valgrind")
    done = _gate(clone, "--budget", "180")  # stops as soon as the interval decides
    assert done.returncode == 0, done.stdout + done.stderr
    assert "instructions: pass" in done.stdout and "ab: pass" in done.stdout


def test_extra_work_in_issuance_fails_both_layers(clone: Path) -> None:
    """About 10% more CPU in CertificationAuthority.issue is a regression on layers 1 and 2."""
    require_tool("valgrind")
    with (clone / "engine" / "ca.py").open("a") as handle:
        handle.write(SLOW_ISSUE)
    done = _gate(clone, "--budget", "180")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "instructions: REGRESSION" in done.stdout
    assert "ab: REGRESSION" in done.stdout


def test_repeated_counts_agree(clone: Path) -> None:
    """Two instruction counts of the same tree agree to better than 0.1%."""
    require_tool("valgrind")
    gate.prepare(clone)
    first = gate.instructions_per_enrollment(clone)
    second = gate.instructions_per_enrollment(clone)
    assert abs(first / second - 1) < 0.001


def test_failing_fast_stops_the_ab_layer(clone: Path) -> None:
    """A tree whose enrollments fail (cheaply) is a broken workload, exit 2, never "faster"."""
    with (clone / "engine" / "ca.py").open("a") as handle:
        handle.write(FAILING_ISSUE)
    done = _gate(clone, "--layers", "ab", "--budget", "5")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not issued" in done.stderr


class _Rejecting:
    """An engine double whose every enrollment is rejected at issuance."""

    async def enroll(self, identity: object) -> Outcome:
        return Outcome(str(identity), Status.REJECTED, Step.ISSUE, reason="policy")


def test_the_workload_refuses_an_enrollment_not_issued() -> None:
    """The driver raises on the first enrollment that ends without a certificate."""
    with pytest.raises(gate_driver.NotIssuedError, match="not issued"):
        gate_driver.run(_Rejecting(), ["device-0"], 1, 0)


def test_unknown_ref_is_exit_2(clone: Path) -> None:
    """A baseline ref that does not exist is a one-line error and exit code 2."""
    done = _gate(clone, "--baseline", "no-such-ref")
    assert done.returncode == 2
    assert "git ref 'no-such-ref' does not exist" in done.stderr


def test_outside_git_is_a_usage_error(tmp_path: Path) -> None:
    """The code layers need a git repository."""
    with pytest.raises(UsageError, match="not inside a git repository"):
        gate.repository_root(tmp_path)


def test_missing_valgrind_is_a_usage_error(clone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without valgrind the instruction layer says so and how to get it."""
    monkeypatch.setattr("shutil.which", lambda _name: None)
    with pytest.raises(UsageError, match="apt-get install valgrind"):
        gate.instructions_per_enrollment(clone)


def _result_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A seeded result and one whose issued/s (and so enrollments/s) halved."""
    stored, current = tmp_path / "stored.json", tmp_path / "current.json"
    stored.write_text(json.dumps(measured_result(seed=0)))
    current.write_text(json.dumps(measured_result(seed=0, issued_per_s=4000.0)))
    return stored, current


def test_stored_baseline_warns_unless_strict(tmp_path: Path) -> None:
    """Against a stored baseline a regression is a warning by default, a failure with --strict."""
    stored, current = _result_pair(tmp_path)
    rules = [parse_rule("throughput:-5%")]
    warning = gate.stored_layer(stored, current, rules, strict=False)
    assert warning.code == gate.PASS and "warning only" in warning.summary
    strict = gate.stored_layer(stored, current, rules, strict=True)
    assert strict.code == gate.REGRESSION and "throughput -50.0%" in strict.summary


def test_overall_prefers_regression_then_inconclusive() -> None:
    """A regression anywhere fails; otherwise an inconclusive layer is inconclusive."""
    verdicts = [gate.Verdict("a", gate.PASS, ""), gate.Verdict("b", gate.INCONCLUSIVE, "")]
    assert gate.overall(verdicts) == gate.INCONCLUSIVE
    assert gate.overall([*verdicts, gate.Verdict("c", gate.REGRESSION, "")]) == gate.REGRESSION


def test_prepare_builds_each_trees_c_path_and_the_workload_uses_it(tmp_path: Path) -> None:
    """The tree's own C DER module is built (from a scratch folder, so the tree's pyproject
    cannot stop it) and is the one its workload reports."""
    require_tool("gcc")
    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT / "engine", tree / "engine", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    gate.prepare(tree)
    assert list((tree / "engine").glob("_derc*.so"))
    worker = gate._Worker(tree, None)
    try:
        measured = worker.environment
    finally:
        worker.close()
    assert measured.der == "c"


def _worktrees(repository: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "-C", str(repository), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in listed.stdout.splitlines() if line.startswith("worktree ")]


def test_a_terminated_gate_removes_its_baseline_worktree(clone: Path) -> None:
    """SIGTERM (a cancelled CI job) exits through cleanup: no baseline worktree is left behind."""
    gate_process = subprocess.Popen(
        [*CLI, "gate", "--baseline", "HEAD", "--current", str(clone), "--layers", "ab"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(600):  # until the baseline worktree exists (at most a minute)
            if len(_worktrees(clone)) == 2:
                break
            time.sleep(0.1)
        assert len(_worktrees(clone)) == 2
        gate_process.send_signal(signal.SIGTERM)
        assert gate_process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        gate_process.kill()
        gate_process.communicate()
    assert _worktrees(clone) == [f"worktree {clone}"]
