"""`lesa bench quality`: every forecasting method at every acceleration level, against full compute.

For one model, on held-out prompts and seeds, each method x level is run through the pipeline's
own call contract (`cache=CacheConfig(...)`) and its final samples are compared with the
full-compute samples of the same seeds:

* fidelity: MSE, PSNR and SSIM (Gaussian window, per frame for video) of the final sample;
* meaning: evaluator agreement, i.e. the share of samples whose recognised digit is the one the
  prompt asked for (and, for video, whose motion direction is the one asked for);
* speed: the realised wall-clock speed-up over full compute at each batch size, timed in the same
  run (round-robin repeats; fastest and median), next to the theoretical one (total steps / full steps).

Full compute is the pipeline with no hooks at all (`cache=None`). The `none` method attaches the
hooks with every step full, so its record checks that the hooks themselves change nothing (MSE 0)
and shows what they cost.

Outputs (`write_outputs`): JSON (header with the machine + one record per method x level), a
Markdown table, a PNG grid (rows = methods, columns = levels, one seed), for video a GIF strip per
method, and a PSNR-vs-speed-up plot. `update_quality_cards` writes each LESA level's figures into
its bundle's `config.json` (`quality`), which the service shows on /v1/models.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lesa_core.cli import MAX_SEED
from lesa_core.hooks import CacheConfig
from lesa_core.levels import LEVELS, level_schedule
from lesa_core.predictor import BundleError, StagePredictor
from lesa_core.schedule import CacheSchedule

# PSNR of identical samples is infinite, which JSON cannot carry and a mean cannot average: the
# per-sample MSE is floored at 1e-10 (data range 1), so PSNR is capped at exactly 100 dB.
PSNR_CAP_DB = 100.0
_MSE_FLOOR = 10.0 ** (-PSNR_CAP_DB / 10.0)

SSIM_WINDOW = 11  # Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

# Method names on the command line -> (lesa_core method, TaylorSeer order).
METHODS: dict[str, tuple[str, int]] = {
    "none": ("none", 1),
    "reuse": ("reuse", 1),
    "taylorseer1": ("taylorseer", 1),
    "taylorseer2": ("taylorseer", 2),
    "lesa": ("lesa", 1),
}
DEFAULT_METHODS = tuple(METHODS)
# "lesa-<variant>" names another predictor family (e.g. a paper-exact and an improved predictor side
# by side); its bundle for level L is <predictors>/<variant>/<L> (the layout training runs write),
# or given explicitly in `bundles`.
LESA_VARIANT_PREFIX = "lesa-"


def method_spec(name: str) -> tuple[str, int]:
    """(lesa_core method, TaylorSeer order) of a benchmark method name; ValueError if unknown."""
    if name in METHODS:
        return METHODS[name]
    if name.startswith(LESA_VARIANT_PREFIX) and len(name) > len(LESA_VARIANT_PREFIX):
        return ("lesa", 1)
    raise ValueError(f"unknown methods [{name!r}]; known methods: {', '.join(METHODS)}, lesa-<variant>")


def default_bundle_dir(root: Path, method: str, level: str) -> Path:
    if method == "lesa":
        return root / level
    return root / method[len(LESA_VARIANT_PREFIX) :] / level


def portable_path(path: Path, base: Path | None = None) -> str:
    """`path` relative to `base` (the working directory) when it lies under it: results name no machine paths."""
    try:
        return str(Path(path).resolve().relative_to((base or Path.cwd()).resolve()))
    except ValueError:
        return str(path)


DEFAULT_LEVELS = tuple(name for name in LEVELS if name != "none")
# Predictor training records seeds < 1000; the benchmark's defaults start above that range.
TRAINING_SEED_LIMIT = 1000
# 256 seeds: a ratio of mean MSEs is decided by its worst seeds. On the first 32 the image 5x
# LESA / TaylorSeer ratio was 0.73x, and 0.42x without its one bad seed (1021); see the README.
DEFAULT_SEEDS = tuple(range(1000, 1256))
FULL = "full"  # label of the reference run (no hooks)


# ------------------------------------------------------------------------------------- metrics


def _as_frames(samples: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[N, H, W] or [N, F, H, W] -> float64 [N, F, H, W] (a still image is a one-frame clip)."""
    x = torch.as_tensor(np.asarray(samples), dtype=torch.float64)
    if x.dim() == 2:
        x = x[None]
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise ValueError(f"samples must be [N, H, W] or [N, F, H, W], got shape {tuple(x.shape)}")
    return x


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"samples differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def mse_per_sample(samples: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean squared error per sample (values in [0, 1]), shape [N].

    Any layout after the sample axis ([N, H, W], [N, F, H, W], RGB [N, H, W, 3], [N, F, H, W, 3]);
    a single [H, W] image is one sample."""
    a, b = np.asarray(samples, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"samples differ in shape: {a.shape} vs {b.shape}")
    if a.ndim < 2:
        raise ValueError(f"samples must have at least 2 dimensions, got shape {a.shape}")
    count = 1 if a.ndim == 2 else len(a)
    return ((a - b) ** 2).reshape(count, -1).mean(1)


def psnr_per_sample(samples: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """PSNR in dB per sample; identical samples give PSNR_CAP_DB (100 dB), never inf."""
    mse = np.maximum(mse_per_sample(samples, reference) / data_range**2, _MSE_FLOOR)
    return -10.0 * np.log10(mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_per_frame(samples: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """SSIM per frame, shape [N, F] (F = 1 for stills).

    Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5). The images here are tiny (16x16),
    so instead of cropping the window's border (which would keep only the centre 6x6) the image is
    reflect-padded and the SSIM map is averaged over every pixel. The window shrinks to the largest
    odd size that fits an image smaller than 11 pixels.
    """
    a, b = _as_frames(samples), _as_frames(reference)
    _check_pair(a, b)
    n, f, h, w = a.shape
    size = min(SSIM_WINDOW, h - (1 - h % 2), w - (1 - w % 2))
    g = _gaussian_window(size, SSIM_SIGMA)
    pad = size // 2
    x = a.reshape(n * f, 1, h, w)
    y = b.reshape(n * f, 1, h, w)

    def blur(t: torch.Tensor) -> torch.Tensor:
        if pad:
            t = F.pad(t, (pad, pad, pad, pad), mode="reflect")
        t = F.conv2d(t, g.view(1, 1, 1, -1))  # separable: rows, then columns
        return F.conv2d(t, g.view(1, 1, -1, 1))

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return ssim_map.flatten(1).mean(1).reshape(n, f).numpy()


def ssim_per_sample(samples: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """SSIM per sample, shape [N]: the mean over a clip's frames (one frame for stills)."""
    return ssim_per_frame(samples, reference, data_range).mean(1)


def psnr(samples: np.ndarray, reference: np.ndarray) -> float:
    """Mean of the per-sample PSNRs (each capped at 100 dB)."""
    return float(psnr_per_sample(samples, reference).mean())


def ssim(samples: np.ndarray, reference: np.ndarray) -> float:
    return float(ssim_per_sample(samples, reference).mean())


# --------------------------------------------------------------------------- evaluator agreement


def digit_hits(kind: str, samples: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Per sample: share of the sample (1 image, or its frames) recognised as the prompt's digit."""
    from lesa_models.evaluator import classify_digits, classify_frames, parse_prompt_digit

    wanted = np.array([parse_prompt_digit(p) for p in prompts], dtype=object)
    if kind == "image":
        return (classify_digits(samples) == wanted).astype(np.float64)
    return np.array([(classify_frames(clip) == w).mean() for clip, w in zip(samples, wanted, strict=True)])


def direction_hits(samples: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Per clip: 1 if its estimated motion direction is the one the prompt asked for."""
    from lesa_models.evaluator import motion_direction, parse_prompt_direction

    return np.array(
        [float(motion_direction(clip) == parse_prompt_direction(p)) for clip, p in zip(samples, prompts, strict=True)]
    )


# ----------------------------------------------------------------------------------- settings


# Wordings for the held-out prompts: templates and attributes the predictor-training prompt files
# (prompts/<model>-train.txt: "a handwritten seven", "the number 7", "digit 7", "a bold seven";
# "digit 7 moving up", "a seven moving down") never use, so prompts are held out as well as seeds.
HELD_OUT_IMAGE = ("a {word}", "the digit {word}", "an image of a {d}", "a thin {word}", "a small {word}")
HELD_OUT_VIDEO = ("the number {d} moves {p}", "a handwritten {word} sliding {p}")


def default_prompts(kind: str, count: int) -> list[str]:
    """Held-out evaluation prompts: digits 0..9 in turn, wording (and direction) varying by round.

    Every digit appears once per ten prompts; video prompts cycle through all eight directions,
    diagonals included (training prompts use only left/right/up/down).
    """
    from lesa_models import data

    prompts = []
    names = list(data.DIRECTIONS)
    for i in range(count):
        digit, round_ = i % 10, i // 10
        word = data.DIGIT_WORDS[digit]
        if kind == "image":
            template = HELD_OUT_IMAGE[(digit + round_) % len(HELD_OUT_IMAGE)]
            prompts.append(template.format(d=digit, word=word))
        else:
            direction = names[(digit + 3 * round_) % len(names)]
            template = HELD_OUT_VIDEO[(digit + round_) % len(HELD_OUT_VIDEO)]
            phrase = data.DIRECTION_PHRASES[direction][round_ % len(data.DIRECTION_PHRASES[direction])]
            prompts.append(template.format(d=digit, word=word, p=phrase))
    return prompts


MAX_SEED_COUNT = 100_000  # days of benchmarking on a CPU; more is a typo


def parse_seeds(text: str) -> list[int]:
    """'1000-1015' (inclusive) or '1000,1003,1007' or a mix: '1000-1003,1010'. ValueError saying
    what is wrong otherwise (every CLI that takes seeds parses them here)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            start, end = (int(v) for v in part.split("-", 1)) if "-" in part else (int(part), int(part))
        except ValueError:
            raise ValueError(f"seeds {text!r}: expected ranges like 0-63 or lists like 1,2,5") from None
        if end < start:
            raise ValueError(f"seed range {part!r} runs backwards")
        if end > MAX_SEED:  # checked before the range is built: a typo must not fill the memory
            raise ValueError(f"seeds {text!r}: {end} is over the largest seed, {MAX_SEED}")
        if len(seeds) + end - start + 1 > MAX_SEED_COUNT:
            raise ValueError(f"seeds {text!r}: more than {MAX_SEED_COUNT} seeds")
        seeds.extend(range(start, end + 1))
    if not seeds:
        raise ValueError(f"no seeds in {text!r}")
    if len(set(seeds)) != len(seeds):  # one sample twice: in training data, it could be validated on itself
        twice = sorted(s for s, n in Counter(seeds).items() if n > 1)
        shown = ", ".join(map(str, twice[:5])) + (", ..." if len(twice) > 5 else "")
        raise ValueError(f"seeds {text!r}: {shown} given more than once (overlapping ranges?)")
    return seeds


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line (lines starting with # are comments); ValueError naming the
    file when it cannot be read or holds no prompt (every CLI that takes a prompts file reads it here)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (bad byte at offset {error.start})") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror or error})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line; lines starting with # are comments)")
    return prompts


@dataclass
class BenchConfig:
    """What to measure. `schedules` / `predictors` override the named levels and bundles (tests,
    custom schedules); `predictors_dir` holds one bundle per level (default: <model>/predictors)."""

    model: str
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    prompts: list[str] | None = None  # cycled over the seeds; default: default_prompts()
    levels: list[str] = field(default_factory=lambda: list(DEFAULT_LEVELS))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    steps: int = 50
    guidance: float | None = None
    repeats: int = 5
    quality_batch: int = 8
    threads: int | None = 1
    schedules: dict[str, CacheSchedule] | None = None
    predictors: dict[str, StagePredictor] | None = None  # level -> predictor, for method "lesa"
    predictors_dir: Path | None = None
    bundles: dict[tuple[str, str], Path] | None = None  # (method, level) -> bundle directory

    def __post_init__(self) -> None:
        for method in self.methods:
            method_spec(method)
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if not self.levels or not self.methods:
            raise ValueError(
                f"give at least one level and one method (got levels {self.levels}, methods {self.methods})"
            )
        for method, level in self.bundles or {}:
            if method not in self.methods or level not in self.levels:
                raise ValueError(f"--bundle {method}:{level} is for a method / level this run does not include "
                                 f"(methods {', '.join(self.methods)}; levels {', '.join(self.levels)})")  # fmt: skip
        if self.schedules is None:
            for level in self.levels:
                level_schedule(level, self.steps)  # ValueError naming the known levels
        if self.guidance is not None and not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"--guidance must be a finite number >= 0, got {self.guidance}")
        if self.predictors_dir is not None and not Path(self.predictors_dir).is_dir():
            raise ValueError(f"--predictors {self.predictors_dir}: no such directory (it holds one bundle per level)")


class BenchSettingsError(ValueError):
    """The model refuses the run's settings (e.g. a step count it does not sample): the user's to fix."""


@dataclass
class Variant:
    """One method x level to run: its label, its hooks, and (for LESA) where its bundle came from."""

    method: str
    level: str
    schedule: CacheSchedule
    cache: CacheConfig | None
    bundle: Path | None = None


@dataclass
class BenchResult:
    header: dict[str, Any]
    records: list[dict[str, Any]]
    notes: list[str]
    prompts: list[str]
    seeds: list[int]
    reference: np.ndarray  # full-compute samples, one per seed
    samples: dict[tuple[str, str], np.ndarray]  # (method, level) -> samples, one per seed
    kind: str

    def to_json(self) -> dict[str, Any]:
        return {
            "header": self.header,
            "notes": self.notes,
            "targets": target_checks(self.records),
            "records": self.records,
        }


# ----------------------------------------------------------------------------------- machine


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """What the timings depend on: CPU, cores, torch threads, allocator, versions, load, date."""
    import diffusers

    from lesa_core.allocator import freed_memory_retained

    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "freed_memory_retained": freed_memory_retained(),  # lesa_core/allocator.py
        "device": device,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": load_average(),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def machine_label(header: dict[str, Any]) -> str:
    """One line naming the machine, for tables and quality cards."""
    load = header.get("load_average_start")
    load_text = f", load avg {load[0]:.2f} at start" if load else ""
    end = header.get("load_average_end")
    if end:
        load_text += f" / {end[0]:.2f} at end"
    return (
        f"{header['cpu']} ({header['cpu_count']} cores), {header['device']}, torch {header['torch']} with "
        f"{header['torch_threads']} thread(s){load_text}"
    )


# ------------------------------------------------------------------------------------- running


def _variants(config: BenchConfig, pipe: Any, notes: list[str]) -> list[Variant]:
    """Every method x level to run, in table order; LESA levels without a usable bundle are noted."""
    variants: list[Variant] = []
    steps = config.steps
    if "none" in config.methods:
        variants.append(Variant("none", "none", CacheSchedule.every_step(steps), CacheConfig(method="none")))
    bundles_root = config.predictors_dir
    # A bundle trained on another transformer class or width is reported, not run.
    transformer = getattr(pipe, "transformer", None)
    family = type(transformer).__name__ if transformer is not None else None
    info = getattr(pipe, "info", None)
    hidden_size = getattr(info, "hidden_size", None)
    if bundles_root is None and getattr(pipe, "root", None) is not None:
        bundles_root = Path(pipe.root) / "predictors"
    for method in config.methods:
        if method == "none":
            continue
        kind, order = method_spec(method)
        for level in config.levels:
            schedule = config.schedules[level] if config.schedules is not None else level_schedule(level, steps)
            if kind != "lesa":
                cache = CacheConfig(method=kind, schedule=schedule, taylor_order=order)
                variants.append(Variant(method, level, schedule, cache))
                continue
            predictor, bundle = None, None
            explicit = (config.bundles or {}).get((method, level))
            if method == "lesa" and config.predictors is not None and level in config.predictors:
                predictor = config.predictors[level]
            elif explicit is not None or bundles_root is not None:
                bundle = Path(explicit) if explicit is not None else default_bundle_dir(bundles_root, method, level)
                if not (bundle / "config.json").is_file():
                    if explicit is not None:
                        raise BundleError(f"--bundle {method}:{level}: no predictor bundle at {bundle}")
                    notes.append(f"{method} skipped at {level}: no predictor bundle at {bundle}")
                    continue
                try:
                    predictor = StagePredictor.from_pretrained(bundle)
                except BundleError as error:
                    if explicit is not None:  # asked for by name: never a silent gap in the table
                        raise BundleError(f"--bundle {method}:{level}: {error}") from None
                    notes.append(f"{method} skipped at {level}: {error}")
                    continue
            else:
                notes.append(f"{method} skipped at {level}: no predictor given and the model has no bundle directory")
                continue
            try:
                predictor.check_compatible(schedule, family=family, hidden_size=hidden_size)
            except BundleError as error:
                if explicit is not None:
                    raise BundleError(f"--bundle {method}:{level}: {error}") from None
                notes.append(f"{method} skipped at {level}: {error}")
                continue
            cache = CacheConfig(method="lesa", schedule=schedule, predictor=predictor)
            variants.append(Variant(method, level, schedule, cache, bundle))
        if method.startswith(LESA_VARIANT_PREFIX) and not any(v.method == method for v in variants):
            # a variant is only ever asked for by name: a table without it would answer another question
            where = default_bundle_dir(bundles_root, method, "<level>") if bundles_root is not None else "nowhere"
            raise BundleError(f"{method}: no usable bundle at any of {', '.join(config.levels)} ({where}): "
                              + "; ".join(notes[-len(config.levels):]))  # fmt: skip
    return variants


def _generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    cache: CacheConfig | None,
    config: BenchConfig,
    size: tuple[int, int],
    frames: int | None,
    batch: int,
) -> np.ndarray:
    width, height = size
    chunks = []
    for start in range(0, len(seeds), batch):
        out = pipe(
            list(prompts[start : start + batch]),
            seeds=list(seeds[start : start + batch]),
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance,
            cache=cache,
        )
        chunks.append(out.samples)
    return np.concatenate(chunks)


@dataclass
class Timing:
    """Seconds per call at one batch size: wall clock (fastest and median of the repeats), and
    this process's CPU time (fastest).

    The fastest repeat is the estimate least inflated by other processes (timeit's convention);
    the median shows how much noise there was. CPU time (time.process_time) is what the call itself
    consumed: on a shared, loaded machine it stays close to the unloaded cost while the wall clock
    also counts the time spent waiting for a core.
    """

    full_wall: float
    full_cpu: float
    full_wall_median: float
    wall: dict[tuple[str, str], float]
    cpu: dict[tuple[str, str], float]
    wall_median: dict[tuple[str, str], float]
    load_before: list[float] | None
    load_after: list[float] | None


def _time_all(
    pipe: Any,
    variants: list[Variant],
    batch: int,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: BenchConfig,
    size: tuple[int, int],
    frames: int | None,
) -> Timing:
    """Seconds of one whole generation (text encoding included) per variant at `batch`.

    Round-robin: every repeat runs the reference and every variant once, in a rotated order, so a
    burst of load from another process hits all of them alike instead of one cell.
    """
    request_prompts = [prompts[i % len(prompts)] for i in range(batch)]
    request_seeds = [seeds[i % len(seeds)] for i in range(batch)]
    jobs: list[tuple[tuple[str, str], CacheConfig | None]] = [((FULL, FULL), None)]
    jobs += [((v.method, v.level), v.cache) for v in variants]

    def one(cache: CacheConfig | None) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        _generate(pipe, request_prompts, request_seeds, cache, config, size, frames, batch)
        return time.perf_counter() - wall, time.process_time() - cpu

    load_before = load_average()
    for _, cache in jobs:  # warm-up: allocator, oneDNN kernels, LESA's per-step coefficients
        one(cache)
    walls: dict[tuple[str, str], list[float]] = {key: [] for key, _ in jobs}
    cpus: dict[tuple[str, str], list[float]] = {key: [] for key, _ in jobs}
    for repeat in range(config.repeats):
        shift = (repeat * len(jobs)) // config.repeats  # spread the starting point over the list
        for key, cache in jobs[shift:] + jobs[:shift]:
            wall, cpu = one(cache)
            walls[key].append(wall)
            cpus[key].append(cpu)
    wall_fastest = {key: min(values) for key, values in walls.items()}
    cpu_fastest = {key: min(values) for key, values in cpus.items()}
    wall_medians = {key: statistics.median(values) for key, values in walls.items()}
    return Timing(
        wall_fastest.pop((FULL, FULL)),
        cpu_fastest.pop((FULL, FULL)),
        wall_medians.pop((FULL, FULL)),
        wall_fastest,
        cpu_fastest,
        wall_medians,
        load_before,
        load_average(),
    )


def run_quality_benchmark(config: BenchConfig, pipe: Any = None, log: Callable[[str], None] = print) -> BenchResult:
    """Run every method x level on the held-out seeds and return the measured records."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if pipe is None:
        from lesa_models import load_pipeline

        pipe = load_pipeline(config.model)
    kind = pipe.kind
    size = tuple(pipe.sizes[0])
    frames = pipe.num_frames_options[0] if kind == "video" else None
    if config.guidance is None:
        config.guidance = float(pipe.default_guidance)
    seeds = list(config.seeds)
    base_prompts = config.prompts or default_prompts(kind, len(seeds))
    prompts = [base_prompts[i % len(base_prompts)] for i in range(len(seeds))]
    notes: list[str] = []
    overlap = [s for s in seeds if s < TRAINING_SEED_LIMIT]
    if overlap:
        notes.append(f"{len(overlap)} seed(s) below {TRAINING_SEED_LIMIT} may overlap predictor training seeds")
    header = machine_info()
    header.update(
        model=config.model,
        kind=kind,
        width=size[0],
        height=size[1],
        num_frames=frames,
        steps=config.steps,
        guidance=config.guidance,
        seeds=seeds,
        prompts=prompts,
        batch_sizes=list(config.batch_sizes),
        repeats=config.repeats,
        psnr_cap_db=PSNR_CAP_DB,
        timing="fastest (and median) wall time of one whole pipeline call (text encoding + sampling), "
        "round-robin repeats",
    )
    variants = _variants(config, pipe, notes)
    log(f"bench quality: {config.model}, {len(seeds)} seeds, {config.steps} steps, {len(variants)} variants")
    log(f"machine: {machine_label(header)}")

    started = time.perf_counter()
    try:
        reference = _generate(pipe, prompts, seeds, None, config, size, frames, config.quality_batch)
    except ValueError as error:  # the first call: a refusal here is of the settings asked for (steps, guidance)
        raise BenchSettingsError(f"{config.model} refuses these settings: {error}") from None
    full_digits = digit_hits(kind, reference, prompts)
    full_dirs = direction_hits(reference, prompts) if kind == "video" else None
    samples: dict[tuple[str, str], np.ndarray] = {}
    for variant in variants:
        samples[(variant.method, variant.level)] = _generate(
            pipe, prompts, seeds, variant.cache, config, size, frames, config.quality_batch
        )
        log(f"  quality {variant.method:>12} @ {variant.level:<6} done ({time.perf_counter() - started:.0f}s)")

    timings: dict[int, Timing] = {}
    for batch in config.batch_sizes:
        timings[batch] = _time_all(pipe, variants, batch, prompts, seeds, config, size, frames)
        t = timings[batch]
        log(f"  timing batch {batch}: full compute {t.full_wall:.3f}s wall, {t.full_cpu:.3f}s cpu per call")

    records = []
    for variant in variants:
        out = samples[(variant.method, variant.level)]
        mse = mse_per_sample(out, reference)
        psnrs = psnr_per_sample(out, reference)
        ssims = ssim_per_sample(out, reference)
        digits = digit_hits(kind, out, prompts)
        kind_name, order = method_spec(variant.method)
        record: dict[str, Any] = {
            "model": config.model,
            "method": variant.method,
            "forecaster": kind_name,
            "taylor_order": order if kind_name == "taylorseer" else None,
            "level": variant.level,
            "full_steps": variant.schedule.num_full,
            "total_steps": variant.schedule.num_steps,
            "psnr": round(float(psnrs.mean()), 4),
            "psnr_min": round(float(psnrs.min()), 4),
            "ssim": round(float(ssims.mean()), 6),
            "mse": float(mse.mean()),
            "agreement": round(float(digits.mean()), 4),
            "agreement_full": round(float(full_digits.mean()), 4),
            "agreement_delta_pp": round(100.0 * float(digits.mean() - full_digits.mean()), 2),
            "speedup_theoretical": round(variant.schedule.speedup, 4),
            "speedup_wall_b1": None,
            "speedup_wall_b8": None,
            "seeds": len(seeds),
            "psnr_per_seed": [round(float(v), 3) for v in psnrs],
            "mse_per_seed": [float(v) for v in mse],
        }
        if kind == "video":
            dirs = direction_hits(out, prompts)
            record["agreement_direction"] = round(float(dirs.mean()), 4)
            record["agreement_direction_full"] = round(float(full_dirs.mean()), 4)
        for batch, t in timings.items():
            key = (variant.method, variant.level)
            record[f"seconds_b{batch}"] = round(t.wall[key], 4)
            record[f"seconds_full_b{batch}"] = round(t.full_wall, 4)
            record[f"speedup_wall_b{batch}"] = round(t.full_wall / t.wall[key], 4)
            record[f"speedup_wall_median_b{batch}"] = round(t.full_wall_median / t.wall_median[key], 4)
            record[f"cpu_seconds_b{batch}"] = round(t.cpu[key], 4)
            record[f"cpu_seconds_full_b{batch}"] = round(t.full_cpu, 4)
            record[f"speedup_cpu_b{batch}"] = round(t.full_cpu / t.cpu[key], 4)
        if variant.bundle is not None:
            record["bundle"] = portable_path(variant.bundle)
        records.append(record)

    header["load_average_end"] = load_average()
    header["load_average_timing"] = {f"b{b}": [t.load_before, t.load_after] for b, t in timings.items()}
    header["seconds_total"] = round(time.perf_counter() - started, 1)
    return BenchResult(header, records, notes, prompts, seeds, reference, samples, kind)


# ------------------------------------------------------------------------------------- targets

TARGET_LEVELS = ("5x", "6.25x")  # where issue 4 asks LESA to halve the best TaylorSeer's MSE


def _per_seed_mse(record: dict[str, Any]) -> np.ndarray | None:
    """A record's MSE per seed (older records kept only PSNR per seed: inverted, 3 decimals)."""
    if record.get("mse_per_seed") is not None:
        return np.asarray(record["mse_per_seed"], dtype=np.float64)
    if record.get("psnr_per_seed") is not None:
        return 10.0 ** (-np.asarray(record["psnr_per_seed"], dtype=np.float64) / 10.0)
    return None


def mse_ratio_interval(
    record: dict[str, Any], other: dict[str, Any], resamples: int = 10_000
) -> tuple[float, float] | None:
    """95% interval of mean MSE(record) / mean MSE(other), by a paired bootstrap over seeds.

    The ratio of *means* is decided by the worst seeds: with a few dozen seeds one mode flip moves
    it a lot, and this interval says how much the run's seeds pin it down. Fixed RNG: reruns agree.
    """
    a, b = _per_seed_mse(record), _per_seed_mse(other)
    if a is None or b is None or len(a) != len(b) or len(a) < 2:
        return None
    picks = np.random.default_rng(0).integers(0, len(a), size=(resamples, len(a)))
    ratios = a[picks].mean(1) / np.maximum(b[picks].mean(1), 1e-300)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def target_checks(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 4's targets, checked on this run's records (only where the compared records exist)."""
    checks: list[dict[str, Any]] = []
    by_key = {(r["method"], r["level"]): r for r in records}
    lesa_methods = [m for m in dict.fromkeys(r["method"] for r in records) if method_spec(m)[0] == "lesa"]
    for method in lesa_methods:
        for level in dict.fromkeys(r["level"] for r in records if r["method"] == method):
            lesa = by_key[(method, level)]
            taylors = [by_key[(t, level)] for t in ("taylorseer1", "taylorseer2") if (t, level) in by_key]
            if level in TARGET_LEVELS and taylors:
                best = min(taylors, key=lambda r: r["mse"])
                ratio = lesa["mse"] / best["mse"] if best["mse"] > 0 else math.inf
                interval = mse_ratio_interval(lesa, best)
                spread = f", 95% CI {interval[0]:.2f}-{interval[1]:.2f} over seeds" if interval else ""
                checks.append(
                    {
                        "target": "MSE <= 0.5x best TaylorSeer",
                        "method": method,
                        "level": level,
                        "passed": ratio <= 0.5,
                        "detail": f"{lesa['mse']:.3g} vs {best['method']} {best['mse']:.3g} (ratio {ratio:.2f}"
                        f"{spread}, {lesa['psnr'] - best['psnr']:+.2f} dB)",
                        "ratio_ci95": list(interval) if interval else None,
                    }
                )
            reuse = by_key.get(("reuse", level))
            if reuse is not None:
                checks.append(
                    {
                        "target": "better than reuse",
                        "method": method,
                        "level": level,
                        "passed": lesa["mse"] < reuse["mse"],
                        "detail": f"MSE {lesa['mse']:.3g} vs reuse {reuse['mse']:.3g}",
                    }
                )
            if level == "5x":
                delta = lesa["agreement_delta_pp"]
                checks.append(
                    {
                        "target": "agreement within 2 pp of full compute",
                        "method": method,
                        "level": level,
                        "passed": abs(delta) <= 2.0,
                        "detail": f"{100 * lesa['agreement']:.1f}% vs {100 * lesa['agreement_full']:.1f}% "
                        f"({delta:+.1f} pp)",
                    }
                )
            wall = lesa.get("speedup_wall_b8")
            if wall is not None:
                theory = lesa["speedup_theoretical"]
                checks.append(
                    {
                        "target": "wall speed-up b8 >= 0.9x theoretical",
                        "method": method,
                        "level": level,
                        "passed": wall >= 0.9 * theory,
                        "detail": f"{wall:.2f}x vs {theory:.2f}x ({wall / theory:.2f}; median "
                        f"{lesa.get('speedup_wall_median_b8', math.nan):.2f}x, cpu-time "
                        f"{lesa.get('speedup_cpu_b8', math.nan):.2f}x)",
                    }
                )
    return checks


# ------------------------------------------------------------------------------------- outputs


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:{spec}}{suffix}"


def markdown_table(result: BenchResult) -> str:
    """The records as a Markdown table, headed by the model, settings and machine."""
    h = result.header
    batches = h["batch_sizes"]
    video = result.kind == "video"
    lines = [
        f"### {h['model']}: quality vs full compute, {len(result.seeds)} held-out seeds "
        f"({result.seeds[0]}..{result.seeds[-1]}), {h['steps']} steps, guidance {h['guidance']:g}",
        "",
        f"Measured {h['date']} on {machine_label(h)}.",
        "",
    ]
    loads = h.get("load_average_timing") or {}
    spans = [f"{name} {v[0][0]:.2f} -> {v[1][0]:.2f}" for name, v in loads.items() if v[0] and v[1]]
    if spans:
        lines += [f"1-minute load average while timing ({h['cpu_count']} cores): {', '.join(spans)}.", ""]
    cols = ["method", "level", "full/total", "PSNR dB", "SSIM", "MSE", "digit agree"]
    if video:
        cols.append("direction agree")
    cols.append("speed-up theory")
    cols += [f"wall b{b}" for b in batches]
    cols += [f"median b{b}" for b in batches]
    cols += [f"cpu b{b}" for b in batches]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join(" --- " for _ in cols) + "|")
    full = result.records[0] if result.records else None
    if full is not None:
        row = ["full compute", "-", f"{h['steps']}/{h['steps']}", "ref", "ref", "ref"]
        row.append(_fmt(100 * full["agreement_full"], ".1f", "%"))
        if video:
            row.append(_fmt(100 * full["agreement_direction_full"], ".1f", "%"))
        row.append("1.00x")
        row += [f"1.00x ({full[f'seconds_full_b{b}']:.2f}s)" for b in batches]
        row += ["1.00x" for b in batches]
        row += [f"1.00x ({full[f'cpu_seconds_full_b{b}']:.2f}s)" for b in batches]
        lines.append("| " + " | ".join(row) + " |")
    for r in result.records:
        row = [
            r["method"],
            r["level"],
            f"{r['full_steps']}/{r['total_steps']}",
            _fmt(r["psnr"], ".2f"),
            _fmt(r["ssim"], ".4f"),
            _fmt(r["mse"], ".2e"),
            _fmt(100 * r["agreement"], ".1f", "%"),
        ]
        if video:
            row.append(_fmt(100 * r["agreement_direction"], ".1f", "%"))
        row.append(_fmt(r["speedup_theoretical"], ".2f", "x"))
        row += [_fmt(r.get(f"speedup_wall_b{b}"), ".2f", "x") for b in batches]
        row += [_fmt(r.get(f"speedup_wall_median_b{b}"), ".2f", "x") for b in batches]
        row += [_fmt(r.get(f"speedup_cpu_b{b}"), ".2f", "x") for b in batches]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        f"PSNR/SSIM/MSE: final sample vs the full-compute sample of the same seed (PSNR capped at "
        f"{PSNR_CAP_DB:g} dB for identical samples). Agreement: share of samples the evaluator "
        "recognises as the prompt's digit (video: per frame; direction per clip). Wall: fastest "
        f"of {h['repeats']} round-robin timed calls per cell (whole pipeline call, text encoding included), "
        "against the fastest full-compute call of the same run; median: the same with medians, which "
        "show the machine's noise; cpu: the calls' fastest process CPU time, which load from other "
        "processes inflates far less than the wall clock."
    )
    for note in result.notes:
        lines.append(f"Note: {note}.")
    checks = target_checks(result.records)
    if checks:
        lines += ["", "Targets (issue 4), checked on this run:", ""]
        lines += ["| target | method | level | result | measured |", "| --- | --- | --- | --- | --- |"]
        for c in checks:
            verdict = "PASS" if c["passed"] else "FAIL"
            lines.append(f"| {c['target']} | {c['method']} | {c['level']} | {verdict} | {c['detail']} |")
    return "\n".join(lines) + "\n"


def _tile(frame: np.ndarray, scale: int) -> np.ndarray:
    return np.kron(np.clip(frame, 0, 1), np.ones((scale, scale), dtype=np.float32))


def labelled_grid(rows: list[str], cols: list[str], cells: dict[tuple[int, int], np.ndarray], scale: int) -> Any:
    """A PIL image: row labels on the left, column labels on top, enlarged cells (blank if missing)."""
    from PIL import Image, ImageDraw

    some = next(iter(cells.values()))
    ch, cw = some.shape[0] * scale, some.shape[1] * scale
    left, top, pad = 96, 18, 4
    width = left + len(cols) * (cw + pad) + pad
    height = top + len(rows) * (ch + pad) + pad
    canvas = Image.new("L", (width, height), 40)
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(cols):
        draw.text((left + pad + j * (cw + pad), 3), name, fill=255)
    for i, name in enumerate(rows):
        draw.text((4, top + pad + i * (ch + pad) + ch // 2 - 5), name, fill=255)
        for j in range(len(cols)):
            cell = cells.get((i, j))
            if cell is None:
                continue
            tile = Image.fromarray((_tile(cell, scale) * 255 + 0.5).astype(np.uint8), mode="L")
            canvas.paste(tile, (left + pad + j * (cw + pad), top + pad + i * (ch + pad)))
    return canvas


def _still(sample: np.ndarray) -> np.ndarray:
    """The frame shown in a grid: the image, or a clip's middle frame."""
    sample = np.asarray(sample)
    return sample if sample.ndim == 2 else sample[len(sample) // 2]


DIFF_GAIN = 8.0  # |sample - full| is small; amplified so a reader can see where the error sits


def write_grid(result: BenchResult, path: Path, seed_index: int = 0, scale: int = 6, difference: bool = False) -> Path:
    """PNG: rows = methods (full compute first), columns = levels, all for one seed.

    With `difference`, each method's cell shows |sample - full compute| x DIFF_GAIN instead.
    """
    reference = _still(result.reference[seed_index])

    def shown(sample: np.ndarray) -> np.ndarray:
        return np.clip(np.abs(_still(sample) - reference) * DIFF_GAIN, 0, 1) if difference else _still(sample)

    levels = list(dict.fromkeys(level for (_, level) in result.samples if level != "none"))
    methods = list(dict.fromkeys(method for (method, _) in result.samples if method != "none"))
    rows, cells = [FULL], {}
    for j in range(len(levels)):
        cells[(0, j)] = _still(result.reference[seed_index])
    for i, method in enumerate(methods, start=1):
        rows.append(method)
        for j, level in enumerate(levels):
            out = result.samples.get((method, level))
            if out is not None:
                cells[(i, j)] = shown(out[seed_index])
    if not levels:  # only `none` ran: one column
        levels = ["none"]
        cells = {(0, 0): _still(result.reference[seed_index])}
    image = labelled_grid(rows, levels, cells, scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_video_strips(result: BenchResult, out_dir: Path, seed_index: int = 0, scale: int = 6) -> list[Path]:
    """Per method: a GIF with full compute then every level side by side, and a PNG of all frames."""
    from lesa_models.media import gif_bytes

    paths = []
    levels = list(dict.fromkeys(level for (_, level) in result.samples))
    methods = list(dict.fromkeys(method for (method, _) in result.samples))
    for method in methods:
        clips = [result.reference[seed_index]]
        names = [FULL]
        for level in levels:
            out = result.samples.get((method, level))
            if out is not None:
                clips.append(out[seed_index])
                names.append(level)
        stacked = np.stack(clips)  # [C, F, H, W]
        n_clips, n_frames, h, w = stacked.shape
        pad = 1
        frames = np.full((n_frames, h + 2 * pad, n_clips * (w + pad) + pad), 0.25, np.float32)
        for c in range(n_clips):
            frames[:, pad : pad + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = stacked[c]
        gif = out_dir / f"strip_{method}.gif"
        gif.write_bytes(gif_bytes(frames, fps=6, scale=scale))
        paths.append(gif)
        cells = {(i, f): stacked[i, f] for i in range(n_clips) for f in range(n_frames)}
        sheet = labelled_grid(names, [f"f{f}" for f in range(n_frames)], cells, scale)
        png = out_dir / f"strip_{method}.png"
        sheet.save(png)
        paths.append(png)
    return paths


def write_plot(result: BenchResult, path: Path) -> Path:
    """PSNR vs speed-up per method: realised at the largest batch (left) and theoretical (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = max(result.header["batch_sizes"]) if result.header["batch_sizes"] else None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    methods = list(dict.fromkeys(r["method"] for r in result.records if r["method"] != "none"))
    for ax, key, title in (
        (axes[0], f"speedup_wall_b{batch}", f"realised wall-clock speed-up, batch {batch}"),
        (axes[1], "speedup_theoretical", "theoretical speed-up (total / full steps)"),
    ):
        for method in methods:
            rows = [r for r in result.records if r["method"] == method and r.get(key) is not None]
            rows.sort(key=lambda r: r["speedup_theoretical"])
            if not rows:
                continue
            xs = [r[key] for r in rows]
            ys = [min(r["psnr"], PSNR_CAP_DB) for r in rows]
            ax.plot(xs, ys, marker="o", label=method)
            for r, x, y in zip(rows, xs, ys, strict=True):
                ax.annotate(r["level"], (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR vs full compute (dB)")
    axes[0].legend(fontsize=8)
    h = result.header
    fig.suptitle(
        f"{h['model']}: {len(result.seeds)} held-out seeds, {h['steps']} steps "
        f"({h['cpu']}, {h['torch_threads']} thread(s))",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: BenchResult, out_dir: Path, json_path: Path | None = None) -> dict[str, Any]:
    """JSON, Markdown, grid PNG, PSNR plot (and video strips) under `out_dir`; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = result.header["model"]
    json_path = Path(json_path) if json_path is not None else out_dir / "quality.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a non-finite figure is a bug here (PSNR is capped), never silently written.
    json_path.write_text(json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
    markdown = out_dir / "quality.md"
    markdown.write_text(markdown_table(result))
    paths: dict[str, Any] = {
        "json": json_path,
        "markdown": markdown,
        "grid": write_grid(result, out_dir / f"{model}_grid.png"),
        "difference_grid": write_grid(result, out_dir / f"{model}_grid_diff.png", difference=True),
        "plot": write_plot(result, out_dir / f"{model}_psnr_vs_speedup.png"),
    }
    if result.kind == "video":
        paths["strips"] = write_video_strips(result, out_dir)
    return paths


def quality_card(result: BenchResult, record: dict[str, Any]) -> dict[str, Any]:
    """What a LESA bundle's config.json `quality` carries: this level's measured figures."""
    h = result.header
    baselines = {
        r["method"]: {"psnr": r["psnr"], "ssim": r["ssim"], "mse": r["mse"]}
        for r in result.records
        if r["level"] == record["level"] and r["method"] != record["method"]
    }
    card = {
        key: record.get(key)
        for key in (
            "psnr",
            "ssim",
            "mse",
            "agreement",
            "agreement_full",
            "agreement_direction",
            "speedup_theoretical",
            "speedup_wall_b1",
            "speedup_wall_b8",
        )
        if key in record
    }
    card.update(
        seeds=list(result.seeds),
        steps=h["steps"],
        guidance=h["guidance"],
        baselines_same_level=baselines,
        date=h["date"],
        machine=machine_label(h),
        measured_by="lesa bench quality",
    )
    return card


def update_quality_cards(result: BenchResult) -> list[Path]:
    """Write each LESA record's quality card into its bundle (load, set config.quality, save)."""
    written = []
    for record in result.records:
        bundle = record.get("bundle")
        if method_spec(record["method"])[0] != "lesa" or not bundle:
            continue
        predictor = StagePredictor.from_pretrained(bundle)
        predictor.config.quality = quality_card(result, record)
        predictor.save_pretrained(bundle)
        written.append(Path(bundle))
    return written
