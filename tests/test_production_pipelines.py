"""The production backend on the four diffusers pipelines, assembled offline from tiny random parts.

For FluxPipeline, QwenImagePipeline, WanPipeline and HunyuanVideoPipeline: every step full through
the backend equals the un-hooked pipeline bit for bit; LESA skips every transformer block on the
predicted steps of every CFG branch and gets the sampler's own sigmas; output shapes; cancellation; the
time of each stage of a call (text encoder, steps, VAE); previews and given pixels (image families).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from production_tiny import PIPELINES, TinyPipeline, build
from torch import nn

import lesa_core
from lesa_core import CacheConfig, CacheSchedule, PredictorConfig, StagePredictor
from lesa_core.production import BackendOptions, DiffusersBackend
from lesa_models import GenerationCancelled

STEPS = 6
SCHEDULE = CacheSchedule.from_full_steps(STEPS, [0, 1, 3])  # steps 2, 4, 5 predicted
PROMPTS = ["a red cat", "the monkey dance"]
SEEDS = [11, 12]


@pytest.fixture(scope="module", params=PIPELINES)
def tiny(request) -> TinyPipeline:
    return build(request.param)


def backend_for(tiny: TinyPipeline, **overrides) -> DiffusersBackend:
    options = BackendOptions(
        name=f"tiny-{tiny.name}",
        sizes=[(tiny.width, tiny.height)],
        num_frames=[tiny.num_frames] if tiny.num_frames else [1],
        default_steps=STEPS,
        call_kwargs=dict(tiny.call_kwargs),
        **overrides,
    )
    return DiffusersBackend(tiny.pipe, options)


def call(backend: DiffusersBackend, tiny: TinyPipeline, prompts=PROMPTS, seeds=SEEDS, **kwargs):
    return backend(
        list(prompts), seeds=list(seeds), height=tiny.height, width=tiny.width, num_frames=tiny.num_frames,
        num_inference_steps=STEPS, guidance_scale=tiny.guidance, **kwargs,
    )  # fmt: skip


def random_predictor(backend: DiffusersBackend) -> StagePredictor:
    info = backend.info
    torch.manual_seed(0)
    predictor = StagePredictor(
        PredictorConfig(
            schedule=SCHEDULE.to_dict(), kan_hidden=(8,), family=info.transformer_class, hidden_size=info.hidden_size
        )
    )
    for heads in predictor.latent.values():
        for head in heads:  # away from the all-zero start, so the forecast is not plain reuse
            nn.init.normal_(head.weight, std=0.2)
    return predictor.eval()


def block_attention_per_call(model: nn.Module) -> tuple[list[int], list]:
    """Attention calls inside transformer blocks, per transformer forward (as tests/test_hooks.py)."""
    counter, per_call, handles = [0], [], []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            for module in child.modules():
                if hasattr(module, "processor"):
                    handles.append(module.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1)))
    start = [0]
    handles.append(model.register_forward_pre_hook(lambda *_: start.__setitem__(0, counter[0])))
    handles.append(model.register_forward_hook(lambda *_: per_call.append(counter[0] - start[0])))
    return per_call, handles


def test_every_step_full_equals_the_unhooked_pipeline(tiny):
    backend = backend_for(tiny)
    kwargs = backend._call_kwargs(len(PROMPTS), tiny.guidance)
    if tiny.num_frames:
        kwargs["num_frames"] = tiny.num_frames
    with torch.no_grad():
        reference = tiny.pipe(
            prompt=PROMPTS, height=tiny.height, width=tiny.width, num_inference_steps=STEPS,
            generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="np", **kwargs,
        )  # fmt: skip
    reference = getattr(reference, backend.family.output_attr)
    out = call(backend, tiny, cache=CacheConfig(method="none"))
    assert out.samples.dtype == np.float32
    assert np.array_equal(out.samples, reference)
    # The recorder's replay path: the seeds' initial latents passed back reproduce the same samples.
    noise = backend.initial_noise(SEEDS, tiny.height, tiny.width, tiny.num_frames)
    assert np.array_equal(call(backend, tiny, latents=noise).samples, reference)
    assert out.stats["cache"] == {"cond": {"full": STEPS, "predicted": 0}} | (
        {"uncond": {"full": STEPS, "predicted": 0}} if tiny.calls_per_step == 2 else {}
    )
    assert out.stats["transformer_calls"] == STEPS * tiny.calls_per_step


def test_lesa_skips_blocks_on_predicted_steps_with_the_samplers_sigmas(tiny, monkeypatch):
    backend = backend_for(tiny)
    predictor = random_predictor(backend)
    times: list[torch.Tensor] = []
    real_new_generation = lesa_core.new_generation

    def recording_new_generation(model, timesteps=None):
        times.append(torch.as_tensor(timesteps).clone())
        real_new_generation(model, timesteps=timesteps)

    monkeypatch.setattr(lesa_core, "new_generation", recording_new_generation)
    per_call, handles = block_attention_per_call(tiny.pipe.transformer)
    try:
        out = call(backend, tiny, cache=CacheConfig(method="lesa", schedule=SCHEDULE, predictor=predictor))
    finally:
        for handle in handles:
            handle.remove()

    k = tiny.calls_per_step
    assert len(per_call) == STEPS * k
    ran = [n > 0 for n in per_call]
    assert ran == [SCHEDULE.is_full(call_index // k) for call_index in range(STEPS * k)], per_call
    branches = {"cond": {"full": 3, "predicted": 3}} | ({"uncond": {"full": 3, "predicted": 3}} if k == 2 else {})
    assert out.stats["cache"] == branches
    # The predictor got the sampler's sigmas (shifted as the pipeline shifts them), 1 = noise ... 0.
    assert len(times) == 1 and times[0].numel() == STEPS + 1
    torch.testing.assert_close(times[0], tiny.pipe.scheduler.sigmas.float().cpu())
    # ... and the backend computes the same times without running (the recorder stores them).
    assert torch.equal(backend.timesteps(STEPS, tiny.height, tiny.width, tiny.num_frames), times[0])
    assert float(times[0][-1]) == 0.0
    # Shapes: channels-last RGB, one sample per prompt, the requested size and frame count.
    frames = (tiny.num_frames,) if tiny.num_frames else ()
    assert out.samples.shape == (len(PROMPTS), *frames, tiny.height, tiny.width, 3)
    assert np.isfinite(out.samples).all() and out.samples.min() >= 0.0 and out.samples.max() <= 1.0
    # Nothing stays attached after the call.
    assert not lesa_core.is_cache_enabled(tiny.pipe.transformer)
    assert "set_timesteps" not in vars(tiny.pipe.scheduler)
    info = backend.info
    assert info.kind == ("video" if tiny.num_frames else "image")
    assert info.transformer_class == type(tiny.pipe.transformer).__name__


def test_cancellation_stops_mid_run_and_detaches_the_hooks(tiny):
    backend = backend_for(tiny)
    seen: list[tuple[int, int]] = []

    def callback(done: int, total: int) -> bool:
        seen.append((done, total))
        return done < 2  # cancel after the second step

    with pytest.raises(GenerationCancelled):
        call(backend, tiny, prompts=PROMPTS[:1], seeds=SEEDS[:1], callback=callback,
             cache=CacheConfig(method="taylorseer", schedule=SCHEDULE))  # fmt: skip
    assert seen == [(1, STEPS), (2, STEPS)]
    assert not lesa_core.is_cache_enabled(tiny.pipe.transformer)
    assert "set_timesteps" not in vars(tiny.pipe.scheduler)


def test_validation_names_the_field():
    tiny = build("flux")
    backend = backend_for(tiny)
    with pytest.raises(ValueError, match="size 32x32"):
        backend(["a cat"], seeds=[0], height=32, width=32, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="seeds"):
        backend(["a cat", "a dog"], seeds=[0], height=16, width=16, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="num_frames"):
        backend(["a cat"], seeds=[0], height=16, width=16, num_frames=9, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="num_inference_steps"):
        backend(["a cat"], seeds=[0], height=16, width=16, num_inference_steps=2)
    # the same checks without generating (`lesa generate` refuses bad input with them first)
    assert backend.validate(["a cat"], [0], 16, 16, None, STEPS, 1.0) is None
    with pytest.raises(ValueError, match="size 32x32"):
        backend.validate(["a cat"], [0], 32, 32, None, STEPS, 1.0)
    with pytest.raises(ValueError, match=r"prompts\[0\] is blank"):
        backend.validate(["  "], [0], 16, 16, None, STEPS, 1.0)
    # "" is no text (a variation): generated from the unconditional prediction
    assert backend([""], seeds=[0], height=16, width=16, num_inference_steps=STEPS).samples.shape[0] == 1


def test_image_pipelines_preview_the_clean_estimate_decoded_as_the_output_is(tiny):
    backend = backend_for(tiny)
    if tiny.name not in ("flux", "qwenimage"):
        assert not backend.supports_preview  # video pipelines: no previews (none are asked for)
        return
    assert backend.supports_preview
    # The decode is the pipeline's own: the final latents decode to the pipeline's output, bit for bit.
    kwargs = backend._call_kwargs(len(PROMPTS), tiny.guidance)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    with torch.no_grad():
        final = tiny.pipe(prompt=PROMPTS, height=tiny.height, width=tiny.width, num_inference_steps=STEPS,
                          generator=generators, output_type="latent", **kwargs).images  # fmt: skip
        decoded = lesa_core.production.backend.decode_latents(tiny.pipe, backend.family, final, tiny.height, tiny.width)
    out = call(backend, tiny)
    assert np.array_equal(decoded, out.samples)
    # Previews after steps 1 (not available: the starting latents are not shown), 2 and 4, also
    # with LESA on, and per chunk of a batch split by the memory cap (`first` = its first item).
    seen: dict[tuple[int, int], np.ndarray] = {}

    def preview(step: int, samples: np.ndarray, first: int = 0) -> None:
        for i, sample in enumerate(samples):
            seen[(step, first + i)] = sample

    capped = backend_for(tiny, max_batch_pixels=tiny.width * tiny.height)  # one sample per chunk
    cache = CacheConfig(method="lesa", schedule=SCHEDULE, predictor=random_predictor(capped))
    out = call(capped, tiny, cache=cache, preview=preview, preview_steps={1, 2, 4})
    assert sorted(seen) == [(2, 0), (2, 1), (4, 0), (4, 1)]
    for item in (0, 1):
        early, late = seen[(2, item)], seen[(4, item)]
        assert early.shape == late.shape == out.samples[item].shape and 0 <= late.min() and late.max() <= 1
        # nearer the result the later it is taken
        assert np.mean((late - out.samples[item]) ** 2) < np.mean((early - out.samples[item]) ** 2)


def test_each_stage_of_the_call_is_timed_where_it_runs(tiny, monkeypatch):
    """Text encoder, steps and VAE each made slow: each delay lands in its own stage, summed over
    the chunks of a split batch, and the stages fit inside the call."""
    import time

    text_s, step_s, vae_s = 0.06, 0.004, 0.05
    pipe = tiny.pipe

    def slowed(function, seconds):
        def run(*args, **kwargs):
            time.sleep(seconds)
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(pipe, "encode_prompt", slowed(pipe.encode_prompt, text_s))
    monkeypatch.setattr(pipe.vae, "decode", slowed(pipe.vae.decode, vae_s))
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: time.sleep(step_s))
    try:
        capped = backend_for(tiny, max_batch_pixels=tiny.width * tiny.height)  # two chunks of one
        started = time.perf_counter()
        out = call(capped, tiny)
        wall = time.perf_counter() - started
    finally:
        handle.remove()
    stages = out.stats["stage_seconds"]
    assert list(stages) == ["encode_prompts", "denoise", "decode"]
    assert stages["encode_prompts"] >= 2 * text_s
    assert stages["denoise"] >= 2 * STEPS * tiny.calls_per_step * step_s
    assert stages["decode"] >= 2 * vae_s
    assert sum(stages.values()) <= wall


def test_cpu_offload_without_accelerate_is_a_clear_error_before_any_download(monkeypatch):
    """diffusers' offload needs `accelerate` (the `production` extra): without it, an ImportError
    from deep inside diffusers, after loading, crash-looped the worker."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a)
    )
    options = BackendOptions(name="flux", sizes=[(1024, 1024)], num_frames=[1], default_steps=28)
    with pytest.raises(ValueError, match=r"cpu_offload needs the accelerate package.*lesa-serving\[production\]"):
        DiffusersBackend.from_pretrained("black-forest-labs/FLUX.1-dev", "FluxPipeline", options, device="cuda",
                                         cpu_offload=True)  # fmt: skip


def test_image_pipelines_keep_given_pixels_in_latent_space(tiny):
    """`reference=`: the VAE-encoded pixels are put back into the latents after every step, so kept
    latents end as the reference's (the output is the reference through the VAE), the rest is
    generated, and a reference that keeps nothing changes nothing: also under LESA and in chunks."""
    from lesa_core.pipeline_types import Reference
    from lesa_core.production.backend import decode_latents, encode_images

    backend = backend_for(tiny)
    rng = np.random.default_rng(0)
    pixels = rng.random((len(PROMPTS), tiny.height, tiny.width, 3), dtype=np.float32)
    if tiny.name not in ("flux", "qwenimage"):
        assert backend.reference_mode is None
        with pytest.raises(ValueError, match="takes no reference"):
            call(backend, tiny, reference=Reference(pixels, np.ones(pixels.shape, bool), [0, 0]))
        return
    assert backend.reference_mode == "RGB"
    none = np.zeros(pixels.shape, bool)
    plain = call(backend, tiny).samples
    assert np.array_equal(call(backend, tiny, reference=Reference(pixels, none, [0, 0])).samples, plain)
    with torch.no_grad():
        through_vae = decode_latents(
            tiny.pipe, backend.family, encode_images(tiny.pipe, backend.family, torch.from_numpy(pixels)),
            tiny.height, tiny.width,
        )  # fmt: skip
    assert np.abs(plain - through_vae).mean() > 1e-3
    capped = backend_for(tiny, max_batch_pixels=tiny.width * tiny.height)  # one sample per chunk
    cache = CacheConfig(method="lesa", schedule=SCHEDULE, predictor=random_predictor(capped))
    for run, kwargs in ((backend, {}), (capped, {"cache": cache})):
        kept = call(run, tiny, reference=Reference(pixels, np.ones(pixels.shape, bool), [0, 0]), **kwargs).samples
        np.testing.assert_allclose(kept, through_vae, atol=1e-5)
        followed = call(run, tiny, reference=Reference(pixels, none, [STEPS, STEPS]), **kwargs).samples
        np.testing.assert_allclose(followed, through_vae, atol=1e-5)  # strength 0: the image itself
    half = none.copy()
    half[:, :, : tiny.width // 2] = True
    edited = call(backend, tiny, reference=Reference(pixels, half, [0, 0])).samples
    assert np.abs(edited - plain).mean() > 1e-3 and np.abs(edited - through_vae).mean() > 1e-3
