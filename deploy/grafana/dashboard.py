"""Writes deploy/grafana/dashboards/lesa-serving.json (the provisioned Grafana dashboard).

The JSON is committed; this script is its source. After changing a panel:

    python deploy/grafana/dashboard.py

tests/test_deploy_metrics.py checks that every metric queried here is exported by the service.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "lesa-serving.json"
DATASOURCE = {"type": "prometheus", "uid": "lesa-prometheus"}  # provisioning/datasources/prometheus.yml
MODEL = 'model=~"$model"'
LEVEL = 'level=~"$level"'
WINDOW = "$__rate_interval"


def quantiles(metric: str, by: str = "", selector: str = f"{MODEL}, {LEVEL}") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{WINDOW}])))",
            f"p{int(q * 100)}{suffix}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def mean(metric: str, by: str, selector: str) -> str:
    return (
        f"sum by ({by}) (rate({metric}_sum{{{selector}}}[{WINDOW}]))"
        f" / sum by ({by}) (rate({metric}_count{{{selector}}}[{WINDOW}]))"
    )


class Layout:
    """Panels on Grafana's 24-column grid, left to right, top to bottom."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_h = 0

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": w, "h": h}
        panel["datasource"] = DATASOURCE
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def targets(queries: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [
        {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
        for i, (expr, legend) in enumerate(queries)
    ]


def timeseries(title: str, queries: list[tuple[str, str]], unit: str, description: str, **custom: Any) -> dict:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "targets": targets(queries),
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 10, **custom}}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
    }


def stat(title: str, expr: str, unit: str, description: str, thresholds: list[tuple[str, float | None]]) -> dict:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "targets": targets([(expr, title)]),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in thresholds]},
            },
            "overrides": [],
        },
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background", "graphMode": "area"},
    }


def build() -> dict[str, Any]:
    layout = Layout()
    # ---- headline numbers
    layout.add(
        stat("Ready workers", "sum(lesa_workers_ready)", "none",
             "Worker processes with models loaded that reach Redis (lesa worker).",
             [("red", None), ("green", 1)]), 4, 4,
    )  # fmt: skip
    layout.add(
        stat("Queue depth", "max(lesa_queue_depth)", "none",
             "Jobs waiting to be claimed (every API replica reports the same Redis backlog).",
             [("green", None), ("orange", 20), ("red", 100)]), 4, 4,
    )  # fmt: skip
    layout.add(
        stat("In flight", "sum(lesa_jobs_in_flight)", "none", "Jobs being generated now.",
             [("green", None)]), 4, 4,
    )  # fmt: skip
    layout.add(
        stat("Requests/s", f"sum(rate(lesa_requests_total[{WINDOW}]))", "reqps", "All HTTP requests.",
             [("green", None)]), 4, 4,
    )  # fmt: skip
    layout.add(
        stat("5xx ratio", f'sum(rate(lesa_requests_total{{status=~"5.."}}[{WINDOW}])) / '
             f"clamp_min(sum(rate(lesa_requests_total[{WINDOW}])), 1e-9)", "percentunit",
             "Share of requests answered with a server error.",
             [("green", None), ("orange", 0.01), ("red", 0.05)]), 4, 4,
    )  # fmt: skip
    layout.add(
        stat("Realised speed-up", mean("lesa_realised_speedup", "model", f'{MODEL}, level!="none"'), "none",
             "Mean estimated full-compute time / actual time over accelerated jobs.",
             [("red", None), ("orange", 1.2), ("green", 1.8)]), 4, 4,
    )  # fmt: skip

    # ---- traffic and latency
    layout.add(
        timeseries("Request rate by endpoint and status",
                   [(f"sum by (endpoint, status) (rate(lesa_requests_total[{WINDOW}]))", "{{endpoint}} {{status}}")],
                   "reqps", "HTTP requests per second (route template, status code)."), 12, 8,
    )  # fmt: skip
    layout.add(
        timeseries("End-to-end latency (job created -> completed)", quantiles("lesa_job_e2e_seconds"), "s",
                   "Percentiles over the selected models and levels."), 12, 8,
    )  # fmt: skip
    layout.add(
        timeseries("Queue depth and in-flight jobs",
                   [("max(lesa_queue_depth)", "queued"), ("sum(lesa_jobs_in_flight)", "in flight")],
                   "none", "Backlog (waiting to be claimed) vs being generated."), 12, 8,
    )  # fmt: skip
    layout.add(
        timeseries("Queue wait (created -> claimed by a worker)", quantiles("lesa_job_queue_wait_seconds", "priority"),
                   "s", "Grows when workers are too few: compare with the worker count. Per priority class: "
                   "high jobs are taken first, so low ones wait longest under load."), 12, 8,
    )  # fmt: skip
    layout.add(
        timeseries("Generation time per batch", quantiles("lesa_generation_seconds", "level"), "s",
                   "One batched pipeline call (denoise + decode + encode), by level."), 12, 8,
    )  # fmt: skip
    layout.add(
        timeseries("Batch size (samples per generation)",
                   [(mean("lesa_batch_size", "model", MODEL), "mean {{model}}"),
                    (f"histogram_quantile(0.95, sum by (le, model) (rate(lesa_batch_size_bucket{{{MODEL}}}[{WINDOW}])))",
                     "p95 {{model}}")],
                   "none", "How well dynamic batching fills batches (max_batch caps it)."), 12, 8,
    )  # fmt: skip

    # ---- acceleration
    layout.add(
        timeseries("Realised speed-up by level",
                   [(mean("lesa_realised_speedup", "level", f"{MODEL}, {LEVEL}"), "{{level}}")],
                   "none", "Mean estimated full-compute time / actual time per job, by acceleration level. "
                   "An accelerated level near 1 means the cache is not paying off (alert: LesaSpeedupCollapsed)."),
        12, 8,
    )  # fmt: skip
    layout.add(
        timeseries("Denoising steps: full vs predicted",
                   [(f"sum by (kind) (rate(lesa_denoising_steps_total{{{MODEL}, {LEVEL}}}[{WINDOW}]))", "{{kind}}")],
                   "ops", "Steps per second per sample: `full` ran every block, `predicted` was forecast.",
                   stacking={"mode": "normal"}), 12, 8,
    )  # fmt: skip

    layout.add(
        timeseries("Step time: full vs predicted", quantiles("lesa_step_seconds", "kind"), "s",
                   "One denoising step of a batched generation (every CFG branch and the sampler's own "
                   "work), by kind. What a predicted step costs against a full one is what caps the "
                   "realised speed-up."), 12, 8,
    )  # fmt: skip
    layout.add(
        timeseries("Where a generation's time goes",
                   [(mean("lesa_stage_seconds", "stage", f"{MODEL}, {LEVEL}"), "{{stage}}")],
                   "s", "Mean seconds per batched generation in each stage: encode_prompts (text encoder), "
                   "denoise (the sampling loop: what acceleration shortens), decode (latents to pixels: the "
                   "VAE), encode_output (PNG / MP4). Stacked, the total is the generation time.",
                   stacking={"mode": "normal"}), 12, 8,
    )  # fmt: skip

    # ---- online quality (LESA_SHADOW_FRACTION > 0)
    layout.add(
        timeseries("Online quality: PSNR vs full compute (shadow checks) and quality card",
                   [(mean("lesa_shadow_psnr_db", "model, level, method", f"{MODEL}, {LEVEL}"),
                     "{{model}} {{level}} {{method}} live"),
                    (f"max by (model, level, method) (lesa_quality_card_psnr_db{{{MODEL}, {LEVEL}}})",
                     "{{model}} {{level}} {{method}} card")],
                   "dB", "Mean PSNR of served accelerated samples against the same request rerun at full "
                   "compute (a LESA_SHADOW_FRACTION share of jobs, when workers are idle), beside what the "
                   "benchmark measured for the level. Live well below card: alert LesaQualityDrift."), 12, 8,
    )  # fmt: skip
    layout.add(
        timeseries("Shadow checks",
                   [(f"sum by (result) (rate(lesa_shadow_checks_total{{{MODEL}, {LEVEL}}}[{WINDOW}]))",
                     "{{result}}")],
                   "ops", "Checks per second: done, dropped (backlog full: workers never idle), failed."),
        12, 8,
    )  # fmt: skip

    # ---- health
    layout.add(
        timeseries("Errors by type", [(f"sum by (type) (rate(lesa_errors_total[{WINDOW}]))", "{{type}}")],
                   "ops", "queue_full = 429s, rate_limit_exceeded = 429s of an API key over its live jobs or its "
                   "per-minute budget (lesa_rate_limited_requests_total says which), queue_unavailable = Redis "
                   "down, generation_failed, queue_timeout (a job no worker started within its queue_timeout_s), "
                   "..."), 12, 8,
    )  # fmt: skip
    layout.add(
        timeseries("Redis streams: lag and pending",
                   [(f"max by (model) (lesa_queue_stream_lag{{{MODEL}}})", "lag {{model}} (not yet delivered: KEDA's signal)"),
                    (f"max by (model) (lesa_queue_stream_pending{{{MODEL}}})", "pending {{model}} (delivered, not acknowledged)")],
                   "none", "Per model's stream, from its consumer group (XINFO GROUPS), as each worker sees it. "
                   "Lag that only grows: no worker serves that model. Pending well above workers x max_batch "
                   "means deliveries wait for reclaim (dead workers)."), 12, 8,
    )  # fmt: skip
    layout.add(
        timeseries("Workers and finished jobs",
                   [("sum(lesa_workers_ready)", "ready workers"),
                    (f"sum by (status) (rate(lesa_jobs_total{{{MODEL}}}[{WINDOW}]))", "jobs/s {{status}}")],
                   "none", "Ready worker processes, and jobs finished per second by final status."), 12, 8,
    )  # fmt: skip
    layout.add(
        timeseries("Webhooks",
                   [(f"sum by (type, outcome) (rate(lesa_webhooks_total[{WINDOW}]))", "{{type}} {{outcome}}")],
                   "ops", "Job events POSTed to LESA_WEBHOOK_URL per second: delivered, or failed after every "
                   "try (alert: LesaWebhooksFailing). Empty without webhooks."), 12, 8,
    )  # fmt: skip

    def variable(name: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": name,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": query, "refId": name},
            "definition": query,
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }

    return {
        "uid": "lesa-serving",
        "title": "LESA serving",
        "description": "API, queue, workers and realised acceleration of LESA serving.",
        "tags": ["lesa"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                variable("model", "label_values(lesa_job_e2e_seconds_count, model)"),
                variable("level", "label_values(lesa_job_e2e_seconds_count, level)"),
            ]
        },
        "annotations": {"list": []},
        "panels": layout.panels,
    }


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
