"""`enrollbench gate`: a CI regression gate with three layers, each usable alone.

1. instructions: the per-enrollment instruction count of a fixed, seeded workload
   (`bench/gate_driver.py`) under valgrind (cachegrind, no cache simulation, fixed hash seed),
   baseline ref against the current tree. Deterministic: repeated counts agree to ~0.001%.
2. ab: the same workload on the wall clock, baseline and current in two live processes,
   alternating short blocks in random order; the verdict comes from a bootstrap interval of the
   paired ratios against a minimum effect size, or is inconclusive when the noise does not allow
   one within the time budget.
3. stored: a result file against a stored baseline (`results/baselines/`). Warning only unless
   `--strict`: stored-baseline comparisons on shared runners false-alarm 25-45% at a 5% threshold.

Exit codes: 0 pass, 1 regression, 2 usage or input error, 3 inconclusive.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.compare import compare_pair
from bench.errors import UsageError
from bench.paired import Interval, bootstrap_median
from bench.results import read_result
from bench.suite import Rule, load_suite, rules_from

PASS, REGRESSION, INCONCLUSIVE = 0, 1, 3
DRIVER = Path(__file__).resolve().parent / "gate_driver.py"
SHORT, LONG = 10, 110  # enrollments in the two counted runs; their difference is measured
_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")


@dataclass(frozen=True, slots=True)
class Verdict:
    """One layer's answer, with the numbers behind it."""

    layer: str
    code: int
    summary: str

    @property
    def word(self) -> str:
        return {PASS: "pass", REGRESSION: "REGRESSION", INCONCLUSIVE: "inconclusive"}[self.code]


# ---- source trees ----


def _git(repository: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (fixed git arguments)
        ["git", "-C", str(repository), *args],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def repository_root(start: Path) -> Path:
    done = _git(start, "rev-parse", "--show-toplevel")
    if done.returncode != 0:
        raise UsageError(f"{start} is not inside a git repository (the gate compares git refs)")
    return Path(done.stdout.strip())


@contextlib.contextmanager
def worktree(repository: Path, ref: str) -> Iterator[Path]:
    """The baseline ref checked out into a temporary worktree, removed afterwards."""
    if _git(repository, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode != 0:
        raise UsageError(f"git ref {ref!r} does not exist in {repository}")
    folder = Path(tempfile.mkdtemp(prefix="enrollbench-baseline-"))
    added = _git(repository, "worktree", "add", "--detach", str(folder), ref)
    if added.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise UsageError(f"cannot check out {ref!r}: {added.stderr.strip()}")
    try:
        yield folder
    finally:
        _git(repository, "worktree", "remove", "--force", str(folder))
        shutil.rmtree(folder, ignore_errors=True)


def prepare(tree: Path) -> None:
    """Compile a tree's C DER path in place, so both sides run the same kind of code."""
    source = tree / "engine" / "_derc.c"
    if not source.exists():
        return
    script = (
        "from setuptools import setup, Extension;"
        "setup(script_args=['-q', 'build_ext', '--inplace'],"
        " ext_modules=[Extension('engine._derc', ['engine/_derc.c'], optional=True,"
        " extra_compile_args=['-O2'])])"
    )
    subprocess.run(  # noqa: S603 (our interpreter, a fixed script)
        [sys.executable, "-c", script], cwd=tree, capture_output=True, check=False, timeout=300
    )


def _environment(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}


# ---- layer 1: instructions ----


def _count(tree: Path, enrollments: int) -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise UsageError("valgrind is not installed (apt-get install valgrind)")
    done = subprocess.run(  # noqa: S603 (fixed arguments)
        [
            valgrind,
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            os.path.realpath(sys.executable),
            str(DRIVER),
            "count",
            str(enrollments),
        ],
        capture_output=True,
        text=True,
        check=False,
        env=_environment(tree),
        timeout=1800,
    )
    match = _IREFS.search(done.stderr)
    if done.returncode != 0 or match is None:
        tail = done.stderr.strip().splitlines()[-3:]
        raise UsageError(f"the workload failed in {tree}: {' / '.join(tail)}")
    return int(match.group(1).replace(",", ""))


def instructions_per_enrollment(tree: Path) -> float:
    """Instructions one enrollment costs: the difference of two counted runs, per enrollment."""
    return (_count(tree, LONG) - _count(tree, SHORT)) / (LONG - SHORT)


def instructions_layer(baseline: Path, current: Path, limit: float) -> Verdict:
    before = instructions_per_enrollment(baseline)
    after = instructions_per_enrollment(current)
    change = after / before - 1.0
    code = REGRESSION if change > limit else PASS
    summary = (
        f"{before:,.0f} -> {after:,.0f} instructions per enrollment ({change:+.2%}; "
        f"limit {limit:+.1%})"
    )
    return Verdict("instructions", code, summary)


# ---- layer 2: interleaved A/B ----


class _Worker:
    """A live driver process serving timed blocks."""

    def __init__(self, tree: Path) -> None:
        self.process = subprocess.Popen(  # noqa: S603 (our interpreter, our driver)
            [sys.executable, str(DRIVER), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_environment(tree),
        )

    def block(self, enrollments: int) -> float:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(f"run {enrollments}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            error = self.process.stderr.read() if self.process.stderr else ""
            raise UsageError(f"the A/B workload died: {error.strip().splitlines()[-1:]}")
        return int(line) / enrollments

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def ab_layer(
    baseline: Path, current: Path, limit: float, budget: float, block: int = 150, seed: int = 0
) -> Verdict:
    """Alternate blocks until the interval of the paired ratios clears the limit, or time is up.

    A regression needs the whole interval above 1 + limit; a pass needs it below.
    """
    order = random.Random(seed)
    workers = _Worker(baseline), _Worker(current)
    ratios: list[float] = []
    interval = Interval(1.0, 0.0, float("inf"))
    deadline = time.monotonic() + budget
    try:
        for worker in workers:
            worker.block(block)  # warm-up
        while time.monotonic() < deadline:
            if order.random() < 0.5:
                a = workers[0].block(block)
                b = workers[1].block(block)
            else:
                b = workers[1].block(block)
                a = workers[0].block(block)
            ratios.append(b / a)
            if len(ratios) >= 12:
                interval = bootstrap_median(ratios, resamples=2000, seed=seed)
                if interval.low > 1.0 + limit or interval.high < 1.0 + limit:
                    break
    finally:
        for worker in workers:
            worker.close()
    if interval.low > 1.0 + limit:
        code = REGRESSION
    elif interval.high < 1.0 + limit:
        code = PASS
    else:
        code = INCONCLUSIVE
    summary = (
        f"current/baseline time per enrollment {interval.estimate:.3f} (95% CI "
        f"{interval.low:.3f}-{interval.high:.3f}) over {len(ratios)} block pairs; "
        f"limit {1.0 + limit:.3f}"
    )
    return Verdict("ab", code, summary)


# ---- layer 3: stored baselines ----


def stored_layer(stored: Path, result: Path, rules: Sequence[Rule], strict: bool) -> Verdict:
    """Rows of `result` against a stored baseline, judged by the rules: a warning unless strict."""
    rows = {row.metric: row for row in compare_pair(read_result(stored), read_result(result))}
    broken = []
    for rule in rules:
        row = rows.get(rule.metric)
        if row is None:
            continue
        change = row.ratio - 1.0
        worse = change < rule.limit if rule.higher_is_better else change > rule.limit
        if worse:
            broken.append(f"{rule.metric} {change:+.1%} (rule {rule})")
    if not broken:
        return Verdict("stored", PASS, f"within the rules against {stored.name}")
    note = "; ".join(broken)
    if strict:
        return Verdict("stored", REGRESSION, note)
    return Verdict("stored", PASS, f"warning only (see --strict): {note}")


def limit_for(rules: Sequence[Rule], metric: str, default: float) -> float:
    for rule in rules:
        if rule.metric == metric:
            return abs(rule.limit)
    return default


def overall(verdicts: Sequence[Verdict]) -> int:
    """Regression wins over inconclusive, which wins over pass."""
    codes = {verdict.code for verdict in verdicts}
    if REGRESSION in codes:
        return REGRESSION
    if INCONCLUSIVE in codes:
        return INCONCLUSIVE
    return PASS


# ---- the command ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`enrollbench gate` flags."""
    parser.add_argument("--baseline", default="HEAD", help="git ref to compare against")
    parser.add_argument("--current", type=Path, help="the tree to judge (default: this repo)")
    parser.add_argument("--layers", default="instructions,ab", help="instructions,ab,stored")
    parser.add_argument("--rule", action="append", default=[], help="e.g. instructions:+2%%")
    parser.add_argument("--suite", help="take the rules from this suite")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds for the A/B layer")
    parser.add_argument("--stored", type=Path, help="stored baseline result (stored layer)")
    parser.add_argument("--result", type=Path, help="result to judge (stored layer)")
    parser.add_argument("--strict", action="store_true", help="stored layer fails, not warns")


def command(args: argparse.Namespace) -> int:
    """Run the chosen layers and print one line per verdict; the exit code is the overall one."""
    suite = load_suite(args.suite) if args.suite else None
    rules = rules_from(args.rule, suite)
    layers = [layer.strip() for layer in args.layers.split(",") if layer.strip()]
    unknown = set(layers) - {"instructions", "ab", "stored"}
    if unknown or not layers:
        raise UsageError(f"--layers: choose from instructions, ab, stored (got {args.layers!r})")
    if "stored" in layers and (args.stored is None or args.result is None):
        raise UsageError("the stored layer needs --stored BASELINE.json and --result RUN.json")
    verdicts = []
    if "stored" in layers:
        verdicts.append(stored_layer(args.stored, args.result, rules, args.strict))
    code_layers = [layer for layer in layers if layer != "stored"]
    if code_layers:
        current = repository_root(args.current or Path.cwd())
        with worktree(current, args.baseline) as baseline:
            for tree in (baseline, current):
                prepare(tree)
            if "instructions" in code_layers:
                limit = limit_for(rules, "instructions", 0.02)
                verdicts.append(instructions_layer(baseline, current, limit))
            if "ab" in code_layers:
                drop = limit_for(rules, "throughput", 0.05)
                verdicts.append(ab_layer(baseline, current, 1 / (1 - drop) - 1, args.budget))
    for verdict in verdicts:
        print(f"{verdict.layer}: {verdict.word}: {verdict.summary}")
    code = overall(verdicts)
    print(f"gate: {['pass', 'REGRESSION', '', 'inconclusive'][code]}")
    return code
