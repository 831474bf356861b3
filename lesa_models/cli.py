"""`lesa generate`, `lesa train-model` and `lesa eval`: the reference models from the command line."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lesa_core import given_images
from lesa_core.cli import CliError, positive_int, prepare_output, seed_int
from lesa_core.commands import read_prompts
from lesa_core.given_images import edit_strength
from lesa_core.pipeline_types import Reference, reference_steps

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
VIDEO_SUFFIXES = {".mp4": "mp4", ".gif": "gif"}


def _scale(text: str) -> int:
    value = positive_int(text)
    if value > 64:  # 16 px x 64 = 1024 px; a typo of 100000 would take the machine's memory
        raise argparse.ArgumentTypeError(f"must be at most 64, got {value}")
    return value


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="generate an image or clip with a reference model")
    gen.add_argument("--model", default="digits-image", help="digits-image | digits-video | pipeline directory")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", type=Path, help="file with one prompt per line (batch generation)")
    gen.add_argument("--seed", type=seed_int, default=0, help="seed of the first sample; sample i uses seed + i")
    gen.add_argument("--steps", type=positive_int, default=50, help="denoising steps (4..100)")
    gen.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    gen.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's first size)")
    gen.add_argument("--frames", type=positive_int, default=None, help="clip length (video models)")
    gen.add_argument("--acceleration", default="none", help="none or a lesa_core level (e.g. 5x)")
    gen.add_argument(
        "--method",
        default="lesa",
        choices=("lesa", "taylorseer", "reuse"),
        help="forecaster used by an acceleration level other than none",
    )
    gen.add_argument("--predictor", type=Path, default=None, help="LESA predictor bundle directory")
    gen.add_argument("--batch-size", type=positive_int, default=8, help="samples per pipeline call with --prompts")
    gen.add_argument(
        "--output",
        type=Path,
        required=True,
        help="file (.png/.jpg/.webp, or .mp4/.gif for video); with --prompts, a directory "
        "or a name that gets -000, -001, ... appended",
    )
    gen.add_argument("--scale", type=_scale, default=None, help="nearest-neighbour enlargement of the output, 1-64")
    gen.add_argument(
        "--image",
        type=Path,
        default=None,
        help="start from this image (resized to --size): an image model redraws it to the prompt (--prompt '' "
        "makes variations), a video model keeps it as the clip's first frame",
    )
    gen.add_argument(
        "--mask",
        type=Path,
        default=None,
        help="image models: an RGBA PNG of --image's size; its fully transparent pixels are redrawn, the rest kept",
    )
    gen.add_argument(
        "--strength",
        type=float,
        default=None,
        help="image models: how far --image may change, 0-1 (default: 1 with --mask, 0.5 with --prompt '', else 0.6)",
    )
    gen.set_defaults(func=_generate)

    train = subparsers.add_parser("train-model", help="train a reference model with its seeded recipe")
    train.add_argument(
        "name",
        choices=("digits-image", "digits-video", "evaluator"),
        help="a reference model, or the evaluator's digit classifier",
    )
    train.add_argument("--work-dir", type=Path, default=None, help="checkpoints (resumed if present)")
    train.add_argument("--output", type=Path, default=None, help="export directory (default: lesa_models/weights)")
    train.add_argument("--steps", type=positive_int, default=None, help="override the recipe's step count")
    train.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads (1 is fastest on a busy 2-core box)"
    )
    train.set_defaults(func=_train_model)

    ev = subparsers.add_parser("eval", help="judge a model with the digit classifier / motion estimator")
    ev.add_argument("--model", default="digits-image")
    ev.add_argument("--per-class", type=positive_int, default=10, help="samples per digit")
    ev.add_argument("--steps", type=positive_int, default=50)
    ev.add_argument("--guidance", type=float, default=None)
    ev.add_argument("--acceleration", default="none")
    ev.add_argument("--method", default="lesa", choices=("lesa", "taylorseer", "reuse"))
    ev.add_argument("--predictor", type=Path, default=None)
    ev.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    ev.add_argument(
        "--grid", type=Path, default=None, help="samples as a grid (.png/.jpg/.webp); video: a strip (.gif/.mp4)"
    )
    ev.set_defaults(func=_eval)


def _load(name: str) -> Any:
    from lesa_models.registry import load_pipeline

    try:
        return load_pipeline(name)
    except (ValueError, FileNotFoundError) as error:
        raise CliError(str(error)) from error


def resolve_acceleration(pipe: Any, level: str, steps: int, method: str = "lesa", predictor: Path | None = None) -> Any:
    """CacheConfig for a named lesa_core level, or None for full compute.

    This is the one place the CLI turns `--acceleration` into hooks. LESA needs a predictor bundle
    trained for the exact schedule: `--predictor`, else `<model dir>/predictors/<level>/` (the
    weights-tree layout deploy/models.toml and the service use).
    """
    if predictor is not None and (level == "none" or method != "lesa"):  # it would be ignored, silently
        raise CliError(f"--predictor is used by --method lesa at an --acceleration level, not {method} at {level}")
    if level == "none":
        return None
    import lesa_core

    try:
        schedule = lesa_core.level_schedule(level, steps)
    except ValueError as error:
        raise CliError(str(error)) from error
    if method != "lesa":
        return lesa_core.CacheConfig(method=method, schedule=schedule)
    if predictor is None:
        root = getattr(pipe, "root", None)
        candidate = None if root is None else Path(root) / "predictors" / level
        if candidate is None or not candidate.is_dir():
            raise CliError(
                f"--acceleration {level} with --method lesa needs a predictor bundle: none at {candidate}; "
                "pass --predictor BUNDLE or use --method taylorseer|reuse"
            )
        predictor = candidate
    try:
        bundle = lesa_core.StagePredictor.from_pretrained(predictor)
    except Exception as error:  # a user-supplied path: report it as one line
        raise CliError(f"cannot load predictor bundle {predictor}: {error}") from error
    return lesa_core.CacheConfig(method="lesa", schedule=schedule, predictor=bundle)


def _size(pipe: Any, text: str | None) -> tuple[int, int]:
    if text is None:
        return pipe.sizes[0]
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise CliError(f"--size must look like 16x16, got {text!r}") from error
    return w, h


def _outputs(base: Path, count: int, suffix: str) -> list[Path]:
    if count == 1 and base.suffix:
        return [base]
    if not base.suffix:  # a directory
        base.mkdir(parents=True, exist_ok=True)
        return [base / f"{i:03d}{suffix}" for i in range(count)]
    return [base.with_name(f"{base.stem}-{i:03d}{base.suffix}") for i in range(count)]


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lesa_models import media

    pipe = _load(args.model)
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        prompts = read_prompts(args.prompts)  # comments (#) skipped, as for `lesa record` and `lesa bench`
    suffixes = IMAGE_SUFFIXES if pipe.kind == "image" else VIDEO_SUFFIXES
    suffix = args.output.suffix.lower() or (".png" if pipe.kind == "image" else ".mp4")
    if suffix not in suffixes:
        raise CliError(f"--output for {pipe.kind} must end in one of {', '.join(suffixes)}, got {suffix!r}")
    width, height = _size(pipe, args.size)
    # what the pipeline would refuse (steps, guidance, size, frames), refused before any output is
    # made and before the progress bar opens: an error printed after it lands on the bar's line
    guidance = pipe.default_guidance if args.guidance is None else args.guidance
    seeds = [args.seed + i for i in range(len(prompts))]
    try:
        frames = pipe.validate(prompts, seeds, height, width, args.frames, args.steps, guidance)
    except ValueError as error:
        raise _in_flags(error) from error
    given = _given_image(pipe, args, prompts, (height, width) if frames is None else (frames, height, width))
    cache = resolve_acceleration(pipe, args.acceleration, args.steps, args.method, args.predictor)
    # a folder (no suffix) or the folder a file goes in: writable before the work, not after it
    prepare_output(args.output, "--output", directory=not args.output.suffix)
    paths = _outputs(args.output, len(prompts), suffix)
    chunk = max(1, args.batch_size)
    bar = tqdm(total=args.steps * -(-len(prompts) // chunk), desc=f"{pipe.name}", unit="step", file=sys.stderr)
    written = 0
    with bar:  # closed on any error too: its message then starts on a line of its own
        for start in range(0, len(prompts), chunk):
            part = prompts[start : start + chunk]
            reference = None if given is None else given.select(slice(start, start + chunk))
            try:
                out = pipe(
                    part,
                    seeds=[args.seed + start + i for i in range(len(part))],
                    height=height,
                    width=width,
                    num_frames=args.frames,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    cache=cache,
                    callback=lambda done, total: bar.update(1) and None,
                    reference=reference,
                )
            except ValueError as error:
                raise _in_flags(error) from error
            for sample in out.samples:
                path = paths[written]
                path.parent.mkdir(parents=True, exist_ok=True)
                if pipe.kind == "image":
                    path.write_bytes(media.image_bytes(sample, suffixes[suffix], scale=args.scale or 8))
                else:
                    path.write_bytes(media.video_bytes(sample, suffixes[suffix], scale=args.scale or 16))
                written += 1
    for path in paths:
        print(path)
    return 0


# the pipeline's argument names, as the flags that set them
_FLAGS = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "num_frames": "--frames"}


def _given_image(pipe: Any, args: argparse.Namespace, prompts: list[str], shape: tuple[int, ...]) -> Reference | None:
    """`--image` (and `--mask`, `--strength`) as the sampler keeps them, for every prompt: as
    `POST /v1/images/edits`, `/v1/images/variations` and a video's `input_reference` read theirs."""
    if args.image is None:
        if args.mask is not None or args.strength is not None:
            raise CliError("--mask and --strength need --image (the image to edit)")
        return None
    if pipe.kind == "video" and (args.mask is not None or args.strength is not None):
        raise CliError("--mask and --strength are for image models; a video model keeps --image as its first frame")
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        raise CliError(f"--strength must be in 0..1, got {args.strength:g}")

    def read(path: Path, flag: str) -> Any:
        try:
            return given_images.read_upload(path.read_bytes(), f"{flag} {path}")
        except OSError as error:
            raise CliError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
        except ValueError as error:
            raise CliError(str(error)) from None

    picture = read(args.image, "--image")
    height, width = shape[-2:]
    sample = given_images.reference_sample(picture, width, height, pipe.reference_mode)
    samples = np.zeros((len(prompts), *shape), np.float32)
    keep = np.zeros(samples.shape, bool)
    if pipe.kind == "video":  # the first frame, kept at every step
        samples[:, 0], keep[:, 0] = sample, True
        return Reference(samples, keep, [0] * len(prompts))
    samples[:] = sample
    if args.mask is not None:
        try:
            keep[:] = given_images.keep_mask(
                read(args.mask, "--mask"), picture.size, width, height, f"--mask {args.mask}"
            )
        except ValueError as error:
            raise CliError(str(error)) from None
    strengths = [edit_strength(args.strength, masked=args.mask is not None, prompted=bool(p)) for p in prompts]
    return Reference(samples, keep, [reference_steps(s, args.steps) for s in strengths])


def _in_flags(error: ValueError) -> CliError:
    """The pipeline's refusal, naming the flags typed, not the pipeline's arguments."""
    message = str(error)
    for name, flag in _FLAGS.items():
        message = re.sub(rf"\b{name}\b", flag, message)
    return CliError(message)


def _train_model(args: argparse.Namespace) -> int:
    from lesa_models.train import train

    # found unwritable only after minutes of training, the run would be lost
    prepare_output(args.output, "--output", directory=True)
    if args.name == "evaluator":
        import torch

        from lesa_models.evaluator import train_classifier

        if args.work_dir is not None:  # minutes of training: nothing to resume
            raise CliError("--work-dir: the evaluator trains in one go and keeps no checkpoints")
        torch.set_num_threads(args.threads)
        steps = {} if args.steps is None else {"steps": args.steps}
        print(json.dumps(train_classifier(output=args.output, **steps)))
        return 0
    prepare_output(args.work_dir, "--work-dir", directory=True)
    try:
        out = train(args.name, work_dir=args.work_dir, output=args.output, steps=args.steps, threads=args.threads)
    except ValueError as error:
        raise CliError(str(error)) from None
    print(out)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lesa_models import evaluator, media

    prepare_output(args.json, "--json")
    prepare_output(args.grid, "--grid")
    pipe = _load(args.model)
    # a still grid for images, an animated strip for videos: the name says in which format
    suffixes = IMAGE_SUFFIXES if pipe.kind == "image" else VIDEO_SUFFIXES
    if args.grid is not None and args.grid.suffix.lower() not in suffixes:
        raise CliError(f"--grid for {pipe.kind} must end in one of {', '.join(suffixes)}, got {args.grid.name!r}")
    cache = resolve_acceleration(pipe, args.acceleration, args.steps, args.method, args.predictor)
    try:
        result, samples, _ = evaluator.evaluate_pipeline(
            pipe, per_class=args.per_class, steps=args.steps, guidance=args.guidance, cache=cache
        )
    except ValueError as error:
        raise CliError(str(error)) from error
    report = result.to_dict()
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.grid is not None:
        fmt = suffixes[args.grid.suffix.lower()]
        if pipe.kind == "image":
            args.grid.write_bytes(media.image_bytes(media.grid(samples, rows=10), fmt, scale=4))
        else:
            strip = media.clip_strip(np.asarray(samples[:: args.per_class]))
            args.grid.write_bytes(media.video_bytes(strip, fmt, scale=4))
    return 0
