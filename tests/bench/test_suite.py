"""Suites and rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.errors import ProfileError, UsageError
from bench.suite import load_suite, parse_rule, rules_from, shipped_suites
from tests.bench.conftest import run_cli


@pytest.mark.parametrize("path", shipped_suites(), ids=lambda p: p.stem)
def test_shipped_suites_load(path: Path) -> None:
    """ci and full name existing profiles and valid rules."""
    suite = load_suite(str(path))
    assert suite.profiles and suite.rules


@pytest.mark.parametrize(
    ("text", "metric", "limit"),
    [
        ("throughput:-5%", "throughput", -0.05),
        ("p99:+10%", "p99", 0.10),
        ("instructions:+2%", "instructions", 0.02),
        ("issue.p99:+15%", "issue.p99", 0.15),
    ],
)
def test_rules_parse(text: str, metric: str, limit: float) -> None:
    rule = parse_rule(text)
    assert rule.metric == metric
    assert rule.limit == pytest.approx(limit)


@pytest.mark.parametrize("text", ["throughput:+5%", "p99:-10%", "speed:+1%", "p99=10"])
def test_rules_pointing_the_wrong_way_or_unknown_are_refused(text: str) -> None:
    """A rule must name a known metric and point the way that hurts."""
    with pytest.raises(UsageError):
        parse_rule(text)


def test_command_line_rules_override_the_suite() -> None:
    suite = load_suite("ci")
    rules = {r.metric: r for r in rules_from(["p99:+20%"], suite)}
    assert rules["p99"].limit == pytest.approx(0.20)
    assert rules["throughput"].limit == pytest.approx(-0.05)


def test_empty_suite_is_refused(tmp_path: Path) -> None:
    """A suite without profiles names the problem."""
    path = tmp_path / "empty.toml"
    path.write_text('description = "nothing"\nprofiles = []\n')
    with pytest.raises(ProfileError, match="non-empty list"):
        load_suite(str(path))


def test_suite_with_unknown_profile_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('profiles = ["smoke", "no-such-profile"]\n')
    with pytest.raises(ProfileError, match="no profile 'no-such-profile'"):
        load_suite(str(path))


def test_suite_command_writes_results_and_an_index(tmp_path: Path) -> None:
    """`suite` runs each profile and writes one result each plus index.json."""
    path = tmp_path / "two.toml"
    path.write_text(
        'profiles = ["smoke"]\noverrides = ["load.duration=1.0"]\n[rules]\nthroughput = "-5%"\n'
    )
    out = tmp_path / "out"
    done = run_cli("suite", str(path), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["results"] == [{"profile": "smoke", "result": "smoke.json"}]
    assert index["rules"] == ["throughput:-5%"]
    assert json.loads((out / "smoke.json").read_text())["outcomes"]["accounted"]


def test_profiles_commands(tmp_path: Path) -> None:
    """profiles list shows descriptions; validate is exit 2 on a bad file."""
    listed = run_cli("profiles", "list")
    assert listed.returncode == 0
    assert "p256-admin-approval" in listed.stdout and "fleet-10k" in listed.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('description = "x"\n[ca]\nkey = "dsa"\n')
    done = run_cli("profiles", "validate", "profiles/smoke.toml", str(bad))
    assert done.returncode == 2
    assert "ok: profiles/smoke.toml" in done.stdout and "ca.key = 'dsa'" in done.stderr


def test_step_rules_name_the_flows_steps() -> None:
    """A step rule names an engine.flow.Step label; a near miss is refused with a suggestion."""
    assert parse_rule("match-and-deliver.p99.9:+5%").metric == "match-and-deliver.p99.9"
    with pytest.raises(UsageError, match=r"did you mean 'issue\.p99'"):
        parse_rule("isue.p99:+10%")
    with pytest.raises(UsageError, match="no step 'quantum' in the flow"):
        parse_rule("quantum.p50:+10%")


def test_a_suite_with_a_misspelt_step_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('profiles = ["smoke"]\n[rules]\n"isue.p99" = "+10%"\n')
    with pytest.raises(ProfileError, match=r"did you mean 'issue\.p99'"):
        load_suite(str(path))


def test_rules_print_as_written() -> None:
    """A fractional limit keeps its digits in messages (p99.9:+0.1%, not +0%)."""
    assert str(parse_rule("p99.9:+0.1%")) == "p99.9:+0.1%"
    assert str(parse_rule("issued:-5%")) == "issued:-5%"
