"""Attach a forecaster and a schedule to a diffusers transformer, without editing its code.

Five kinds of hooks, registered with diffusers' own `HookRegistry`:

* on the transformer: counts denoising calls per CFG branch and decides, from the schedule,
  whether this call is a full or a predicted step; on a predicted step of FLUX or Wan it calls
  only the timestep embedding and the final layer instead of the model's forward
  (`lesa_core/predicted_step.py`), and the hooks below then matter for the final layer alone;
* on every transformer block: on a predicted step the block returns its inputs untouched, so
  no block computes anything;
* on the final layer (`norm_out`): on a full step it records the incoming hidden state; on a
  predicted step it replaces that input with the forecast. The final layer then runs with the
  current timestep's conditioning, as the method requires (its norm with faster kernels:
  `fast_final_norm` in `lesa_core/predicted_step.py`);
* on the embedders whose output only the blocks read (patch/text embedders, rotary tables; see
  `BLOCK_ONLY_INPUTS`): on a predicted step they are skipped too and hand the skipped blocks
  their last full step's output, whose values nothing reads. The timestep embedding still runs;
* on the embedders whose inputs repeat (`REPEATED_INPUTS`: the timestep embedding, the same for
  both CFG branches of a step and for every request on the same schedule; the pooled-text
  projection, the same for every step of a branch): a call whose inputs equal an earlier call's
  returns that call's output, for as long as the embedder's weights are unchanged.
  On a predicted step these embedders and the final layer are all that still computes.

State lives in a diffusers `StateManager`, keyed by the `cache_context` name ("cond",
"uncond"; "default" for models without contexts), and is wiped by `new_generation`: nothing
but those embedders' outputs survives from one request to the next.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

from lesa_core.forecasters import BranchHistory, ForecastContext, Forecaster, make_forecaster
from lesa_core.predicted_step import PREDICTED_FORWARD, PredictedForward, fast_final_norm
from lesa_core.predictor import StagePredictor
from lesa_core.schedule import CacheSchedule

logger = logging.getLogger(__name__)

MODEL_HOOK = "lesa_model"
BLOCK_HOOK = "lesa_block"
FINAL_LAYER_HOOK = "lesa_final_layer"
BLOCK_INPUT_HOOK = "lesa_block_input"
FINAL_LAYER_NAME = "norm_out"
# Per family, the submodules of the transformer whose outputs feed the blocks and nothing else
# (read off each family's forward in diffusers 0.42). Families not listed keep their embedders.
# Wan's condition_embedder also makes the final layer's temb, so only its block-only parts are here.
BLOCK_ONLY_INPUTS: dict[str, tuple[str, ...]] = {
    "DiTTransformer2DModel": ("pos_embed",),
    "PixArtTransformer2DModel": ("pos_embed", "caption_projection"),
    "FluxTransformer2DModel": ("x_embedder", "context_embedder", "pos_embed"),
    "QwenImageTransformer2DModel": ("img_in", "txt_norm", "txt_in", "pos_embed"),
    "WanTransformer3DModel": (
        "patch_embedding",
        "rope",
        "condition_embedder.time_proj",
        "condition_embedder.text_embedder",
        "condition_embedder.image_embedder",
    ),
    "HunyuanVideoTransformer3DModel": ("x_embedder", "context_embedder", "rope"),
}
# Per family, the submodules whose inputs repeat within a generation (read off diffusers 0.42;
# each returns a fresh tensor that its caller does not modify in place).
REPEATED_INPUTS: dict[str, tuple[str, ...]] = {
    "FluxTransformer2DModel": (
        "time_text_embed.time_proj",
        "time_text_embed.timestep_embedder",
        "time_text_embed.guidance_embedder",
        "time_text_embed.text_embedder",
    ),
    "WanTransformer3DModel": ("condition_embedder.timesteps_proj", "condition_embedder.time_embedder"),
}
REPEATED_INPUT_HOOK = "lesa_repeated_input"
MEMO_SIZE = 1024  # per embedder: every time of a few schedules and batch sizes, the recent prompts
MEMO_MAX_NUMEL = 1 << 16  # inputs larger than this are not worth hashing
MEMO_MAX_WEIGHT_BYTES = 64 << 20  # an embedder with more weights keeps no copy: its memo lasts one generation


@dataclass
class _Memo:
    """One embedder's outputs by input, valid while its weights equal `weights` (checked once per
    generation: weights never change inside one, and outputs never outlive the weights that made them)."""

    outputs: OrderedDict = field(default_factory=OrderedDict)
    weights: list[torch.Tensor] | None = None
    checked: object = None  # the generation that last compared the weights


# embedder -> its memo across generations (dropped with the model)
_MEMOS: weakref.WeakKeyDictionary[nn.Module, _Memo] = weakref.WeakKeyDictionary()
DEFAULT_BRANCH = "default"

# An observer sees every hidden state entering the final layer: (branch, step, hidden, full).
Observer = Callable[[str, int, torch.Tensor, bool], None]


class UnsupportedModelError(ValueError):
    """The transformer lacks what the hooks need (registered blocks, a `norm_out` final layer)."""


@dataclass
class CacheConfig:
    """What to attach: a method, the schedule it follows, and (for LESA) the trained predictor.

    `method` is one of "none", "reuse", "taylorseer" (with `taylor_order` 1 or 2), "lesa".
    With no schedule, "none" runs every step in full; the others require one.
    """

    method: str = "none"
    schedule: CacheSchedule | None = None
    predictor: StagePredictor | None = None
    taylor_order: int = 1
    observer: Observer | None = field(default=None, repr=False)
    # Predicted steps of the families in `PREDICTED_FORWARD` call only the submodules after the
    # blocks; False runs the model's own forward with skipped blocks (same output, slower).
    predicted_forward: bool = True


class _BranchState(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.step = 0
        self.memory = BranchHistory()
        self.full = 0
        self.predicted = 0
        self.shape: torch.Size | None = None
        self.block_inputs: dict[str, tuple] = {}  # embedder -> (input shapes, output) of the last full step


class _BranchStateManager(StateManager):
    """diffusers' StateManager, falling back to one default branch for models without contexts."""

    def get_state(self) -> _BranchState:
        if self._context is None:
            self._state_cache.setdefault(DEFAULT_BRANCH, _BranchState())
            return self._state_cache[DEFAULT_BRANCH]
        return super().get_state()

    @property
    def branch(self) -> str:
        return DEFAULT_BRANCH if self._context is None else self._context.name

    def states(self) -> dict[str, _BranchState]:
        return dict(self._state_cache)


class _Session:
    """Shared by the three hook kinds of one model: the plan, the forecaster, the current step."""

    def __init__(self, config: CacheConfig, forecaster: Forecaster, schedule: CacheSchedule | None) -> None:
        self.config = config
        self.forecaster = forecaster
        self.schedule = schedule
        self.timesteps: torch.Tensor | None = None
        self.states = _BranchStateManager(_BranchState)
        self.predicting = False  # True while a predicted step's forward runs
        self.current: _BranchState | None = None
        self.generation = object()  # a new token per generation: RepeatedInputHook checks weights once per token
        # The thread whose generation runs: one model's histories hold one generation, so another
        # thread's forwards in the middle of it would mix two (see LesaModelHook.pre_forward).
        self.owner: int | None = None
        # every (registry, hook name) enable_cache added, so disable_cache need not walk the model
        self.registered: list[tuple[HookRegistry, str]] = []


class LesaModelHook(ModelHook):
    _is_stateful = True

    def __init__(self, session: _Session, predicted_forward: PredictedForward | None = None) -> None:
        super().__init__()
        self.session = session
        self.state_manager = session.states  # found by diffusers' cache_context machinery
        self.predicted_forward = predicted_forward

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        session = self.session
        state = session.states.get_state()
        schedule = session.schedule
        if schedule is not None and session.owner not in (None, threading.get_ident()):
            # (also when the other thread's generation has ended: this thread's own, begun before
            # it, would go on from the other's last step)
            raise RuntimeError(
                "this model's LESA cache holds a generation started on another thread: run one "
                "generation at a time per model (a lock around the pipeline call, as the project's "
                "pipelines hold), each begun with lesa_core.new_generation() on its own thread"
            )
        if schedule is not None and state.step >= schedule.num_steps:
            # A new generation began without new_generation(): start this branch afresh.
            state.reset()
            session.generation = object()
        session.current = state
        session.predicting = schedule is not None and not schedule.is_full(state.step)
        return args, kwargs

    def new_forward(self, module: nn.Module, *args, **kwargs):
        if self.session.predicting and self.predicted_forward is not None and not args:
            output = self.predicted_forward(module, **kwargs)
            if output is not None:
                return output
        return self.fn_ref.original_forward(*args, **kwargs)

    def post_forward(self, module: nn.Module, output):
        session = self.session
        state = session.current
        if session.predicting:
            state.predicted += 1
        else:
            state.full += 1
        state.step += 1
        session.predicting = False
        session.current = None
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        # what every diffusers pipeline call ends with: the next call is another generation, and
        # RepeatedInputHook must look at the weights again (they may have changed in between)
        self.session.states.reset()
        self.session.generation = object()
        return module


class BlockSkipHook(ModelHook):
    """On a predicted step, return the block's inputs as its outputs: the block does no work."""

    def __init__(self, session: _Session, metadata) -> None:
        super().__init__()
        self.session = session
        self.metadata = metadata

    def new_forward(self, module: nn.Module, *args, **kwargs):
        if not self.session.predicting:
            return self.fn_ref.original_forward(*args, **kwargs)
        meta = self.metadata
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        if meta.return_encoder_hidden_states_index is None:
            return hidden
        encoder = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
        outputs = [None, None]
        outputs[meta.return_hidden_states_index] = hidden
        outputs[meta.return_encoder_hidden_states_index] = encoder
        return tuple(outputs)


class BlockInputHook(ModelHook):
    """On a predicted step, skip an embedder that only the (skipped) blocks read.

    The blocks still receive arguments of the right shapes: the embedder's output from this
    branch's last full step. Step 0 is always full, so a predicted step always finds one.
    """

    def __init__(self, session: _Session, name: str) -> None:
        super().__init__()
        self.session = session
        self.name = name

    def new_forward(self, module: nn.Module, *args, **kwargs):
        state = self.session.current
        if state is None:  # called outside a denoising forward
            return self.fn_ref.original_forward(*args, **kwargs)
        # Inputs of other shapes (a call that does not belong to this generation) are computed, so
        # the final layer's shape check still sees them and says so.
        shapes = _shapes(args, kwargs)
        cached = state.block_inputs.get(self.name)
        if self.session.predicting and cached is not None and cached[0] == shapes:
            return cached[1]
        output = self.fn_ref.original_forward(*args, **kwargs)
        state.block_inputs[self.name] = (shapes, output)
        return output


class RepeatedInputHook(ModelHook):
    """Return an earlier call's output when this call's inputs equal that call's (small CPU inputs).

    Inputs are compared by value (their bytes are copied into the key, so a caller reusing an
    input buffer cannot fool it). The memo outlives generations, so a server computes each
    schedule time's timestep embedding once, not once per step of every request: at the first call
    of each generation the embedder's weights are compared with a copy kept from when the memo was
    filled, and any difference (a fine-tune, a LoRA, a reload) empties it.
    """

    def __init__(self, session: _Session, module: nn.Module) -> None:
        super().__init__()
        self.session = session
        self.memo = _MEMOS.setdefault(module, _Memo())

    def new_forward(self, module: nn.Module, *args, **kwargs):
        if self.session.current is None:  # called outside a denoising forward
            return self.fn_ref.original_forward(*args, **kwargs)
        key = _fingerprint(args, kwargs)
        if key is None:
            # accelerator or large inputs: reading them back to compare would make the host wait
            # for the device, which costs more than the few small kernels the memo could save
            return self.fn_ref.original_forward(*args, **kwargs)
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            # training the embedder: each call needs its own graph (a kept output holds an old one)
            return self.fn_ref.original_forward(*args, **kwargs)
        memo = self.memo
        # without a schedule no step count marks where a generation ends: look at every call
        if memo.checked is not self.session.generation or self.session.schedule is None:
            _check_weights(memo, module)
            memo.checked = self.session.generation
        output = memo.outputs.get(key)
        if output is not None and not torch.is_inference_mode_enabled() and _holds_inference_tensors(output):
            output = None  # kept from a run under torch.inference_mode: unusable by autograd here
        if output is None:
            output = memo.outputs[key] = self.fn_ref.original_forward(*args, **kwargs)
            while len(memo.outputs) > MEMO_SIZE:
                memo.outputs.popitem(last=False)
        return output


def _holds_inference_tensors(output: object) -> bool:
    """Whether a kept output holds inference tensors (made under torch.inference_mode)."""
    parts = output if isinstance(output, tuple | list) else (output,)
    return any(isinstance(part, torch.Tensor) and part.is_inference() for part in parts)


def _check_weights(memo: _Memo, module: nn.Module) -> None:
    """Empty `memo` unless `module`'s weights are still those its outputs were computed with."""
    current = [*module.parameters(), *module.buffers()]
    kept = memo.weights
    same = kept is not None and len(kept) == len(current)
    same = same and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(kept, current, strict=True)
    )
    if not same:
        memo.outputs.clear()
        if sum(t.numel() * t.element_size() for t in current) <= MEMO_MAX_WEIGHT_BYTES:
            memo.weights = [t.detach().clone() for t in current]
        else:  # too large to copy: the memo lasts this generation only
            memo.weights = None


def _fingerprint(args: tuple, kwargs: dict) -> tuple | None:
    """A hashable copy of the inputs' values, or None where comparing them is not worth it."""
    # the same inputs give other outputs under autocast (bfloat16 matmuls): part of the key
    key: list[object] = [tuple(kwargs), torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu" or value.numel() > MEMO_MAX_NUMEL:
                return None
            try:  # numpy copies any strides out in C order, in one call (a predicted step makes three)
                data = value.detach().numpy().tobytes()
            except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16), a conjugate view
                flat = value.detach().contiguous().reshape(-1)
                if flat.numel() == 1:  # an expanded scalar keeps stride 0, which a byte view refuses
                    flat = flat.as_strided((1,), (1,))
                data = flat.view(torch.uint8).numpy().tobytes()
            key.append((value.dtype, tuple(value.shape), data))
        else:
            try:
                hash(value)
            except TypeError:
                return None
            key.append(value)
    return tuple(key)


def _shapes(args: tuple, kwargs: dict) -> tuple:
    values = (*args, *kwargs.values())
    return tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in values)


class FinalLayerHook(ModelHook):
    """Record the final layer's input on full steps; substitute the forecast on predicted ones."""

    def __init__(self, session: _Session) -> None:
        super().__init__()
        self.session = session

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        session = self.session
        state = session.current
        if state is None:  # final layer called outside a denoising forward: leave it alone
            return args, kwargs
        branch = session.states.branch
        hidden = args[0]
        if state.shape is not None and hidden.shape != state.shape and session.schedule is None:
            # nothing is ever predicted without a schedule, so no step count ends a generation:
            # other shapes are the next one
            state.reset()
        if state.shape is None:
            state.shape = hidden.shape
        elif hidden.shape != state.shape:
            raise RuntimeError(
                f"cache state for branch {branch!r} holds hidden states of shape {tuple(state.shape)} but this "
                f"call has {tuple(hidden.shape)}: call lesa_core.new_generation(model, ...) between generations"
            )
        if session.predicting:
            hidden = session.forecaster.forecast(
                state.memory, state.step, ForecastContext(branch=branch, timesteps=session.timesteps)
            )
            args = (hidden, *args[1:])
        session.forecaster.observe(state.memory, state.step, hidden, full=not session.predicting)
        if session.config.observer is not None:
            session.config.observer(branch, state.step, hidden, not session.predicting)
        return args, kwargs

    def new_forward(self, module: nn.Module, *args, **kwargs):
        # On a predicted step the norm is most of the compute left: use the faster equivalent.
        if self.session.predicting and not kwargs:
            output = fast_final_norm(module, *args)
            if output is not None:
                return output
        return self.fn_ref.original_forward(*args, **kwargs)


def _hidden_size(model: nn.Module) -> int | None:
    """Channels of the hidden state the final layer reads (heads x head width in diffusers' DiTs)."""
    config = getattr(model, "config", None)
    heads, width = getattr(config, "num_attention_heads", None), getattr(config, "attention_head_dim", None)
    return heads * width if isinstance(heads, int) and isinstance(width, int) else None


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, object]]:
    blocks = []
    for name, child in model.named_children():
        if not isinstance(child, nn.ModuleList):
            continue
        for index, block in enumerate(child):
            try:
                metadata = TransformerBlockRegistry.get(type(block))
            except ValueError:
                continue
            blocks.append((f"{name}.{index}", block, metadata))
    return blocks


def enable_cache(model: nn.Module, config: CacheConfig) -> None:
    """Attach `config`'s method and schedule to a diffusers transformer (replacing any earlier one)."""
    blocks = _find_blocks(model)
    final_layer = getattr(model, FINAL_LAYER_NAME, None)
    missing = []
    if not blocks:
        missing.append("transformer blocks registered in diffusers' TransformerBlockRegistry")
    if not isinstance(final_layer, nn.Module):
        missing.append(f"a final layer named `{FINAL_LAYER_NAME}`")
    if missing:
        hint = ""
        if hasattr(model, "_orig_mod"):  # torch.compile's wrapper hides the model's own structure
            hint = "; it is torch.compile's wrapper: attach the cache to the model itself (`model._orig_mod`)"
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: it has no {' and no '.join(missing)}{hint}"
        )
    schedule = config.schedule
    if schedule is None and config.method != "none":
        raise ValueError(f"method {config.method!r} needs a schedule (CacheSchedule or a level)")
    if config.method == "none" and schedule is not None and schedule.num_full != schedule.num_steps:
        raise ValueError("method 'none' runs every step in full; give no schedule or CacheSchedule.every_step")
    if config.method == "lesa" and config.predictor is not None and schedule is not None:
        # A bundle trained on another family or width must not run here, even when the shapes it
        # would see happen to fit (an image model's bundle on a video model of the same width).
        config.predictor.check_compatible(schedule, family=type(model).__name__, hidden_size=_hidden_size(model))
    forecaster = make_forecaster(config.method, config.predictor, config.taylor_order)
    if is_cache_enabled(model):  # only now: a config refused above leaves the earlier cache working
        disable_cache(model)
    session = _Session(config, forecaster, schedule)

    def register(module: nn.Module, hook: ModelHook, name: str) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, name)
        session.registered.append((registry, name))

    family = type(model).__name__
    register(
        model, LesaModelHook(session, PREDICTED_FORWARD.get(family) if config.predicted_forward else None), MODEL_HOOK
    )
    for _, block, metadata in blocks:
        register(block, BlockSkipHook(session, metadata), BLOCK_HOOK)
    register(final_layer, FinalLayerHook(session), FINAL_LAYER_HOOK)
    for names, make_hook, hook_name in (
        (BLOCK_ONLY_INPUTS, lambda name, module: BlockInputHook(session, name), BLOCK_INPUT_HOOK),
        (REPEATED_INPUTS, lambda name, module: RepeatedInputHook(session, module), REPEATED_INPUT_HOOK),
    ):
        for name in names.get(family, ()):
            try:
                embedder = model.get_submodule(name)
            except AttributeError:  # e.g. Wan without an image embedder, FLUX without guidance
                continue
            if isinstance(embedder, nn.Module):
                register(embedder, make_hook(name, embedder), hook_name)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


def disable_cache(model: nn.Module) -> None:
    """Remove every LESA hook; the model computes exactly as before `enable_cache`."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None:
        return
    hook = registry.get_hook(MODEL_HOOK)
    if hook is None:  # enable_cache registers the model hook first: without it there is nothing of ours
        return
    for module_registry, name in reversed(hook.session.registered):
        module_registry.remove_hook(name, recurse=False)
    registry.invalidate_child_registries_cache()


def _session(model: nn.Module) -> _Session:
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(MODEL_HOOK) if registry is not None else None
    if hook is None:
        raise RuntimeError("no LESA cache is enabled on this model: call lesa_core.enable_cache(model, config) first")
    return hook.session


def is_cache_enabled(model: nn.Module) -> bool:
    registry = getattr(model, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(MODEL_HOOK) is not None


def new_generation(model: nn.Module, timesteps: Sequence[float] | torch.Tensor | None = None) -> None:
    """Start a generation: wipe every branch's history and set the schedule's normalised times.

    `timesteps` are the sampler's times normalised to 1 = noise, 0 = clean (flow-matching sigmas,
    or t / 1000), one per step plus the final one (num_steps + 1 values); a list of num_steps
    values gets the final 0 appended. LESA needs them; the training-free methods do not.
    """
    session = _session(model)
    session.states.reset()
    session.generation = object()
    session.owner = threading.get_ident()
    if timesteps is None:
        session.timesteps = None
        return
    # a copy: forecasts keyed on these times must not change if the caller reuses its tensor
    times = torch.as_tensor(timesteps, dtype=torch.float32).detach().cpu().reshape(-1).clone()
    if times.numel() and not (torch.isfinite(times).all() and times.min() >= 0 and times.max() <= 1 + 1e-4):
        # scheduler.timesteps (0..1000) passed as they are gave NaN samples, not an error
        raise ValueError(
            f"timesteps must be normalised to 1 = noise ... 0 = clean; got {times.min():g} .. {times.max():g} "
            "(pass the flow-matching sigmas, or scheduler.timesteps / 1000)"
        )
    schedule = session.schedule
    if schedule is not None:
        if times.numel() == schedule.num_steps:
            times = torch.cat([times, times.new_zeros(1)])
        if times.numel() != schedule.num_steps + 1:
            raise ValueError(
                f"the schedule has {schedule.num_steps} steps, so timesteps needs {schedule.num_steps + 1} "
                f"values; got {times.numel()}"
            )
    session.timesteps = times


def cache_stats(model: nn.Module) -> dict[str, dict[str, int]]:
    """Full and predicted step counts per CFG branch for the current generation."""
    return {
        branch: {"full": state.full, "predicted": state.predicted}
        for branch, state in _session(model).states.states().items()
    }
