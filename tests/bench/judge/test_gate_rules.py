"""Every rule the gate accepts is judged by a chosen layer, or refused with exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.errors import UsageError
from bench.judge import gate
from bench.suite import parse_rule
from tests.bench.conftest import measured_result, run_cli


def _write(folder: Path, name: str, result: dict[str, Any]) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result))
    return path


def _stored(tmp_path: Path, *extra: str, **scale: float) -> tuple[int, str, str]:
    """`gate --layers stored` of a seeded result against one whose steps are scaled."""
    stored = _write(tmp_path, "stored", measured_result(seed=0))
    current = _write(tmp_path, "current", measured_result(seed=0, scale=scale))
    done = run_cli(
        "gate", "--layers", "stored", "--stored", str(stored), "--result", str(current), *extra
    )
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize(
    ("metric", "layers"),
    [
        ("instructions", ("instructions",)),
        ("throughput", ("ab", "stored")),
        ("issued", ("ab", "stored")),
        ("p50", ("stored",)),
        ("p99.9", ("stored",)),
        ("issue.p99", ("stored",)),
    ],
)
def test_each_metric_has_its_layers(metric: str, layers: tuple[str, ...]) -> None:
    """Instructions: layer 1; throughput and issued: A/B and stored; latencies: stored only."""
    assert gate.layers_of(metric) == layers


def test_worse_tail_fails_a_strict_stored_gate(tmp_path: Path) -> None:
    """A p99.9 rule is judged, not skipped: a worse tail under --strict is a regression."""
    code, out, err = _stored(tmp_path, "--rule", "p99.9:+0.1%", "--strict", issue=1.5)
    assert code == 1, out + err
    assert "stored: REGRESSION: p99.9 +" in out and "(rule p99.9:+0.1%)" in out


def test_a_step_rule_is_judged_on_that_step(tmp_path: Path) -> None:
    """issue.p99 compares the issue step: slower issuance breaks it, a slower lookup does not."""
    code, out, _ = _stored(tmp_path, "--rule", "issue.p99:+10%", "--strict", issue=1.5)
    assert code == 1 and "issue.p99 +" in out
    code, out, _ = _stored(tmp_path, "--rule", "issue.p99:+10%", "--strict", **{"lookup-dn": 2})
    assert code == 0 and "within the rules (issue.p99:+10%)" in out


def test_a_rule_on_a_precomputed_step_is_refused(tmp_path: Path) -> None:
    """A step that did no work has no latency to judge: exit 2 naming the rule, not a pass."""
    code, _, err = _stored(tmp_path, "--rule", "generate-key.p99:+10%", "--strict")
    assert code == 2
    assert "generate-key.p99" in err and "precomputed" in err


@pytest.mark.parametrize(
    ("layers", "rule"),
    [
        ("instructions", "p99:+10%"),
        ("instructions,ab", "issue.p99:+10%"),
        ("ab", "instructions:+2%"),
        ("stored", "instructions:+2%"),
    ],
)
def test_a_rule_no_chosen_layer_judges_is_exit_2(tmp_path: Path, layers: str, rule: str) -> None:
    """Asked for on the command line, a rule no chosen layer can judge is refused up front."""
    stored = _write(tmp_path, "stored", measured_result(seed=0))
    done = run_cli(
        "gate",
        "--layers",
        layers,
        "--rule",
        rule,
        "--stored",
        str(stored),
        "--result",
        str(stored),
        "--baseline",
        "no-such-ref",  # never reached: the rule is refused first
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no chosen layer judges" in done.stderr


def test_a_misspelt_step_is_exit_2_with_a_suggestion() -> None:
    """Step names are the flow's step labels; a near miss says which one was meant."""
    done = run_cli("gate", "--layers", "stored", "--rule", "isue.p99:+10%")
    assert done.returncode == 2
    assert "did you mean 'issue.p99'" in done.stderr


def test_suite_rules_for_other_layers_are_named_not_dropped() -> None:
    """A suite carries rules for every layer; those no chosen layer judges are listed as such."""
    rules = [parse_rule(text) for text in ("throughput:-5%", "p99:+10%", "instructions:+2%")]
    skipped = gate.check_rules(rules, ["instructions", "ab"], explicit=[])
    assert skipped == ["p99:+10% (judged by the stored layer, not chosen)"]
    with pytest.raises(UsageError, match="no chosen layer judges p99"):
        gate.check_rules(rules, ["instructions", "ab"], explicit=[rules[1]])


def test_the_ab_limit_comes_from_the_strictest_throughput_or_issued_rule() -> None:
    """Default throughput:-5%; an issued rule counts too (every gate enrollment is issued)."""
    limit, rule = gate.ab_limit([])
    assert rule == "throughput:-5%" and limit == pytest.approx(1 / 0.95 - 1)
    limit, rule = gate.ab_limit([parse_rule("throughput:-8%"), parse_rule("issued:-3%")])
    assert rule == "issued:-3%" and limit == pytest.approx(1 / 0.97 - 1)


def test_failing_fast_is_not_faster(tmp_path: Path) -> None:
    """Issued/s judges: more enrollments/s because many fail fast is a regression, not a gain."""
    stored = _write(tmp_path, "stored", measured_result(seed=0))
    failing = measured_result(seed=0, issued_per_s=6000.0, failed=20000)
    assert failing["throughput"]["enrollments_per_s"] > 8000.0  # all enrollments: "faster"
    current = _write(tmp_path, "current", failing)
    pair = ["--layers", "stored", "--stored", str(stored), "--result", str(current), "--strict"]
    by_default = run_cli("gate", *pair)
    assert by_default.returncode == 1, by_default.stdout + by_default.stderr
    assert "issued -25.0% (rule issued:-5%)" in by_default.stdout
    suite = run_cli("gate", *pair, "--suite", "ci")
    assert suite.returncode == 1 and "issued -25.0%" in suite.stdout


def test_stored_layer_without_rules_judges_issued() -> None:
    """With no rule for the stored layer, it judges the headline, issued:-5%."""
    assert [str(rule) for rule in gate.stored_rules([parse_rule("instructions:+2%")])] == [
        "issued:-5%"
    ]
