"""Recorded denoising trajectories: the training data of a predictor (`lesa_core/training.py`).

`record` runs the unaccelerated sampler and stores, per sample, the initial noise, what is needed
to rerun it (prompt, seed, guidance, size), the final sample, and the hidden state entering the
final layer at every step, per CFG branch. Shards are safetensors files written atomically; a
shard that is truncated, corrupt or recorded with other settings is detected, never used, and
re-recorded on the next `record` run (which is how resuming works).

Works with any pipeline that follows the DigitsPipeline call contract (the reference models and
the production diffusers backends alike).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from lesa_core.cli import remove_empty
from lesa_core.hooks import CacheConfig

MANIFEST = "dataset.json"


class TrajectoryError(ValueError):
    """A trajectory directory or shard that cannot be used."""


class _OtherRecording(TrajectoryError):
    """A sound shard of another recording (other settings, prompts or seeds): never overwritten."""


@dataclass(frozen=True)
class RecordSettings:
    model: str
    num_steps: int
    guidance_scale: float
    height: int
    width: int
    num_frames: int | None = None
    hidden_dtype: str = "float16"  # fp16 halves the disk; predictors train in fp32


@dataclass
class Trajectories:
    """Loaded trajectories: tensors indexed by sample along dim 0."""

    settings: RecordSettings
    prompts: list[str]
    seeds: list[int]
    noise: torch.Tensor  # [n, ...] initial noise, exactly what the sampler started from
    final: torch.Tensor  # [n, ...] full-compute samples in [0, 1]
    hidden: dict[str, torch.Tensor]  # branch -> [n, steps, tokens, channels]
    times: torch.Tensor  # [steps + 1] normalised schedule times

    def __len__(self) -> int:
        return len(self.seeds)

    def subset(self, index: Sequence[int]) -> Trajectories:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return Trajectories(
            settings=self.settings,
            prompts=[self.prompts[i] for i in idx.tolist()],
            seeds=[self.seeds[i] for i in idx.tolist()],
            noise=self.noise[idx],
            final=self.final[idx],
            hidden={b: h[idx] for b, h in self.hidden.items()},
            times=self.times,
        )


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def record(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    settings: RecordSettings,
    shard_size: int = 16,
    progress: bool = True,
) -> Path:
    """Record full-compute trajectories for (prompt, seed) pairs into `out_dir` (resumable)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    if not seeds:
        raise ValueError("no seeds to record")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    out = Path(out_dir)
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first: the folders this run creates
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _record_into(pipe, prompts, seeds, out, settings, shard_size, progress)
    except BaseException:
        remove_empty(made)  # a run refused before its first shard leaves the filesystem as it found it
        raise


def _record_into(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    settings: RecordSettings,
    shard_size: int,
    progress: bool,
) -> Path:
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        existing = read_manifest(manifest_path)
        if existing.get("settings") != asdict(settings):
            raise TrajectoryError(
                f"{out} holds trajectories recorded with {existing.get('settings')}; "
                f"use another --out or the same settings ({asdict(settings)})"
            )
    first = out / _shard_name(0)
    if first.exists():
        # the same recording cut into other shards: each would read as "another recording"
        try:
            _check_shard(first, settings, None, None)
            with safe_open(str(first), framework="pt") as f:
                meta = f.metadata() or {}
                held = json.loads(meta["seeds"]), json.loads(meta["prompts"])
        except (TrajectoryError, SafetensorError, OSError, KeyError, ValueError):
            held = None, None  # unreadable: the shard loop below says so, or re-records it
        k = len(held[0]) if isinstance(held[0], list) else 0
        if 0 < k != min(shard_size, len(seeds)) and held == ([int(s) for s in seeds[:k]], list(prompts[:k])):
            raise TrajectoryError(
                f"{out} was recorded with --shard-size {k}; resume with --shard-size {k} (this run asked for "
                f"{shard_size}), or use another --out"
            )
    batches = [
        (i, list(range(s, min(s + shard_size, len(seeds))))) for i, s in enumerate(range(0, len(seeds), shard_size))
    ]
    ours = {_shard_name(index) for index, _ in batches}
    others = sorted(p.name for p in out.glob("shard-*.safetensors") if p.name not in ours)
    if others:  # a longer recording: rewriting the manifest for fewer seeds would orphan its shards
        raise TrajectoryError(
            f"{out} holds another recording, with shards this run would not record ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}): use another --out, or the same --prompts / --seeds to resume it"
        )
    shards = []
    bar = tqdm(batches, desc=f"record {settings.model}", unit="shard", disable=not progress)
    for index, members in bar:
        path = out / _shard_name(index)
        shard_prompts = [prompts[i] for i in members]
        shard_seeds = [int(seeds[i]) for i in members]
        if path.exists():
            try:
                _check_shard(path, settings, shard_prompts, shard_seeds)
                _read_shard(path)
                shards.append(path.name)
                bar.set_postfix_str("kept")
                continue
            except _OtherRecording as error:
                # Resuming means the same command: other seeds into a used directory would
                # silently drop the shards recorded before. Never delete someone's data.
                raise TrajectoryError(
                    f"{out}: {error}; this directory holds another recording: use another --out, or the "
                    "same --prompts / --seeds / settings to resume it"
                ) from None
            except TrajectoryError as error:  # truncated or corrupt: this run's own shard, redo it
                tqdm.write(f"re-recording {path.name}: {error}")
                path.unlink()
        _record_shard(pipe, path, settings, shard_prompts, shard_seeds)
        shards.append(path.name)
    manifest = {"settings": asdict(settings), "shards": shards, "num_samples": len(seeds)}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _record_shard(pipe: Any, path: Path, settings: RecordSettings, prompts: list[str], seeds: list[int]) -> None:
    hidden: dict[str, list[torch.Tensor]] = {}
    dtype = getattr(torch, settings.hidden_dtype)

    def observe(branch: str, step: int, h: torch.Tensor, full: bool) -> None:
        steps = hidden.setdefault(branch, [])
        if step != len(steps):
            raise RuntimeError(f"branch {branch}: expected step {len(steps)}, got {step}")
        steps.append(h.detach().to("cpu", dtype))

    noise = pipe.initial_noise(seeds, settings.height, settings.width, settings.num_frames)
    output = pipe(
        list(prompts),
        seeds=seeds,
        height=settings.height,
        width=settings.width,
        num_frames=settings.num_frames,
        num_inference_steps=settings.num_steps,
        guidance_scale=settings.guidance_scale,
        cache=CacheConfig(method="none", observer=observe),
        latents=noise,
    )
    tensors = {
        "noise": noise.float().contiguous(),
        "final": torch.as_tensor(output.samples).float().contiguous(),
        "times": pipe.timesteps(settings.num_steps).float().contiguous(),
    }
    for branch, steps in hidden.items():
        if len(steps) != settings.num_steps:
            raise RuntimeError(f"branch {branch}: recorded {len(steps)} of {settings.num_steps} steps")
        tensors[f"hidden.{branch}"] = torch.stack(steps, dim=1).contiguous()
    metadata = {
        "prompts": json.dumps(prompts), "seeds": json.dumps(seeds), "settings": json.dumps(asdict(settings)),
        "sha256": json.dumps({key: _digest(t) for key, t in tensors.items()}),
    }  # fmt: skip
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as written:  # on disk before it takes the real name (a power cut: no torn shard)
        os.fsync(written.fileno())
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written shard under the real name


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _read_shard(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A shard's metadata and tensors, its content checked: bytes overwritten or zeroed inside it
    (a torn write) pass every header check, and would poison training."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise TrajectoryError(f"{path}: corrupt or truncated ({error}); rerun `lesa record` to re-record it") from error
    digests = json.loads(meta.get("sha256", "{}"))  # (shards recorded before 2026-11-28 have none)
    bad = [key for key, t in tensors.items() if key in digests and _digest(t) != digests[key]]
    bad += [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise TrajectoryError(f"{path}: {', '.join(sorted(set(bad)))} do not hold what was recorded: corrupt; delete "
                              "it and rerun `lesa record` to re-record it")  # fmt: skip
    return meta, tensors


def _check_shard(path: Path, settings: RecordSettings, prompts: list[str] | None, seeds: list[int] | None) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            shapes = {k: f.get_slice(k).get_shape() for k in keys}
    except (SafetensorError, OSError, ValueError) as error:
        raise TrajectoryError(f"{path.name} is corrupt or truncated ({error})") from error
    try:
        recorded = json.loads(meta.get("settings", "null")), json.loads(meta["prompts"]), json.loads(meta["seeds"])
    except (KeyError, ValueError) as error:
        raise TrajectoryError(f"{path.name} has corrupt metadata ({error})") from error
    if recorded[0] != asdict(settings):
        raise _OtherRecording(f"{path.name} was recorded with other settings")
    if prompts is not None and (recorded[1] != prompts or recorded[2] != seeds):
        raise _OtherRecording(f"{path.name} holds other prompts/seeds ({recorded[2][0]}..{recorded[2][-1]})")
    hidden_keys = [k for k in keys if k.startswith("hidden.")]
    if not {"noise", "final", "times"} <= keys or not hidden_keys:
        raise TrajectoryError(f"{path.name} lacks tensors (has {sorted(keys)})")
    n = shapes["noise"][0]
    for k in hidden_keys:
        if shapes[k][0] != n or shapes[k][1] != settings.num_steps:
            raise TrajectoryError(f"{path.name}: {k} has shape {shapes[k]}, expected [{n}, {settings.num_steps}, ...]")


def read_manifest(path: Path) -> dict[str, Any]:
    """dataset.json, checked: a TrajectoryError naming the file and what is wrong with it."""
    if not path.is_file():
        raise TrajectoryError(f"{path.parent}: no {MANIFEST}; record trajectories first with `lesa record`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        RecordSettings(**manifest["settings"])
        if not isinstance(manifest["shards"], list):
            raise TypeError("'shards' is not a list")
    except (ValueError, KeyError, TypeError) as error:  # JSON, missing or unknown keys, wrong types
        raise TrajectoryError(f"{path}: not a `lesa record` manifest ({type(error).__name__}: {error})") from None
    return manifest


def load_trajectories(data_dir: str | Path) -> Trajectories:
    """Load every shard of a recorded directory, verifying each one."""
    root = Path(data_dir)
    manifest = read_manifest(root / MANIFEST)
    settings = RecordSettings(**manifest["settings"])
    prompts, seeds, noise, final, times = [], [], [], [], None
    hidden: dict[str, list[torch.Tensor]] = {}
    for name in manifest["shards"]:
        path = root / name
        _check_shard(path, settings, None, None)
        meta, tensors = _read_shard(path)
        prompts += json.loads(meta["prompts"])
        seeds += json.loads(meta["seeds"])
        noise.append(tensors["noise"])
        final.append(tensors["final"])
        times = tensors["times"]
        for key, tensor in tensors.items():
            if key.startswith("hidden."):
                hidden.setdefault(key.removeprefix("hidden."), []).append(tensor.float())
    if not seeds:
        raise TrajectoryError(f"{root}: no samples")
    return Trajectories(
        settings=settings,
        prompts=prompts,
        seeds=seeds,
        noise=torch.cat(noise),
        final=torch.cat(final),
        hidden={b: torch.cat(h) for b, h in hidden.items()},
        times=times,
    )
