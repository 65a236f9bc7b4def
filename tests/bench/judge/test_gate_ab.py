"""The A/B layer's design, on fixed-cost test doubles: no clock, no processes, fixed seeds."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from bench.judge import gate

BASELINE, CURRENT = Path("/trees/baseline"), Path("/trees/current")
ENVIRONMENT = gate.Environment("3.11.7", sys.prefix, "50.0.2", "OpenSSL 3", "/e", "c")
START_UP_S = 0.7  # seconds a double "takes" to start, as the real driver does here


class Clock:
    """Simulated time: the doubles advance it by what they would have taken."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FixedCostWorker:
    """A workload process of fixed cost per enrollment, times its own layout factor, with noise."""

    def __init__(self, cost_ns: float, layout: float, noise: random.Random, clock: Clock) -> None:
        self.cost_ns = cost_ns * layout
        self.noise = noise
        self.clock = clock
        self.closed = False

    @property
    def environment(self) -> gate.Environment:
        return ENVIRONMENT

    def block(self, enrollments: int) -> float:
        per_enrollment = self.cost_ns * self.noise.lognormvariate(0.0, 0.02)
        self.clock.now += per_enrollment * enrollments / 1e9
        return per_enrollment

    def close(self) -> None:
        self.closed = True


class Spawner:
    """Starts doubles; each process draws a layout factor (ASLR, heap), sd 3% (long-lived pinned
    pairs here sat 1-3% off 1.0 with tight intervals), so one pair alone can mislead."""

    def __init__(self, slowdown: float, clock: Clock, seed: int = 7) -> None:
        self.costs = {BASELINE: 250_000.0, CURRENT: 250_000.0 * slowdown}
        self.random = random.Random(seed)
        self.clock = clock
        self.started: list[tuple[Path, int | None, FixedCostWorker]] = []

    def __call__(self, tree: Path, cpu: int | None) -> FixedCostWorker:
        self.clock.now += START_UP_S
        layout = self.random.lognormvariate(0.0, 0.03)
        worker = FixedCostWorker(self.costs[tree], layout, self.random, self.clock)
        self.started.append((tree, cpu, worker))
        return worker


def _ab(slowdown: float, budget: float = 60.0, seed: int = 7) -> tuple[gate.Verdict, Spawner]:
    clock = Clock()
    spawner = Spawner(slowdown, clock, seed)
    limit = 1 / 0.95 - 1  # throughput:-5%
    verdict = gate.ab_layer(
        BASELINE, CURRENT, limit, budget, spawn=spawner, clock=clock, cpu=1, seed=seed
    )
    return verdict, spawner


def _interval(verdict: gate.Verdict) -> tuple[float, float, float]:
    """Estimate, low and high as the summary prints them."""
    estimate = verdict.summary.split("enrollment ")[1].split(" ")[0]
    low, high = verdict.summary.split("CI ")[1].split(")")[0].split("-")
    return float(estimate), float(low), float(high)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_a_against_a_centres_on_one_despite_process_layout(seed: int) -> None:
    """Identical code passes and reads within 3% of 1.0, though processes differ by 8% and more."""
    verdict, spawner = _ab(1.0, seed=seed)
    assert verdict.code == gate.PASS, verdict.summary
    estimate, _, high = _interval(verdict)
    assert abs(estimate - 1.0) < 0.03 and high < 1 / 0.95, verdict.summary
    layouts = [worker.cost_ns / 250_000.0 for _, _, worker in spawner.started]
    assert max(layouts) / min(layouts) > 1.08  # the doubles really differ per process


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_ten_percent_more_work_is_a_regression(seed: int) -> None:
    """About 10% more time per enrollment is called a regression, its interval around 1.10."""
    verdict, _ = _ab(1.10, seed=seed)
    assert verdict.code == gate.REGRESSION, verdict.summary
    estimate, low, high = _interval(verdict)
    assert low <= 1.10 <= high and 1.06 < estimate < 1.14, verdict.summary


def test_every_round_starts_a_fresh_pinned_pair_and_closes_it() -> None:
    """Each round runs two new processes, one per tree, on the one measuring CPU; all are closed."""
    verdict, spawner = _ab(1.0)
    trees = [tree for tree, _, _ in spawner.started]
    assert len(trees) >= 2 * gate.ABDesign().first_look
    assert all(set(trees[i : i + 2]) == {BASELINE, CURRENT} for i in range(0, len(trees), 2))
    assert {cpu for _, cpu, _ in spawner.started} == {1}
    assert all(worker.closed for _, _, worker in spawner.started)
    assert "pinned to CPU 1" in verdict.summary


def test_a_budget_too_short_for_the_first_look_is_inconclusive() -> None:
    """Fewer rounds than the first look needs is never a verdict, even at a large difference."""
    verdict, spawner = _ab(1.5, budget=5.0)
    assert verdict.code == gate.INCONCLUSIVE
    assert "too few rounds" in verdict.summary
    assert len(spawner.started) < 2 * gate.ABDesign().first_look


def test_a_difference_at_the_limit_is_inconclusive() -> None:
    """A change the size of the limit itself cannot be told apart from it: inconclusive."""
    verdict, _ = _ab(1 / 0.95, budget=40.0)
    assert verdict.code == gate.INCONCLUSIVE, verdict.summary


def test_the_verdict_names_what_it_measured_with() -> None:
    """Python, cryptography and OpenSSL as the measured processes reported them."""
    verdict, _ = _ab(1.0)
    assert "python 3.11.7, cryptography 50.0.2, OpenSSL 3" in verdict.summary
    assert "(both trees)" in verdict.summary
