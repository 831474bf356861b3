"""The monitoring kit against live processes: a real API and a real `lesa worker` (Redis queue,
test pipeline inside the real Engine, see test_redis_support), scraped over loopback.

* every metric (and label) that the Grafana dashboard and the alert rules query is exported by
  the service: compared with the live /metrics output of the API and the worker;
* a real Prometheus server (Debian's `prometheus` package, which .ci/run installs) scrapes both,
  a query for a `lesa_` metric returns data, every dashboard and alert expression is valid
  PromQL to that server, and it loads the alert rules without errors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_redis_support import (
    Proc,
    cleanup_prefix,
    free_port,
    image_body,
    needs_redis,
    new_prefix,
    start_api,
    start_workers,
)

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
METRIC = re.compile(r"\b(lesa_[a-z0-9_]+)\b")
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}


pytestmark = [
    pytest.mark.slow,
    needs_redis,
]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/lesa-serving.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def as_promql(expr: str) -> str:
    """Grafana's variables replaced by what they mean with "All" selected."""
    expr = expr.replace("$__rate_interval", "1m").replace('"$model"', '".*"').replace('"$level"', '".*"')
    match = re.fullmatch(r"label_values\((\w+), (\w+)\)", expr)
    return f"count by ({match.group(2)}) ({match.group(1)})" if match else expr


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """API + one worker with traffic behind them: plain and accelerated jobs, a 4xx, a cancel."""
    tmp = tmp_path_factory.mktemp("metrics")
    prefix = new_prefix()
    procs: list[Proc] = []
    try:
        api = start_api(tmp, prefix)
        procs.append(api)
        # every accelerated job shadow-checked, so the online-quality series carry their labels;
        # webhooks on (to a port nobody listens on), so their series exist
        webhooks = {"LESA_WEBHOOK_URL": f"http://127.0.0.1:{free_port()}/hooks", "LESA_WEBHOOK_SECRET": "s"}
        (worker,) = start_workers(tmp, prefix, ["m1"], cli=True, LESA_SHADOW_FRACTION="1", **webhooks)
        procs.append(worker)
        with httpx.Client(base_url=api.url, timeout=60) as client:
            for body in (image_body(), image_body(acceleration="2x", num_inference_steps=8), image_body(n=2)):
                assert client.post("/v1/images/generations", json=body).status_code == 200
            assert client.post("/v1/images/generations", json=image_body(size="7x7")).status_code == 400
            client.get("/readyz")
        # The shadow check runs once the worker is idle; the stream gauges come with its next
        # queue poll (every READY_POLL_S).
        deadline = time.monotonic() + 30
        for series in ("lesa_shadow_psnr_db_count{", "lesa_queue_stream_lag{"):
            while series not in httpx.get(worker.url + "/metrics", timeout=10).text:
                assert time.monotonic() < deadline, f"no {series}...}} series"
                time.sleep(0.1)
        yield {"api": api, "worker": worker, "tmp": tmp}
    finally:
        for proc in procs:
            proc.stop(signal.SIGKILL)
        cleanup_prefix(prefix)


def exported(url: str) -> dict[str, set[str]]:
    """Sample name -> label names, from a live /metrics (HELP/TYPE-only families included)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            samples.setdefault(family.name + suffix, set())
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def test_every_metric_the_dashboard_and_alerts_query_is_exported(stack: dict[str, Any]) -> None:
    live: dict[str, set[str]] = {}
    for proc in (stack["api"], stack["worker"]):
        for name, labels in exported(proc.url).items():
            live.setdefault(name, set()).update(labels)
    queried = [(expr, "dashboard") for expr in dashboard_exprs()] + [(expr, "alerts") for expr in alert_exprs()]
    assert queried
    for expr, where in queried:
        names = set(METRIC.findall(expr))
        assert names, f"{where}: no lesa_ metric in {expr!r}"
        for name in names:
            assert name in live, f"{where} queries {name}, which neither the API nor the worker exports"
        # Labels in selectors and by(...) clauses must exist on the metrics of the expression.
        labels = set().union(*(live[n] for n in names)) | {"le", "instance", "job"}
        used = set(re.findall(r"\b(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            used |= {label.strip() for label in group.split(",") if label.strip()}
        missing = used - labels - PROMQL_KEYWORDS
        assert not missing, f"{where}: labels {missing} not on {names} in {expr!r}"


def test_worker_exports_worker_metrics_and_api_exports_request_metrics(stack: dict[str, Any]) -> None:
    worker = exported(stack["worker"].url)
    api = exported(stack["api"].url)
    assert worker["lesa_workers_ready"] is not None and "lesa_generation_seconds_bucket" in worker
    assert "lesa_requests_total" in api and "lesa_queue_depth" in api
    text = httpx.get(stack["worker"].url + "/metrics").text
    assert "lesa_workers_ready 1.0" in text and 'lesa_jobs_total{model="test-image",status="completed"}' in text
    # LESA_SHADOW_FRACTION reached the worker: its one accelerated job (2x) was rerun at full compute
    assert 'lesa_shadow_checks_total{level="2x",model="test-image",result="done"} 1.0' in text


@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus missing: `apt-get install prometheus` (.ci/run does)"
)
def test_real_prometheus_scrapes_the_service_and_accepts_every_query(stack: dict[str, Any]) -> None:
    tmp: Path = stack["tmp"]
    api, worker = stack["api"], stack["worker"]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus/alerts.yml")],
        "scrape_configs": [
            {"job_name": "lesa-api", "static_configs": [{"targets": [f"127.0.0.1:{api.port}"]}]},
            {"job_name": "lesa-worker", "static_configs": [{"targets": [f"127.0.0.1:{worker.port}"]}]},
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def query(expr: str) -> dict[str, Any]:
        return httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()

    try:
        deadline = time.monotonic() + 60
        result: list[Any] = []
        while not result:
            assert server.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp / "prometheus.log").read_text()[-3000:]
            time.sleep(0.5)
            try:
                result = query('lesa_requests_total{job="lesa-api"}')["data"]["result"]
            except (httpx.HTTPError, KeyError, ValueError):
                continue
        assert any(r["metric"]["endpoint"] == "/v1/images/generations" for r in result)
        while not query('lesa_workers_ready{job="lesa-worker"} == 1')["data"]["result"]:
            assert time.monotonic() < deadline
            time.sleep(0.5)

        for expr in dashboard_exprs() + alert_exprs():
            answer = query(as_promql(expr))
            assert answer["status"] == "success", (expr, answer)
        # The scraped histograms give the dashboard real numbers (not just valid queries). rate()
        # needs two scrapes of the worker's series, so wait for the second one.
        p95_expr = "histogram_quantile(0.95, sum by (le) (rate(lesa_job_e2e_seconds_bucket[1m])))"
        while not (p95 := query(p95_expr))["data"]["result"]:
            assert time.monotonic() < deadline, p95
            time.sleep(0.5)

        while True:
            groups = httpx.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if rules and all(r.get("health") == "ok" for r in rules):
                break
            assert not any(r.get("health") == "err" for r in rules), rules
            assert time.monotonic() < deadline, rules
            time.sleep(0.5)
        assert {r["name"] for r in rules} == {
            "LesaBacklogGrowing", "LesaHighErrorRate", "LesaGenerationErrors", "LesaSpeedupCollapsed",
            "LesaQualityDrift", "LesaModelUnserved", "LesaNoReadyWorkers", "LesaWebhooksFailing",
        }  # fmt: skip
    finally:
        server.terminate()
        server.wait(20)
        log.close()


def test_the_image_healthcheck_command_probes_api_and_worker(stack: dict[str, Any]) -> None:
    """The Dockerfile's HEALTHCHECK command, run as written, against the live API and worker."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    command = json.loads(re.search(r"HEALTHCHECK .*?CMD (\[.*\])", text).group(1))
    assert command[0] == "python"
    command[0] = sys.executable  # the image's venv python; here the test venv's
    targets = {
        f"{stack['api'].url}/healthz": 0,
        f"{stack['worker'].url}/healthz": 0,
        f"http://127.0.0.1:{free_port()}/healthz": 1,  # nothing listens: unhealthy
    }
    for url, expected in targets.items():
        run = subprocess.run(command, env={**os.environ, "LESA_HEALTHCHECK_URL": url}, capture_output=True, timeout=30)
        assert (run.returncode != 0) == bool(expected), (url, run.returncode, run.stderr[-500:])
