"""The reference pipelines: offline loading, the call contract, determinism, prompts honoured."""

from __future__ import annotations

import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # loading must never touch the network

import numpy as np
import pytest
import torch

from lesa_core.pipeline_types import Reference, reference_steps
from lesa_models import MODEL_NAMES, GenerationCancelled, load_pipeline
from lesa_models.evaluator import classify_digits, classify_frames, motion_direction, parse_prompt_direction

STEPS = 4


@pytest.fixture(scope="module")
def image_pipe():
    return load_pipeline("digits-image")


@pytest.fixture(scope="module")
def video_pipe():
    return load_pipeline("digits-video")


def _size(pipe):
    width, height = pipe.info.sizes[0]
    return dict(height=height, width=width)


def test_models_load_from_committed_directories(image_pipe, video_pipe):
    assert set(MODEL_NAMES) == {"digits-image", "digits-video"}
    info = image_pipe.info
    assert info.kind == "image" and info.transformer_class == "FluxTransformer2DModel"
    assert (info.min_steps, info.max_steps, info.default_steps) == (4, 100, 50)
    assert video_pipe.info.kind == "video" and video_pipe.info.transformer_class == "WanTransformer3DModel"
    assert video_pipe.info.num_frames == [8]


def test_generation_is_deterministic_per_seed(image_pipe):
    a = image_pipe(["a handwritten seven"], seeds=[3], num_inference_steps=STEPS, **_size(image_pipe))
    b = image_pipe(["a handwritten seven"], seeds=[3], num_inference_steps=STEPS, **_size(image_pipe))
    c = image_pipe(["a handwritten seven"], seeds=[4], num_inference_steps=STEPS, **_size(image_pipe))
    assert a.samples.dtype == np.float32 and a.samples.shape == (1, 16, 16)
    assert 0.0 <= a.samples.min() and a.samples.max() <= 1.0
    np.testing.assert_array_equal(a.samples, b.samples)
    assert not np.allclose(a.samples, c.samples)
    assert a.stats["transformer_calls"] == 2 * STEPS and "wall_time_s" in a.stats


def test_each_stage_of_the_call_is_timed_where_it_runs(image_pipe, monkeypatch):
    # Each delay in its own stage: were two stages to overlap, their sum would exceed the wall time
    # by at least the delay counted twice.
    text_s, step_s = 0.1, 0.002
    monkeypatch.setattr(
        image_pipe, "encode", lambda prompts, real=image_pipe.encode: time.sleep(text_s) or real(prompts)
    )
    handle = image_pipe.transformer.register_forward_pre_hook(lambda *_: time.sleep(step_s))
    try:
        started = time.perf_counter()
        out = image_pipe(["a handwritten seven"], seeds=[3], num_inference_steps=STEPS, **_size(image_pipe))
        wall = time.perf_counter() - started
    finally:
        handle.remove()
    stages = out.stats["stage_seconds"]
    assert list(stages) == ["encode_prompts", "denoise", "decode"]
    assert stages["encode_prompts"] >= 2 * text_s  # both CFG branches' prompts
    assert stages["denoise"] >= 2 * STEPS * step_s
    assert 0 <= stages["decode"] and sum(stages.values()) <= wall


def test_sample_does_not_depend_on_its_batch(image_pipe):
    alone = image_pipe(["digit 2"], seeds=[11], num_inference_steps=STEPS, **_size(image_pipe))
    batch = image_pipe(
        ["the number 5", "digit 2", "a nine"], seeds=[1, 11, 7], num_inference_steps=STEPS, **_size(image_pipe)
    )
    # Same noise and same maths; only the batch size of the matmuls differs (float rounding).
    np.testing.assert_allclose(batch.samples[1], alone.samples[0], atol=1e-4)


def test_latents_override_the_seeded_noise(image_pipe):
    noise = image_pipe.initial_noise([5, 6], **_size(image_pipe))
    assert noise.shape == (2, 1, 16, 16)
    by_seed = image_pipe(["a one", "a two"], seeds=[5, 6], num_inference_steps=STEPS, **_size(image_pipe))
    by_latents = image_pipe(
        ["a one", "a two"], seeds=[0, 0], latents=noise, num_inference_steps=STEPS, **_size(image_pipe)
    )
    np.testing.assert_array_equal(by_seed.samples, by_latents.samples)


def test_callback_reports_progress_and_cancels(image_pipe):
    seen = []
    image_pipe(
        ["a six"], seeds=[0], num_inference_steps=STEPS, callback=lambda d, t: seen.append((d, t)), **_size(image_pipe)
    )
    assert seen == [(i, STEPS) for i in range(1, STEPS + 1)]
    with pytest.raises(GenerationCancelled):
        image_pipe(["a six"], seeds=[0], num_inference_steps=STEPS, callback=lambda d, t: d < 2, **_size(image_pipe))


def test_sampler_step_is_the_diffusers_flow_match_euler_step(image_pipe):
    """The pipeline inlines the scheduler's Euler step; it must stay bit for bit the same."""
    pipe, guidance = image_pipe, 4.0
    out = pipe(["digit 5"], seeds=[2], num_inference_steps=STEPS, guidance_scale=guidance, **_size(pipe))
    sched = pipe._fresh_scheduler(STEPS)
    x = pipe.initial_noise([2], **_size(pipe))
    cond, uncond = pipe.encode(["digit 5"]), pipe.encode([""])
    with torch.no_grad():
        for t in sched.timesteps:
            sigma = (t / 1000.0).expand(1)
            v_cond, v_uncond = pipe.predict_velocity(x, sigma, cond), pipe.predict_velocity(x, sigma, uncond)
            x = sched.step(v_uncond + guidance * (v_cond - v_uncond), t, x, return_dict=False)[0]
    np.testing.assert_array_equal(out.samples, ((x[:, 0] + 1.0) / 2.0).clamp(0.0, 1.0).numpy())


def test_guidance_one_skips_the_unconditional_branch(image_pipe):
    out = image_pipe(["a six"], seeds=[0], num_inference_steps=STEPS, guidance_scale=1.0, **_size(image_pipe))
    assert out.stats["transformer_calls"] == STEPS


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(prompts=["a one"], seeds=[0], height=17, width=16), "size"),
        (dict(prompts=["a one"], seeds=[0], height=16, width=16, num_inference_steps=3), "num_inference_steps"),
        (dict(prompts=["a one"], seeds=[0], height=16, width=16, num_inference_steps=101), "num_inference_steps"),
        (dict(prompts=["  "], seeds=[0], height=16, width=16), "prompts[0]"),
        (dict(prompts=[], seeds=[], height=16, width=16), "prompts"),
        (dict(prompts=["a one"], seeds=[0, 1], height=16, width=16), "seeds"),
        (dict(prompts=["a one"], seeds=[0], height=16, width=16, guidance_scale=-1.0), "guidance_scale"),
        (dict(prompts=["a one"], seeds=[0], height=16, width=16, num_frames=8), "num_frames"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_field(image_pipe, kwargs, field):
    prompts = kwargs.pop("prompts")
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        image_pipe(prompts, **kwargs)


def test_validate_checks_a_call_without_generating(image_pipe, video_pipe):
    """`validate` is public: `lesa generate` refuses bad input with it before any output is made."""
    width, height = image_pipe.info.sizes[0]
    assert image_pipe.validate(["a one"], [0], height, width, None, 8, 4.0) is None
    with pytest.raises(ValueError, match="num_inference_steps"):
        image_pipe.validate(["a one"], [0], height, width, None, 3, 4.0)
    width, height = video_pipe.info.sizes[0]
    frames = video_pipe.validate(["a one"], [0], height, width, None, 8, 4.0)
    assert frames == video_pipe.info.num_frames[0]


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="digits-image, digits-video"):
        load_pipeline("digits-audio")


def test_image_prompts_are_honoured(image_pipe):
    prompts = [f"the number {d}" for d in range(10)]
    out = image_pipe(prompts, seeds=list(range(500, 510)), num_inference_steps=20, **_size(image_pipe))
    hits = (classify_digits(out.samples) == np.arange(10)).sum()
    assert hits >= 8, f"only {hits}/10 digits recognised"


def test_video_clip_shape_digit_and_motion(video_pipe):
    prompts = ["digit 3 moving to the right", "a seven moving up"]
    out = video_pipe(prompts, seeds=[900, 901], num_inference_steps=20, **_size(video_pipe))
    assert out.samples.shape == (2, 8, 16, 16)
    directions = [motion_direction(c) for c in out.samples]
    agree = sum(d == parse_prompt_direction(p) for d, p in zip(directions, prompts, strict=True))
    digits = np.mean([(classify_frames(out.samples[0]) == 3).mean(), (classify_frames(out.samples[1]) == 7).mean()])
    assert agree >= 1 and digits >= 0.5, (directions, digits)


def _no_reference(samples: np.ndarray) -> Reference:
    return Reference(samples, np.zeros(samples.shape, bool), [0] * len(samples))


def test_an_empty_prompt_is_the_unconditional_prediction_so_guidance_changes_nothing(image_pipe):
    """What variations run on: no text, both CFG branches alike (`POST /v1/images/variations`)."""
    size = dict(height=16, width=16, num_inference_steps=8, seeds=[3])
    unguided = image_pipe([""], guidance_scale=1.0, **size).samples
    assert np.array_equal(image_pipe([""], guidance_scale=4.0, **size).samples, unguided)
    assert not np.array_equal(image_pipe(["a handwritten seven"], guidance_scale=4.0, **size).samples, unguided)


def test_a_reference_keeps_its_pixels_under_every_method_and_leaves_the_rest_generated(image_pipe):
    from lesa_models.cli import resolve_acceleration

    kw = dict(num_inference_steps=50, **_size(image_pipe))
    three = image_pipe(["a three"], seeds=[5], **kw).samples
    # a reference that keeps nothing and follows no step changes nothing (such samples share batches)
    assert np.array_equal(image_pipe(["a three"], seeds=[5], reference=_no_reference(three), **kw).samples, three)
    keep = np.zeros(three.shape, bool)
    keep[:, :, :8] = True  # the left half
    plain = image_pipe(["a seven"], seeds=[9], **kw).samples
    for method in ("none", "lesa"):
        cache = None if method == "none" else resolve_acceleration(image_pipe, "5x", 50, method="lesa")
        edited = image_pipe(["a seven"], seeds=[9], reference=Reference(three, keep, [0]), cache=cache, **kw).samples
        assert np.array_equal(edited[keep], three[keep]), method
        # the right half is generated to fit: neither the reference nor the unconditioned sample
        assert np.abs(edited[~keep] - three[~keep]).mean() > 0.05, method
        assert np.abs(edited[~keep] - plain[~keep]).mean() > 0.01, method


def test_an_edit_strength_sets_how_far_the_sample_moves_from_its_reference(image_pipe):
    kw = dict(num_inference_steps=50, **_size(image_pipe))
    three = image_pipe(["a three"], seeds=[5], **kw).samples
    nothing = np.zeros(three.shape, bool)
    distance = []
    for strength in (0.0, 0.3, 0.6, 1.0):
        until = reference_steps(strength, 50)
        out = image_pipe(["a seven"], seeds=[9], reference=Reference(three, nothing, [until]), **kw).samples
        distance.append(float(np.abs(out - three).mean()))
    assert distance[0] == 0.0  # strength 0: the image itself
    assert distance == sorted(distance) and distance[1] < distance[3] / 2, distance
    # strength 1 follows no step: the sample is the plain generation from the same seed
    assert np.array_equal(
        image_pipe(["a seven"], seeds=[9], reference=Reference(three, nothing, [0]), **kw).samples,
        image_pipe(["a seven"], seeds=[9], **kw).samples,
    )
    assert (reference_steps(0.6, 50), reference_steps(0.0, 50), reference_steps(1.0, 50)) == (20, 50, 0)


def test_a_video_from_a_first_frame_keeps_it_and_moves_the_digit_as_asked(video_pipe):
    kw = dict(num_inference_steps=50, **_size(video_pipe))
    prompts = ["digit 5 moving to the right", "digit 5 moving up", "a two moving to the left", "a two moving down"]
    # first frames where such a clip can start (a digit at the edge it moves away from)
    starts = video_pipe(prompts, seeds=[100, 101, 102, 103], **kw).samples
    first = np.repeat(starts[:, :1], starts.shape[1], axis=1)
    keep = np.zeros(first.shape, bool)
    keep[:, 0] = True
    clips = video_pipe(prompts, seeds=[200, 201, 202, 203], reference=Reference(first, keep, [0] * 4), **kw).samples
    assert np.array_equal(clips[:, 0], starts[:, 0])
    directions = [motion_direction(c) for c in clips]
    assert directions == [parse_prompt_direction(p) for p in prompts], directions
    assert np.mean([(classify_frames(c) == d).mean() for c, d in zip(clips, (5, 5, 2, 2), strict=True)]) >= 0.9


def test_a_reference_of_another_shape_is_refused_naming_it(image_pipe):
    ref = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="reference samples and keep must have the batch's shape"):
        image_pipe(["a one"], seeds=[0], num_inference_steps=4, reference=_no_reference(ref), **_size(image_pipe))


def test_acceleration_hooks_attach_and_detach(image_pipe):
    lesa_core = pytest.importorskip("lesa_core")
    schedule = lesa_core.CacheSchedule.from_full_steps(8, [0, 1, 2, 4, 6])
    config = lesa_core.CacheConfig(method="reuse", schedule=schedule)
    out = image_pipe(["a four"], seeds=[2], num_inference_steps=8, cache=config, **_size(image_pipe))
    assert "cache" in out.stats
    assert not lesa_core.is_cache_enabled(image_pipe.transformer)
    full = image_pipe(["a four"], seeds=[2], num_inference_steps=8, **_size(image_pipe))
    assert full.samples.shape == out.samples.shape


def test_a_bundle_trained_for_another_model_family_is_refused(video_pipe):
    """The image model's bundle fits the video model's width (128) and schedule, but not its family."""
    from lesa_core import BundleError, CacheConfig, StagePredictor
    from lesa_models.registry import WEIGHTS_DIR

    bundle = StagePredictor.from_pretrained(WEIGHTS_DIR / "digits-image" / "predictors" / "5x")
    config = CacheConfig(method="lesa", schedule=bundle.schedule, predictor=bundle)
    with pytest.raises(BundleError, match="FluxTransformer2DModel, not WanTransformer3DModel"):
        video_pipe(["digit 3 moving left"], seeds=[0], num_inference_steps=50, cache=config, **_size(video_pipe))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pipeline_moves_to_another_dtype(name):
    """`.to(device, dtype)` like a diffusers pipeline: bfloat16 samples, with and without acceleration
    hooks, stay close to the float32 ones, and the family's float32 modules stay float32."""
    lesa_core = pytest.importorskip("lesa_core")
    pipe = load_pipeline(name, shared=False)  # a private copy: the shared one stays float32
    call = dict(prompts=["a three moving up"], seeds=[7], num_inference_steps=8, guidance_scale=1.0, **_size(pipe))
    reference = pipe(**call).samples
    schedule = lesa_core.CacheSchedule.from_full_steps(8, [0, 1, 2, 5])
    assert pipe.to("cpu", torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16
    keep = set(getattr(pipe.transformer, "_keep_in_fp32_modules", None) or ())
    for param_name, param in pipe.transformer.named_parameters():
        assert param.dtype == (torch.float32 if keep & set(param_name.split(".")) else torch.bfloat16), param_name
    for cache in (None, lesa_core.CacheConfig(method="taylorseer", schedule=schedule)):
        low = pipe(**call, cache=cache).samples
        assert low.dtype == np.float32 and low.shape == reference.shape
        correlation = np.corrcoef(low.ravel(), reference.ravel())[0, 1]
        assert correlation > 0.9, correlation


def test_text_encoder_caches_and_pads():
    from lesa_models.text_encoder import get_text_encoder

    enc = get_text_encoder()
    a = enc.encode(["a seven", ""])
    assert a.tokens.shape == (2, 16, 384) and a.pooled.shape == (2, 384)
    assert torch.all(a.tokens[a.mask == 0] == 0)
    np.testing.assert_array_equal(enc.encode(["a seven"]).tokens[0].numpy(), a.tokens[0].numpy())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_committed_predictor_bundles_fit_their_model_and_forecast_close_to_full_compute(name, request):
    """Every named level has a loadable bundle made for this model and level, with its measured card,
    and its forecasts keep a 50-step sample near full compute (a smoke check: targets are in benchmarks)."""
    lesa_core = pytest.importorskip("lesa_core")
    pipe = request.getfixturevalue("image_pipe" if name == "digits-image" else "video_pipe")
    kwargs = dict(num_inference_steps=50, num_frames=None if pipe.info.kind == "image" else 8, **_size(pipe))
    prompts, seeds = ["a handwritten seven", "the number 2"], [1000, 1001]
    if pipe.info.kind == "video":
        prompts = ["digit 7 moving up", "a two moving left"]
    full = pipe(prompts, seeds=seeds, **kwargs).samples
    for level in (n for n in lesa_core.LEVELS if n != "none"):
        schedule = lesa_core.level_schedule(level, 50)
        predictor = lesa_core.StagePredictor.from_pretrained(pipe.root / "predictors" / level)
        predictor.check_compatible(schedule, family=pipe.info.transformer_class, hidden_size=pipe.info.hidden_size)
        assert {"psnr", "mse", "speedup_wall_b8", "seeds", "machine"} <= set(predictor.config.quality), level
        config = lesa_core.CacheConfig(method="lesa", schedule=schedule, predictor=predictor)
        out = pipe(prompts, seeds=seeds, cache=config, **kwargs)
        assert out.stats["cache"]["cond"] == {"full": schedule.num_full, "predicted": 50 - schedule.num_full}
        psnr = -10 * np.log10(((out.samples - full) ** 2).mean())
        assert psnr > 24, f"{name} {level}: {psnr:.1f} dB vs full compute"


def test_loading_the_text_encoder_prints_nothing(capfd) -> None:
    """Every CLI command loads it: transformers' "Loading weights" bar put a stray line before each
    command's own output and error messages (the weights are the package's, loaded in well under a second)."""
    from lesa_models.text_encoder import TextEncoder

    TextEncoder()
    assert capfd.readouterr().err == ""
