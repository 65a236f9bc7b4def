"""`enrollbench gate`: a CI regression gate with three layers, each usable alone.

1. instructions: the per-enrollment instruction count of a fixed, seeded workload
   (`bench/judge/gate_driver.py`) under valgrind (cachegrind, no cache simulation, fixed hash seed),
   baseline ref against the current tree. Repeatable: A/A counts here differ by up to 0.02%.
2. ab: the same workload on the wall clock, in rounds: each round starts a fresh baseline and
   current process pinned to one CPU, warms both equally, then times short blocks of each in
   random order; a round gives the median of its paired ratios. The verdict comes from a
   bootstrap interval of the round ratios against a minimum effect size, or is inconclusive when
   the noise does not allow one within the time budget. (Two long-lived processes, unpinned,
   compared the CPUs and process layouts they happened to get: A/A ratios of 0.70-1.10.)
3. stored: a result file against a stored baseline (`results/baselines/`). Warning only unless
   `--strict`: stored-baseline comparisons on shared runners false-alarm 25-45% at a 5% threshold.

Every measured process runs the gate's own interpreter and reports what it ran with (python,
cryptography, OpenSSL, engine folder, DER path); the gate checks that against itself and names
it in the verdict. Which layer judges which rule: `layers_of`.

Exit codes: 0 pass, 1 regression, 2 usage or input error, 3 inconclusive.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.errors import UsageError
from bench.judge.compare import compare_pair
from bench.judge.paired import Interval, bootstrap_median
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
    # The add is inside the `try`: a SIGTERM that lands while git registers the worktree still
    # removes it (removing one that was never added is a harmless git error).
    try:
        added = _git(repository, "worktree", "add", "--detach", str(folder), ref)
        if added.returncode != 0:
            raise UsageError(f"cannot check out {ref!r}: {added.stderr.strip()}")
        yield folder
    finally:
        _git(repository, "worktree", "remove", "--force", str(folder))
        shutil.rmtree(folder, ignore_errors=True)
        _git(repository, "worktree", "prune")  # a half-added worktree whose folder is gone


def prepare(tree: Path) -> None:
    """Compile a tree's C DER path in place, so both sides run the same kind of code.

    Built from a scratch folder with the tree as the package root: run inside the tree, setuptools
    reads its pyproject.toml, which a newer tree may write for a newer setuptools than the one
    here (seen: `tool.setuptools.ext-modules`), and the build silently did nothing. Whether the
    C path is in use is reported by each measured process (the environment line), not assumed.
    """
    source = tree / "engine" / "_derc.c"
    if not source.exists():
        return
    script = (
        "import sys; from setuptools import setup, Extension;"
        "setup(name='derc', package_dir={'': sys.argv[1]},"
        " script_args=['-q', 'build_ext', '--inplace', '--force', '--build-temp', 'build'],"
        " ext_modules=[Extension('engine._derc', [sys.argv[1] + '/engine/_derc.c'],"
        " optional=True, extra_compile_args=['-O2'])])"
    )
    with tempfile.TemporaryDirectory(prefix="enrollbench-build-") as scratch:
        subprocess.run(  # noqa: S603 (our interpreter, a fixed script)
            [sys.executable, "-c", script, str(tree)],
            cwd=scratch,
            capture_output=True,
            check=False,
            timeout=300,
        )


def _environment(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}


def _interpreter() -> str:
    """The interpreter the gate runs in, as invoked: inside its virtual environment, if any.

    Not its realpath: a venv's python is a symlink to the base interpreter, and resolving it
    runs the base installation with the base's site-packages (another cryptography, or none).
    valgrind runs a symlinked python fine (CPython finds pyvenv.cfg beside argv[0]).
    """
    if not sys.executable:
        raise UsageError("cannot tell which python runs the gate (sys.executable is empty)")
    return sys.executable


@dataclass(frozen=True, slots=True)
class Environment:
    """What a measured process ran with, as it reported from inside."""

    python: str
    prefix: str
    cryptography: str
    openssl: str
    engine: str
    der: str

    def describe(self) -> str:
        return (
            f"python {self.python}, cryptography {self.cryptography}, {self.openssl}, "
            f"{self.der} DER path"
        )


def _gate_cryptography() -> str:
    import cryptography  # noqa: PLC0415 (the gate's own, to check the measured one against)

    return cryptography.__version__


def read_environment(line: str, tree: Path) -> Environment:
    """Parse a driver's environment line and check it is the gate's environment and `tree`."""
    try:
        raw = json.loads(line)
        found = Environment(
            str(raw["python"]),
            str(raw["prefix"]),
            str(raw["cryptography"]),
            str(raw["openssl"]),
            str(raw["engine"]),
            str(raw["der"]),
        )
        der_path = str(raw.get("der_path", ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"the workload in {tree} did not report its environment: {line!r}"
        ) from exc
    if Path(found.prefix).resolve() != Path(sys.prefix).resolve():
        raise UsageError(
            f"the workload ran in {found.prefix} (cryptography {found.cryptography}), not in the "
            f"gate's environment {sys.prefix} (cryptography {_gate_cryptography()})"
        )
    if found.cryptography != _gate_cryptography():
        raise UsageError(
            f"the workload imported cryptography {found.cryptography}, the gate "
            f"{_gate_cryptography()}: run the gate from the environment that will be measured"
        )
    if Path(found.engine) != (tree / "engine").resolve():
        raise UsageError(f"the workload imported the engine from {found.engine}, not from {tree}")
    if der_path and Path(der_path).parent != (tree / "engine").resolve():
        raise UsageError(f"the workload's C DER path came from {der_path}, not from {tree}")
    return found


def measured_with(baseline: Environment, current: Environment) -> str:
    """Name the versions both sides measured with (once when they agree)."""
    if baseline.describe() == current.describe():
        return f"measured with {current.describe()} (both trees)"
    return f"measured with baseline: {baseline.describe()}; current: {current.describe()}"


# ---- layer 1: instructions ----


def counted_command(valgrind: str, enrollments: int) -> list[str]:
    """The command that counts `enrollments` under cachegrind, in the gate's own environment."""
    return [
        valgrind,
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        _interpreter(),
        str(DRIVER),
        "count",
        str(enrollments),
    ]


def _count(tree: Path, enrollments: int) -> tuple[int, Environment]:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise UsageError("valgrind is not installed (apt-get install valgrind)")
    done = subprocess.run(  # noqa: S603 (fixed arguments)
        counted_command(valgrind, enrollments),
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
    lines = done.stdout.strip().splitlines()
    return int(match.group(1).replace(",", "")), read_environment(lines[-1] if lines else "", tree)


def measure_instructions(tree: Path) -> tuple[float, Environment]:
    """Instructions one enrollment costs (the difference of two counted runs, per enrollment),
    and the environment they were counted in."""
    long, environment = _count(tree, LONG)
    short, _ = _count(tree, SHORT)
    return (long - short) / (LONG - SHORT), environment


def instructions_per_enrollment(tree: Path) -> float:
    return measure_instructions(tree)[0]


def instructions_layer(baseline: Path, current: Path, limit: float) -> Verdict:
    before, before_environment = measure_instructions(baseline)
    after, after_environment = measure_instructions(current)
    change = after / before - 1.0
    code = REGRESSION if change > limit else PASS
    summary = (
        f"{before:,.0f} -> {after:,.0f} instructions per enrollment ({change:+.2%}; "
        f"limit {limit:+.1%}); {measured_with(before_environment, after_environment)}"
    )
    return Verdict("instructions", code, summary)


# ---- layer 2: interleaved A/B ----


class BlockWorker(Protocol):
    """A live workload process: times blocks of enrollments (ns per enrollment)."""

    @property
    def environment(self) -> Environment: ...

    def block(self, enrollments: int) -> float: ...

    def close(self) -> None: ...


class _Worker:
    """A live driver process serving timed blocks, pinned to `cpu` when one is given."""

    def __init__(self, tree: Path, cpu: int | None) -> None:
        self.tree = tree
        self.process = subprocess.Popen(  # noqa: S603 (our interpreter, our driver)
            [_interpreter(), str(DRIVER), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_environment(tree),
        )
        if cpu is not None:
            with contextlib.suppress(OSError):  # gone already: the first read says why
                os.sched_setaffinity(self.process.pid, {cpu})
        self._environment: Environment | None = None

    @property
    def environment(self) -> Environment:
        """The worker's environment line (waits for the worker to be ready)."""
        if self._environment is None:
            self._environment = read_environment(self._line(), self.tree)
        return self._environment

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            error = self.process.stderr.read() if self.process.stderr else ""
            last = (error.strip().splitlines() or ["no message"])[-1]
            raise UsageError(f"the A/B workload in {self.tree} died: {last}")
        return line

    def block(self, enrollments: int) -> float:
        assert self.process.stdin is not None
        self.environment  # noqa: B018 (the ready line comes first)
        self.process.stdin.write(f"run {enrollments}\n")
        self.process.stdin.flush()
        return int(self._line()) / enrollments

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


Spawn = Callable[[Path, "int | None"], BlockWorker]


def measuring_cpu() -> int | None:
    """One CPU for every measured process (the last this process may use), or None if the
    platform cannot pin. Two processes on two CPUs compare the CPUs, not the code: on a 2-vCPU
    machine whose other vCPU is busy (a hyperthread sibling, another tenant) one side ran ~1.3x
    slower for a whole trial, and long-lived processes stay on the CPU they started on."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return max(os.sched_getaffinity(0))


@dataclass(frozen=True, slots=True)
class ABDesign:
    """How the A/B layer measures: rounds of fresh process pairs, pinned to one CPU."""

    # Short blocks: a pair's two blocks run within a few ms of each other, so both see the same
    # machine state (this host's speed shifts by up to 1.5x for hundreds of ms at a time).
    # Measured sd of A/A round ratios here: 0.076 with 5 pairs of 150, 0.037 with 15 of 50,
    # 0.012 with 30 of 25 (45 s each, other helpers loading both CPUs).
    block: int = 25  # enrollments per timed block (~5-7 ms here)
    pairs: int = 30  # block pairs per round
    warmup: int = 150  # enrollments each side runs untimed before its first block
    first_look: int = 15  # rounds before the first verdict (the bootstrap needs a few)
    look_every: int = 10  # rounds between later looks
    confidence: float = 0.99  # at every look, so a few looks keep a false verdict rare


def _round(
    spawn: Spawn, trees: tuple[Path, Path], cpu: int | None, design: ABDesign, order: random.Random
) -> tuple[float, tuple[Environment, Environment]]:
    """One round: a fresh baseline and current process, equal warm-up, then paired blocks in
    random order; the round's median ratio current/baseline.

    Fresh processes each round: a process's heap and code layout (ASLR) and the state its
    stores grew into stay with it for life, so two long-lived processes can differ by a few
    percent for a whole trial; new pairs draw new layouts, and the rounds average them out.
    """
    sides = [0, 1]
    order.shuffle(sides)  # start order is random too
    started: dict[int, BlockWorker] = {}
    try:
        for side in sides:
            started[side] = spawn(trees[side], cpu)
        workers = (started[0], started[1])
        environments = (workers[0].environment, workers[1].environment)
        for side in sides:
            workers[side].block(design.warmup)  # the same warm-up for both
        ratios = []
        for _ in range(design.pairs):
            times = [0.0, 0.0]
            order.shuffle(sides)
            for side in sides:
                times[side] = workers[side].block(design.block)
            ratios.append(times[1] / times[0])
    finally:
        for worker in started.values():
            worker.close()
    return statistics.median(ratios), environments


def ab_layer(
    baseline: Path,
    current: Path,
    limit: float,
    budget: float,
    *,
    design: ABDesign = ABDesign(),
    seed: int = 0,
    spawn: Spawn = _Worker,
    clock: Callable[[], float] = time.monotonic,
    cpu: int | None = None,
) -> Verdict:
    """Rounds of fresh process pairs until the interval of the round ratios clears the limit,
    or the budget is spent.

    A regression needs the whole interval above 1 + limit; a pass needs it below; otherwise the
    layer is inconclusive. Every enrollment in a block must be issued (the driver raises), so the
    time per enrollment is the time per issued certificate: failing fast is never a speed-up.
    """
    order = random.Random(seed)
    pin = measuring_cpu() if cpu is None else cpu
    rounds: list[float] = []
    interval = Interval(float("nan"), 0.0, float("inf"))
    environments: tuple[Environment, Environment] | None = None
    deadline = clock() + budget
    while clock() < deadline:
        ratio, environments = _round(spawn, (baseline, current), pin, design, order)
        rounds.append(ratio)
        looks = len(rounds) - design.first_look
        if (looks >= 0 and looks % design.look_every == 0) or clock() >= deadline:
            interval = _interval(rounds, design, seed)
            if interval.low > 1.0 + limit or interval.high < 1.0 + limit:
                break
    if len(rounds) < design.first_look:
        code = INCONCLUSIVE
    elif interval.low > 1.0 + limit:
        code = REGRESSION
    elif interval.high < 1.0 + limit:
        code = PASS
    else:
        code = INCONCLUSIVE
    where = "unpinned" if pin is None else f"pinned to CPU {pin}"
    summary = (
        f"current/baseline time per issued enrollment {interval.estimate:.3f} "
        f"({design.confidence:.0%} CI {interval.low:.3f}-{interval.high:.3f}) over "
        f"{len(rounds)} rounds of fresh process pairs ({design.pairs} block pairs of "
        f"{design.block} each, {where}); limit {1.0 + limit:.3f}"
    )
    if len(rounds) < design.first_look:
        summary += f"; too few rounds for a verdict (need {design.first_look}: raise --budget)"
    if environments is not None:
        summary += f"; {measured_with(*environments)}"
    return Verdict("ab", code, summary)


def _interval(rounds: Sequence[float], design: ABDesign, seed: int) -> Interval:
    if len(rounds) < 3:
        return Interval(statistics.median(rounds), 0.0, float("inf"))
    return bootstrap_median(rounds, resamples=4000, confidence=design.confidence, seed=seed)


# ---- layer 3: stored baselines ----


def stored_layer(stored: Path, result: Path, rules: Sequence[Rule], strict: bool) -> Verdict:
    """Rows of `result` against a stored baseline, judged by the rules: a warning unless strict.

    Every rule is judged: a metric the two results cannot give a row for (a step that did no
    work, a field missing) is an input error, never a silent pass.
    """
    judged = stored_rules(rules)
    rows = {
        row.metric: row
        for row in compare_pair(
            read_result(stored), read_result(result), seed=0, metrics=[r.metric for r in judged]
        )
    }
    broken = []
    for rule in judged:
        row = rows.get(rule.metric)
        if row is None:
            raise UsageError(
                f"rule {rule}: {stored} and {result} give no {rule.metric} to compare "
                "(a precomputed step, or a field the results lack)"
            )
        change = row.ratio - 1.0
        worse = change < rule.limit if rule.higher_is_better else change > rule.limit
        if worse:
            broken.append(f"{rule.metric} {change:+.1%} (rule {rule})")
    names = ", ".join(str(rule) for rule in judged)
    if not broken:
        return Verdict("stored", PASS, f"within the rules ({names}) against {stored.name}")
    note = "; ".join(broken)
    if strict:
        return Verdict("stored", REGRESSION, note)
    return Verdict("stored", PASS, f"warning only (see --strict): {note}")


def stored_rules(rules: Sequence[Rule]) -> list[Rule]:
    """The rules the stored layer judges; without any, the headline: issued:-5%."""
    judged = [rule for rule in rules if "stored" in layers_of(rule.metric)]
    return judged or [Rule("issued", -0.05)]


# ---- which layer judges which rule ----

LAYERS = ("instructions", "ab", "stored")


def layers_of(metric: str) -> tuple[str, ...]:
    """The layers that can judge a metric.

    instructions: only layer 1 counts them. throughput and issued: the A/B layer's time per
    enrollment (every gate enrollment is issued, so the two are one there) and stored results.
    Latency percentiles, end to end or per step: only results carry latency distributions.
    """
    if metric == "instructions":
        return ("instructions",)
    if metric in ("throughput", "issued"):
        return ("ab", "stored")
    return ("stored",)


def check_rules(
    rules: Sequence[Rule], layers: Sequence[str], explicit: Sequence[Rule]
) -> list[str]:
    """Refuse an explicit rule that no chosen layer judges; name suite rules left to others.

    A suite holds rules for every layer (a CI job gates on code layers and checks stored results
    in another step), so its rules for unchosen layers are listed, not refused; a rule given on
    the command line was asked for here, and is judged here or refused.
    """
    skipped = []
    for rule in rules:
        judges = [layer for layer in layers_of(rule.metric) if layer in layers]
        if judges:
            continue
        where = " or ".join(layers_of(rule.metric))
        if rule in explicit:
            raise UsageError(
                f"rule {rule}: no chosen layer judges {rule.metric} (chosen: "
                f"{', '.join(layers)}; {rule.metric} is judged by the {where} layer)"
            )
        skipped.append(f"{rule} (judged by the {where} layer, not chosen)")
    return skipped


def ab_limit(rules: Sequence[Rule]) -> tuple[float, str]:
    """The A/B layer's limit on time per enrollment, from the strictest throughput/issued rule
    (default throughput:-5%), and that rule's name."""
    candidates = [rule for rule in rules if rule.metric in ("throughput", "issued")]
    chosen = min(candidates, key=lambda rule: abs(rule.limit), default=Rule("throughput", -0.05))
    return 1 / (1 - abs(chosen.limit)) - 1, str(chosen)


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


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (a cancelled CI job) exits through the `finally`s: workers closed, the baseline
    worktree removed, instead of left registered in the repository."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    explicit = rules_from(args.rule)
    rules = rules_from(args.rule, suite)
    layers = [layer.strip() for layer in args.layers.split(",") if layer.strip()]
    unknown = set(layers) - set(LAYERS)
    if unknown or not layers:
        raise UsageError(f"--layers: choose from instructions, ab, stored (got {args.layers!r})")
    if "stored" in layers and (args.stored is None or args.result is None):
        raise UsageError("the stored layer needs --stored BASELINE.json and --result RUN.json")
    skipped = check_rules(rules, layers, explicit)
    verdicts = []
    if "stored" in layers:
        verdicts.append(stored_layer(args.stored, args.result, rules, args.strict))
    code_layers = [layer for layer in layers if layer != "stored"]
    if code_layers:
        current = repository_root(args.current or Path.cwd())
        with _terminate_as_exit(), worktree(current, args.baseline) as baseline:
            for tree in (baseline, current):
                prepare(tree)
            if "instructions" in code_layers:
                limit = limit_for(rules, "instructions", 0.02)
                verdicts.append(instructions_layer(baseline, current, limit))
            if "ab" in code_layers:
                limit, rule = ab_limit(rules)
                verdict = ab_layer(baseline, current, limit, args.budget)
                verdicts.append(Verdict("ab", verdict.code, f"{verdict.summary} (rule {rule})"))
    for verdict in verdicts:
        print(f"{verdict.layer}: {verdict.word}: {verdict.summary}")
    for note in skipped:
        print(f"not judged here: {note}")
    code = overall(verdicts)
    print(f"gate: {['pass', 'REGRESSION', '', 'inconclusive'][code]}")
    return code
