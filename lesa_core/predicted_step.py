"""A predicted step without the transformer's forward: only what follows the blocks.

On a predicted step the hooks make every block return its inputs, so the transformer's own
forward computes nothing that reaches its output except the timestep embedding and the final
layer. It still walks every embedder, rotary table and block in Python, which on a small model
or a fast accelerator costs more than the final layer itself: the realised speed-up falls short
of the theoretical one. For the families below, the model hook calls only the submodules whose
output reaches the sample, in the order the family's forward calls them (read off diffusers
0.42). `tests/test_hooks.py` pins each against the full forward with skipped blocks.

Each function takes the transformer and the keyword arguments of its forward and returns the
forward's output, or None when the call uses an option it does not cover (positional
arguments, LoRA scales, controlnet residuals, per-token timesteps): the hook then runs the
model's forward, with skipped blocks, as for any other family.

The final layer is called with a placeholder of the shape the blocks would hand it: its hook
replaces it with the forecast, and checks the shape against the generation's.

`fast_final_norm` is the final layer's norm on a predicted step (every family, either path): the
same math as the module's forward with faster CPU kernels, because on a predicted step the norm
is most of what is left to compute.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import AdaLayerNormContinuous, FP32LayerNorm
from torch import nn

PredictedForward = Callable[..., Any]


def _hidden_size(model: nn.Module) -> int:
    return int(model.config.num_attention_heads) * int(model.config.attention_head_dim)


# Weight dtypes that are also the dtype the model computes in. Under diffusers' layerwise casting
# (float8 storage) or a quantized model they are not, and the fast path declines (the generic
# forward runs); it cannot tell the compute dtype without running the embedder.
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _wrap(output: torch.Tensor, return_dict: bool) -> Any:
    return Transformer2DModelOutput(sample=output) if return_dict else (output,)


def flux_predicted_forward(
    model: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    pooled_projections: torch.Tensor | None = None,
    timestep: torch.Tensor | None = None,
    img_ids: torch.Tensor | None = None,
    txt_ids: torch.Tensor | None = None,
    guidance: torch.Tensor | None = None,
    joint_attention_kwargs: dict | None = None,
    controlnet_block_samples: Any = None,
    controlnet_single_block_samples: Any = None,
    return_dict: bool = True,
    controlnet_blocks_repeat: bool = False,
) -> Any:
    if joint_attention_kwargs or controlnet_block_samples is not None or controlnet_single_block_samples is not None:
        return None
    dtype = model.x_embedder.weight.dtype  # the dtype the embedded hidden states would have ...
    if dtype not in COMPUTE_DTYPES:  # ... unless stored in another (layerwise casting, quantized)
        return None
    timestep = timestep.to(dtype) * 1000
    if guidance is None:
        temb = model.time_text_embed(timestep, pooled_projections)
    else:
        temb = model.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled_projections)
    batch, tokens = hidden_states.shape[:2]
    placeholder = hidden_states.new_empty((batch, tokens, _hidden_size(model)), dtype=dtype)
    return _wrap(_linear(model.proj_out, model.norm_out(placeholder, temb)), return_dict)


def wan_predicted_forward(
    model: nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_hidden_states_image: torch.Tensor | None = None,
    return_dict: bool = True,
    attention_kwargs: dict | None = None,
) -> Any:
    if attention_kwargs or timestep.ndim != 1:
        return None
    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = model.config.patch_size
    frames, height, width = frames // p_t, height // p_h, width // p_w
    temb, _, _, _ = model.condition_embedder(timestep, encoder_hidden_states, encoder_hidden_states_image)
    shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    dtype = model.patch_embedding.weight.dtype
    if dtype not in COMPUTE_DTYPES:  # stored in another dtype than it computes in (see FLUX's)
        return None
    placeholder = hidden_states.new_empty((batch, frames * height * width, _hidden_size(model)), dtype=dtype)
    shift, scale = shift.to(placeholder.device), scale.to(placeholder.device)
    hidden = (model.norm_out(placeholder.float()) * (1 + scale) + shift).type_as(placeholder)
    hidden = _linear(model.proj_out, hidden)
    hidden = hidden.reshape(batch, frames, height, width, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return _wrap(hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3), return_dict)


PREDICTED_FORWARD: dict[str, PredictedForward] = {
    "FluxTransformer2DModel": flux_predicted_forward,
    "WanTransformer3DModel": wan_predicted_forward,
}


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`. A plain nn.Linear without hooks is called as a function: on a small model a
    module call costs as much as the matmul. Anything else (LoRA, 8-bit, hooked) as a module."""
    plain = (
        type(layer) is nn.Linear
        and "forward" not in vars(layer)  # diffusers' hooks replace the instance's forward
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
    )
    return F.linear(x, layer.weight, layer.bias) if plain else layer(x)


@functools.lru_cache(maxsize=16)
def _unit_affine(size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Normal tensors even when an inference-mode run fills the cache: an inference tensor cannot
    # take part in a later generation under autograd (training through the hooks).
    with torch.inference_mode(False):
        return torch.ones(size, dtype=dtype, device=device), torch.zeros(size, dtype=dtype, device=device)


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)`, bit for bit. torch's CPU kernel is ~1.5x faster given a weight and a bias than
    without them, so a norm without an affine gets ones and zeros (the same numbers)."""
    weight, bias = norm.weight, norm.bias
    if weight is None or bias is None:
        ones, zeros = _unit_affine(x.shape[-1], x.dtype, x.device)
        weight = ones if weight is None else weight
        bias = zeros if bias is None else bias
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


def fast_final_norm(module: nn.Module, *args: torch.Tensor) -> torch.Tensor | None:
    """The final layer's norm applied to a predicted step's forecast, faster; None if not covered.

    LayerNorm (FP32LayerNorm: DiT, PixArt, Wan) bit for bit; AdaLayerNormContinuous with a
    LayerNorm (FLUX, Qwen-Image, HunyuanVideo) modulates with one fused multiply-add instead of a
    multiply and an add, which can round the last bit differently.
    """
    if isinstance(module, FP32LayerNorm) and len(args) == 1:
        return _layer_norm(module, args[0].float()).to(args[0].dtype)
    if type(module) is nn.LayerNorm and len(args) == 1:
        return _layer_norm(module, args[0])
    if isinstance(module, AdaLayerNormContinuous) and isinstance(module.norm, nn.LayerNorm) and len(args) == 2:
        x, conditioning = args
        activated = (F.silu(conditioning) if type(module.silu) is nn.SiLU else module.silu(conditioning)).to(x.dtype)
        emb = _linear(module.linear, activated)
        scale, shift = emb[:, None, :].chunk(2, dim=2)
        return torch.addcmul(shift, _layer_norm(module.norm, x), scale + 1)
    return None
