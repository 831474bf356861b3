"""Prometheus metrics (`lesa_` prefix), one `Metrics` object per app.

Each app gets its own `CollectorRegistry` so tests and benchmarks can build many apps in one
process without "duplicated timeseries" errors; `/metrics` serves that registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few ms (tiny CPU model, one step) to minutes (a long video on a GPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
SPEEDUP_BUCKETS = (0.5, 0.8, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
# Seconds per denoising step: from a predicted step of a tiny CPU model (< 1 ms) to a full step
# of a large video model (seconds).
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
PSNR_BUCKETS = (10, 15, 20, 25, 28, 30, 32, 34, 36, 38, 40, 45, 50, 60, 80, 100)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lesa_requests", "HTTP requests by endpoint (route template) and status code",
            ["endpoint", "method", "status"], registry=r,
        )  # fmt: skip
        self.request_latency = Histogram(
            "lesa_request_duration_seconds", "HTTP request handling time by endpoint",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e_latency = Histogram(
            "lesa_job_e2e_seconds", "job creation to completion", ["model", "level"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "lesa_job_queue_wait_seconds", "job creation to claim by a worker, by the job's priority class",
            ["model", "level", "priority"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.generation_time = Histogram(
            "lesa_generation_seconds", "one batched generation (denoise + decode + encode)",
            ["model", "level"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("lesa_queue_depth", "jobs waiting to be claimed", registry=r)
        self.in_flight = Gauge("lesa_jobs_in_flight", "jobs being generated now", registry=r)
        self.batch_size = Histogram(
            "lesa_batch_size", "samples per batched generation", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.steps = Counter(
            "lesa_denoising_steps", "denoising steps run, per sample, by kind (full = every block ran, "
            "predicted = forecast by the cache method)", ["model", "level", "kind"], registry=r,
        )  # fmt: skip
        self.step_time = Histogram(
            "lesa_step_seconds", "one denoising step of a batched generation (every CFG branch, the sampler's "
            "own work included), by kind: full = every block ran, predicted = forecast; a generation's first "
            "step, which also encodes the prompts, is not observed",
            ["model", "level", "kind"], buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_time = Histogram(
            "lesa_stage_seconds", "one batched generation's time in a stage: encode_prompts (text encoder), "
            "denoise (sampling loop), decode (latents to pixels), encode_output (PNG / MP4)",
            ["model", "level", "stage"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.speedup = Histogram(
            "lesa_realised_speedup",
            "estimated full-compute generation time / actual generation time, per job",
            ["model", "level", "method"], buckets=SPEEDUP_BUCKETS, registry=r,
        )  # fmt: skip
        # Online quality (LESA_SHADOW_FRACTION): accelerated samples rerun at full compute.
        self.shadow_psnr = Histogram(
            "lesa_shadow_psnr_db", "PSNR of an accelerated sample vs the same request at full compute "
            "(shadow quality checks, per sample)", ["model", "level", "method"], buckets=PSNR_BUCKETS, registry=r,
        )  # fmt: skip
        self.shadow_checks = Counter(
            "lesa_shadow_checks", "shadow quality checks by result (done; preempted: a job arrived; dropped: backlog full; failed)",
            ["model", "level", "result"], registry=r,
        )  # fmt: skip
        self.card_psnr = Gauge(
            "lesa_quality_card_psnr_db", "mean PSNR vs full compute the benchmark measured for a level "
            "(its bundle's quality card; what lesa_shadow_psnr_db is compared with)",
            ["model", "level", "method"], registry=r,
        )  # fmt: skip
        self.load_raised = Counter(
            "lesa_load_raised_jobs", "jobs the API ran at their max_acceleration because the queue was long "
            "(LESA_LOAD_QUEUE_DEPTH), by the level they ran at", ["model", "level"], registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "lesa_rate_limited_requests", "requests refused (429) because their API key had spent its budget "
            "(LESA_REQUESTS_PER_MINUTE_PER_KEY / LESA_STEPS_PER_MINUTE_PER_KEY), by the limit that refused them",
            ["limit"], registry=r,
        )  # fmt: skip
        self.serves = Gauge(
            "lesa_worker_serves", "1 per model a running worker takes jobs of (LesaModelUnserved looks for one)",
            ["model"], registry=r,
        )  # fmt: skip
        self.jobs = Counter("lesa_jobs", "finished jobs by final status", ["model", "status"], registry=r)
        self.errors = Counter("lesa_errors", "errors by type", ["type"], registry=r)
        self.webhooks = Counter(
            "lesa_webhooks", "job events sent to LESA_WEBHOOK_URL, by type and outcome (delivered / failed)",
            ["type", "outcome"], registry=r,
        )  # fmt: skip
        self.ready = Gauge("lesa_ready", "1 when models are loaded and warmed up", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
