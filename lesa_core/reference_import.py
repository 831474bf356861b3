"""Import predictor checkpoints saved by the paper's reference code into our bundle format.

Those files are torch pickles holding `{'model': state_dict, ...}` plus pickled config objects
and optimiser state. We never execute pickled code: the file is read with torch's
`weights_only=True` unpickler, and every global it names that is not a tensor type is bound to
`OpaqueObject`, an inert stand-in that only records its arguments. Globals on torch's blocklist
(such as `os.system`) cannot be bound: a checkpoint whose pickle names one is refused with a
`BundleError` and nothing in it runs.

Key layouts:
    latent.{stage}.{weight,bias}, timestep.{stage}.layers.{j}.{base_weight,spline_weight,spline_scaler,grid}
    or the per-branch variant latent_cond / latent_uncond / timestep_cond / timestep_uncond.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lesa_core.predictor import SHARED_BRANCH, BundleError, PredictorConfig, StagePredictor, stage_thresholds_for
from lesa_core.schedule import CacheSchedule


class OpaqueObject:
    """Stands in for any non-tensor global in a reference checkpoint; runs no code of the file."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> OpaqueObject:
        return OpaqueObject(*args, **kwargs)


def load_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a reference checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if path.is_dir():  # "no such file" would puzzle whoever sees the folder there
        raise BundleError(f"checkpoint {path}: is a directory, expected the torch file saved by the reference code")
    if not path.is_file():
        raise BundleError(f"{path}: no such file")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        stand_ins = [(OpaqueObject, name) for name in unsafe]
        with torch.serialization.safe_globals(stand_ins):
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file can fail in many ways; all mean "cannot import"
        raise BundleError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(data, dict) and "model" in data:
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise BundleError(f"{path}: expected {{'model': state_dict}} with tensors")
    return data


_BRANCH_KEY = re.compile(r"^(latent|timestep)(?:_(cond|uncond))?\.(.*)$")


def convert_state_dict(reference: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Rename reference keys to ours: latent.{i} -> latent.shared.{i}, latent_cond.{i} -> latent.cond.{i}."""
    converted, branches = {}, []
    for key, value in reference.items():
        match = _BRANCH_KEY.match(key)
        if match is None:
            raise BundleError(f"unexpected key {key!r} in reference checkpoint")
        kind, branch, rest = match.group(1), match.group(2) or SHARED_BRANCH, match.group(3)
        if branch not in branches:
            branches.append(branch)
        converted[f"{kind}.{branch}.{rest}"] = value
    return converted, tuple(branches)


def infer_config(state: dict[str, torch.Tensor], branch: str, schedule: CacheSchedule) -> PredictorConfig:
    depths = []
    stage = 0
    while f"latent.{branch}.{stage}.weight" in state:
        depths.append(int(state[f"latent.{branch}.{stage}.weight"].shape[1]))
        stage += 1
    if len(depths) != 3:
        raise BundleError(f"expected 3 stage experts, found {len(depths)}")
    prefix = f"timestep.{branch}.0.layers"
    widths = []
    layer = 0
    while f"{prefix}.{layer}.base_weight" in state:
        out_features, in_features = state[f"{prefix}.{layer}.base_weight"].shape
        widths.append(int(in_features))
        layer += 1
    widths.append(int(out_features))
    grid = state[f"{prefix}.0.grid"][0]
    coefficients = int(state[f"{prefix}.0.spline_weight"].shape[-1])  # grid_size + order
    order = grid.numel() - coefficients - 1  # the grid holds grid_size + 2 * order + 1 knots
    grid_size = coefficients - order
    if widths[0] != schedule.num_steps + 1:
        raise BundleError(
            f"checkpoint's KAN takes {widths[0]} schedule times, i.e. {widths[0] - 1} steps, "
            f"but --num-steps is {schedule.num_steps}"
        )
    return PredictorConfig(
        schedule=schedule.to_dict(),
        history_depths=tuple(depths),
        kan_hidden=tuple(widths[1:-1]),
        grid_size=grid_size,
        spline_order=order,
        grid_range=(round(float(grid[order]), 6), round(float(grid[order + grid_size]), 6)),
    )


def import_reference(
    checkpoint: str | Path,
    out_dir: str | Path,
    schedule: CacheSchedule,
    family: str | None = None,
    stage_thresholds: tuple[float, float] | None = None,
) -> StagePredictor:
    """Convert a reference checkpoint into a bundle at `out_dir`. The checkpoint does not hold its
    stage thresholds: `stage_thresholds`, else the paper's for `family` (`stage_thresholds_for`)."""
    reference = load_reference_checkpoint(checkpoint)
    try:
        converted, branches = convert_state_dict(reference)
    except BundleError as error:
        raise BundleError(f"{checkpoint}: {error}") from None
    if not branches:
        raise BundleError(f"{checkpoint}: holds no predictor weights (no latent.* / timestep.* keys)")
    try:
        config = infer_config(converted, branches[0], schedule)
    except BundleError as error:
        raise BundleError(f"{checkpoint}: {error}") from None
    except (KeyError, IndexError, ValueError, UnboundLocalError) as error:  # parts of the KAN missing or empty
        raise BundleError(
            f"{checkpoint}: not a complete LESA predictor checkpoint ({type(error).__name__}: {error})"
        ) from None
    config.branches = branches
    config.family = family
    config.stage_thresholds = stage_thresholds or stage_thresholds_for(family)
    config.training = {"imported_from": Path(checkpoint).name, "source": "LESA reference implementation"}
    predictor = StagePredictor(config)
    try:
        predictor.load_state_dict(converted, strict=True)
    except RuntimeError as error:
        raise BundleError(f"{checkpoint}: weights do not fit the inferred predictor ({error})") from error
    predictor.save_pretrained(out_dir)
    return predictor
