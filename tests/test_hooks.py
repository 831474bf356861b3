"""The hooks on every supported diffusers family: exactness, skipped blocks, state isolation."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.normalization import AdaLayerNormContinuous, FP32LayerNorm
from tiny_transformers import FAMILIES, build
from torch import nn

from lesa_core import (
    CacheConfig,
    CacheSchedule,
    UnsupportedModelError,
    cache_stats,
    disable_cache,
    enable_cache,
    new_generation,
)
from lesa_core.hooks import BLOCK_ONLY_INPUTS, REPEATED_INPUTS, _fingerprint
from lesa_core.predicted_step import PREDICTED_FORWARD, fast_final_norm

TIMES = [1.0, 0.95, 0.85, 0.7, 0.55, 0.4, 0.25, 0.1]


def run_loop(family, times=TIMES) -> list[torch.Tensor]:
    with torch.no_grad():
        return [family.call(t) for t in times]


def count_block_attention(model: nn.Module) -> list[int]:
    """Count attention calls inside the transformer blocks: a block that computes attends.

    (Not every submodule of a block is block compute: DiT's final layer borrows block 0's
    timestep embedding, which must still run on a predicted step.)
    """
    calls = [0]
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            for module in child.modules():
                if hasattr(module, "processor"):
                    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    assert any(hasattr(m, "processor") for m in model.modules())
    return calls


@pytest.mark.parametrize("name", FAMILIES)
def test_every_step_full_is_bit_exact(name):
    family = build(name)
    reference = run_loop(family)
    enable_cache(family.model, CacheConfig(method="none"))
    new_generation(family.model)
    hooked = run_loop(family)
    disable_cache(family.model)
    after = run_loop(family)
    for ref, out, again in zip(reference, hooked, after, strict=True):
        assert torch.equal(ref, out)
        assert torch.equal(ref, again)


@pytest.mark.parametrize("name", FAMILIES)
def test_predicted_steps_run_no_block_and_apply_final_layer_to_forecast(name):
    family = build(name)
    model = family.model
    schedule = CacheSchedule.from_full_steps(len(TIMES), [0, 1, 4])
    captured: dict[int, torch.Tensor] = {}
    # Count what the embedders compute: wrap their forward before the hooks wrap it in turn.
    names = [n for n, _ in model.named_modules()]
    embedders = [e for e in BLOCK_ONLY_INPUTS.get(type(model).__name__, ()) if e in names]
    embedded: list[str] = []
    for embedder in embedders:
        module = model.get_submodule(embedder)
        module.forward = lambda *a, _f=module.forward, _n=embedder, **k: embedded.append(_n) or _f(*a, **k)
    enable_cache(
        model,
        CacheConfig(
            method="reuse", schedule=schedule, observer=lambda b, step, h, full: captured.__setitem__(step, h.clone())
        ),
    )
    new_generation(model)
    calls = count_block_attention(model)
    outputs, per_step, embedded_per_step = [], [], []
    with torch.no_grad():
        for t in TIMES:
            before = calls[0]
            embedded.clear()
            outputs.append(family.call(t))
            per_step.append(calls[0] - before)
            embedded_per_step.append(sorted(embedded))
    assert cache_stats(model) == {"default": {"full": 3, "predicted": 5}}
    for step, n in enumerate(per_step):
        assert (n > 0) == schedule.is_full(step), f"step {step}: {n} attention calls in blocks"
        # the embedders only the blocks read run on full steps only
        assert embedded_per_step[step] == (sorted(embedders) if schedule.is_full(step) else []), step
    # reuse forecasts the last full step's hidden state ...
    assert torch.equal(captured[2], captured[1]) and torch.equal(captured[7], captured[4])
    disable_cache(model)
    # ... and a predicted step's output is the unhooked final layer applied to that forecast,
    # with the current timestep's conditioning.
    handle = model.norm_out.register_forward_pre_hook(lambda m, args: (captured[1], *args[1:]))
    with torch.no_grad():
        expected = family.call(TIMES[2])
    handle.remove()
    # bit for bit, except that AdaLayerNormContinuous modulates with a fused multiply-add on a
    # predicted step (lesa_core.predicted_step.fast_final_norm), which may round the last bit
    fused = isinstance(model.norm_out, AdaLayerNormContinuous)
    torch.testing.assert_close(outputs[2], expected, rtol=1e-5 if fused else 0, atol=1e-6 if fused else 0)


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_predicted_forward_under_layerwise_casting_gives_the_generic_output(name):
    """diffusers' layerwise casting stores weights in float8 and computes in float32: the weight's
    dtype is not the compute dtype, and the fast path (which read it) failed on FLUX."""
    schedule = CacheSchedule.from_full_steps(len(TIMES), [0, 1, 4])
    outputs = {}
    for shortcut in (False, True):
        family = build(name)
        family.model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        enable_cache(family.model, CacheConfig(method="reuse", schedule=schedule, predicted_forward=shortcut))
        new_generation(family.model)
        outputs[shortcut] = run_loop(family)
    for generic, short in zip(outputs[False], outputs[True], strict=True):
        assert torch.equal(generic, short)


@pytest.mark.parametrize("name", ["flux", "wan"])
@pytest.mark.parametrize("method", ["reuse", "taylorseer"])
def test_predicted_forward_skips_the_model_forward_with_the_same_output(name, method):
    family = build(name)
    model = family.model
    assert type(model).__name__ in PREDICTED_FORWARD
    schedule = CacheSchedule.from_full_steps(len(TIMES), [0, 1, 4])
    # the rotary tables are computed by the model's forward only (its BlockInputHook's cached
    # copy still counts as a call): uncalled means the forward did not run
    rotary = model.get_submodule({"flux": "pos_embed", "wan": "rope"}[name])
    forwards = [0]
    rotary.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    outputs = {}
    for shortcut in (False, True):
        enable_cache(model, CacheConfig(method=method, schedule=schedule, predicted_forward=shortcut))
        new_generation(model)
        forwards[0] = 0
        outputs[shortcut] = run_loop(family)
        assert forwards[0] == (schedule.num_full if shortcut else len(TIMES))
        assert cache_stats(model) == {"default": {"full": 3, "predicted": 5}}
        disable_cache(model)
    for generic, short in zip(outputs[False], outputs[True], strict=True):
        assert torch.equal(generic, short)


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_weightless_timestep_projection_is_computed_once_per_time_across_generations(name):
    family = build(name)
    model = family.model
    projection = model.get_submodule(
        {"flux": "time_text_embed.time_proj", "wan": "condition_embedder.timesteps_proj"}[name]
    )
    assert not list(projection.parameters()) and not list(projection.buffers())
    computed = [0]
    projection.forward = lambda *a, _f=projection.forward, **k: computed.__setitem__(0, computed[0] + 1) or _f(*a, **k)
    reference = run_loop(family)
    computed[0] = 0
    enable_cache(model, CacheConfig(method="none"))
    for _ in range(2):
        new_generation(model)
        outputs = run_loop(family)
        assert all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))
    disable_cache(model)
    enable_cache(model, CacheConfig(method="none"))  # a later request on the same model
    new_generation(model)
    assert all(torch.equal(a, b) for a, b in zip(run_loop(family), reference, strict=True))
    assert computed[0] == len(TIMES)  # once per distinct time, over three generations
    disable_cache(model)


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_embedders_with_repeated_inputs_compute_once_per_distinct_input_and_weights(name):
    family = build(name)
    model = family.model
    assert all(n in dict(model.named_modules()) for n in REPEATED_INPUTS[type(model).__name__] if "guidance" not in n)
    timestep_embedder = {"flux": "time_text_embed.timestep_embedder", "wan": "condition_embedder.time_embedder"}[name]
    module = model.get_submodule(timestep_embedder)
    computed = [0]
    module.forward = lambda *a, _f=module.forward, **k: computed.__setitem__(0, computed[0] + 1) or _f(*a, **k)

    reference = []
    with torch.no_grad():
        for t in TIMES[:4]:
            reference += [family.call(t), family.call(t)]
    computed[0] = 0
    enable_cache(model, CacheConfig(method="none"))
    new_generation(model)
    outputs = []
    with torch.no_grad():
        for t in TIMES[:4]:
            for branch in ("cond", "uncond"):
                with model.cache_context(branch):
                    outputs.append(family.call(t))
    # both CFG branches of a step share one timestep embedding; outputs stay bit for bit the same
    assert computed[0] == 4
    assert all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))
    # a later generation with the same weights computes nothing again
    new_generation(model)
    with torch.no_grad(), model.cache_context("cond"):
        assert torch.equal(family.call(TIMES[0]), reference[0])
    assert computed[0] == 4
    # changed weights (in place through .data, which no version counter sees) empty the memo
    next(module.parameters()).data.mul_(1.5)
    disable_cache(model)
    with torch.no_grad():
        changed = family.call(TIMES[0])
    assert computed[0] == 5 and not torch.equal(changed, reference[0])
    enable_cache(model, CacheConfig(method="none"))
    new_generation(model)
    with torch.no_grad(), model.cache_context("cond"):
        assert torch.equal(family.call(TIMES[0]), changed)
    assert computed[0] == 6
    disable_cache(model)


def test_a_generation_another_thread_breaks_into_fails_loudly_instead_of_mixing_two():
    """Two threads on one model (two pipelines sharing a transformer, no lock): the histories hold
    one generation, so the interrupted one must raise, not finish on the other's state."""
    import threading

    family = build("flux", batch=1)
    schedule = CacheSchedule(6, interval=2, first_enhance=1)
    enable_cache(family.model, CacheConfig(method="taylorseer", schedule=schedule))
    times = torch.linspace(1, 0, 7)
    new_generation(family.model, timesteps=times)
    with torch.no_grad():
        for t in times[:3]:
            family.call(float(t))

        def other_generation(steps: int) -> None:
            new_generation(family.model, timesteps=times)
            for t in times[:steps]:
                family.call(float(t))

        for steps in (2, 6):  # the other generation under way, or ended: this one cannot go on
            other = threading.Thread(target=other_generation, args=(steps,))
            other.start()
            other.join()
            with pytest.raises(RuntimeError, match="started on another thread"):
                family.call(float(times[3]))
        # a generation of its own, started afresh, runs (so does one after a finished one)
        new_generation(family.model, timesteps=times)
        for t in times[:-1]:
            family.call(float(t))
        for t in times[:-1]:  # no new_generation: the finished one's steps start a new one
            family.call(float(t))


def test_the_memo_steps_aside_while_its_embedders_train():
    """Fine-tuning through the hooks (a LoRA on the embedders, say): a memoised output would carry
    the first generation's autograd graph into the second, whose backward then failed."""
    family = build("flux", batch=1)
    enable_cache(family.model, CacheConfig(method="taylorseer", schedule=CacheSchedule(6, interval=2, first_enhance=1)))
    times = torch.linspace(1, 0, 7)
    new_generation(family.model, timesteps=times)
    with torch.inference_mode():  # a served generation first: what it caches must not be inference tensors
        for t in times[:-1]:
            family.call(float(t))
    for _ in range(2):
        new_generation(family.model, timesteps=times)
        with torch.enable_grad():
            loss = sum(family.call(float(t)).square().mean() for t in times[:-1])
            loss.backward()  # the second generation's raised "backward through the graph a second time"
    assert any(p.grad is not None for p in family.model.time_text_embed.parameters())


def test_the_memo_and_the_state_follow_what_the_caller_changes_between_calls():
    family = build("flux")
    model = family.model
    embedder = next(model.get_submodule("time_text_embed.timestep_embedder").parameters())
    schedule = CacheSchedule.from_full_steps(4, [0, 2])

    def plain(t: float) -> torch.Tensor:
        disable_cache(model)
        with torch.no_grad():
            return family.call(t)

    # diffusers pipelines end every call with reset_state (no new_generation): weights changed
    # after it are seen at the next call (the memo gave the old embedding, 0.6 off on digits-image)
    enable_cache(model, CacheConfig(method="reuse", schedule=schedule))
    new_generation(model)
    run_loop(family, TIMES[:4])
    model._reset_stateful_cache()
    embedder.data.mul_(2.0)
    with torch.no_grad():
        hooked = family.call(TIMES[0])
    assert torch.equal(hooked, plain(TIMES[0]))
    # without a schedule nothing marks a generation's end: other shapes start the next (it raised),
    # and weights are looked at on every call
    enable_cache(model, CacheConfig())
    run_loop(family, TIMES[:2])
    small = family.model(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 5, 32),
                         pooled_projections=torch.randn(1, 32), timestep=torch.full((1,), 0.9),
                         img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))  # fmt: skip
    assert small.sample.shape[0] == 1
    embedder.data.mul_(0.5)
    with torch.no_grad():
        hooked = family.call(TIMES[1])
    assert torch.equal(hooked, plain(TIMES[1]))
    # the same inputs under autocast are other outputs (it returned bfloat16 embeddings to a float32 call)
    enable_cache(model, CacheConfig(method="none", schedule=CacheSchedule.every_step(2)))
    new_generation(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        family.call(TIMES[0])
    new_generation(model)
    with torch.no_grad():
        assert torch.equal(family.call(TIMES[0]), plain(TIMES[0]))
    # times on the scheduler's 0..1000 scale are refused (they gave NaN samples)
    enable_cache(model, CacheConfig(method="reuse", schedule=schedule))
    with pytest.raises(ValueError, match="timesteps must be normalised to 1 = noise"):
        new_generation(model, timesteps=[1000.0, 750.0, 500.0, 250.0, 0.0])
    disable_cache(model)


def test_branches_keep_separate_histories_and_generations_do_not_leak():
    family = build("flux")
    model = family.model
    schedule = CacheSchedule.from_full_steps(4, [0, 2])
    seen: list[tuple[str, int, bool]] = []
    enable_cache(
        model,
        CacheConfig(method="reuse", schedule=schedule, observer=lambda b, s, h, full: seen.append((b, s, full))),
    )
    new_generation(model)
    with torch.no_grad():
        for t in TIMES[:4]:
            for branch in ("cond", "uncond"):
                with model.cache_context(branch):
                    family.call(t)
    assert cache_stats(model) == {
        "cond": {"full": 2, "predicted": 2},
        "uncond": {"full": 2, "predicted": 2},
    }
    assert [s for b, s, _ in seen if b == "uncond"] == [0, 1, 2, 3]
    # A second generation at another batch size starts clean instead of failing on stale shapes.
    new_generation(model)
    assert cache_stats(model) == {}
    small = build("flux", batch=1)
    small.model.load_state_dict(model.state_dict())
    enable_cache(small.model, CacheConfig(method="reuse", schedule=schedule))
    new_generation(small.model)
    with torch.no_grad():
        for t in TIMES[:4]:
            small.call(t)
    assert cache_stats(small.model) == {"default": {"full": 2, "predicted": 2}}


def test_shape_change_inside_a_generation_is_a_clear_error():
    family = build("flux")
    enable_cache(family.model, CacheConfig(method="reuse", schedule=CacheSchedule.from_full_steps(4, [0, 2])))
    new_generation(family.model)
    with torch.no_grad():
        family.call(1.0)
        # the same hooked model called with a batch of 1 inside the batch-of-2 generation
        with pytest.raises(RuntimeError, match="new_generation"):
            family.model(
                hidden_states=torch.randn(1, 16, 4),
                encoder_hidden_states=torch.randn(1, 5, 32),
                pooled_projections=torch.randn(1, 32),
                timestep=torch.full((1,), 0.9),
                img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(5, 3),
            )


def test_unsupported_model_names_what_is_missing():
    with pytest.raises(UnsupportedModelError, match="norm_out"):
        enable_cache(nn.Sequential(nn.Linear(2, 2)), CacheConfig())
    model = build("flux").model
    with pytest.raises(UnsupportedModelError, match=r"torch.compile's wrapper: .*model._orig_mod"):
        enable_cache(torch.compile(model), CacheConfig())
    # a config refused leaves the cache that was there working (it was removed first)
    from lesa_core.hooks import is_cache_enabled

    enable_cache(model, CacheConfig(method="reuse", schedule=CacheSchedule.from_full_steps(4, [0, 2])))
    with pytest.raises(ValueError, match="needs a schedule"):
        enable_cache(model, CacheConfig(method="reuse"))
    assert is_cache_enabled(model)
    disable_cache(model)


def test_lesa_without_timesteps_says_how_to_fix(tmp_path):
    from lesa_core import PredictorConfig, StagePredictor

    family = build("flux")
    schedule = CacheSchedule.from_full_steps(4, [0, 2])
    predictor = StagePredictor(PredictorConfig(schedule=schedule.to_dict(), kan_hidden=(8,)))
    enable_cache(family.model, CacheConfig(method="lesa", schedule=schedule, predictor=predictor))
    new_generation(family.model)
    with torch.no_grad(), pytest.raises(RuntimeError, match="timesteps"):
        run_loop(family, TIMES[:2])
    new_generation(family.model, timesteps=TIMES[:4])  # num_steps values: the final 0 is appended
    run_loop(family, TIMES[:4])
    assert cache_stats(family.model) == {"default": {"full": 2, "predicted": 2}}
    with pytest.raises(ValueError, match="needs 5 values"):
        new_generation(family.model, timesteps=TIMES)


def test_fast_final_norm_matches_each_norm_it_covers_and_declines_the_rest():
    torch.manual_seed(0)
    x, conditioning = torch.randn(2, 5, 16) * 3 + 1, torch.randn(2, 8)
    exact = [nn.LayerNorm(16, elementwise_affine=False, eps=1e-6), nn.LayerNorm(16), FP32LayerNorm(16, 1e-6, False)]
    for norm in exact:
        assert torch.equal(fast_final_norm(norm, x), norm(x))
    ada = AdaLayerNormContinuous(16, 8, elementwise_affine=False, eps=1e-6)
    torch.testing.assert_close(fast_final_norm(ada, x, conditioning), ada(x, conditioning), rtol=1e-5, atol=1e-6)
    rms = AdaLayerNormContinuous(16, 8, elementwise_affine=False, eps=1e-6, norm_type="rms_norm")
    assert fast_final_norm(rms, x, conditioning) is None
    assert fast_final_norm(nn.Identity(), x) is None
    # a plain Linear is called as a function; one with a hook (LoRA, a user's hook) as the module
    ada.linear.register_forward_hook(lambda module, args, output: output * 2)
    torch.testing.assert_close(fast_final_norm(ada, x, conditioning), ada(x, conditioning), rtol=1e-5, atol=1e-6)


def test_memo_keys_compare_values_whatever_the_layout_or_dtype():
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert _fingerprint((values.t(),), {}) == _fingerprint((values.t().contiguous(),), {})
    assert _fingerprint((values,), {}) != _fingerprint((values.t().contiguous(),), {})  # same bytes, other shape
    changed = values.clone()
    changed[2, 3] += 1
    assert _fingerprint((values,), {}) != _fingerprint((changed,), {})
    half = values.to(torch.bfloat16)  # numpy has no bfloat16: compared as raw bytes
    assert _fingerprint((half,), {}) == _fingerprint((half.clone(),), {}) != _fingerprint((values,), {})
    scalar = torch.tensor(0.5).expand(4)  # stride 0
    assert _fingerprint((scalar,), {}) == _fingerprint((torch.full((4,), 0.5),), {})
    assert _fingerprint((values,), {"scale": [1]}) is None  # unhashable: not memoised
