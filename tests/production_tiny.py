"""Tiny random FluxPipeline, QwenImagePipeline, WanPipeline and HunyuanVideoPipeline, built offline.

Every component is constructed here from a config: transformer, VAE, scheduler, text encoder(s),
and tokenizers made from a small in-test word vocabulary with the `tokenizers` library (unknown
words map to <unk>, which is all the pipelines' prompt templates need). Nothing is downloaded.
Sizes follow diffusers' own fast tests for these pipelines, shrunk where it is free to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]
WORDS = "a an the of in on with and cat dog red blue green monkey dance digit seven three moving left right".split()
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
PIPELINES = ["flux", "qwenimage", "wan", "hunyuanvideo"]


def word_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over VOCAB (ids: pad 0, eos 1, bos 2, unk 3)."""
    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def clip_text_encoder(hidden: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=32, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        hidden_act="gelu",
    )  # fmt: skip
    return CLIPTextModel(config).eval()


def t5_encoder(cls: type = T5EncoderModel, config_cls: type = T5Config, d_model: int = 32) -> torch.nn.Module:
    config = config_cls(
        vocab_size=len(VOCAB), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return cls(config).eval()


@dataclass
class TinyPipeline:
    """A pipeline plus what the backend needs to serve it in a test."""

    name: str
    pipe: Any
    height: int
    width: int
    num_frames: int | None
    guidance: float
    calls_per_step: int  # transformer calls per denoising step at `guidance` (2 with true CFG)
    call_kwargs: dict[str, Any] = field(default_factory=dict)


# The production schedulers' settings (the models' scheduler_config.json): FLUX.1-dev and
# Qwen-Image shift their sigmas by the image's token count, so the tests cover that path.
FLUX_SCHEDULER = dict(
    use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, shift=3.0
)
QWEN_SCHEDULER = dict(
    use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9,
    shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
)  # fmt: skip


def build(name: str) -> TinyPipeline:
    torch.manual_seed(0)
    if name == "flux":
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        )  # fmt: skip
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
            latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5035,
        )  # fmt: skip
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=clip_text_encoder(32),
            tokenizer=word_tokenizer(77),
            text_encoder_2=t5_encoder(), tokenizer_2=word_tokenizer(16), transformer=transformer,
        )  # fmt: skip
        # FLUX.1-dev is guidance-distilled: one transformer call per step whatever the guidance.
        return TinyPipeline(name, pipe, 16, 16, None, 3.5, 1, {"max_sequence_length": 16})
    if name == "qwenimage":
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
            joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        )  # fmt: skip
        vae = AutoencoderKLQwenImage(
            base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        )  # fmt: skip
        vocab = len(VOCAB)
        config = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": vocab + 3, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 2, "rope_theta": 1000000.0,
                "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            },
            vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
            hidden_size=16, vocab_size=vocab + 3, bos_token_id=2, eos_token_id=1, pad_token_id=0,
            vision_start_token_id=vocab, vision_end_token_id=vocab + 1, vision_token_id=vocab + 2,
            image_token_id=vocab + 2, video_token_id=vocab + 2,
        )  # fmt: skip
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=vae, text_encoder=text_encoder,
            tokenizer=word_tokenizer(1024),
            transformer=transformer,
        )  # fmt: skip
        # True CFG (guidance > 1 with the negative prompt " "): "cond" and "uncond" calls per step.
        return TinyPipeline(name, pipe, 32, 32, None, 4.0, 2, {"max_sequence_length": 16})
    if name == "wan":
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )  # fmt: skip
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        pipe = WanPipeline(
            tokenizer=word_tokenizer(512), text_encoder=t5_encoder(UMT5EncoderModel, UMT5Config), vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer,
        )  # fmt: skip
        # CFG above 1: "cond" and "uncond" calls per step.
        return TinyPipeline(name, pipe, 16, 16, 9, 5.0, 2, {"max_sequence_length": 16})
    if name == "hunyuanvideo":
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
        )  # fmt: skip
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
            scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
            mid_block_add_attention=True,
        )  # fmt: skip
        llama = LlamaConfig(
            vocab_size=len(VOCAB), hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            pad_token_id=0, eos_token_id=1, bos_token_id=2, hidden_act="gelu",
        )  # fmt: skip
        pipe = HunyuanVideoPipeline(
            text_encoder=LlamaModel(llama).eval(), tokenizer=word_tokenizer(256), transformer=transformer, vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip_text_encoder(8),
            tokenizer_2=word_tokenizer(77),
        )  # fmt: skip
        # The production template crops 95 tokens of the LLaVA system prompt; the word-level
        # tokenizer makes fewer, so the tiny pipeline uses the bare template (as diffusers' tests do).
        kwargs = {"max_sequence_length": 16, "prompt_template": {"template": "{}", "crop_start": 0}}
        # Guidance-distilled (embedded guidance): one transformer call per step.
        return TinyPipeline(name, pipe, 16, 16, 9, 6.0, 1, kwargs)
    raise ValueError(name)
