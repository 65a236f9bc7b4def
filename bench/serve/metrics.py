"""What a running server counts and times, summed over its workers, in Prometheus text format.

Each worker buffers its observations and, once a second, folds them into histograms and writes
a snapshot file (`metrics/worker-N.json`, replaced atomically) in the state folder. Whichever
worker a scrape reaches reads every worker's snapshot and sums them, so `/metrics` describes the
whole service however SO_REUSEPORT spreads the connections. A scrape is at most a second behind.

Latency is exposed as Prometheus summaries (quantiles from the log-linear histograms the rest of
enrollbench uses), in seconds, per server-side step and per route.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.histogram import Histogram

QUANTILES = (0.5, 0.9, 0.99, 0.999)


class Metrics:
    """One worker's counters and latency histograms."""

    def __init__(self, folder: Path, worker: int) -> None:
        self.folder = folder
        self.worker = worker
        self.counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self.histograms: dict[tuple[str, str], Histogram] = {}
        self._buffered: dict[tuple[str, str], list[int]] = {}
        folder.mkdir(mode=0o700, exist_ok=True)
        self._resume()

    @property
    def path(self) -> Path:
        return self.folder / f"worker-{self.worker}.json"

    def _resume(self) -> None:
        """A restarted worker goes on from its predecessor's snapshot (the server clears the
        folder when it starts), so the sums over workers never go backwards mid-run."""
        snapshot = _read(self.path)
        if snapshot is None:
            return
        for name, labels, n in snapshot["counters"]:
            self.counters[name, tuple((str(k), str(v)) for k, v in labels)] += int(n)
        for kind, label, encoded in snapshot["histograms"]:
            self.histograms[str(kind), str(label)] = Histogram.decode(encoded)

    def count(self, name: str, **labels: str) -> None:
        """Add one to a counter (labels in a fixed order)."""
        self.counters[name, tuple(sorted(labels.items()))] += 1

    def observe(self, kind: str, label: str, nanoseconds: int) -> None:
        """Record one duration (folded into the histogram at the next `flush`)."""
        buffered = self._buffered.get((kind, label))
        if buffered is None:
            buffered = self._buffered[kind, label] = []
        buffered.append(nanoseconds // 1000)

    def flush(self) -> None:
        """Fold buffered durations and write this worker's snapshot."""
        for key, values in self._buffered.items():
            if values:
                histogram = self.histograms.get(key)
                if histogram is None:
                    histogram = self.histograms[key] = Histogram()
                histogram.record_many(values)
                values.clear()
        snapshot = {
            "counters": [
                [name, list(map(list, labels)), n] for (name, labels), n in self.counters.items()
            ],
            "histograms": [
                [kind, label, h.encode()] for (kind, label), h in self.histograms.items()
            ],
            "written": time.time(),
        }
        path = self.path
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(snapshot))
        os.replace(scratch, path)


def gather(
    folder: Path,
) -> tuple[Counter[tuple[str, tuple[tuple[str, str], ...]]], dict[tuple[str, str], Histogram]]:
    """Every worker's snapshot, summed."""
    counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
    histograms: dict[tuple[str, str], Histogram] = {}
    for path in sorted(folder.glob("worker-*.json")):
        snapshot = _read(path)
        if snapshot is None:
            continue
        for name, labels, n in snapshot["counters"]:
            counters[name, tuple((str(k), str(v)) for k, v in labels)] += int(n)
        for kind, label, encoded in snapshot["histograms"]:
            histogram = histograms.get((kind, label))
            if histogram is None:
                histogram = histograms[kind, label] = Histogram()
            histogram.merge(Histogram.decode(encoded))
    return counters, histograms


def clear(folder: Path) -> None:
    """Forget the snapshots of an earlier server (a stale worker-N.json would be summed)."""
    for path in [*folder.glob("worker-*.json"), *folder.glob("worker-*.tmp")]:
        path.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        snapshot: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or not written whole (files are replaced atomically)
    return snapshot


def render(folder: Path, gauges: dict[str, float]) -> str:
    """The Prometheus text exposition (format 0.0.4) of all workers' metrics plus `gauges`."""
    counters, histograms = gather(folder)
    lines: list[str] = []
    for name in sorted({name for name, _ in counters}):
        metric = f"enrollbench_{name}_total"
        lines.append(f"# TYPE {metric} counter")
        for (other, labels), n in sorted(counters.items()):
            if other == name:
                lines.append(f"{metric}{_labels(labels)} {n}")
    for kind in sorted({kind for kind, _ in histograms}):
        metric = f"enrollbench_{kind}_seconds"
        lines.append(f"# TYPE {metric} summary")
        for (other, label), histogram in sorted(histograms.items()):
            if other != kind:
                continue
            base = (("step" if kind == "step" else "route", label),)
            for quantile in QUANTILES:
                value = histogram.percentile(quantile * 100) / 1e6
                lines.append(f"{metric}{_labels((*base, ('quantile', str(quantile))))} {value:.6f}")
            total = histogram.total / 1e6
            lines.append(f"{metric}_sum{_labels(base)} {total:.6f}")
            lines.append(f"{metric}_count{_labels(base)} {histogram.count}")
    for name, value in sorted(gauges.items()):
        lines.append(f"# TYPE enrollbench_{name} gauge")
        lines.append(f"enrollbench_{name} {value:g}")
    return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
