"""Shared pieces of the Redis and deploy tests: a Redis key prefix per test, free ports, real
server subprocesses (`lesa serve`-equivalent API with the Redis queue, `lesa worker`, a private
`redis-server`), and the test pipeline.

The test pipeline (`StepPipe`) stands in for the reference model's pipeline *inside the real
`service.engine.Engine`* (catalogue, validation, batching, encoding, metrics all real): it sleeps
`LESA_TEST_STEP_S` per denoising step (predicted steps of an accelerated level cost a tenth of a
full one), calls the per-step callback (progress, cancellation), and returns deterministic images
(a function of the seed). It exists because the queue tests need hundreds of generations and
controllable step times on 2 CPU cores; every process around it is the real one. It also appends
one line per finished generation to `LESA_TEST_LOG`, which is how the tests count how many times
each job really ran.

Run as a script it starts the API: `python tests/test_redis_support.py serve --port P`
(equivalent to `lesa serve` with the Redis queue and this engine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from service_support import free_port

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
PYTHON = sys.executable
LESA = str(Path(PYTHON).parent / "lesa")
REDIS_URL = os.environ.get("LESA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.ConnectionError:
        return False


# Tests that talk to the real Redis (CI starts one; `.ci/run`).
needs_redis = pytest.mark.skipif(not redis_up(), reason=f"needs Redis at {REDIS_URL} (.ci/run starts it)")
TEST_MODEL = "test-image"


# ---- the test pipeline ----------------------------------------------------------------------


class StepCancelled(Exception):
    """Raised when the step callback asks to stop (the real pipeline raises its own)."""


@dataclass
class _Output:
    samples: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


class StepPipe:
    def __init__(self, step_s: float, log_path: str | None) -> None:
        self.step_s = step_s
        self.log_path = log_path

    def __call__(
        self,
        prompts: list[str],
        *,
        seeds: list[int],
        height: int,
        width: int,
        num_frames: int | None,
        num_inference_steps: int,
        guidance_scale: float,
        cache: Any,
        callback: Any,
        reference: Any = None,
    ) -> _Output:
        schedule = getattr(cache, "schedule", None)
        for step in range(num_inference_steps):
            full = schedule is None or schedule.is_full(step)
            time.sleep(self.step_s if full else self.step_s / 10)
            if callback is not None and callback(step + 1, num_inference_steps) is False:
                raise StepCancelled(f"stopped at step {step + 1}")
        samples = np.stack([np.random.default_rng(seed).random((height, width), dtype=np.float32) for seed in seeds])
        if reference is not None:  # as the real sampler ends: kept pixels (or a sample followed to the end) given
            for i, until in enumerate(reference.follow_until):
                keep = reference.keep[i] | (until >= num_inference_steps)
                samples[i][keep] = reference.samples[i][keep]
        if self.log_path:
            with open(self.log_path, "a") as log:
                for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
                    given = reference is not None and bool(reference.keep[i].any() or reference.follow_until[i])
                    log.write(json.dumps({"pid": os.getpid(), "prompt": prompt, "seed": seed, "given": given}) + "\n")
        return _Output(samples=samples, stats={})


def make_engine(settings: Any) -> Any:
    """The real Engine, serving tiny image models backed by `StepPipe` (see module docstring): the
    ones LESA_MODELS names (as `Engine.load` would), else TEST_MODEL."""
    from lesa_core import level_schedule
    from service.engine import Bundle, Engine, ModelEntry

    models: dict[str, ModelEntry] = {}
    for name in settings.model_list or [TEST_MODEL]:
        pipe = StepPipe(float(os.environ.get("LESA_TEST_STEP_S", "0.0")), os.environ.get("LESA_TEST_LOG"))
        entry = ModelEntry(
            name=name,
            kind="image",
            pipe=pipe,
            sizes=[(16, 16), (32, 32)],
            num_frames=[1],
            fps=8,
            default_steps=4,
            min_steps=1,
            max_steps=50,
            default_guidance=1.0,
            levels=["none", "2x", "3.3x", "5x", "6.25x"],
            reference_mode="L",
        )
        # A "trained" level with a quality card (at 50 steps, which no test asks for): the card gauge
        # lesa_quality_card_psnr_db has a series for the dashboard and alert checks to find.
        card_only = SimpleNamespace(schedule=level_schedule("6.25x", 50))
        entry.bundles["6.25x"] = Bundle("6.25x", card_only, num_steps=50, quality={"psnr": 30.0})
        models[name] = entry
    engine = Engine(settings, models)
    engine.ready = True
    return engine


# ---- keys, ports, processes -----------------------------------------------------------------


def new_prefix() -> str:
    return "lesatest-" + secrets.token_hex(4)


def cleanup_prefix(prefix: str, url: str = REDIS_URL) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


def base_env(prefix: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        LESA_REDIS_URL=REDIS_URL,
        LESA_REDIS_PREFIX=prefix,
        LESA_WARMUP="false",
        LESA_LOG_LEVEL="warning",
    )
    env.update(extra)
    return env


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return int(self.popen.returncode)


def spawn(args: list[str], env: dict[str, str], log: Path, port: int | None = None) -> Proc:
    handle = open(log, "wb")  # noqa: SIM115 - the child owns it for its lifetime
    popen = subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    handle.close()
    return Proc(popen, log, port)


def wait_http(proc: Proc, path: str, timeout: float = 60.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"process exited with {proc.popen.returncode}:\n{proc.output()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(proc.url + path, timeout=2).status_code == status:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{proc.url}{path} not {status} after {timeout}s:\n{proc.output()}")


def start_api(tmp: Path, prefix: str, name: str = "api", **env: str) -> Proc:
    port = free_port()
    proc = spawn(
        [PYTHON, str(Path(__file__).resolve()), "serve", "--port", str(port)],
        base_env(prefix, LESA_EMBEDDED_WORKER="false", **env),
        tmp / f"{name}.log",
        port,
    )
    wait_http(proc, "/readyz")
    return proc


def start_workers(
    tmp: Path, prefix: str, names: list[str], *, cli: bool = False, real_model: bool = False, **env: str
) -> list[Proc]:
    """Worker processes, started in parallel and ready (models loaded, Redis reached).

    `cli=True`: the real `lesa worker` command. `real_model=True`: the models from settings
    (`Engine.load`, e.g. LESA_MODELS=digits-image) instead of the test pipeline. Otherwise `python -m service.worker_cli`: the
    same code without the `lesa` dispatcher, which imports every package's commands (torch
    included) and costs several seconds per process on 2 cores.
    """
    command = [LESA, "worker"] if cli and _lesa_has_worker() else [PYTHON, "-m", "service.worker_cli"]
    engine = "" if real_model else "test_redis_support:make_engine"  # "": Engine.load from settings
    procs = []
    for name in names:
        port = free_port()
        procs.append(
            spawn(
                [*command, "--name", name, "--metrics-port", str(port)],
                # Warm-up on: the one-off imports of a first generation (torch, encoders) happen
                # before /readyz, not inside a timed or visibility-timeout-sensitive batch.
                base_env(prefix, LESA_WORKER_ENGINE=engine, LESA_WARMUP="true", **env),
                tmp / f"worker-{name}.log",
                port,
            )
        )
    for proc in procs:
        wait_http(proc, "/readyz", timeout=120)
    return procs


_HAS_WORKER: bool | None = None


def _lesa_has_worker() -> bool:
    global _HAS_WORKER
    if _HAS_WORKER is None:
        try:
            out = subprocess.run([LESA, "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
            _HAS_WORKER = " worker" in out.stdout
        except (OSError, subprocess.TimeoutExpired):
            _HAS_WORKER = False
    return _HAS_WORKER


def start_redis_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_redis(f"redis://127.0.0.1:{port}/0")
    return proc


def _wait_redis(url: str, timeout: float = 10.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    while True:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def image_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a seven", "model": TEST_MODEL, "size": "16x16", "num_inference_steps": 2}
    body.update(overrides)
    return body


def read_log(path: Path) -> list[dict[str, Any]]:
    """Generations that ran to the end, minus the workers' start-up warm-up runs."""
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if e["prompt"] != "warm-up"]


# ---- `python tests/test_redis_support.py serve --port P` -----------------------------------


def _serve(port: int) -> None:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(port=port)
    # LESA_TEST_REAL_ENGINE=1: the models from settings (Engine.load), exactly as `lesa serve`.
    engine = None if os.environ.get("LESA_TEST_REAL_ENGINE") == "1" else make_engine(settings)
    app = create_app(settings, engine=engine)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.keep_alive_s,
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve" and sys.argv[2] == "--port":
        _serve(int(sys.argv[3]))
    else:
        sys.exit("usage: test_redis_support.py serve --port PORT")
