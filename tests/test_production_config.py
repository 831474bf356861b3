"""The model config file and its loader, and memory-aware batching (cap + out-of-memory split)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from production_tiny import build

import lesa_models
from lesa_core import CacheSchedule, PredictorConfig, StagePredictor, level_schedule
from lesa_core.production import (
    BackendOptions,
    ConfigError,
    DiffusersBackend,
    load_models,
    plan_chunks,
    read_config,
)
from lesa_core.production.config import DEFAULT_CONFIG

STEPS = 4


def test_plan_chunks_caps_batch_x_pixels_x_frames():
    assert plan_chunks(8, 100, None) == [8]
    assert plan_chunks(8, 100, 300) == [3, 3, 2]
    assert plan_chunks(2, 1000, 10) == [1, 1]  # a sample over the cap still runs, alone
    with pytest.raises(ValueError):
        plan_chunks(0, 1, 1)


def test_shipped_config_parses_with_the_four_production_models_gpu_only():
    config = read_config(DEFAULT_CONFIG)
    pipelines = {m.pipeline for m in config.models.values() if m.backend == "diffusers"}
    assert pipelines == {"FluxPipeline", "QwenImagePipeline", "WanPipeline", "HunyuanVideoPipeline"}
    for model in config.models.values():
        if model.backend == "diffusers":
            assert model.enabled == "gpu" and not model.enabled_on("cpu")
            assert model.default_steps == 50 and model.levels
            assert all(w % 16 == 0 and h % 16 == 0 for w, h in model.sizes)
            assert all(f % 4 == 1 for f in model.num_frames)
    assert {"digits-image", "digits-video"} <= set(config.models)


def _flux_backend(**options) -> tuple[DiffusersBackend, object]:
    tiny = build("flux")
    opts = BackendOptions(
        name="tiny-flux", sizes=[(16, 16)], default_steps=STEPS, call_kwargs=dict(tiny.call_kwargs), **options
    )
    return DiffusersBackend(tiny.pipe, opts), tiny


PROMPTS, SEEDS = ["a red cat", "a blue dog", "the monkey dance"], [1, 2, 3]


def test_batches_over_the_cap_and_out_of_memory_split_without_changing_samples():
    backend, tiny = _flux_backend()
    whole = backend(PROMPTS, seeds=SEEDS, height=16, width=16, num_inference_steps=STEPS)
    assert whole.stats["chunks"] == [3]

    capped = DiffusersBackend(tiny.pipe, replace(backend.options, max_batch_pixels=2 * 16 * 16))
    progress: list[tuple[int, int]] = []
    out = capped(PROMPTS, seeds=SEEDS, height=16, width=16, num_inference_steps=STEPS,
                 callback=lambda d, t: progress.append((d, t)))  # fmt: skip
    assert out.stats["chunks"] == [2, 1]
    assert progress == [(i, 2 * STEPS) for i in range(1, 2 * STEPS + 1)]  # monotone across chunks
    # Per-sample generators: a sample does not depend on its batch (up to batched-matmul rounding).
    np.testing.assert_allclose(out.samples, whole.samples, atol=1e-5)

    # A transformer that runs out of memory on more than one sample: the batch splits down.
    def oom_over_one(module, args, kwargs):
        if kwargs["hidden_states"].shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = backend.transformer.register_forward_pre_hook(oom_over_one, with_kwargs=True)
    try:
        split = backend(PROMPTS, seeds=SEEDS, height=16, width=16, num_inference_steps=STEPS)
        assert split.stats["chunks"] == [1, 1, 1] and split.stats["oom_splits"] == 2
        np.testing.assert_allclose(split.samples, whole.samples, atol=1e-5)
        # The backend remembers: the next batch is planned below the size that failed.
        again = backend(PROMPTS[:2], seeds=SEEDS[:2], height=16, width=16, num_inference_steps=STEPS)
        assert again.stats["chunks"] == [1, 1] and again.stats["oom_splits"] == 0
    finally:
        handle.remove()

    # Out of memory late (step 3 of 4, previews already shown after step 2): progress never goes
    # back nor past its total, ends at 100%, and the retried halves do not preview step 2 again.
    calls = [0]

    def oom_late(module, args, kwargs):
        calls[0] += 1
        if kwargs["hidden_states"].shape[0] > 1 and calls[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    progress.clear()
    previews: list[tuple[int, int, int]] = []
    handle = backend.transformer.register_forward_pre_hook(oom_late, with_kwargs=True)
    try:
        fresh = DiffusersBackend(tiny.pipe, backend.options)  # no remembered OOM ceiling
        late = fresh(PROMPTS[:2], seeds=SEEDS[:2], height=16, width=16, num_inference_steps=STEPS,
                     callback=lambda d, t: progress.append((d, t)), preview_steps={2},
                     preview=lambda step, samples, first: previews.append((step, first, len(samples))))  # fmt: skip
    finally:
        handle.remove()
    assert late.stats["chunks"] == [1, 1] and late.stats["oom_splits"] == 1
    np.testing.assert_allclose(late.samples, whole.samples[:2], atol=1e-5)
    done = [d for d, _ in progress]
    assert done == sorted(done) and all(d <= t for d, t in progress) and progress[-1][0] == progress[-1][1]
    assert progress[-1] == (2 + 2 * STEPS, 2 + 2 * STEPS)  # the 2 steps the failed batch made count too
    assert previews == [(2, 0, 2)]

    def other_error(module, args):
        raise RuntimeError("shape mismatch")

    handle = backend.transformer.register_forward_pre_hook(other_error)
    try:
        with pytest.raises(RuntimeError, match="shape mismatch"):  # not an OOM: no retry, no masking
            backend(PROMPTS[:1], seeds=SEEDS[:1], height=16, width=16, num_inference_steps=STEPS)
    finally:
        handle.remove()


def _bundle(path, schedule: CacheSchedule, family: str, hidden: int) -> None:
    predictor = StagePredictor(
        PredictorConfig(schedule=schedule.to_dict(), kan_hidden=(8,), family=family, hidden_size=hidden)
    )
    predictor.save_pretrained(path)


def test_loader_serves_a_local_pipeline_and_disables_only_broken_levels(tmp_path, caplog):
    tiny = build("flux")
    tiny.pipe.save_pretrained(tmp_path / "tiny-flux")
    family, hidden = "FluxTransformer2DModel", 32
    bundles = tmp_path / "bundles"
    _bundle(bundles / "good-2x", level_schedule("2x", STEPS), family, hidden)
    _bundle(bundles / "wrong-schedule", level_schedule("2x", STEPS), family, hidden)  # filed as 3.3x below
    _bundle(bundles / "wrong-width", level_schedule("5x", STEPS), family, 64)
    (bundles / "corrupt").mkdir()
    (bundles / "corrupt" / "config.json").write_text("{ not json")
    (bundles / "corrupt" / "model.safetensors").write_bytes(b"\0" * 10)
    config = tmp_path / "models.toml"
    config.write_text(
        f"""
[defaults]
weights_root = "{bundles}"

[models.tiny-flux]
source = "./tiny-flux"
pipeline = "FluxPipeline"
sizes = [[16, 16]]
default_steps = {STEPS}
call_kwargs = {{ max_sequence_length = 16 }}
scheduler_config = {{ max_shift = 1.0 }}
levels = {{ "2x" = "good-2x", "3.3x" = "wrong-schedule", "5x" = "wrong-width", "6.25x" = "corrupt", "9x" = "good-2x" }}

[models.big-gpu-model]
source = "nobody/not-downloaded"
pipeline = "WanPipeline"
enabled = "gpu"
sizes = [[832, 480]]
num_frames = [81]
"""
    )
    with caplog.at_level(logging.WARNING, logger="lesa_core.production.config"):
        served = load_models(config, device="cpu")
    assert list(served) == ["tiny-flux"]  # the "gpu" model is not even tried on a CPU node
    model = served["tiny-flux"]
    assert list(model.bundles) == ["2x"]
    warnings = caplog.text
    for level in ("3.3x", "5x", "6.25x", "'9x'"):
        assert level in warnings
    info = model.pipe.info
    assert (info.kind, info.sizes, info.hidden_size, info.pipeline_class) == ("image", [(16, 16)], 32, "FluxPipeline")
    assert model.pipe.pipe.transformer.dtype == torch.float32  # fp32 on CPU
    assert model.pipe.scheduler.config.max_shift == 1.0 and model.pipe.pipe.scheduler is model.pipe.scheduler
    out = model.pipe(["a cat"], seeds=[0], height=16, width=16, num_inference_steps=STEPS)
    assert out.samples.shape == (1, 16, 16, 3)

    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_models(config, ["big-gpu-model"], device="cpu")
    with pytest.raises(ConfigError, match="unknown model"):
        load_models(config, ["nope"], device="cpu")
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.x]\nsource = "a"\npipeline = "FluxPipeline"\nsizes = [[16, 16]]\nstep = 3\n')
    with pytest.raises(ConfigError, match=r"\[models.x\]: unknown keys \['step'\]"):
        read_config(bad)
    bad.write_text('[models.x]\nsource = "a"\npipeline = "StableDiffusionPipeline"\nsizes = [[16, 16]]\n')
    with pytest.raises(ConfigError, match="pipeline"):
        read_config(bad)
    bad.write_text('[models.x]\nsource = "a"\npipeline = "FluxPipeline"\nsizes = [[1000, 1000]]\n')
    with pytest.raises(ConfigError, match="multiples of 16"):
        read_config(bad)
    bad.write_text('[models.x]\nsource = "a"\npipeline = "WanPipeline"\nsizes = [[832, 480]]\nnum_frames = [80]\n')
    with pytest.raises(ConfigError, match=r"\[80\] are not 4k \+ 1"):
        read_config(bad)
    # Wrong value types, typos outside [models.*] and truthy stand-ins are named, not found later.
    flux = '[models.x]\nsource = "a"\npipeline = "FluxPipeline"\nsizes = [[16, 16]]\n'
    for extra, message in (
        ('default_steps = "fifty"', r"\[models.x\].default_steps: expected int, got 'fifty'"),
        ('levels = "5x"', r"\[models.x\].levels: expected dict"),
        ("cpu_offload = 1", r"\[models.x\].cpu_offload: expected bool"),
        ("enabled = 1", r"\[models.x\].enabled: use true, false"),
        ("max_batch_pixels = -5", r"max_batch_pixels: must be at least 1"),
        ('num_frames = ["a"]', r"\[models.x\]: a value has the wrong type"),
        ('device = "gpu0"', r"\[models.x\].device: 'gpu0' is not a torch device"),
        # values of the right type that no request could use
        ("num_frames = []", r"\[models.x\].num_frames: one or more frame counts"),
        ("num_frames = [0]", r"\[models.x\].num_frames: one or more frame counts"),
        ("default_guidance = nan", r"\[models.x\].default_guidance: must be a finite number >= 0"),
        ("default_guidance = -1.0", r"\[models.x\].default_guidance: must be a finite number >= 0"),
        ('dtype = "bf17"', r"\[models.x\].dtype: unknown dtype 'bf17'"),
        ('vae_dtype = "int8"', r"\[models.x\].vae_dtype: unknown dtype 'int8'"),
        ('created = "2024-08-01"', r"\[models.x\].created: expected a date \(2024-08-01\), a date-time or Unix"),
        ("created = -1", r"\[models.x\].created: expected a date"),
        ("created = 10:30:00", r"\[models.x\].created: expected a date"),
    ):
        bad.write_text(flux + extra + "\n")
        with pytest.raises(ConfigError, match=message):
            read_config(bad)
    for created, seconds in (("", 0), ("2024-08-01", 1722470400), ("2024-08-01T02:00:00+02:00", 1722470400),
                             ("2024-08-01T00:00:00", 1722470400), ("1722470400", 1722470400)):  # fmt: skip
        bad.write_text(flux + (f"created = {created}\n" if created else ""))
        assert read_config(bad).models["x"].created == seconds
    for sizes in ("[[0, 16]]", "[[-16, 16]]"):  # (multiples of 16 as well)
        bad.write_text(flux.replace("[[16, 16]]", sizes))
        with pytest.raises(ConfigError, match=r"\[models.x\].sizes: widths and heights must be at least 1"):
            read_config(bad)
    # Pipeline keywords are checked against the pipeline's signature before any weights load (a
    # typo would fail every request with a TypeError), the file's mistake whether named or not.
    for extra, message in (
        ("call_kwargs = { max_seq_length = 512 }", r"\[models.x\].call_kwargs: FluxPipeline takes no .*max_seq_length"),
        ('guidance_arg = "cfg_scale"', r"\[models.x\].guidance_arg: FluxPipeline takes no .*cfg_scale"),
    ):
        bad.write_text(flux + extra + "\n")
        for names in (["x"], None):
            with pytest.raises(ConfigError, match=message):
                load_models(bad, names, device="cpu")
    bad.write_text(flux + 'call_kwargs = { max_sequence_length = 64 }\nguidance_arg = "guidance_scale"\n')
    with pytest.raises(OSError):  # accepted: on to loading "a", which is no pipeline
        load_models(bad, ["x"], device="cpu")
    bad.write_text('[defaults]\nweigths_root = "w"\n' + flux)
    with pytest.raises(ConfigError, match=r"\[defaults\] takes only weights_root"):
        read_config(bad)
    bad.write_text("models = 3\n")
    with pytest.raises(ConfigError, match="no \\[models.NAME\\] tables"):
        read_config(bad)


def test_service_engine_serves_a_configured_model_with_its_bundles(tmp_path, monkeypatch):
    from service.engine import Engine
    from service.schemas import ImageGenerationRequest
    from service.settings import Settings

    tiny = build("flux")
    tiny.pipe.save_pretrained(tmp_path / "tiny-flux")
    _bundle(tmp_path / "tiny-flux" / "predictors" / "2x", level_schedule("2x", STEPS), "FluxTransformer2DModel", 32)
    config = tmp_path / "models.toml"
    config.write_text(
        f"""
[models.tiny-flux]
source = "./tiny-flux"
pipeline = "FluxPipeline"
sizes = [[16, 16]]
default_steps = {STEPS}
call_kwargs = {{ max_sequence_length = 16 }}
levels = {{ "2x" = "tiny-flux/predictors/2x" }}
"""
    )
    monkeypatch.setenv("LESA_MODELS_CONFIG", str(config))
    settings = Settings(_env_file=None, models="tiny-flux", device="cpu", weights_dir=tmp_path)
    engine = Engine.load(settings)
    entry = engine.models["tiny-flux"]
    assert (entry.kind, entry.sizes, entry.default_steps) == ("image", [(16, 16)], STEPS)
    assert list(entry.bundles) == ["2x"] and entry.bundles["2x"].num_steps == STEPS
    spec = engine.resolve_image(ImageGenerationRequest(model="tiny-flux", prompt="a cat", acceleration="2x"))
    assert (spec.level, spec.method) == ("2x", "lesa")
    out = entry.pipe(["a cat"], seeds=[spec.seed], height=16, width=16, num_inference_steps=STEPS,
                     cache=engine.cache_config(spec))  # fmt: skip
    assert out.stats["cache"] == {"cond": {"full": 2, "predicted": 2}}
    with pytest.raises(ValueError, match="configured: tiny-flux"):
        Engine.load(Settings(_env_file=None, models="nope", device="cpu"))


def test_a_missing_levels_dir_is_warned_about_not_silently_training_free(tmp_path, caplog):
    from lesa_core.production.config import load_bundles

    config = tmp_path / "models.toml"
    config.write_text(f'[defaults]\nweights_root = "{tmp_path}"\n[models.m]\nbackend = "digits"\n'
                      'source = "digits-image"\nlevels_dir = "nowhere/predictors"\n')  # fmt: skip
    model = read_config(config).models["m"]
    with caplog.at_level("WARNING"):
        assert load_bundles(model, None) == {}
    assert "levels_dir" in caplog.text and "nowhere" in caplog.text


def test_an_enabled_model_the_file_gets_wrong_stops_the_start_instead_of_being_skipped(tmp_path, monkeypatch):
    # Weights missing on this node: the others are served (a warning). A source that names no
    # reference model is the file's mistake: every node would skip it, so nobody would notice.
    from service.engine import Engine
    from service.settings import Settings

    config = tmp_path / "models.toml"
    for source in ("digits-imag", "", ".", str(tmp_path)):  # a name, or a directory without model_index.json
        config.write_text(f'[models.typo]\nbackend = "digits"\nsource = "{source}"\n')
        with pytest.raises(ConfigError, match=r"\[models.typo\].source: .* is not a reference model"):
            load_models(config, device="cpu")
        with pytest.raises(ConfigError, match=r"\[models.typo\].source"):  # the Redis API tier's catalogue too
            Engine.catalogue(Settings(_env_file=None, models_config=config))
    # a local pipeline directory is relative to the file, not to wherever the server was started
    (tmp_path / "conf").mkdir()
    shutil.copytree(Path(lesa_models.__file__).parent / "weights" / "digits-image", tmp_path / "conf" / "mine",
                    ignore=shutil.ignore_patterns("predictors"))  # fmt: skip
    (tmp_path / "conf" / "models.toml").write_text(
        '[defaults]\nweights_root = "../weights"\n[models.mine]\nbackend = "digits"\nsource = "./mine"\n'
    )
    with monkeypatch.context() as patch:
        patch.chdir(tmp_path)
        assert list(load_models(tmp_path / "conf" / "models.toml", device="cpu")) == ["mine"]
    # "gpu" means a node with CUDA, whatever the entry's own device says; "" is the loader's choice
    config.write_text('[models.big]\nbackend = "digits"\nsource = "digits-image"\nenabled = "gpu"\n'
                      'device = "cuda"\n[models.small]\nbackend = "digits"\nsource = "digits-image"\ndevice = ""\n')  # fmt: skip
    if not torch.cuda.is_available():
        assert list(load_models(config, device="cpu")) == ["small"]


def test_a_moved_reference_model_is_a_copy_of_its_own_in_the_dtype_asked_for(tmp_path):
    """dtype aliases work on the digits path too, and moving one entry's pipeline leaves the
    process's shared copy (the CLI's, the benchmarks', another entry's) as it was."""
    shared = lesa_models.load_pipeline("digits-image")
    config = tmp_path / "models.toml"
    config.write_text('[models.plain]\nbackend = "digits"\nsource = "digits-image"\n'
                      '[models.half]\nbackend = "digits"\nsource = "digits-image"\ndtype = "bf16"\n')  # fmt: skip
    served = load_models(config, device="cpu")
    assert served["plain"].pipe is shared and served["half"].pipe is not shared
    assert next(served["half"].pipe.transformer.parameters()).dtype == torch.bfloat16
    assert next(shared.transformer.parameters()).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_device_without_cuda_is_named_not_an_assertion(tmp_path):
    config = tmp_path / "models.toml"
    config.write_text('[models.here]\nbackend = "digits"\nsource = "digits-image"\n')
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available on this machine"):
        load_models(config, device="cuda")  # the node's device (LESA_DEVICE)
    config.write_text('[models.here]\nbackend = "digits"\nsource = "digits-image"\ndevice = "cuda:1"\n')
    with pytest.raises(ValueError, match="device 'cuda:1': CUDA is not available"):
        load_models(config, ["here"], device="cpu")  # named: its failure is the operator's to see
    assert load_models(config, device="cpu") == {}  # enabled on every node, but not runnable here: skipped
