"""The stage-aware multi-expert predictor of the LESA paper (CVPR 2026).

For the last K hidden states H = [h_-K, ..., h_-1] (oldest first), the current normalised
time t (1 = noise, 0 = clean) and the schedule's times T = (t_0, ..., t_S):

    latent = Linear_K->1(H)                 # one weight per history slot, plus a bias
                                            # (history_weights="channel": one per slot and channel)
    gain   = KAN([t - t_i for t_i in T])    # a scalar
    h_pred = h_-1 + gain * latent

Three experts, chosen by t: stage 0 if t > 0.9 (K = 4), stage 1 if 0.5 < t <= 0.9 (K = 8),
stage 2 otherwise (K = 8). Optionally one expert set per CFG branch ("cond", "uncond").

A bundle is a directory with `config.json` and `model.safetensors` (or, for an ensemble of
predictors, `config.json` listing member bundles: `lesa_core/ensemble.py`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lesa_core.kan import KAN
from lesa_core.schedule import CacheSchedule

if TYPE_CHECKING:
    from lesa_core.ensemble import PredictorEnsemble

SHARED_BRANCH = "shared"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class BundleError(ValueError):
    """A predictor bundle that cannot be used: missing, corrupt, or made for something else."""


# Where the three experts split, by the time t in [0, 1] (LESA_METHOD.md): at 0.9 and 0.5, except
# the HunyuanVideo variant, which moves the second split to 0.4.
FAMILY_STAGE_THRESHOLDS = {"HunyuanVideoTransformer3DModel": (0.9, 0.4)}


def stage_thresholds_for(family: str | None) -> tuple[float, float]:
    """The paper's stage thresholds for a transformer class (None or unknown: FLUX's 0.9 / 0.5)."""
    return FAMILY_STAGE_THRESHOLDS.get(family or "", (0.9, 0.5))


def check_stage_thresholds(thresholds: Sequence[float], name: str = "stage_thresholds") -> None:
    """Stage thresholds must be (high, low) with 1 >= high >= low >= 0 (BundleError otherwise, naming
    them `name`): the one check of a bundle's config and of `lesa import-reference --stage-thresholds`."""
    numbers = all(isinstance(t, int | float) and not isinstance(t, bool) for t in thresholds)
    if len(thresholds) != 2 or not numbers or not 1.0 >= thresholds[0] >= thresholds[1] >= 0.0:
        raise BundleError(f"{name} must be (high, low) with 1 >= high >= low >= 0, got {list(thresholds)}")


@dataclass
class PredictorConfig:
    schedule: dict  # CacheSchedule.to_dict(): the one (steps, full steps) plan this predictor was trained for
    stage_thresholds: tuple[float, float] = (0.9, 0.5)
    history_depths: tuple[int, int, int] = (4, 8, 8)
    kan_hidden: tuple[int, ...] = (256, 256)
    grid_size: int = 5
    spline_order: int = 3
    grid_range: tuple[float, float] = (-3.0, 3.0)
    branches: tuple[str, ...] = (SHARED_BRANCH,)
    # What the learned term corrects: "last" = h_-1 (the paper); "reuse" = the last full step's
    # hidden state (FORA), "taylor1" / "taylor2" = a TaylorSeer extrapolation from the last full
    # steps (our improved variants, see README). Anchored bases stop forecasts compounding.
    base: str = "last"
    # "scalar" = the paper's Linear_K->1, shared by every channel; "channel" = one weight per
    # history slot and channel (an improved variant: channels move at different speeds).
    history_weights: str = "scalar"
    # Stages whose steps are not forecast by the learned experts but by TaylorSeer order 1 from the
    # last two full steps (an improved variant): on the reference image model the high-noise
    # steps decide the digit's shape, and a learned forecast there can tip a sample into another
    # shape (benchmarks/bench_stage_mix.py). Applied by the forecaster and the training losses.
    taylor_stages: tuple[int, ...] = ()
    family: str | None = None  # transformer class name, e.g. "FluxTransformer2DModel"
    hidden_size: int | None = None  # channels of the forecast hidden state
    training: dict[str, Any] = field(default_factory=dict)  # how it was trained
    quality: dict[str, Any] = field(default_factory=dict)  # measured quality card (benchmark figures)

    @property
    def num_times(self) -> int:
        return int(self.schedule["num_steps"]) + 1

    @classmethod
    def from_dict(cls, data: dict) -> PredictorConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise BundleError(f"unknown predictor config keys: {sorted(unknown)}")
        data = dict(data)
        for key in ("stage_thresholds", "history_depths", "kan_hidden", "grid_range", "branches", "taylor_stages"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def occupied_bundle_path(path: str | Path) -> str | None:
    """What writing a bundle to `path` would destroy ("a file", "a bundle (config.json)"), or None."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return "a file"
    if (path / CONFIG_NAME).exists():  # a trained predictor or an ensemble: its config and quality card
        return f"a bundle ({CONFIG_NAME})"
    return None


def refuse_occupied(path: str | Path, name: str) -> None:
    """A bundle's destination must not hold a file or another bundle: writing would destroy it.
    ValueError naming `name` (the flag or argument that gave `path`); the CLI reports it as is."""
    if what := occupied_bundle_path(path):
        raise ValueError(f"{name} {path}: already holds {what}; choose a new directory or remove it first")


# A forecast's base (`PredictorConfig.base`) -> how many of the last full steps it extrapolates from
BASE_ANCHORS = {"last": 0, "reuse": 1, "taylor1": 2, "taylor2": 3}


class StagePredictor(nn.Module):
    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        self.schedule = CacheSchedule.from_dict(config.schedule)
        widths = [config.num_times, *config.kan_hidden, 1]
        # Module names mirror the reference checkpoints: latent.{stage}, timestep.{stage}.
        if config.history_weights not in ("scalar", "channel"):
            raise BundleError(f"history_weights must be 'scalar' or 'channel', got {config.history_weights!r}")
        if config.history_weights == "channel" and not config.hidden_size:
            raise BundleError("history_weights='channel' needs hidden_size")
        # Checked here, not at the first forecast of a request (where a bad value fails a generation).
        check_stage_thresholds(config.stage_thresholds)
        if len(config.history_depths) != 3 or not all(isinstance(d, int) and d >= 1 for d in config.history_depths):
            raise BundleError(
                f"history_depths must be 3 whole numbers >= 1 (one per stage), got {list(config.history_depths)}"
            )
        if config.base not in BASE_ANCHORS:
            raise BundleError(f"base must be one of {', '.join(BASE_ANCHORS)}, got {config.base!r}")
        if (
            not isinstance(config.grid_size, int)
            or config.grid_size < 1
            or not all(isinstance(w, int) and w >= 1 for w in config.kan_hidden)
        ):
            raise BundleError(
                f"grid_size and kan_hidden must be whole numbers >= 1, got {config.grid_size!r}, {list(config.kan_hidden)}"
            )
        if not set(config.taylor_stages) <= {0, 1, 2}:
            raise BundleError(f"taylor_stages must name stages 0, 1, 2, got {list(config.taylor_stages)}")
        out = 1 if config.history_weights == "scalar" else int(config.hidden_size)
        self.latent = nn.ModuleDict(
            {b: nn.ModuleList(nn.Linear(k, out) for k in config.history_depths) for b in config.branches}
        )
        self.timestep = nn.ModuleDict(
            {
                b: nn.ModuleList(
                    KAN(widths, config.grid_size, config.spline_order, config.grid_range) for _ in config.history_depths
                )
                for b in config.branches
            }
        )
        self.reset_history_weights()
        # (branch, schedule times, weight versions) -> {(step, device, dtype): folded coefficients}
        self._folded_cache: dict[tuple, dict[tuple, tuple]] = {}

    def reset_history_weights(self) -> None:
        # Start as "repeat the last hidden state" (latent = 0): training moves away from FORA.
        for heads in self.latent.values():
            for head in heads:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    @property
    def base_anchors(self) -> int:
        """0 for the paper's base h_-1, else how many full steps the base extrapolates from."""
        return BASE_ANCHORS[self.config.base]

    @property
    def max_depth(self) -> int:
        return max(self.config.history_depths)

    def stage(self, t_curr: float) -> int:
        high, low = self.config.stage_thresholds
        if t_curr > high:
            return 0
        return 1 if t_curr > low else 2

    def learned_steps(self, timesteps: torch.Tensor) -> list[int]:
        """The predicted steps of the schedule that the learned experts forecast (not `taylor_stages`)."""
        taylor = set(self.config.taylor_stages)
        return [
            s
            for s in range(self.schedule.num_steps)
            if not self.schedule.is_full(s) and self.stage(float(timesteps[s])) not in taylor
        ]

    def _branch(self, branch: str | None) -> str:
        if SHARED_BRANCH in self.latent:
            return SHARED_BRANCH
        if branch not in self.latent:
            raise ValueError(f"predictor has experts for branches {list(self.latent)}, not for {branch!r}")
        return branch

    def _check_times(self, timesteps: torch.Tensor) -> torch.Tensor:
        if timesteps.numel() != self.config.num_times:
            raise ValueError(
                f"predictor was trained for {self.config.num_times - 1} steps "
                f"({self.config.num_times} schedule times) but got {timesteps.numel()} times"
            )
        return timesteps.reshape(-1)

    def gain(self, timesteps: torch.Tensor, t_curr: torch.Tensor | float, branch: str | None = None) -> torch.Tensor:
        """The scalar gain KAN([t_curr - t_i]) of the expert for t_curr's stage."""
        times = self._check_times(torch.as_tensor(timesteps, dtype=torch.float32))
        t = torch.as_tensor(t_curr, dtype=torch.float32)
        kan = self.timestep[self._branch(branch)][self.stage(float(t))]
        weight = kan.layers[0].base_weight
        return kan((t - times).to(weight.device, weight.dtype).unsqueeze(0)).reshape(())

    def history_weights(self, t_curr: float, branch: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, bias) of the stage's head: [K] and [] (scalar), or [C, K] and [C] (channel)."""
        head = self.latent[self._branch(branch)][self.stage(t_curr)]
        if self.config.history_weights == "scalar":
            return head.weight.reshape(-1), head.bias.reshape(())
        return head.weight, head.bias

    def predict(
        self,
        history: Sequence[torch.Tensor],
        timesteps: torch.Tensor | Sequence[float],
        t_curr: float,
        branch: str | None = None,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forecast the next hidden state from `history` (oldest first), differentiably.

        `base` is the term the prediction corrects: h_-1 (the paper) unless the predictor was
        trained on a Taylor base, which the caller extrapolates from the full steps.
        """
        if not history:
            raise ValueError("predict needs at least one past hidden state")
        if (base is None) != (self.base_anchors == 0):
            raise ValueError(f"this predictor's base is {self.config.base!r}: pass base= exactly when it is not 'last'")
        t_curr = float(t_curr)
        weights, bias = self.history_weights(t_curr, branch)
        window = pad_history(history, weights.shape[-1])
        stacked = torch.stack(window, dim=-1)  # (..., C, K)
        latent = (stacked * weights.to(stacked.dtype)).sum(-1) + bias.to(stacked.dtype)
        gain = self.gain(torch.as_tensor(timesteps, dtype=torch.float32), t_curr, branch).to(stacked.dtype)
        return (window[-1] if base is None else base) + gain * latent

    def predict_steps(
        self,
        trajectory: torch.Tensor,
        steps: Sequence[int],
        timesteps: torch.Tensor,
        branch: str | None = None,
        full_steps: Sequence[int] = (),
    ) -> torch.Tensor:
        """Forecast many steps at once, each from the hidden states before it in `trajectory`.

        trajectory: [B, S, ...] hidden states of one generation per sample (steps on dim 1);
        returns [B, len(steps), ...], entry i equal to predict(trajectory[:, :steps[i]], ...).
        The history sum is a sliding window over the step axis, so training needs no Python loop
        over steps beyond the three stages. A Taylor base extrapolates from `full_steps`.
        """
        times = self._check_times(torch.as_tensor(timesteps, dtype=torch.float32))
        steps_t = torch.as_tensor(list(steps), dtype=torch.long)
        out = trajectory.new_empty(trajectory.shape[0], len(steps_t), *trajectory.shape[2:])
        stages = torch.tensor([self.stage(float(times[s])) for s in steps_t.tolist()], dtype=torch.long)
        b = self._branch(branch)
        for stage in stages.unique().tolist():
            select = (stages == stage).nonzero().flatten()
            chosen = steps_t[select]
            head, kan = self.latent[b][stage], self.timestep[b][stage]
            depth = head.weight.shape[1]
            # front-pad with the first state: a short history repeats its oldest entry
            padded = torch.cat([trajectory[:, :1].expand(-1, depth, *trajectory.shape[2:]), trajectory], dim=1)
            # weight[:, k] and bias are [1] (scalar weights) or [C] (per channel): both broadcast
            # over the channel axis
            latent = sum(head.weight[:, k] * padded[:, chosen + k] for k in range(depth)) + head.bias
            weight = kan.layers[0].base_weight
            gains = kan((times[chosen].unsqueeze(1) - times.unsqueeze(0)).to(weight.device, weight.dtype))
            gains = gains.reshape(1, -1, *([1] * (trajectory.dim() - 2))).to(trajectory.dtype)
            out[:, select] = gains * latent
        if self.base_anchors == 0:
            return out + trajectory[:, steps_t - 1]
        full = sorted(full_steps)
        if not full:
            raise ValueError(f"a predictor with base {self.config.base!r} needs the schedule's full_steps")
        bases = []
        for step in steps_t.tolist():
            anchors = [f for f in full if f < step][-self.base_anchors :]
            bases.append(newton_extrapolate(anchors, [trajectory[:, f] for f in anchors], step))
        return out + torch.stack(bases, dim=1)

    def step_coefficients(
        self, timesteps: torch.Tensor, t_curr: float, branch: str | None = None
    ) -> tuple[list[float] | list[torch.Tensor], float | torch.Tensor]:
        """The forecast folded into constants: h_pred = h_-1 + sum_k c_k H_k + c_0.

        Scalar history weights fold to floats; per-channel ones to [C] tensors (float32, CPU).
        The gain depends only on the schedule, so for inference the forecast becomes one weighted
        sum over the history (no stack, no KAN on the hot path); `folded_steps` caches them.
        """
        times = torch.as_tensor(timesteps, dtype=torch.float32)
        with torch.no_grad():
            return self._fold_gain(self.gain(times, t_curr, branch), *self.history_weights(t_curr, branch))

    def _fold_gain(self, gain: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> tuple:
        if self.config.history_weights == "scalar":
            return (gain * weights).float().cpu().tolist(), float(gain * bias)
        return list((gain * weights).float().cpu().unbind(-1)), (gain * bias).float().cpu()

    def schedule_coefficients(self, timesteps: torch.Tensor, branch: str | None = None) -> dict[int, tuple]:
        """`step_coefficients` of every predicted step the learned experts forecast (`learned_steps`:
        not those of `taylor_stages`, which TaylorSeer forecasts), one KAN call per stage.

        A server folds a schedule on its first request at that step count; step by step that is
        one small KAN call per step and branch (~1 ms each on a CPU), batched it is three.
        """
        times = self._check_times(torch.as_tensor(timesteps, dtype=torch.float32))
        by_stage: dict[int, list[int]] = {}
        for step in self.learned_steps(times):
            by_stage.setdefault(self.stage(float(times[step])), []).append(step)
        table: dict[int, tuple] = {}
        with torch.no_grad():
            for stage, steps in by_stage.items():
                kan = self.timestep[self._branch(branch)][stage]
                weight = kan.layers[0].base_weight
                rows = (times[steps].unsqueeze(1) - times.unsqueeze(0)).to(weight.device, weight.dtype)
                gains = kan(rows).reshape(-1)
                weights, bias = self.history_weights(float(times[steps[0]]), branch)
                for step, gain in zip(steps, gains, strict=True):
                    table[step] = self._fold_gain(gain, weights, bias)
        return table

    def folded_steps(self, timesteps: torch.Tensor, branch: str | None = None) -> dict[tuple, tuple]:
        """One branch's table (step, device, dtype) -> folded coefficients (`step_coefficients`, in
        the form `LesaForecaster` sums them), shared by every generation on these times.

        Inference fills it as the steps come: a server folds each step once, not once per request,
        and a generation pays for one lookup of this table, not one per step (the key hashes the
        times and the weights' versions, a fifth of a forecast on the small models). Tensor
        versions change with every in-place update (optimizer steps, load_state_dict), so a table
        never outlives the weights it was computed from.
        """
        times = torch.as_tensor(timesteps, dtype=torch.float32).detach().cpu()
        # (identity, version) per parameter: `load_state_dict(assign=True)` or `p.data = ...` put
        # new tensors in whose counters may equal the old ones'
        weights = tuple((id(p), p.data_ptr(), p._version) for p in self.parameters())
        key = (self._branch(branch), times.numpy().tobytes(), weights)
        table = self._folded_cache.get(key)
        if table is None:
            if len(self._folded_cache) >= 64:
                self._folded_cache.clear()
            table = self._folded_cache[key] = {}
        return table

    # -- bundles ---------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, path: str | Path, map_location: str | torch.device = "cpu"
    ) -> StagePredictor | PredictorEnsemble:
        """Load a bundle; a bundle listing `members` loads as a `PredictorEnsemble` (same interface)."""
        path = Path(path)
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config_path.is_file():
            raise BundleError(f"{config_path}: missing (a predictor bundle holds {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BundleError(f"{config_path}: not a valid predictor config ({error})") from error
        if not isinstance(data, dict):
            kind = "null" if data is None else f"a JSON {type(data).__name__}"
            raise BundleError(f"{config_path}: not a valid predictor config (expected a JSON object, got {kind})")
        if "members" in data:
            from lesa_core.ensemble import PredictorEnsemble

            return PredictorEnsemble.from_pretrained(path, map_location)
        if not weights_path.is_file():
            raise BundleError(f"{weights_path}: missing")
        try:
            config = PredictorConfig.from_dict(data)
            predictor = cls(config)
        except (TypeError, KeyError, ValueError, AttributeError, RuntimeError) as error:
            # RuntimeError: sizes torch cannot build (a negative history depth); AttributeError: a
            # field of the wrong JSON type (a schedule that is a string)
            raise BundleError(f"{config_path}: not a valid predictor config ({error})") from error
        try:
            state = load_file(str(weights_path), device=str(map_location))
        except (SafetensorError, OSError, RuntimeError) as error:
            raise BundleError(f"{weights_path}: corrupt or truncated safetensors file ({error})") from error
        try:
            predictor.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise BundleError(f"{weights_path}: weights do not match {config_path} ({error})") from error
        return predictor.to(map_location).eval()

    def check_compatible(self, schedule: CacheSchedule, family: str | None, hidden_size: int | None) -> None:
        """Raise BundleError naming what differs between this bundle and a request or model."""
        if (
            tuple(schedule.full_steps) != tuple(self.schedule.full_steps)
            or schedule.num_steps != self.schedule.num_steps
        ):
            raise BundleError(
                f"predictor was trained for {self.schedule.describe()} "
                f"but the request uses {schedule.describe()}: num_steps and schedule must match"
            )
        if family and self.config.family and family != self.config.family:
            raise BundleError(f"predictor was trained for {self.config.family}, not {family}")
        if hidden_size and self.config.hidden_size and hidden_size != self.config.hidden_size:
            raise BundleError(
                f"predictor was trained on hidden size {self.config.hidden_size}, the model has {hidden_size}"
            )


def newton_extrapolate(steps: Sequence[int], values: Sequence[torch.Tensor], at: int) -> torch.Tensor:
    """The polynomial through (steps[i], values[i]) evaluated at step `at` (Newton's form).

    Divided differences scaled by step distance, as TaylorSeer computes them; exact for
    polynomials of degree len(steps) - 1.
    """
    differences = list(values)
    out = differences[-1]
    basis = 1.0
    # column j holds f[s_{i-j}, ..., s_i]; the Newton term uses the newest entry of each column
    for j in range(1, len(steps)):
        differences = [
            (differences[i + 1] - differences[i]) / (steps[i + j] - steps[i]) for i in range(len(differences) - 1)
        ]
        basis = basis * (at - steps[len(steps) - j])
        out = out + basis * differences[-1]
    return out


def pad_history(history: Sequence[torch.Tensor], depth: int) -> list[torch.Tensor]:
    """The last `depth` entries, oldest first; too short a history repeats its oldest entry."""
    window = list(history[-depth:])
    return [window[0]] * (depth - len(window)) + window
