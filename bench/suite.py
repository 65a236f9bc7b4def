"""Suites (profiles/suites/*.toml): a list of profiles, shared overrides, and gate rules.

    description = "..."
    profiles = ["smoke", "p256-auto"]
    overrides = ["load.duration=2.0"]       # optional, applied to every profile
    [rules]                                 # optional: metric = "+N%" / "-N%"
    throughput = "-5%"
    p99 = "+10%"

A rule says how far a metric may move the wrong way before the gate calls it a regression:
`throughput:-5%` fails when throughput drops more than 5%, `p99:+10%` when p99 grows more than
10%. Metrics: throughput (enrollments/s), issued (issued certificates/s, the headline), p50, p90,
p99, p99.9 (end to end), `<step>.pNN` (one step of the flow by its label, e.g. issue.p99),
instructions (per enrollment). Which gate layer judges which metric: bench.judge.gate.layers_of.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import ProfileError, UsageError
from bench.profile import PROFILE_DIRECTORY, resolve
from engine.flow import Step

SUITE_DIRECTORY = PROFILE_DIRECTORY / "suites"
_RULE = re.compile(r"^([a-z0-9.-]+)\s*[:=]\s*([+-])(\d+(?:\.\d+)?)%$")
_PERCENTILES = ("p50", "p90", "p99", "p99.9")
METRICS = ("throughput", "issued", *_PERCENTILES, "instructions")
_STEP_METRIC = re.compile(r"^([a-z]+(?:-[a-z]+)*)\.(p50|p90|p99|p99\.9)$")
STEPS = tuple(step.label for step in Step)


@dataclass(frozen=True, slots=True)
class Rule:
    """`metric` may move by `limit` (a signed fraction) before it is a regression."""

    metric: str
    limit: float

    @property
    def higher_is_better(self) -> bool:
        return self.metric in ("throughput", "issued")

    def __str__(self) -> str:
        return f"{self.metric}:{self.limit * 100:+g}%"


def parse_rule(text: str) -> Rule:
    """`p99:+10%` -> Rule("p99", 0.10); the sign must point the way that hurts."""
    match = _RULE.match(text.strip())
    if match is None:
        raise UsageError(f"rule {text!r}: expected metric:+N% or metric:-N%")
    metric, sign, number = match.groups()
    step = _STEP_METRIC.match(metric)
    if metric not in METRICS and step is None:
        raise UsageError(
            f"rule {text!r}: unknown metric {metric!r}; known: throughput, issued, "
            "p50, p90, p99, p99.9, instructions, <step>.pNN"
        )
    if step is not None and step.group(1) not in STEPS:
        raise UsageError(f"rule {text!r}: {_unknown_step(*step.groups())}")
    limit = float(number) / 100.0 * (1 if sign == "+" else -1)
    rule = Rule(metric, limit)
    if (limit < 0) != rule.higher_is_better:
        worse = "down" if rule.higher_is_better else "up"
        raise UsageError(f"rule {text!r}: {metric} regresses when it goes {worse}")
    return rule


def _unknown_step(name: str, percentile: str) -> str:
    close = difflib.get_close_matches(name, STEPS, n=1)
    hint = f"did you mean {close[0] + '.' + percentile!r}? " if close else ""
    return f"no step {name!r} in the flow; {hint}steps: {', '.join(STEPS)}"


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    description: str
    profiles: tuple[str, ...]
    overrides: tuple[str, ...]
    rules: tuple[Rule, ...]


def load_suite(name_or_path: str) -> Suite:
    """Read and check a suite: known keys, at least one profile, each profile found, rules."""
    path = resolve(name_or_path, SUITE_DIRECTORY, "suite")
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from exc
    unknown = set(raw) - {"description", "profiles", "overrides", "rules"}
    if unknown:
        raise ProfileError(f"{path}: unknown keys {sorted(unknown)}")
    profiles = raw.get("profiles")
    if not isinstance(profiles, list) or not profiles:
        raise ProfileError(f"{path}: 'profiles' must be a non-empty list of profile names")
    for name in profiles:
        resolve(str(name))
    rules = raw.get("rules", {})
    if not isinstance(rules, Mapping):
        raise ProfileError(f'{path}: [rules] must be a table of metric = "+N%"')
    try:
        parsed = tuple(parse_rule(f"{metric}:{limit}") for metric, limit in rules.items())
    except UsageError as exc:
        raise ProfileError(f"{path}: {exc}") from exc
    return Suite(
        path.stem,
        str(raw.get("description", "")),
        tuple(str(p) for p in profiles),
        tuple(str(o) for o in raw.get("overrides", [])),
        parsed,
    )


def shipped_suites() -> list[Path]:
    return sorted(SUITE_DIRECTORY.glob("*.toml"))


def rules_from(texts: Sequence[str], suite: Suite | None = None) -> tuple[Rule, ...]:
    """Command-line rules override the suite's rules for the same metric."""
    rules = {rule.metric: rule for rule in (suite.rules if suite else ())}
    for text in texts:
        rule = parse_rule(text)
        rules[rule.metric] = rule
    return tuple(rules.values())
