"""`lesa` sub-commands that belong to the algorithm library itself."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from lesa_core.cli import CliError, non_negative_int, positive_float, positive_int, prepare_output, seed_int
from lesa_core.predictor import BundleError
from lesa_core.schedule import CacheSchedule
from lesa_core.training import TrainSettings as TrainDefaults


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-reference", help="convert a checkpoint from the paper's code into a predictor bundle"
    )
    parser.add_argument("checkpoint", help="torch file saved by the reference implementation")
    parser.add_argument("out_dir", help="bundle directory to write (config.json + model.safetensors)")
    parser.add_argument("--num-steps", type=positive_int, required=True)
    parser.add_argument("--interval", type=positive_int, required=True)
    parser.add_argument("--first-enhance", type=non_negative_int, required=True)
    parser.add_argument("--family", default=None, help="transformer class, e.g. FluxTransformer2DModel")
    parser.add_argument(
        "--stage-thresholds",
        type=stage_thresholds,
        default=None,
        metavar="HIGH,LOW",
        help="where the experts split (default: the paper's for --family: 0.9,0.4 for HunyuanVideo, else 0.9,0.5)",
    )
    parser.set_defaults(func=_import_reference)
    parser = subparsers.add_parser(
        "ensemble-predictors",
        help="combine bundles trained for one schedule into one whose forecast is their mean (improved)",
    )
    parser.add_argument("members", nargs="+", metavar="NAME=BUNDLE", help="member name (its subdirectory) and bundle")
    parser.add_argument("--out", required=True, help="ensemble bundle directory to write")
    parser.set_defaults(func=_ensemble_predictors)
    add_training_commands(subparsers)


def _ensemble_predictors(args: argparse.Namespace) -> int:
    from lesa_core.ensemble import PredictorEnsemble
    from lesa_core.predictor import StagePredictor

    refuse_occupied(Path(args.out), "--out")
    names, members = [], []
    for item in args.members:
        name, sep, bundle = item.partition("=")
        # NAME becomes a subdirectory next to the ensemble's own config.json: letters, digits, - and _ only
        if not sep or not bundle or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise CliError(f"member {item!r}: expected NAME=BUNDLE, NAME made of letters, digits, - and _")
        try:
            member = StagePredictor.from_pretrained(bundle)
        except BundleError as error:
            raise CliError(f"member {name}: {error}") from error
        if not isinstance(member, StagePredictor):
            raise CliError(f"member {name} ({bundle}): an ensemble; members are single predictors")
        if members and member.schedule != members[0].schedule:
            raise CliError(
                f"member {name} ({bundle}) is for {member.schedule.describe()}, member {names[0]} for "
                f"{members[0].schedule.describe()}: an ensemble's members share one schedule"
            )
        names.append(name)
        members.append(member)
    if len(set(names)) != len(names):
        raise CliError(f"member names must differ: {names}")
    for member in members:
        member.config.quality = {}  # a member's own card would describe it alone, not the ensemble
    try:
        training = {"method": "mean forecast of the members (each member's config.json says how it was trained)"}
        ensemble = PredictorEnsemble(members, training=training, names=names)
    except BundleError as error:
        raise CliError(str(error)) from error
    ensemble.save_pretrained(args.out)
    print(f"wrote {args.out}: mean of {', '.join(names)} ({ensemble.schedule.describe()})")
    return 0


def stage_thresholds(text: str) -> tuple[float, float]:
    """argparse type: HIGH,LOW, two numbers (their range: the library's check, in `_import_reference`)."""
    try:
        high, low = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HIGH,LOW (e.g. 0.9,0.5), got {text!r}") from None
    return high, low


def refuse_occupied(out: Path, name: str) -> None:
    """A bundle's destination must not hold a file or another bundle (the library's check and wording)."""
    from lesa_core.predictor import refuse_occupied as refuse

    try:
        refuse(out, name)
    except ValueError as error:
        raise CliError(str(error)) from None


def _import_reference(args: argparse.Namespace) -> int:
    from lesa_core.predictor import check_stage_thresholds
    from lesa_core.reference_import import import_reference

    if args.stage_thresholds is not None:
        try:
            check_stage_thresholds(args.stage_thresholds, name="--stage-thresholds")
        except ValueError as error:
            raise CliError(str(error)) from None
    refuse_occupied(Path(args.out_dir), "out_dir")
    try:
        schedule = CacheSchedule(args.num_steps, args.interval, args.first_enhance)
        predictor = import_reference(args.checkpoint, args.out_dir, schedule, args.family, args.stage_thresholds)
    except (BundleError, ValueError) as error:
        raise CliError(str(error)) from error
    branches = ", ".join(predictor.config.branches)
    high, low = predictor.config.stage_thresholds
    print(f"wrote {args.out_dir}: {schedule.describe()}, branches: {branches}, stages split at t={high:g} and {low:g}")
    return 0


def load_any_pipeline(name: str):
    """A model named in the models config (deploy/models.toml), or a reference pipeline directory."""
    from lesa_core.production.config import ConfigError, build_pipeline, read_config

    if (Path(name) / "model_index.json").is_file():
        from lesa_models import load_pipeline

        return load_pipeline(name)
    try:
        config = read_config()
    except ConfigError as error:
        raise CliError(str(error)) from error
    if name not in config.models:
        raise CliError(f"unknown model {name!r}; known models: {', '.join(config.models)}")
    return build_pipeline(config.models[name], root=config.weights_root)


def parse_seeds(text: str) -> list[int]:
    """'0-63' or '1,2,5' or '0-9,20-29' -> a list of seeds (CliError otherwise)."""
    from lesa_core.benchmark import parse_seeds as parse

    try:
        return parse(text)
    except ValueError as error:
        raise CliError(f"--seeds: {error}") from None


def read_prompts(path: str | Path) -> list[str]:
    from lesa_core.benchmark import read_prompts as read

    try:
        return read(path)
    except ValueError as error:
        raise CliError(f"--prompts {error}") from None


def add_training_commands(subparsers: argparse._SubParsersAction) -> None:
    rec = subparsers.add_parser("record", help="record full-compute trajectories to train predictors on")
    rec.add_argument("--model", required=True)
    rec.add_argument("--prompts", required=True, help="text file, one prompt per line (cycled over the seeds)")
    rec.add_argument("--seeds", required=True, help="e.g. 0-63")
    rec.add_argument("--steps", type=positive_int, default=50)
    rec.add_argument("--guidance", type=float, default=None, help="default: the model's")
    rec.add_argument("--size", default=None, help="WxH, default: the model's first size")
    rec.add_argument("--frames", type=positive_int, default=None)
    rec.add_argument("--shard-size", type=positive_int, default=16)
    rec.add_argument("--out", required=True)
    rec.set_defaults(func=_record)

    train = subparsers.add_parser(
        "train-predictor", help="train a LESA predictor bundle (phases 1-2, optional phase 3)"
    )
    train.add_argument("--model", required=True)
    train.add_argument("--data", required=True, help="directory written by `lesa record`")
    train.add_argument("--steps", type=positive_int, default=50)
    group = train.add_mutually_exclusive_group(required=True)
    group.add_argument("--level", help="a named level: 2x, 3.3x, 5x, 6.25x")
    group.add_argument("--interval", type=positive_int)
    train.add_argument("--first-enhance", type=non_negative_int, default=3)
    train.add_argument("--out", required=True, help="bundle directory")
    train.add_argument("--work-dir", default=None, help="resumable state (default: OUT.work)")
    train.add_argument("--phase1-epochs", type=non_negative_int, default=TrainDefaults.phase1_epochs)
    train.add_argument("--phase2-epochs", type=non_negative_int, default=TrainDefaults.phase2_epochs)
    train.add_argument(
        "--phase3-epochs",
        type=non_negative_int,
        default=TrainDefaults.phase3_epochs,
        help="epochs of final-sample MSE through the whole sampler (improved; reference models only)",
    )
    train.add_argument("--batch-size", type=positive_int, default=TrainDefaults.batch_size)
    train.add_argument("--lr", type=positive_float, default=TrainDefaults.lr)
    train.add_argument(
        "--phase3-batch-size", type=positive_int, default=None, help="phase 3's batch (default: --batch-size)"
    )
    train.add_argument("--phase3-lr", type=positive_float, default=TrainDefaults.phase3_lr)
    train.add_argument(
        "--kan-hidden",
        default="256,256",
        help="KAN hidden widths (the paper: 256,256; the gain is one scalar per step)",
    )
    train.add_argument(
        "--train-tokens", type=positive_int, default=None, help="tokens sampled per update (default: all)"
    )
    train.add_argument(
        "--phase2-updates",
        type=positive_int,
        default=TrainDefaults.phase2_updates_per_rollout,
        help="optimizer steps per closed-loop rollout",
    )
    train.add_argument("--per-branch", action="store_true", help="separate experts per CFG branch")
    train.add_argument(
        "--base",
        choices=("last", "reuse", "taylor1", "taylor2"),
        default="last",
        help="what the learned term corrects: last = h_-1 (the paper); reuse = last full step, taylorN = TaylorSeer order N (improved)",
    )
    train.add_argument(
        "--history-weights",
        choices=("scalar", "channel"),
        default="scalar",
        help="scalar = one weight per history slot (the paper); channel = one per slot and channel (improved)",
    )
    train.add_argument(
        "--loss",
        choices=("l1", "guided"),
        default="l1",
        help="l1 = L1 on each branch's hidden state (the paper); guided = the error after the final layer's "
        "norm, CFG and the step size, squared (improved)",
    )
    train.add_argument(
        "--taylor-stages",
        default="",
        help="comma-separated stages (0: t > 0.9, 1: 0.5 < t <= 0.9, 2: t <= 0.5) forecast by TaylorSeer "
        "order 1 instead of the learned experts (improved variant)",
    )
    train.add_argument("--init", default=None, help="start from this bundle's weights (e.g. phase 3 fine-tuning)")
    train.add_argument("--seed", type=seed_int, default=0)
    train.set_defaults(func=_train_predictor)


def _record(args: argparse.Namespace) -> int:
    from lesa_core.trajectories import RecordSettings, TrajectoryError, record

    seeds = parse_seeds(args.seeds)  # before the model loads: a typo costs no minutes
    prompts = read_prompts(args.prompts)
    # a file as --out, found by record() only after the model loaded; record() makes the folder
    # itself and removes it when refused, so nothing is created here
    prepare_output(Path(args.out), "--out", directory=True, create=False)
    pipe = load_any_pipeline(args.model)
    info = pipe.info
    prompts = [prompts[i % len(prompts)] for i in range(len(seeds))]
    width, height = _parse_size(args.size) if args.size else info.sizes[0]
    frames = args.frames if args.frames else (None if info.kind == "image" else info.num_frames[0])
    settings = RecordSettings(
        model=args.model,
        num_steps=args.steps,
        guidance_scale=info.default_guidance if args.guidance is None else args.guidance,
        height=height,
        width=width,
        num_frames=frames,
    )
    try:
        record(pipe, prompts, seeds, args.out, settings, shard_size=args.shard_size)
    except (TrajectoryError, ValueError) as error:
        raise CliError(str(error)) from error
    print(f"recorded {len(seeds)} trajectories of {args.model} into {args.out}")
    return 0


def _parse_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError as error:
        raise CliError(f"--kan-hidden {text!r}: expected comma-separated widths like 256,256") from error
    if not widths or min(widths) < 1:
        raise CliError(f"--kan-hidden {text!r}: widths must be positive")
    return widths


def _parse_stages(text: str) -> tuple[int, ...]:
    try:
        stages = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError as error:
        raise CliError(f"--taylor-stages {text!r}: expected stage numbers like 0 or 0,1") from error
    if any(s not in (0, 1, 2) for s in stages):
        raise CliError(f"--taylor-stages {text!r}: stages are 0, 1 and 2")
    return stages


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise CliError(f"--size {text!r}: expected WxH, e.g. 16x16") from error
    return width, height


def _train_predictor(args: argparse.Namespace) -> int:
    from lesa_core.levels import level_schedule
    from lesa_core.training import TrainSettings, train_predictor, training_paths
    from lesa_core.trajectories import MANIFEST, TrajectoryError, read_manifest

    try:
        if args.level:
            schedule = level_schedule(args.level, args.steps)
        else:
            schedule = CacheSchedule(args.steps, args.interval, args.first_enhance)
    except ValueError as error:
        raise CliError(str(error)) from error
    settings = TrainSettings(
        phase1_epochs=args.phase1_epochs,
        phase2_epochs=args.phase2_epochs,
        phase3_epochs=args.phase3_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        phase3_lr=args.phase3_lr,
        phase3_batch_size=args.phase3_batch_size,
        per_branch=args.per_branch,
        train_tokens=args.train_tokens,
        phase2_updates_per_rollout=args.phase2_updates,
        kan_hidden=_parse_widths(args.kan_hidden),
        base=args.base,
        history_weights=args.history_weights,
        loss=args.loss,
        init_from=args.init,
        taylor_stages=_parse_stages(args.taylor_stages),
        seed=args.seed,
    )
    try:
        recorded = read_manifest(Path(args.data) / MANIFEST)["settings"]["model"]
    except TrajectoryError as error:
        raise CliError(str(error)) from None
    if recorded != args.model:  # same names as `lesa record --model` took
        raise CliError(f"--data {args.data} holds trajectories of {recorded!r}, not --model {args.model!r}")
    try:
        training_paths(args.out, args.work_dir)  # before the model loads (minutes for a production one)
    except ValueError as error:
        raise CliError(str(error)) from None
    pipe = load_any_pipeline(args.model)
    try:
        predictor, report = train_predictor(pipe, args.data, schedule, args.out, settings, args.work_dir)
    except (TrajectoryError, ValueError) as error:
        raise CliError(str(error)) from error
    print(
        f"wrote {args.out}: {schedule.describe()}, best {report.best_epoch} "
        f"(val final MSE {report.best_val_mse:.6f}) in {report.seconds / 60:.1f} min"
    )
    return 0
