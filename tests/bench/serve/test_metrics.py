"""bench.serve.metrics: per-worker snapshots summed into the Prometheus text format, in
process and through a running 2-worker server."""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path

from bench.serve.metrics import Metrics, clear, gather, render
from engine.wire.est import basic_authorization, encode_base64
from engine.wire.seam import TicketStatus
from tests.bench.serve.conftest import (
    Served,
    ServerFactory,
    csr,
    device,
    enroll_all,
    pinned,
    run,
    user_id,
    wait_for,
)

# The text exposition format 0.0.4 (prometheus.io/docs/instrumenting/exposition_formats)
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_VALUE = r"(?:[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?Inf|NaN)"
SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*,?)?\}})? {_VALUE}(?: -?[0-9]+)?")
TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|summary|histogram|untyped)")
SUFFIXES = {"summary": ("", "_sum", "_count"), "histogram": ("_bucket", "_sum", "_count")}


def check_exposition(text: str) -> dict[str, float]:
    """Check every line against the grammar and every sample against its family's TYPE
    (declared once, before its samples, samples kept together); the samples by name+labels."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[str, float] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("#"):
            typed = TYPE.fullmatch(line)
            assert typed or line.startswith("# HELP "), line
            if typed:
                assert typed[1] not in types, f"{typed[1]} declared twice"
                types[typed[1]] = current = typed[1]
                current_type = typed[2]
            continue
        match = SAMPLE.fullmatch(line)
        assert match, line
        name = match[1]
        allowed = [current + suffix for suffix in SUFFIXES.get(current_type, ("",))]
        assert current and name in allowed, f"{line} outside its family {current}"
        if current_type == "summary" and name == current:
            assert 'quantile="' in (match[2] or ""), line
        key = line.rsplit(" ", 1)[0]
        assert key not in samples, f"{key} twice"
        samples[key] = float(line.rsplit(" ", 1)[1])
    return samples


def test_counters_and_histograms_sum_over_workers(tmp_path: Path) -> None:
    """Two workers' snapshots sum: counters add up, histograms merge their counts."""
    first, second = Metrics(tmp_path, 0), Metrics(tmp_path, 1)
    for metrics, n in ((first, 3), (second, 4)):
        for _ in range(n):
            metrics.count("requests", protocol="est", status="200")
            metrics.observe("step", "issue", 150_000)
        metrics.flush()
    counters, histograms = gather(tmp_path)
    assert counters["requests", (("protocol", "est"), ("status", "200"))] == 7
    assert histograms["step", "issue"].count == 7


def test_a_restarted_worker_resumes_its_snapshot(tmp_path: Path) -> None:
    """A worker started again in the same slot goes on counting from its predecessor's
    snapshot (a summed counter must not go backwards mid-run); `clear` forgets snapshots."""
    first = Metrics(tmp_path, 0)
    first.count("refused", kind="bad-base64")
    first.observe("request", "est", 90_000)
    first.flush()
    again = Metrics(tmp_path, 0)
    again.count("refused", kind="bad-base64")
    again.flush()
    counters, histograms = gather(tmp_path)
    assert counters["refused", (("kind", "bad-base64"),)] == 2
    assert histograms["request", "est"].count == 1
    clear(tmp_path)
    assert gather(tmp_path) == (gather(tmp_path / "none")[0], {})
    assert list(tmp_path.iterdir()) == []


def test_render_is_prometheus_text(tmp_path: Path) -> None:
    """Counters, summaries (quantiles, _sum, _count, in seconds) and gauges parse; label values
    with quotes, backslashes and newlines are escaped."""
    metrics = Metrics(tmp_path, 0)
    metrics.count("refused", protocol="est", kind='a"b\\c\nd')
    metrics.count("requests", protocol="scep", status="200")
    for micros in (100, 200, 300):
        metrics.observe("step", "issue", micros * 1000)
    metrics.flush()
    samples = check_exposition(render(tmp_path, {"approvals_pending": 2.0}))
    assert samples['enrollbench_refused_total{kind="a\\"b\\\\c\\nd",protocol="est"}'] == 1
    assert samples['enrollbench_step_seconds_count{step="issue"}'] == 3
    assert 0.0005 < samples['enrollbench_step_seconds_sum{step="issue"}'] < 0.0007
    assert samples["enrollbench_approvals_pending"] == 2


def test_a_worker_ignores_a_torn_or_foreign_snapshot(tmp_path: Path) -> None:
    """A snapshot that is not JSON is skipped by the scrape and by a resuming worker."""
    (tmp_path / "worker-0.json").write_text("{not json")
    Metrics(tmp_path, 0).flush()
    (tmp_path / "worker-1.json").write_text("{")
    assert gather(tmp_path)[0] == gather(tmp_path / "none")[0]
    assert json.loads((tmp_path / "worker-0.json").read_text())["counters"] == []


def scraped(served: Served) -> dict[str, float]:
    return check_exposition(served.metrics())


def test_served_metrics_sum_over_workers(server: ServerFactory) -> None:
    """Requests sent on new connections (spread over both workers) are counted once each in
    /metrics whichever worker is scraped, once the 1 s snapshots are in; the text parses."""
    served = server(workers=2)
    devices = [device(served, n) for n in range(12)]
    tickets = run(enroll_all(served, devices, keep_alive=False))
    assert {t.status for t in tickets} == {TicketStatus.ISSUED}
    for _ in range(3):
        assert served.get("/.well-known/est/cacerts")[0] == 200
    assert served.get("/.well-known/est/nothing")[0] == 404
    wrong = basic_authorization(user_id(0), "not-the-password")
    for _ in range(2):
        status = post(served, wrong)
        assert status == 401
    expected = {
        'enrollbench_requests_total{protocol="est",status="200"}': 15.0,
        'enrollbench_requests_total{protocol="est",status="401"}': 2.0,
        'enrollbench_requests_total{protocol="est",status="404"}': 1.0,
        'enrollbench_refused_total{kind="wrong-credentials",protocol="est"}': 2.0,
        'enrollbench_refused_total{kind="not-found",protocol="est"}': 1.0,
        'enrollbench_step_seconds_count{step="issue"}': 12.0,
        'enrollbench_request_seconds_count{route="est"}': 18.0,
        "enrollbench_certificates_published": 12.0,
        "enrollbench_workers_reporting": 2.0,
    }

    def counted() -> bool:
        found = scraped(served)
        return {key: found.get(key) for key in expected} == expected

    wait_for(counted, timeout=20)
    for pid, connection in pinned(served).items():  # each worker, scraped, has the same sums
        connection.request("GET", "/metrics")
        found = check_exposition(connection.getresponse().read().decode())
        connection.close()
        assert {key: found.get(key) for key in expected} == expected, pid


def post(served: Served, authorization: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", served.est_port, timeout=30)
    try:
        headers = {"Content-Type": "application/pkcs10", "Authorization": authorization}
        connection.request("POST", "/.well-known/est/simpleenroll", encode_base64(csr(0)), headers)
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()
