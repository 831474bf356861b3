"""Predictor training: the LESA paper's two phases (CVPR 2026), plus an optional phase 3.

Phase 1, GT-guided: every predicted step of the schedule forecasts from a history made of the
recorded ground truth (teacher forcing); L1 against the ground truth. No model forward runs, so
this phase is cheap and vectorised over samples.

Phase 2, closed loop: the real accelerated sampler runs from the recorded noise with the current
predictor (full steps compute, predicted steps forecast, forecasts fed back into the history and
the sampler). The hidden states it actually saw are collected, and each forecast is recomputed
from them with gradients and trained with L1 against the recorded ground truth of that step.
Gradients stop at the history (no backpropagation through the sampler or the transformer), which
keeps the phase usable on billion-parameter pipelines whose `__call__` runs under no_grad, while
the inputs still carry the predictor's own accumulated error, which is what this phase teaches
it to correct.

Phase 3 (optional, not in the paper): the loss is the MSE of the final sample against the
recorded full-compute sample, backpropagated through the whole accelerated sampler (the
transformer's full steps included, its weights frozen). It trains what the benchmark measures,
but needs a pipeline whose sampler can run with gradients (`denoise`, as the reference models
have; diffusers pipelines run under no_grad).

Validation: closed-loop generation on held-out trajectories; the score is the MSE of the final
sample against the recorded full-compute sample (what users see). The best epoch is kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lesa_core.hooks import CacheConfig
from lesa_core.predictor import (
    CONFIG_NAME,
    SHARED_BRANCH,
    PredictorConfig,
    StagePredictor,
    refuse_occupied,
    stage_thresholds_for,
)
from lesa_core.schedule import CacheSchedule
from lesa_core.trajectories import Trajectories, load_trajectories

STATE_NAME = "train_state.pt"  # in the work directory: what resuming continues from


@dataclass
class TrainSettings:
    phase1_epochs: int = 300
    phase2_epochs: int = 6
    # Phase 3 (ours, optional): the MSE of the final sample, backpropagated through the whole
    # accelerated sampler. Needs a pipeline with a differentiable `denoise` (the reference models).
    phase3_epochs: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    phase2_lr: float = 2e-4
    phase3_lr: float = 2e-4
    # Phase 3's batch (None: batch_size). Each update runs the whole sampler, so the epochs are
    # what costs: smaller batches give more updates for the same time (the reference 5x ensemble
    # trained 12 epochs of 4 at 3e-4 is as good on validation seeds as 90 epochs of 16 at 2e-4).
    phase3_batch_size: int | None = None
    weight_decay: float = 1e-4
    lr_step: int = 500  # StepLR period (optimizer steps), as in the reference code
    lr_gamma: float = 0.5
    grad_clip: float = 1.0
    val_fraction: float = 0.15
    per_branch: bool = False  # one expert set per CFG branch (the HunyuanVideo variant)
    kan_hidden: tuple[int, ...] = (256, 256)
    base: str = "last"  # "last" = the paper's predictor; "reuse"/"taylor1"/"taylor2" = improved variants
    history_weights: str = "scalar"  # "scalar" = the paper's Linear_K->1; "channel" = per channel (improved)
    # "l1" = the paper: L1 on each branch's hidden state. "guided" (improved): the error the
    # sampler sees, see `forecast_loss`.
    loss: str = "l1"
    seed: int = 0
    init_from: str | None = None  # start from this bundle's weights (fine-tuning) instead of the zero head
    taylor_stages: tuple[int, ...] = ()  # stages forecast by TaylorSeer order 1, not learned (improved variant)
    validate_every: int = 50  # phase 1 epochs between closed-loop validations
    # Each update trains on a random subset of tokens: the predictor's weights are shared by every
    # token and channel, so a subset gives an unbiased gradient at a fraction of the cost.
    train_tokens: int | None = None
    phase2_updates_per_rollout: int = 8


@dataclass
class TrainReport:
    best_val_mse: float
    best_epoch: str
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def forecast_loss(
    predictor: StagePredictor,
    inputs: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    times: torch.Tensor,
    schedule: CacheSchedule,
    loss: str = "l1",
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The error of the forecasts made from `inputs` at every predicted step, vs `targets`.

    Phase 1 passes the ground truth as inputs (teacher forcing); phase 2 passes the hidden states
    the closed-loop sampler actually produced. Both are [n, steps, tokens, channels] per branch.

    "l1" (the paper): mean L1 over steps and branches. "guided" weighs each error by what the
    sampler does with it: the final layer's LayerNorm removes each token's channel mean and
    divides by its spread, CFG moves the sample by g * cond - (g - 1) * uncond (so errors the two
    branches share cancel and the ones they do not are amplified g-fold), and the Euler step
    scales the velocity by the step's dt. Squared, as the quality metric is.
    """
    predicted = predictor.learned_steps(times)
    forecasts = {
        branch: predictor.predict_steps(trajectory, predicted, times, branch, schedule.full_steps)
        for branch, trajectory in inputs.items()
    }
    if loss == "l1":
        return torch.stack([F.l1_loss(f, targets[b][:, predicted]) for b, f in forecasts.items()]).mean()
    if loss != "guided":
        raise ValueError(f"loss must be 'l1' or 'guided', got {loss!r}")
    errors = {}
    for branch, forecast in forecasts.items():
        truth = targets[branch][:, predicted]
        error = forecast - truth
        errors[branch] = (error - error.mean(-1, keepdim=True)) / (truth.std(-1, keepdim=True) + 1e-6)
    if "cond" in errors and "uncond" in errors and guidance_scale > 1.0:
        error = guidance_scale * errors["cond"] - (guidance_scale - 1.0) * errors["uncond"]
    else:
        error = torch.stack(list(errors.values())).mean(0)
    dt = (times[predicted] - times[[s + 1 for s in predicted]]).abs()
    weight = (dt / dt.mean()).reshape(1, -1, *([1] * (error.dim() - 2))).to(error.dtype)
    return (weight * error.square()).mean()


def closed_loop(
    pipe: Any, predictor: StagePredictor, data: Trajectories, schedule: CacheSchedule, batch_size: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run the accelerated sampler from the recorded noise; return the hidden states it saw per
    branch ([n, steps, tokens, channels]) and the final samples."""
    s = data.settings
    seen: dict[str, list[list[torch.Tensor]]] = {}
    finals = []
    predictor.eval()
    for start in range(0, len(data), batch_size):
        chunk: dict[str, list[torch.Tensor]] = {}

        def observe(branch: str, step: int, h: torch.Tensor, full: bool, chunk=chunk) -> None:
            chunk.setdefault(branch, []).append(h.detach().float().cpu())

        end = min(start + batch_size, len(data))
        out = pipe(
            data.prompts[start:end],
            seeds=data.seeds[start:end],
            height=s.height,
            width=s.width,
            num_frames=s.num_frames,
            num_inference_steps=s.num_steps,
            guidance_scale=s.guidance_scale,
            cache=CacheConfig(method="lesa", schedule=schedule, predictor=predictor, observer=observe),
            latents=data.noise[start:end],
        )
        finals.append(torch.as_tensor(out.samples))
        for branch, steps in chunk.items():
            seen.setdefault(branch, []).append(steps)
    merged = {b: torch.cat([torch.stack(c, dim=1) for c in chunks]) for b, chunks in seen.items()}
    return merged, torch.cat(finals)


def sample_loss(pipe: Any, predictor: StagePredictor, data: Trajectories, schedule: CacheSchedule) -> torch.Tensor:
    """Phase 3: MSE of the accelerated sampler's final samples vs full compute, with gradients."""
    s = data.settings
    predictor.train()
    # the transformer's weights stay out of the graph (autograd records requires_grad at forward
    # time): only its activations carry the gradient back to earlier forecasts
    with torch.enable_grad(), _frozen(pipe):
        samples, _ = pipe.denoise(
            data.prompts,
            seeds=data.seeds,
            height=s.height,
            width=s.width,
            num_frames=s.num_frames,
            num_inference_steps=s.num_steps,
            guidance_scale=s.guidance_scale,
            cache=CacheConfig(method="lesa", schedule=schedule, predictor=predictor),
            latents=data.noise,
        )
        return F.mse_loss(samples, data.final.to(samples.device, samples.dtype))


def _token_subset(hidden: dict[str, torch.Tensor], count: int | None, generator: torch.Generator) -> torch.Tensor:
    tokens = next(iter(hidden.values())).shape[2]
    if not count or count >= tokens:
        return torch.arange(tokens)
    return torch.randperm(tokens, generator=generator)[:count]


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction)) if n > 1 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


def training_paths(out_dir: str | Path, work_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Where a run writes its bundle and its resumable state (`<out>.work` unless given).

    An `out_dir` holding a file, or another bundle, is refused before any work: the run's first
    validation would replace it with an untrained predictor. A bundle of this very run (its state
    is in the work directory) is the one resuming continues.
    """
    out = Path(out_dir).resolve()  # "." has no name to put ".work" after
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    if not (out.is_dir() and (work / STATE_NAME).is_file()):  # else: this run's own bundle, resumed
        refuse_occupied(out_dir, "--out")
    return out, work


def train_predictor(
    pipe: Any,
    data_dir: str | Path,
    schedule: CacheSchedule,
    out_dir: str | Path,
    settings: TrainSettings | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[StagePredictor, TrainReport]:
    """Train a predictor for `schedule` on recorded trajectories; the best epoch goes to `out_dir`.

    `work_dir` holds the resumable training state (optimizer, epoch, best score); rerunning with
    the same arguments continues where it stopped.
    """
    settings = settings or TrainSettings()
    if settings.phase3_epochs and not callable(getattr(pipe, "denoise", None)):
        raise ValueError(
            "phase 3 backpropagates through the sampler: it needs a pipeline with a differentiable "
            "`denoise` (the reference models); diffusers pipelines run under no_grad"
        )
    out_dir, work = training_paths(out_dir, work_dir)
    state_path = work / STATE_NAME
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    data = load_trajectories(data_dir)
    if data.settings.num_steps != schedule.num_steps:
        raise ValueError(
            f"trajectories in {data_dir} have {data.settings.num_steps} steps but the schedule has {schedule.num_steps}"
        )
    train_idx, val_idx = _split(len(data), settings.val_fraction, settings.seed)
    train, val = data.subset(train_idx), data.subset(val_idx) if val_idx else data.subset(train_idx)
    branches = tuple(data.hidden) if settings.per_branch else (SHARED_BRANCH,)
    sample_hidden = next(iter(data.hidden.values()))
    family = getattr(getattr(pipe, "info", None), "transformer_class", None)
    config = PredictorConfig(
        schedule=schedule.to_dict(),
        kan_hidden=tuple(settings.kan_hidden),
        branches=branches,
        base=settings.base,
        history_weights=settings.history_weights,
        taylor_stages=tuple(settings.taylor_stages),
        family=family,
        stage_thresholds=stage_thresholds_for(family),
        hidden_size=int(sample_hidden.shape[-1]),
    )
    predictor = StagePredictor(config)
    if schedule.num_full == schedule.num_steps:
        raise ValueError(f"the schedule runs every step in full ({schedule.describe()}): no step to predict, nothing "
                         "to learn; check --interval / --first-enhance / --level")  # fmt: skip
    if not predictor.learned_steps(data.times):
        raise ValueError(f"taylor_stages {settings.taylor_stages} cover every predicted step: nothing to learn")
    if settings.init_from:
        initial_training = _load_initial(predictor, settings.init_from)
    else:
        initial_training = None
    times = data.times

    work.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=settings.lr_step, gamma=settings.lr_gamma)
    report = TrainReport(best_val_mse=float("inf"), best_epoch="none")
    start_epoch = 0
    generator = torch.Generator().manual_seed(settings.seed)  # epoch orders and token subsets
    # what the run trains on: resuming on other trajectories would mix two datasets in one bundle
    data_id = json.dumps({"settings": asdict(data.settings), "prompts": data.prompts, "seeds": data.seeds})
    if state_path.exists():
        try:
            state = torch.load(state_path, weights_only=True)
            same = (
                state["settings"] == json.dumps(asdict(settings))
                and state["schedule"] == json.dumps(schedule.to_dict())
                and state.get("data", data_id) == data_id  # states saved before it was recorded: trusted
            )
            if same:
                predictor.load_state_dict(state["predictor"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                start_epoch = int(state["epoch"])
                report = TrainReport(**json.loads(state["report"]))
                started -= report.seconds  # the time of the runs it continues counts too
                torch.set_rng_state(state["rng"])
                if "generator" in state:  # (states saved before it was kept replay epoch 0's orders)
                    generator.set_state(state["generator"])
        except Exception as error:  # noqa: BLE001 - truncated, garbage, or another format: say which file
            raise ValueError(
                f"{state_path}: not a readable training state ({type(error).__name__}); remove {work} to start afresh"
            ) from None
        if not same:
            raise ValueError(
                f"{state_path} belongs to another training run (other settings, schedule or --data); "
                f"remove {work} to start afresh"
            )
        if report.best_epoch != "none" and not (out_dir / CONFIG_NAME).is_file():
            raise ValueError(
                f"{out_dir}: the bundle this run saved (best epoch {report.best_epoch}) is gone, so resuming "
                f"has nothing to keep; remove {work} to train afresh"
            )

    def validate(label: str) -> float:
        _, finals = closed_loop(pipe, predictor, val, schedule, settings.batch_size)
        mse = float(F.mse_loss(finals, val.final))
        report.history.append({"epoch": label, "val_final_mse": mse})
        if mse < report.best_val_mse:
            report.best_val_mse, report.best_epoch = mse, label
            _save(predictor, out_dir, settings, report, data, started, initial_training)
        return mse

    def save_state(epoch: int) -> None:
        report.seconds = time.perf_counter() - started
        torch.save(
            {
                "predictor": predictor.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "report": json.dumps(asdict(report)),
                "settings": json.dumps(asdict(settings)),
                "schedule": json.dumps(schedule.to_dict()),
                "data": data_id,
                "rng": torch.get_rng_state(),
                "generator": generator.get_state(),  # a resumed run shuffles as an uninterrupted one
            },
            state_path.with_suffix(".tmp"),
        )
        os.replace(state_path.with_suffix(".tmp"), state_path)  # atomic: a crash never leaves half a state

    def update(loss: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(predictor.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        return loss.item()

    total_epochs = settings.phase1_epochs + settings.phase2_epochs + settings.phase3_epochs
    first_epoch = {1: 0, 2: settings.phase1_epochs, 3: settings.phase1_epochs + settings.phase2_epochs}
    if start_epoch == 0:
        # The untrained predictor is a baseline too (an anchored base with a zero head *is* FORA
        # or TaylorSeer): training keeps it unless an epoch does better on held-out samples.
        validate("init")
        # Its bundle exists now: without a state beside it, a rerun (after a Ctrl-C in epoch 1)
        # would take the bundle for someone else's and refuse to resume.
        save_state(0)
    bar = tqdm(range(start_epoch, total_epochs), desc=f"train {schedule.describe()}", disable=not progress)
    bar.update(0)
    for epoch in bar:
        phase = max(p for p, first in first_epoch.items() if epoch >= first)
        if phase > 1 and epoch == first_epoch[phase]:
            for group in optimizer.param_groups:
                group["lr"] = settings.phase2_lr if phase == 2 else settings.phase3_lr
            if phase == 3 and report.best_epoch != "none":
                # fine-tune the best predictor so far, not wherever phase 2 wandered to
                predictor.load_state_dict(StagePredictor.from_pretrained(out_dir).state_dict())
        order = torch.randperm(len(train), generator=generator).tolist()
        losses = []
        batch_size = (settings.phase3_batch_size or settings.batch_size) if phase == 3 else settings.batch_size
        for start in range(0, len(order), batch_size):
            batch = train.subset(order[start : start + batch_size])
            if phase == 3:
                losses.append(update(sample_loss(pipe, predictor, batch, schedule)))
                continue
            if phase == 1:
                inputs, updates = batch.hidden, 1
            else:
                # One closed-loop rollout is expensive (it runs the model); the forecasts made from
                # its hidden states are cheap, so each rollout feeds several optimizer steps.
                inputs, _ = closed_loop(pipe, predictor, batch, schedule, settings.batch_size)
                updates = settings.phase2_updates_per_rollout
            predictor.train()
            for _ in range(updates):
                keep = _token_subset(batch.hidden, settings.train_tokens, generator)
                loss = forecast_loss(
                    predictor,
                    {b: h[:, :, keep] for b, h in inputs.items()},
                    {b: h[:, :, keep] for b, h in batch.hidden.items()},
                    times,
                    schedule,
                    settings.loss,
                    data.settings.guidance_scale,
                )
                losses.append(update(loss))
        mean_loss = sum(losses) / len(losses)
        if not math.isfinite(mean_loss):  # nothing good can come of more epochs; the best bundle so far stays
            raise ValueError(
                f"training diverged in epoch {epoch + 1} (phase {phase}): the loss is {mean_loss}; check the "
                f"trajectories in {data_dir} or lower the learning rate"
            )
        postfix = {"phase": phase, ("sample_mse" if phase == 3 else settings.loss): f"{mean_loss:.5f}"}
        last_phase1 = epoch == settings.phase1_epochs - 1
        if phase > 1 or last_phase1 or (epoch + 1) % settings.validate_every == 0:
            postfix["val_mse"] = f"{validate(f'phase{phase}-epoch{epoch + 1}'):.5f}"
        report.history.append({"epoch": epoch + 1, "phase": phase, "train_loss": mean_loss})
        bar.set_postfix(postfix)
        save_state(epoch + 1)
    report.seconds = time.perf_counter() - started
    best = StagePredictor.from_pretrained(out_dir)
    return best, report


def _load_initial(predictor: StagePredictor, bundle: str | Path) -> dict[str, Any]:
    """Start from a trained bundle's weights (same predictor, same schedule); returns how it was trained."""
    start = StagePredictor.from_pretrained(bundle)
    if not isinstance(start, StagePredictor):  # an ensemble: its members are what was trained
        names = ", ".join(str(Path(bundle) / n) for n in start.names)
        raise ValueError(f"{bundle}: an ensemble of predictors; fine-tune one of its members ({names})")
    for name in ("schedule", "branches", "history_depths", "kan_hidden", "grid_size", "base", "history_weights"):
        ours, theirs = getattr(predictor.config, name), getattr(start.config, name)
        if ours != theirs:
            raise ValueError(f"{bundle}: its {name} is {theirs!r} but this training run's is {ours!r}")
    predictor.load_state_dict(start.state_dict())
    return start.config.training


@contextlib.contextmanager
def _frozen(pipe: Any) -> Iterator[None]:
    """Turn off requires_grad on the transformer's weights for the duration (restored after)."""
    params = [p for p in pipe.transformer.parameters() if p.requires_grad]
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in params:
            param.requires_grad_(True)


def _save(
    predictor: StagePredictor,
    out_dir: str | Path,
    settings: TrainSettings,
    report: TrainReport,
    data: Trajectories,
    started: float,
    initial_training: dict[str, Any] | None = None,
) -> None:
    predictor.config.training = {
        "method": "LESA two-phase (GT-guided, then closed-loop)"
        + (", then sample-space (phase 3)" if settings.phase3_epochs else ""),
        "settings": asdict(settings),
        "data": {"samples": len(data), **asdict(data.settings)},
        "best_epoch": report.best_epoch,
        "val_final_mse": report.best_val_mse,
        "seconds_so_far": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    if initial_training is not None:  # a fine-tune: keep the record of what it started from
        predictor.config.training["initial"] = initial_training
    predictor.save_pretrained(out_dir)
