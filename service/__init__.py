"""The serving layer: an OpenAI-compatible HTTP API over the LESA-accelerated models.

Read in this order:

* `settings.py`  configuration (`LESA_*` env vars / `.env`)
* `schemas.py`   request/response bodies (what /docs shows)
* `queue.py`     `JobQueue`, the seam between the API and workers; `InProcessJobQueue`
                 (`redis_queue.py`: the Redis Streams implementation for many workers)
* `engine.py`    models + predictor bundles, request -> job resolution, one batched generation
* `worker.py`    claim compatible jobs, run them in a thread, progress and cancellation
* `app.py`       `create_app`: wiring, error shape, limits, auth; `routers/` the thin endpoints
* `metrics.py`   Prometheus `lesa_*` metrics; `media.py` PNG/JPEG/WEBP/MP4 encoding
* `cli.py`       `lesa serve` (and `lesa worker` from `worker_cli.py`)
"""
