"""The engine on a real DigitsPipeline with real lesa_core hooks, across sizes the reference
checkpoint does not offer: a tiny random FLUX transformer with three sizes. Cache state must
never survive from one generation to the next, whatever changes in between (size, level,
method, CFG on/off, batch size, step count)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from lesa_models.pipeline import DigitsPipeline
from lesa_models.text_encoder import get_text_encoder
from service.engine import Engine, content_id, entry_from_pipeline
from service.queue import JobSpec
from service.settings import Settings

MODEL = "tiny-multi"


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=384, pooled_projection_dim=384, axes_dims_rope=[4, 6, 6],
    )  # fmt: skip
    pipe = DigitsPipeline(
        transformer, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), get_text_encoder(),
        name=MODEL, kind="image", sizes=[(16, 16), (32, 16), (32, 32)], default_steps=8, default_guidance=3.0,
    )  # fmt: skip
    engine = Engine(Settings(_env_file=None, warmup=False), {MODEL: entry_from_pipeline(pipe)})
    engine.ready = True
    return engine


def spec(size: tuple[int, int], level: str, method: str, guidance: float, seed: int, n: int = 1, steps: int = 8):
    return JobSpec(
        kind="image", model=MODEL, prompt="a seven", n=n, width=size[0], height=size[1], num_inference_steps=steps,
        guidance_scale=guidance, level=level, method=method, seed=seed,
    )  # fmt: skip


def image(engine: Engine, job: JobSpec) -> bytes:
    (result,) = engine.run_batch([job])
    return result.artifacts["0.png"]


def test_mixed_sequence_gives_the_same_output_as_alone(engine: Engine) -> None:
    reference = spec((32, 16), "5x", "taylorseer", 3.0, seed=1)
    alone = image(engine, reference)
    for other in (
        spec((16, 16), "2x", "reuse", 1.0, seed=2, n=3),  # other size, no CFG branch, batch of 3
        spec((32, 32), "6.25x", "taylorseer", 3.0, seed=3, n=2),
        spec((32, 16), "none", "none", 3.0, seed=4, steps=6),  # same size, other step count, no cache
        spec((32, 16), "5x", "reuse", 2.0, seed=5),  # same size and level, other method and guidance
        spec((32, 16), "3.3x", "taylorseer", 3.0, seed=1, n=2),  # same seed, other level, bigger batch
    ):
        image(engine, other)
        assert image(engine, reference) == alone, f"state leaked after {other.batch_key()}"
    # Not vacuous: the cached generation differs from full compute of the same seed.
    assert image(engine, spec((32, 16), "none", "none", 3.0, seed=1)) != alone


def test_cache_counts_match_the_schedule(engine: Engine) -> None:
    (result,) = engine.run_batch([spec((16, 16), "5x", "taylorseer", 3.0, seed=9)])
    lesa = result.lesa
    assert (lesa["full_steps"], lesa["predicted_steps"]) == (4, 4)
    # The hooks' own counters (per CFG branch) agree with what the response reports.
    for branch in ("cond", "uncond"):
        assert lesa["cache_stats"][branch] == {"full": 4, "predicted": 4}


def test_content_id_names_the_files_that_ran(tmp_path: Path) -> None:
    """The `lesa.model_revision` / `lesa.predictor` of a response: one changed byte, file name or
    added file is another id; the same files elsewhere are the same id; `skip` leaves a folder out."""
    (tmp_path / "a" / "predictors" / "5x").mkdir(parents=True)
    (tmp_path / "a" / "weights.safetensors").write_bytes(b"\x00" * 1000)
    (tmp_path / "a" / "predictors" / "5x" / "config.json").write_text("{}")
    base = content_id(tmp_path / "a", skip="predictors")
    assert len(base) == 12 and base != content_id(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert content_id(tmp_path / "b", skip="predictors") == base
    (tmp_path / "b" / "predictors" / "5x" / "config.json").write_text('{"changed": 1}')
    assert content_id(tmp_path / "b", skip="predictors") == base  # a retrained bundle is not new weights
    (tmp_path / "b" / "weights.safetensors").write_bytes(b"\x00" * 999 + b"\x01")
    assert content_id(tmp_path / "b", skip="predictors") != base
    (tmp_path / "a" / "weights.safetensors").rename(tmp_path / "a" / "other.safetensors")
    assert content_id(tmp_path / "a", skip="predictors") != base


def test_the_api_catalogue_and_the_workers_name_the_same_revision_and_bundles() -> None:
    s = Settings(_env_file=None, models="digits-image")
    api, worker = Engine.catalogue(s).models["digits-image"], Engine.load(s).models["digits-image"]
    assert api.revision == worker.revision and len(api.revision) == 12
    # `created` is models.toml's (2026-11-26), not when the process started: replicas agree
    assert api.created == worker.created == Engine.catalogue(s).models["digits-image"].created == 1795651200
    assert {k: b.content_id for k, b in api.bundles.items()} == {k: b.content_id for k, b in worker.bundles.items()}
    assert api.reference_mode == worker.reference_mode == "L"  # the API accepts the edits the workers can run


def test_a_batch_reports_where_its_time_went(engine: Engine) -> None:
    """The pipeline's stages, then the outputs' encoding: in order, adding up to the generation."""
    (result,) = engine.run_batch([spec((32, 32), "2x", "reuse", 3.0, seed=9, n=2)])
    lesa = result.lesa
    stages = lesa["stage_ms"]
    assert list(stages) == ["encode_prompts", "denoise", "decode", "encode_output"]
    assert all(ms >= 0 for ms in stages.values()) and stages["denoise"] > 0 and stages["encode_output"] > 0
    assert sum(stages.values()) <= lesa["generation_ms"] + 0.05  # each rounded to 0.01 ms
    # what the time outside the stages is: the pipeline's own setup, a few ms at most here
    assert lesa["generation_ms"] - sum(stages.values()) < 50


def test_the_catalogue_knows_which_models_take_given_pixels_without_loading_them() -> None:
    """The API tier reads it from models.toml as the loaded pipelines will say it (`reference_mode`):
    grey for the digits models, RGB for the image families whose latents the backend encodes."""
    from lesa_core.production import read_config
    from service.engine import reference_mode

    config = read_config(Path(__file__).parents[1] / "deploy" / "models.toml", None)
    modes = {name: reference_mode(model) for name, model in config.models.items()}
    assert modes == {"digits-image": "L", "digits-video": "L", "flux.1-dev": "RGB", "qwen-image": "RGB",
                     "wan2.1-t2v-14b": None, "hunyuanvideo": None}  # fmt: skip
