"""`enrollbench report RUN.json [--html OUT] [--png DIR]`: pictures of one run.

Four figures: latency CDFs per step (log scale), throughput over time, where an enrollment's
time goes (mean per step), and the approval queue depth. `--html` writes one self-contained
file (figures embedded, summary tables); `--png` writes the figures as PNG files. Needs
matplotlib, the `[plot]` extra; without it the command says so and exits 2. Steps that did no
work in the run (precomputed device crypto) read "precomputed", never 0.00 ms, and have no bar.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.errors import ResultError, UsageError
from bench.histogram import Histogram
from bench.results import read_result

FIGURES = ("latency-cdf", "throughput", "breakdown", "approvals")


def _pyplot() -> Any:
    try:
        import matplotlib  # noqa: PLC0415 (optional extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise UsageError(
            "enrollbench report needs matplotlib: pip install 'enrollbench[plot]'"
        ) from None
    return plt


def _latency_cdf(plt: Any, result: Mapping[str, Any]) -> Any:
    figure, axes = plt.subplots(figsize=(9, 5.5))
    axes.set_prop_cycle(color=plt.cm.tab20.colors)
    names = ["end_to_end.latency"] + [f"step.{s}" for s in result["latency"]["steps"]]
    for name in names:
        encoded = result["histograms"].get(name)
        if encoded is None:
            continue
        edges, fractions = Histogram.decode(encoded).cdf()
        if not edges:
            continue
        label = "end to end" if name.startswith("end") else name.removeprefix("step.")
        width = 2.5 if name.startswith("end") else 1.0
        axes.step(
            [max(e, 1) / 1000 for e in edges], fractions, where="post", label=label, linewidth=width
        )
    axes.set_xscale("log")
    axes.set_xlabel("latency (ms, log scale)")
    axes.set_ylabel("fraction of enrollments")
    axes.set_title("latency CDF per step")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, ncol=2, loc="lower right")
    return figure


def _throughput(plt: Any, result: Mapping[str, Any]) -> Any:
    series = result["throughput"]["series"]
    figure, axes = plt.subplots(figsize=(9, 4))
    axes.plot(
        series["second"][: len(series["completed"])],
        series["completed"],
        label="enrollments completed/s",
        marker=".",
    )
    axes.plot(
        series["second"][: len(series["issued"])],
        series["issued"],
        label="certificates issued/s (CA)",
        marker=".",
        alpha=0.7,
    )
    axes.set_xlabel("second of the run")
    axes.set_ylabel("per second")
    axes.set_title("throughput over time")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return figure


def _breakdown(plt: Any, result: Mapping[str, Any]) -> Any:
    steps = result["latency"]["steps"]
    labels = [label for label, step in steps.items() if not step["precomputed"]]
    means = [steps[s]["mean_us"] / 1000 for s in labels]
    figure, axes = plt.subplots(figsize=(9, 5))
    axes.barh(labels[::-1], means[::-1])
    axes.set_xlabel("mean time in the step (ms)")
    axes.set_title("where the time of an enrollment goes")
    skipped = precomputed(result)
    if skipped:
        note = f"precomputed (no work in this run, no bar): {', '.join(skipped)}"
        axes.text(0.99, 0.01, note, transform=axes.transAxes, ha="right", fontsize=8)
    axes.grid(True, axis="x", alpha=0.3)
    return figure


def precomputed(result: Mapping[str, Any]) -> list[str]:
    """Steps that did no work in the run."""
    return [label for label, step in result["latency"]["steps"].items() if step["precomputed"]]


def _approvals(plt: Any, result: Mapping[str, Any]) -> Any:
    depth = result["throughput"]["series"]["approvals_pending"]
    figure, axes = plt.subplots(figsize=(9, 3.5))
    axes.plot(range(len(depth)), depth, marker=".")
    axes.set_xlabel("second of the run")
    axes.set_ylabel("requests pending")
    axes.set_title("approval queue depth")
    axes.grid(True, alpha=0.3)
    return figure


_DRAW = {
    "latency-cdf": _latency_cdf,
    "throughput": _throughput,
    "breakdown": _breakdown,
    "approvals": _approvals,
}


def render(result: Mapping[str, Any]) -> dict[str, bytes]:
    """Every figure as PNG bytes."""
    plt = _pyplot()
    images = {}
    for name, draw in _DRAW.items():
        figure = draw(plt, result)
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        images[name] = buffer.getvalue()
    return images


def write_pngs(images: Mapping[str, bytes], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in images.items():
        path = folder / f"{name}.png"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(result: Mapping[str, Any], images: Mapping[str, bytes], path: Path) -> None:
    """One self-contained HTML file: summary tables and the embedded figures."""
    manifest = result["manifest"]
    outcomes = result["outcomes"]
    latency = [["end to end", *_stats(result["latency"]["end_to_end"]["latency"])]]
    latency += [[step, *_stats(stats)] for step, stats in result["latency"]["steps"].items()]
    figures = "".join(
        f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" '
        f'src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        for name, data in images.items()
    )
    facts = [
        ["profile", manifest["profile"]],
        ["started", manifest["started_at"]],
        ["issued/s", f"{result['throughput']['issued_per_s']:,.1f}"],
        ["enrollments/s", f"{result['throughput']['enrollments_per_s']:,.1f}"],
        [
            "outcomes",
            f"{outcomes['issued']} issued of {outcomes['started']}; rejected "
            f"{outcomes['rejected']}; failed {outcomes['failed']}",
        ],
        ["expected issued", _expected(outcomes["expected"])],
        ["generator-bound", _bound(result["generator"])],
        ["workers", str(manifest["workers"])],
        ["commit", _commit(manifest)],
        [
            "versions",
            f"Python {manifest['python']}, cryptography {manifest['cryptography']}, "
            f"{manifest['openssl']}",
        ],
        ["CPU", f"{manifest['cpu_model']} x {manifest['cpu_count']}"],
    ]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>enrollbench: {html.escape(manifest["profile"])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>enrollbench run: {html.escape(manifest["profile"])}</h1>
{_table(facts, ["", ""])}
<h2>latency (ms)</h2>
{_table(latency, ["metric", "count", "p50", "p90", "p99", "p99.9", "max"])}
{figures}
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def _stats(stats: Mapping[str, Any]) -> list[str]:
    if stats.get("precomputed"):
        return ["precomputed", "", "", "", "", ""]  # no work in this run: never 0.00 ms
    keys = ("p50_us", "p90_us", "p99_us", "p99_9_us", "max_us")
    return [str(stats["count"]), *(f"{stats[k] / 1000:.3f}" for k in keys)]


def _expected(expected: Mapping[str, Any]) -> str:
    verdict = "met" if expected["met"] else "NOT met"
    return (
        f"{expected['issued_share']:.2%} issued; expected {expected['issued_fraction']:.2%} "
        f"± {expected['tolerance']:.2%}: {verdict}"
    )


def _bound(generator: Mapping[str, Any]) -> str:
    if not generator["generator_bound"]:
        return "no"
    return "YES: " + "; ".join(generator["reasons"])


def _commit(manifest: Mapping[str, Any]) -> str:
    commit = manifest["git_commit"] or "unknown"
    dirty = {True: " (uncommitted changes)", False: "", None: " (dirty: unknown)"}
    return commit + dirty[manifest["git_dirty"]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`enrollbench report` flags."""
    parser.add_argument("result", type=Path)
    parser.add_argument("--html", type=Path, help="one self-contained HTML file")
    parser.add_argument("--png", type=Path, help="a folder for the PNG figures")


def command(args: argparse.Namespace) -> int:
    if args.html is None and args.png is None:
        raise UsageError("report: give --html OUT.html and/or --png DIR")
    result = read_result(args.result)
    if result["kind"] != "run":
        raise ResultError(f"{args.result}: report reads run results")
    images = render(result)
    if args.png is not None:
        for path in write_pngs(images, args.png):
            print(path)
    if args.html is not None:
        write_html(result, images, args.html)
        print(args.html)
    return 0
