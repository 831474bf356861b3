"""`PredictorEnsemble`: the mean forecast of several predictors trained for one schedule (improved).

Once a step's gain is folded (`StagePredictor.step_coefficients`), a forecast is a weighted sum
over the history, so the mean of the members' forecasts is one weighted sum with the mean of
their coefficients: a predicted step costs what one predictor's costs, however many members.
Members trained differently (shared or per-branch experts, scalar or per-channel history
weights) err differently, and their mean errs less, mostly on the worst samples.

A bundle is a directory whose `config.json` lists member bundles (subdirectories) under
`members`, with the ensemble's own `quality` card and a note on how it was made (`training`).
`StagePredictor.from_pretrained` loads either kind.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lesa_core.predictor import CONFIG_NAME, BundleError, StagePredictor
from lesa_core.schedule import CacheSchedule

# what every member must share: the schedule, how steps map to experts, what the sum corrects
SHARED_SETTINGS = ("schedule", "stage_thresholds", "base", "taylor_stages", "family", "hidden_size")
# an ensemble's own config.json: its members and what describes them all; every other setting is a member's
ENSEMBLE_KEYS = ("members", "schedule", "family", "hidden_size", "training", "quality")


class PredictorEnsemble(nn.Module):
    def __init__(
        self,
        members: Sequence[StagePredictor],
        training: dict[str, Any] | None = None,
        quality: dict[str, Any] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise BundleError("an ensemble needs at least one member")
        if not all(isinstance(m, StagePredictor) for m in members):
            raise BundleError("an ensemble's members are predictors, not ensembles")
        first = members[0].config
        for member in members[1:]:
            for setting in SHARED_SETTINGS:
                if getattr(member.config, setting) != getattr(first, setting):
                    raise BundleError(f"ensemble members differ in {setting}: {getattr(member.config, setting)!r} "
                                      f"vs {getattr(first, setting)!r}")  # fmt: skip
        self.members = nn.ModuleList(members)
        self.names = list(names) if names is not None else [f"member{i}" for i in range(len(members))]
        if len(self.names) != len(members) or len(set(self.names)) != len(self.names):
            raise BundleError(f"an ensemble needs one distinct name per member, got {self.names}")
        channel = any(m.config.history_weights == "channel" for m in members)
        # The config the forecaster and the service read: the members' shared settings; "channel"
        # if any member folds to per-channel coefficients.
        self.config = replace(
            first,
            history_depths=tuple(max(d) for d in zip(*(m.config.history_depths for m in members), strict=True)),
            history_weights="channel" if channel else "scalar",
            branches=tuple(dict.fromkeys(b for m in members for b in m.config.branches)),
            training=dict(training or {}),
            quality=dict(quality or {}),
        )
        self.schedule: CacheSchedule = members[0].schedule
        self._folded_cache: dict[tuple, dict[tuple, tuple]] = {}

    # -- what LesaForecaster asks of a predictor ----------------------------------------------

    base_anchors = StagePredictor.base_anchors
    max_depth = StagePredictor.max_depth
    folded_steps = StagePredictor.folded_steps  # the same per-(branch, times, weights) table
    check_compatible = StagePredictor.check_compatible

    def stage(self, t_curr: float) -> int:
        return self.members[0].stage(t_curr)

    def _branch(self, branch: str | None) -> str:
        for member in self.members:
            member._branch(branch)  # raises, naming the branches, if a member has no expert for it
        return str(branch)

    def predict(
        self,
        history: Sequence[torch.Tensor],
        timesteps: torch.Tensor | Sequence[float],
        t_curr: float,
        branch: str | None = None,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean of the members' forecasts (differentiable; see `StagePredictor.predict`)."""
        forecasts = [m.predict(history, timesteps, t_curr, branch, base=base) for m in self.members]
        return torch.stack(forecasts).mean(0)

    def step_coefficients(
        self, timesteps: torch.Tensor, t_curr: float, branch: str | None = None
    ) -> tuple[list[float] | list[torch.Tensor], float | torch.Tensor]:
        """The members' folded coefficients, averaged; windows align on the newest hidden state."""
        return self._mean([m.step_coefficients(timesteps, t_curr, branch) for m in self.members])

    def schedule_coefficients(self, timesteps: torch.Tensor, branch: str | None = None) -> dict[int, tuple]:
        """`step_coefficients` of every predicted step, from each member's batched table."""
        tables = [m.schedule_coefficients(timesteps, branch) for m in self.members]
        return {step: self._mean([table[step] for table in tables]) for step in tables[0]}

    def _mean(self, folded: list[tuple]) -> tuple:
        depth = max(len(coefficients) for coefficients, _ in folded)
        total: list[Any] = [0.0] * depth
        constant: Any = 0.0
        for coefficients, member_constant in folded:
            offset = depth - len(coefficients)
            for k, c in enumerate(coefficients):
                total[offset + k] = total[offset + k] + c
            constant = constant + member_constant
        n = len(folded)
        if self.config.history_weights == "scalar":
            return [float(c) / n for c in total], float(constant) / n
        channels = int(self.config.hidden_size)
        return [torch.as_tensor(c, dtype=torch.float32).expand(channels) / n for c in total], (
            torch.as_tensor(constant, dtype=torch.float32).expand(channels) / n
        )

    # -- bundles ------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, member in zip(self.names, self.members, strict=True):
            member.save_pretrained(path / name)
        data = {
            "members": self.names,
            "schedule": self.config.schedule,
            "family": self.config.family,
            "hidden_size": self.config.hidden_size,
            "training": self.config.training,
            "quality": self.config.quality,
        }
        (path / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> PredictorEnsemble:
        path = Path(path)
        config_path = path / CONFIG_NAME
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BundleError(f"{config_path}: not a valid ensemble config ({error})") from error
        if not isinstance(data, dict):
            raise BundleError(f"{config_path}: not a valid ensemble config (a JSON object expected)")
        unknown = sorted(set(data) - set(ENSEMBLE_KEYS))
        if unknown:  # e.g. taylor_stages here would be ignored: the members' own settings apply
            raise BundleError(f"{config_path}: unknown ensemble config keys {unknown}; an ensemble's config holds "
                              f"{', '.join(ENSEMBLE_KEYS)}: set predictor settings in each member's config.json")  # fmt: skip
        names = data.get("members")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise BundleError(f"{config_path}: `members` must be a list of member bundle directories")
        for name in names:
            if Path(name).name != name or name in (".", ".."):
                raise BundleError(f"{config_path}: member {name!r} must be a subdirectory name of the bundle")
        members = [StagePredictor.from_pretrained(path / name, map_location) for name in names]
        for key in ("schedule", "family", "hidden_size"):
            if data.get(key) is not None and data[key] != getattr(members[0].config, key):
                raise BundleError(f"{config_path}: its {key} {data[key]!r} differs from its members' "
                                  f"({getattr(members[0].config, key)!r})")  # fmt: skip
        try:
            ensemble = cls(members, training=data.get("training"), quality=data.get("quality"), names=names)
        except BundleError as error:
            raise BundleError(f"{config_path}: {error}") from error
        return ensemble.eval()
