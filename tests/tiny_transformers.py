"""Tiny random diffusers transformers of every supported family, with inputs for one call.

Built inside the tests (no downloads). `call(step_time)` runs one denoising forward at the
given normalised time and returns the model's output tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    WanTransformer3DModel,
)


@dataclass
class TinyFamily:
    name: str
    model: torch.nn.Module
    call: Callable[[float], torch.Tensor]  # normalised time in [0, 1] -> output


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(name: str, batch: int = 2) -> TinyFamily:
    torch.manual_seed(0)
    g = _gen(1)
    if name == "flux":
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
        )
        x, txt, pooled = torch.randn(batch, 16, 4, generator=g), torch.randn(batch, 5, 32, generator=g), None
        pooled = torch.randn(batch, 32, generator=g)
        img_ids, txt_ids = torch.randn(16, 3, generator=g), torch.zeros(5, 3)

        def call(t: float) -> torch.Tensor:
            return model(
                hidden_states=x,
                encoder_hidden_states=txt,
                pooled_projections=pooled,
                timestep=torch.full((batch,), t),  # Flux pipelines pass sigma in [0, 1]
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]

    elif name == "qwenimage":
        model = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=3,
            joint_attention_dim=16,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        )
        x, txt = torch.randn(batch, 16, 16, generator=g), torch.randn(batch, 7, 16, generator=g)
        mask = torch.ones(batch, 7, dtype=torch.long)

        def call(t: float) -> torch.Tensor:
            return model(
                hidden_states=x,
                encoder_hidden_states=txt,
                encoder_hidden_states_mask=mask,
                timestep=torch.full((batch,), t),
                img_shapes=[(1, 4, 4)] * batch,
                return_dict=False,
            )[0]

    elif name == "wan":
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        x, txt = torch.randn(batch, 4, 2, 8, 8, generator=g), torch.randn(batch, 6, 16, generator=g)

        def call(t: float) -> torch.Tensor:
            return model(
                hidden_states=x, encoder_hidden_states=txt, timestep=torch.full((batch,), t * 1000), return_dict=False
            )[0]

    elif name == "hunyuanvideo":
        model = HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4),
        )
        x = torch.randn(batch, 4, 2, 4, 4, generator=g)
        txt, pooled = torch.randn(batch, 6, 16, generator=g), torch.randn(batch, 8, generator=g)
        mask = torch.ones(batch, 6, dtype=torch.long)

        def call(t: float) -> torch.Tensor:
            return model(
                hidden_states=x,
                timestep=torch.full((batch,), t * 1000),
                encoder_hidden_states=txt,
                encoder_attention_mask=mask,
                pooled_projections=pooled,
                guidance=torch.full((batch,), 3000.0),
                return_dict=False,
            )[0]

    elif name == "dit":
        model = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            norm_num_groups=4,
        )
        x, labels = torch.randn(batch, 4, 8, 8, generator=g), torch.arange(batch)

        def call(t: float) -> torch.Tensor:
            return model(
                hidden_states=x, timestep=torch.full((batch,), t * 1000), class_labels=labels, return_dict=False
            )[0]

    elif name == "pixart":
        model = PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=24,
            out_channels=8,
            norm_num_groups=4,
        )
        x, txt = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 5, 32, generator=g)

        def call(t: float) -> torch.Tensor:
            return model(
                hidden_states=x,
                encoder_hidden_states=txt,
                timestep=torch.full((batch,), t * 1000),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0]

    else:
        raise ValueError(name)
    model.eval()
    return TinyFamily(name, model, call)


FAMILIES = ["dit", "pixart", "flux", "qwenimage", "wan", "hunyuanvideo"]
