"""What the service tests share: a fake pipeline that follows the `lesa_models` call contract
but computes nothing (so API tests take milliseconds), an engine and settings built on it, and
small HTTP helpers. The real models run in tests/test_service_e2e.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from fastapi.testclient import TestClient

from lesa_core import level_schedule
from lesa_core.pipeline_types import PipelineInfo
from lesa_models import GenerationCancelled, GenerationOutput
from service.engine import Bundle, Engine, entry_from_pipeline
from service.settings import Settings


@dataclass
class FakePipeline:
    name: str
    kind: str = "image"
    step_delay: float = 0.0
    calls: list[dict] = field(default_factory=list)
    last_step: int = 0

    @property
    def info(self) -> PipelineInfo:
        frames = [4, 8] if self.kind == "video" else [1]
        return PipelineInfo(
            name=self.name, kind=self.kind, sizes=[(16, 16), (32, 16)], num_frames=frames, default_steps=8,
            default_guidance=2.0, min_steps=4, max_steps=100, hidden_size=8, transformer_class="Fake",
        )  # fmt: skip

    supports_preview = True
    reference_mode = "L"

    def __call__(self, prompts, *, seeds, height, width, num_frames=None, num_inference_steps=50,
                 guidance_scale=None, cache=None, callback=None, preview=None, preview_steps=(),
                 reference=None):  # fmt: skip
        self.calls.append(
            dict(prompts=list(prompts), seeds=list(seeds), cache=cache, size=(width, height), reference=reference)
        )
        if any(p == "explode" for p in prompts):
            raise RuntimeError("the fake model exploded")
        shape = (height, width) if self.kind == "image" else (num_frames, height, width)
        for step in range(1, num_inference_steps + 1):
            time.sleep(self.step_delay)
            self.last_step = step
            if preview is not None and step in preview_steps:  # a grey as light as the step is far
                preview(step, np.full((len(seeds), *shape), step / num_inference_steps, dtype=np.float32))
            if callback is not None and callback(step, num_inference_steps) is False:
                raise GenerationCancelled(f"cancelled after step {step}")
        samples = np.stack([np.random.default_rng(s).random(shape, dtype=np.float32) for s in seeds])
        if reference is not None:  # as the real sampler ends: kept pixels (or a sample followed to the end) given
            reference.check(samples.shape, num_inference_steps)
            for i, until in enumerate(reference.follow_until):
                keep = reference.keep[i] | (until >= num_inference_steps)
                samples[i][keep] = reference.samples[i][keep]
        return GenerationOutput(samples=samples, stats={})


class FakePredictor:
    schedule = level_schedule("5x", 8)


def make_engine(settings: Settings, step_delay: float = 0.0) -> Engine:
    image = entry_from_pipeline(FakePipeline("fake-image", step_delay=step_delay))
    # A "trained" 5x bundle for 8 steps with a quality card: drives method defaults and "auto".
    image.bundles["5x"] = Bundle("5x", FakePredictor(), num_steps=8, quality={"psnr": 31.5, "speedup": 1.6})
    video = entry_from_pipeline(FakePipeline("fake-video", kind="video", step_delay=step_delay))
    engine = Engine(settings, {"fake-image": image, "fake-video": video})
    engine.ready = True
    return engine


def settings(**overrides) -> Settings:
    values = dict(warmup=False, max_wait_ms=0.0, default_level="none", sync_timeout_s=10.0)
    values.update(overrides)
    return Settings(_env_file=None, **values)


def wait_for(
    client: TestClient, path: str, statuses: set[str], timeout: float = 10.0, headers: dict | None = None
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(path, headers=headers).json()
        if body["status"] in statuses or time.monotonic() > deadline:
            return body
        time.sleep(0.01)


def assert_error(response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert "Traceback" not in response.text
    return error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def weights_present(name: str) -> bool:
    """Whether a reference model's committed weights are in the tree."""
    from lesa_models.registry import model_path

    return (model_path(name) / "model_index.json").is_file()


@contextmanager
def uvicorn_thread(app, port: int) -> Iterator[str]:
    """`app` on real uvicorn in a thread of this process, until the block ends; yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn exited"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
