"""enrollbench: benchmark certificate enrollment.

Exit codes: 0 success; 1 the run finished but something is wrong with it (fewer devices issued
than the profile expects, outcomes that do not add up to the devices started: the result is
written all the same, and one line says why); 2 usage or input error (a one-line message).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.errors import AccountingError, BenchError, UsageError
from bench.judge import compare, export, gate, report
from bench.profile import load_profile, shipped_profiles
from bench.results import (
    SCHEMA_VERSION,
    check_accounting,
    check_writable,
    write_result,
)
from bench.run import capacity
from bench.run.merge import build_result
from bench.run.progress import LiveProgress, print_summary
from bench.run.runner import RunOptions, execute, resolve_workers, write_artifacts
from bench.serve import command as serve_command
from bench.services import command as services_command
from bench.suite import load_suite


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", help="a shipped profile name (see profiles/) or a .toml path")
    parser.add_argument("--devices", type=int, help="devices to enroll")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: devices in flight")
    load.add_argument("--rate", type=float, help="open loop: arrivals per second")
    parser.add_argument("--duration", type=float, help="run for this many seconds")
    parser.add_argument("--workers", type=int, help="shard processes (default: one per core)")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--out", type=Path, help="result file (default results/<profile>-<time>.json)"
    )
    parser.add_argument("--quiet", action="store_true", help="no live progress; one summary line")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a profile key"
    )
    parser.add_argument(
        "--target",
        help="the CA to measure: embedded (default), served, est+https://HOST:PORT/.well-known/est,"
        " est+http://..., scep+http://HOST:PORT/PATH (secrets from target.*_env, never flags)",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a target beyond loopback (capped by target.max_rate and target.max_devices)",
    )


def _overrides(args: argparse.Namespace) -> list[str]:
    """Flags become `--set` overrides, so they pass the same validation as the profile."""
    overrides = list(args.set)
    if args.devices is not None:
        overrides.append(f"load.devices={args.devices}")
    if args.concurrency is not None:
        overrides += ["load.mode='closed'", f"load.concurrency={args.concurrency}"]
    if args.rate is not None:
        overrides += ["load.mode='open'", f"load.rate={args.rate}"]
    if args.duration is not None:
        overrides.append(f"load.duration={args.duration}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "target", None) is not None:
        overrides.append(f"target.url={json.dumps(args.target)}")
    if getattr(args, "allow_remote", False):
        overrides.append("target.allow_remote=true")
    return overrides


def check_outcomes(result: Mapping[str, Any]) -> None:
    """Raise AccountingError (exit 1) when outcomes do not add up to the devices started, or
    fewer devices were issued than the profile expects (expect.issued_fraction - tolerance)."""
    check_accounting(result)
    outcomes = result["outcomes"]
    expected = outcomes.get("expected")
    if expected is None:
        raise AccountingError("the result has no outcomes.expected block to judge the run by")
    if expected["met"]:
        return
    least = max(0.0, expected["issued_fraction"] - expected["tolerance"])
    others = {**outcomes["rejected"], **outcomes["failed"]}
    why = ", ".join(f"{count} {reason}" for reason, count in others.items()) or "none"
    raise AccountingError(
        f"{outcomes['issued']}/{outcomes['started']} issued "
        f"({expected['issued_share']:.1%}), the profile expects at least {least:.1%} "
        f"(expect.issued_fraction {expected['issued_fraction']:g}, tolerance "
        f"{expected['tolerance']:g}); rejected or failed: {why}"
    )


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _default_out(profile_name: str, kind: str = "") -> Path:
    return Path("results") / f"{profile_name}{kind}-{_stamp()}.json"


def _prepare_artifacts(folder: Path | None) -> None:
    """Make the --artifacts folder before the run, so a bad path is exit 2, not a lost run."""
    if folder is None:
        return
    try:
        (folder / "certs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--artifacts {folder}: cannot make the folder: {exc.strerror}") from exc
    if not os.access(folder / "certs", os.W_OK):
        raise UsageError(f"--artifacts {folder}: the folder is not writable")


def _run(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.artifacts_sample < 0:
        raise UsageError("--artifacts-sample must be 0 (all) or more")
    profile = load_profile(args.profile, _overrides(args))
    out = args.out or _default_out(profile.name)
    if args.out is None:
        out.parent.mkdir(exist_ok=True)
    check_writable(out)
    _prepare_artifacts(args.artifacts)
    workers = resolve_workers(profile, args.workers)
    sample = args.artifacts_sample or int(profile.get("load", "devices"))
    options = RunOptions(workers, args.artifacts, sample if args.artifacts else 0)
    display = LiveProgress(profile, enabled=not args.quiet)
    with display:
        output = execute(profile, workers, options, display.update)
    result = build_result(profile, workers, output)
    write_result(out, result)
    serials = [serial for shard in output.shards for serial in shard.serials]
    if output.target is not None:
        # every certificate a wire target issued to this run, for revoking them
        out.with_suffix(".serials").write_text("".join(f"{n:x}\n" for n in serials))
    if args.artifacts:
        written = write_artifacts(args.artifacts, output.material, output.shards)
        result_note = f"{written} certificates and the chain in {args.artifacts}"
    else:
        result_note = ""
    print_summary(result, out, quiet=args.quiet, note=result_note)
    problem = _judge(result, output.interrupted)
    if problem:
        raise AccountingError(problem)
    return 130 if output.interrupted else 0


def _capacity(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.target is not None:
        overrides.append(f"target.url={json.dumps(args.target)}")
    if args.allow_remote:
        overrides.append("target.allow_remote=true")
    profile = load_profile(args.profile, overrides)
    out = args.out or _default_out(profile.name, "-capacity")
    if args.out is None:
        out.parent.mkdir(exist_ok=True)
    check_writable(out)
    slo = capacity.parse_slo(args.slo)
    workers = resolve_workers(profile, args.workers)
    result = capacity.search(
        profile,
        slo,
        workers,
        args.step_seconds,
        args.low,
        args.high,
        args.iterations,
        quiet=args.quiet,
    )
    write_result(out, result)
    capacity.print_curve(result, out)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit code 2."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _profiles(args: argparse.Namespace) -> int:
    console = Console(width=max(Console().width, 120))
    if args.action == "list":
        for path in shipped_profiles():
            profile = load_profile(str(path))
            console.print(f"{profile.name:24} {profile.get('', 'description')}", highlight=False)
        return 0
    if args.action == "show":
        if len(args.names) != 1:
            raise UsageError("profiles show takes one profile name")
        profile = load_profile(args.names[0], list(args.set))
        console.print_json(json.dumps(profile.as_dict()))
        return 0
    if not args.names:
        raise UsageError("profiles validate takes one or more paths")
    failures = 0
    for name in args.names:
        try:
            load_profile(name)
            console.print(f"ok: {name}", highlight=False)
        except BenchError as exc:
            failures += 1
            print(f"enrollbench: error: {exc}", file=sys.stderr)
    return 2 if failures else 0


def _judge(result: Mapping[str, Any], interrupted: bool) -> str | None:
    """Why a run fails (exit 1), or None; a run cut short is not held to the expectation."""
    try:
        if interrupted:
            check_accounting(result)
        else:
            check_outcomes(result)
    except AccountingError as exc:
        return str(exc)
    return None


def _suite(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    out = args.out or Path("results") / f"suite-{suite.name}-{_stamp()}"
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out / "index.json")
    entries = []
    problems: list[str] = []
    interrupted = False
    for name in suite.profiles:
        profile = load_profile(name, [*suite.overrides, *args.set])
        workers = resolve_workers(profile, args.workers)
        with LiveProgress(profile, enabled=not args.quiet) as display:
            output = execute(profile, workers, RunOptions(workers), display.update)
        result = build_result(profile, workers, output)
        path = out / f"{profile.name}.json"
        write_result(path, result)
        print_summary(result, path, quiet=True)
        entries.append({"profile": profile.name, "result": path.name})
        interrupted = output.interrupted
        problem = _judge(result, interrupted)  # every profile runs; the suite fails at the end
        if problem:
            problems.append(f"{profile.name}: {problem}")
        if interrupted:
            break
    write_result(
        out / "index.json",
        {
            "schema_version": SCHEMA_VERSION,
            "kind": "suite",
            "suite": suite.name,
            "description": suite.description,
            "rules": [str(rule) for rule in suite.rules],
            "results": entries,
        },
    )
    Console().print(f"suite {suite.name}: {len(entries)} results in {out}", highlight=False)
    for problem in problems:
        print(f"enrollbench: error: {problem}", file=sys.stderr)
    return 1 if problems else 130 if interrupted else 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="enrollbench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="push simulated devices through the engine")
    _add_run_arguments(run)
    run.add_argument("--artifacts", type=Path, help="write the CA chain and certificates here")
    run.add_argument(
        "--artifacts-sample", type=int, default=0, help="certificates to write (0: all)"
    )
    profiles = commands.add_parser("profiles", help="list, show or validate profiles")
    profiles.add_argument("action", choices=["list", "show", "validate"])
    profiles.add_argument("names", nargs="*", help="a profile name (show) or paths (validate)")
    profiles.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    suite = commands.add_parser("suite", help="run every profile of a suite")
    suite.add_argument("suite", help="a shipped suite (profiles/suites/) or a .toml path")
    suite.add_argument("--out", type=Path, help="folder for the results and index.json")
    suite.add_argument("--workers", type=int)
    suite.add_argument("--quiet", action="store_true")
    suite.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    compare.add_arguments(commands.add_parser("compare", help="compare results side by side"))
    gate.add_arguments(
        commands.add_parser(
            "gate",
            help="fail CI on a regression (exit 0 pass, 1 regression, 2 error, 3 inconclusive)",
        )
    )
    report.add_arguments(commands.add_parser("report", help="figures of a run: HTML and PNG"))
    export.add_arguments(commands.add_parser("export", help="a run as pytest-benchmark JSON"))
    serve_command.add_arguments(
        commands.add_parser("serve", help="run the CA as a service: EST (TLS) and SCEP")
    )
    services_command.add_arguments(
        commands.add_parser(
            "services",
            help="OpenLDAP, PostgreSQL and a SoftHSM2 token on loopback: up, status, down",
        )
    )
    serve_command.add_approve_arguments(
        commands.add_parser("approve", help="list, approve or deny a served CA's pending requests")
    )
    cap = commands.add_parser("capacity", help="highest open-loop rate that meets an SLO")
    cap.add_argument("profile")
    cap.add_argument("--slo", required=True, help="e.g. p99=200ms (p50, p90, p99, p99.9)")
    cap.add_argument("--low", type=float, default=50.0, help="lowest rate to try (/s)")
    cap.add_argument("--high", type=float, default=20000.0, help="highest rate to try (/s)")
    cap.add_argument("--iterations", type=int, default=7, help="bisection steps")
    cap.add_argument("--step-seconds", type=float, default=4.0, help="length of each trial run")
    cap.add_argument("--workers", type=int)
    cap.add_argument("--out", type=Path)
    cap.add_argument("--quiet", action="store_true")
    cap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cap.add_argument("--target", help="the CA to measure (as for run)")
    cap.add_argument("--allow-remote", action="store_true", help="allow a target beyond loopback")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handlers: dict[str, Any] = {
        "run": _run,
        "capacity": _capacity,
        "profiles": _profiles,
        "suite": _suite,
        "compare": compare.command,
        "gate": gate.command,
        "report": report.command,
        "export": export.command,
        "serve": serve_command.command,
        "approve": serve_command.approve_command,
        "services": services_command.command,
    }
    try:
        code: int = handlers[args.command](args)
    except AccountingError as exc:
        print(f"enrollbench: error: {exc}", file=sys.stderr)
        return 1
    except BenchError as exc:
        print(f"enrollbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("enrollbench: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
