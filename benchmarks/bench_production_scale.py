"""Realised vs theoretical speed-up at production scale: FLUX.1-dev / Wan2.1-1.3B-sized transformers.

The reference models are so small that on a GPU a step is launch-bound (bench_gpu.py), which says
nothing about a production model, where a full step is real GPU work. This builds a transformer
with a production model's own config and random weights (nothing is downloaded; the speed of a
step does not depend on what the weights are), runs the sampler's denoising loop at that model's
usual resolution, and times full compute against each method at each level. Text encoders and the
VAE are left out: they run once per generation and LESA does not touch them. For FLUX it also
times one preview of a streamed request (`partial_images`): a VAE decode of the clean-image
estimate, with FLUX.1-dev's VAE config, as a share of each generation.

LESA runs an untrained predictor of the right shape (per-channel history weights, the costlier
kind): a forecast costs what a trained one costs. Samples from random weights mean nothing, so
this measures time only; quality is measured on the trained reference models (`lesa bench quality`).

    python benchmarks/bench_production_scale.py                        # on a GPU: flux, wan
    python benchmarks/bench_production_scale.py --families flux --repeats 3
    python benchmarks/bench_production_scale.py --scale tiny --device cpu --steps 10 --levels 2x   # smoke test

Prints a table per family and writes JSON (default benchmarks/results/production_scale-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel

import lesa_core
from lesa_core.benchmark import machine_info

RESULTS = Path(__file__).resolve().parent / "results"

# The published transformer configs (FLUX.1-dev: 12B parameters; Wan2.1-T2V-1.3B), and a tiny
# version of each for smoke tests on a CPU.
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "flux": {
        "production": dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        "tiny": dict(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
    },
    "wan": {
        "production": dict(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ),
        "tiny": dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
        ),
    },
}  # fmt: skip

# FLUX.1-dev's VAE (AutoencoderKL; vae/config.json), for what a streamed request's preview costs:
# one decode of the clean-image estimate (lesa_core.production.backend.decode_latents).
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "production": dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ),
    "tiny": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ),
}  # fmt: skip

# Sample sizes: FLUX at 1024x1024 (4096 image tokens, 512 text tokens); Wan at 480x832 with 33
# frames (9 latent frames, 14,040 tokens; its default 81 frames would make every run 2.5x longer).
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "flux": {"production": dict(height=1024, width=1024, text=512), "tiny": dict(height=64, width=64, text=8)},
    "wan": {
        "production": dict(height=480, width=832, frames=33, text=512),
        "tiny": dict(height=32, width=32, frames=5, text=8),
    },
}


@dataclass
class Workload:
    """A transformer and one denoising step's call on it: `call(x, sigma)` -> velocity, per CFG branch."""

    model: torch.nn.Module
    latents: torch.Tensor
    branches: tuple[str, ...]
    call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    description: str


def build(family: str, scale: str, batch: int, device: str, dtype: torch.dtype) -> Workload:
    config, size = CONFIGS[family][scale], SIZES[family][scale]
    generator = torch.Generator(device).manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights in the serving dtype (FLUX: 24 GB in bf16, not 48)
    try:
        with torch.device(device):
            model = (FluxTransformer2DModel if family == "flux" else WanTransformer3DModel)(**config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    if family == "flux":
        rows, cols = size["height"] // 16, size["width"] // 16  # VAE /8, then 2x2 patches packed into channels
        tokens = rows * cols
        img_ids = torch.zeros(rows, cols, 3, device=device)
        img_ids[..., 1] = torch.arange(rows, device=device)[:, None]
        img_ids[..., 2] = torch.arange(cols, device=device)[None, :]
        img_ids = img_ids.reshape(tokens, 3).to(dtype)
        txt_ids = torch.zeros(size["text"], 3, device=device, dtype=dtype)
        text, pooled = (
            randn(batch, size["text"], config["joint_attention_dim"]),
            randn(batch, config["pooled_projection_dim"]),
        )
        guidance = torch.full((batch,), 3.5, device=device, dtype=dtype)

        def call(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            timestep = sigma.expand(batch).to(dtype)
            return model(
                hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
                img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False,
            )[0]  # fmt: skip

        latents = randn(batch, tokens, config["in_channels"])
        what = f"{size['height']}x{size['width']}, {tokens} image + {size['text']} text tokens"
        return Workload(model, latents, ("cond",), call, f"FLUX.1-dev-sized ({params / 1e9:.2f}B), {what}")

    frames = (size["frames"] - 1) // 4 + 1
    lat_h, lat_w = size["height"] // 8, size["width"] // 8
    tokens = frames * (lat_h // 2) * (lat_w // 2)
    text = randn(batch, size["text"], config["text_dim"])

    def call(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        timestep = (sigma * 1000).expand(batch)  # float32, as WanPipeline passes it
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

    latents = randn(batch, config["in_channels"], frames, lat_h, lat_w)
    what = f"{size['height']}x{size['width']}x{size['frames']} frames, {tokens} tokens, CFG (2 calls per step)"
    return Workload(model, latents, ("cond", "uncond"), call, f"Wan2.1-1.3B-sized ({params / 1e9:.2f}B), {what}")


def sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """Flow-matching noise levels 1 -> 0 with the usual time shift (steps + 1 values)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


@torch.inference_mode()
def generate(work: Workload, times: torch.Tensor, cache: lesa_core.CacheConfig | None) -> int:
    """The sampler's loop: Euler steps, CFG over the workload's branches (scale 5), hooks per generation.

    Returns how many transformer calls were predicted (the hooks' own count), so a run that skipped
    nothing cannot pass for a fast one."""
    model, x = work.model, work.latents.clone()
    if cache is not None:
        lesa_core.enable_cache(model, cache)
        lesa_core.new_generation(model, timesteps=times)
    try:
        for i in range(len(times) - 1):
            sigma = times[i].to(x.device)
            outputs = []
            for branch in work.branches:
                with model.cache_context(branch):
                    outputs.append(work.call(x, sigma))
            velocity = outputs[0] if len(outputs) == 1 else outputs[1] + 5.0 * (outputs[0] - outputs[1])
            x = x + (times[i + 1] - times[i]).item() * velocity
        stats = lesa_core.cache_stats(model) if cache is not None else {}
    finally:
        if cache is not None:
            lesa_core.disable_cache(model)
    return sum(branch["predicted"] for branch in stats.values())


def untrained_predictor(schedule: lesa_core.CacheSchedule, hidden_size: int) -> lesa_core.StagePredictor:
    config = lesa_core.PredictorConfig(
        schedule=schedule.to_dict(), kan_hidden=(64, 64), history_weights="channel", hidden_size=hidden_size
    )
    return lesa_core.StagePredictor(config).eval()


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_preview(args: argparse.Namespace, dtype: torch.dtype) -> list[float]:
    """Seconds per preview of a FLUX-sized request: `decode_latents` on packed latents, as the
    backend runs it when a streamed request asks for `partial_images`."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, FluxPipeline
    from diffusers.image_processor import VaeImageProcessor

    from lesa_core.production.backend import FAMILIES, decode_latents

    config, size = VAE_CONFIGS[args.scale], SIZES["flux"][args.scale]
    vae = AutoencoderKL(**config).to(args.device, dtype).eval()
    scale = 2 ** (len(config["block_out_channels"]) - 1)
    pipe = SimpleNamespace(vae=vae, vae_scale_factor=scale, _unpack_latents=FluxPipeline._unpack_latents,
                           image_processor=VaeImageProcessor(vae_scale_factor=scale * 2))  # fmt: skip
    rows, cols = size["height"] // (scale * 2), size["width"] // (scale * 2)
    latents = torch.randn(args.batch, rows * cols, config["latent_channels"] * 4, device=args.device, dtype=dtype)
    seconds = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        sync(args.device)
        started = time.perf_counter()
        decode_latents(pipe, FAMILIES["FluxPipeline"], latents, size["height"], size["width"])
        sync(args.device)
        seconds.append(time.perf_counter() - started)
    return seconds[1:]


def bench_family(family: str, args: argparse.Namespace, dtype: torch.dtype) -> list[dict[str, Any]]:
    work = build(family, args.scale, args.batch, args.device, dtype)
    hidden = work.model.config.num_attention_heads * work.model.config.attention_head_dim
    times = sigmas(args.steps)
    print(f"## {family}: {work.description}, batch {args.batch}, {args.steps} steps", flush=True)
    print(f"{'level':>6} {'method':>11} {'full':>6} {'seconds':>9} {'wall':>7} {'theory':>7} {'wall/theory':>11}")
    caches: dict[tuple[str, str], lesa_core.CacheConfig | None] = {("none", "none"): None}
    for level in args.levels.split(","):
        schedule = lesa_core.level_schedule(level, args.steps)
        for method in args.methods.split(","):
            predictor = untrained_predictor(schedule, hidden).to(args.device) if method == "lesa" else None
            caches[(level, method)] = lesa_core.CacheConfig(method=method, schedule=schedule, predictor=predictor)
    generate(work, sigmas(min(args.steps, 4)), None)  # warm-up: kernels, allocator, autotuning
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in caches}
    predicted: dict[tuple[str, str], int] = {}
    for _ in range(args.repeats):  # round-robin, so drift hits every method alike
        for key, cache in caches.items():
            if cache is not None and not seconds[key]:
                generate(work, times, cache)  # first use: the predictor folds its step tables
            sync(args.device)
            started = time.perf_counter()
            predicted[key] = generate(work, times, cache)
            sync(args.device)
            seconds[key].append(time.perf_counter() - started)
    full = statistics.median(seconds[("none", "none")])
    records = []
    for (level, method), cache in caches.items():
        median = statistics.median(seconds[(level, method)])
        theoretical = cache.schedule.speedup if cache is not None else 1.0
        record = dict(
            family=family, scale=args.scale, description=work.description, batch=args.batch, steps=args.steps,
            level=level, method=method, full_steps=cache.schedule.num_full if cache is not None else args.steps,
            predicted_calls=predicted[(level, method)],
            seconds_median=round(median, 4), seconds_all=[round(s, 4) for s in seconds[(level, method)]],
            speedup_wall=round(full / median, 3), speedup_theoretical=round(theoretical, 3),
            wall_over_theoretical=round(full / median / theoretical, 3),
        )  # fmt: skip
        records.append(record)
        print(
            f"{level:>6} {method:>11} {record['full_steps']:>6} {median:>9.3f} {record['speedup_wall']:>6.2f}x "
            f"{theoretical:>6.2f}x {record['wall_over_theoretical']:>11.3f}",
            flush=True,
        )
    del work
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    if family == "flux":
        preview = statistics.median(time_preview(args, dtype))
        share = {f"share_of_{r['level']}_{r['method']}": round(preview / r["seconds_median"], 4)
                 for r in records if r["method"] in ("none", "lesa")}  # fmt: skip
        records.append(dict(family=family, scale=args.scale, batch=args.batch, level="-", method="preview",
                            what="one partial image: the VAE decode of the clean estimate (FLUX.1-dev's VAE)",
                            seconds_median=round(preview, 4), **share))  # fmt: skip
        print(
            f"  one preview (VAE decode): {1000 * preview:.1f} ms; "
            + ", ".join(f"{k.removeprefix('share_of_')} {100 * v:.1f}%" for k, v in share.items()),
            flush=True,
        )
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="flux,wan", help="comma-separated: flux, wan")
    parser.add_argument("--scale", default="production", choices=["production", "tiny"])
    parser.add_argument("--levels", default="5x,6.25x")
    parser.add_argument("--methods", default="reuse,taylorseer,lesa")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed generations per cell (median reported)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("bench_production_scale: no CUDA GPU here; nothing measured (--device cpu --scale tiny: smoke test)")
        return 0
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in CONFIGS]
    if unknown:
        print(f"bench_production_scale: unknown families {unknown}; known: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    machine = machine_info()
    result: dict[str, Any] = {"machine": machine, "dtype": args.dtype, "records": [], "failures": {}}
    slug = re.sub(r"[^a-z0-9]+", "-", machine["device"].lower()).strip("-")[:40]
    path = args.json or RESULTS / f"production_scale-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for family in families:  # results are written after each family, so a later failure keeps them
        try:
            result["records"] += bench_family(family, args, dtype)
        except (RuntimeError, ValueError) as error:  # out of memory, an unsupported model
            result["failures"][family] = str(error)
            print(f"bench_production_scale: {family} not measured: {error}", file=sys.stderr)
        result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
