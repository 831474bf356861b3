"""Forecasters: what replaces the transformer blocks on a predicted step.

All four share one interface. `observe` is told every hidden state that enters the final
layer (computed on full steps, forecast on predicted ones); `forecast` returns the hidden
state for a predicted step from what was observed in this generation and CFG branch.

    none        every step is full; nothing is forecast
    reuse       FORA: the last full step's hidden state
    taylorseer  finite differences over full steps, extrapolated by step distance (order 1, 2)
    lesa        the learned stage-aware predictor over the last 8 hidden states
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lesa_core.predictor import StagePredictor, newton_extrapolate, pad_history

MAX_FULL_POINTS = 3  # enough anchors for a second-order extrapolation
_MISSING = object()


@dataclass
class BranchHistory:
    """Everything a forecaster remembers about one generation in one CFG branch."""

    history: list[torch.Tensor] = field(default_factory=list)  # last hidden states, oldest first
    full_points: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # last full (step, hidden)


@dataclass
class ForecastContext:
    """What a forecaster may know about the step being forecast besides the branch's memory."""

    branch: str
    timesteps: torch.Tensor | None  # the schedule's normalised times (num_steps + 1), if set


class Forecaster:
    name = "none"
    keeps = 0  # how many recent hidden states `history` must hold

    def observe(self, memory: BranchHistory, step: int, hidden: torch.Tensor, full: bool) -> None:
        if full:
            # A full step's hidden state is often a view (FLUX slices the image tokens off the joint
            # sequence): kept as is, every predicted step that reads it would copy it again.
            hidden = hidden.contiguous()
            memory.full_points.append((step, hidden))
            del memory.full_points[:-MAX_FULL_POINTS]
        if self.keeps:
            memory.history.append(hidden)
            del memory.history[: -self.keeps]

    def forecast(self, memory: BranchHistory, step: int, context: ForecastContext) -> torch.Tensor:
        raise RuntimeError("the 'none' method runs every step in full; a predicted step was requested")


class ReuseForecaster(Forecaster):
    name = "reuse"

    def forecast(self, memory: BranchHistory, step: int, context: ForecastContext) -> torch.Tensor:
        return extrapolate_full_points(memory.full_points, step, 0)


class TaylorSeerForecaster(Forecaster):
    """TaylorSeer (Liu et al., 2025) as published: a Taylor series at the last full step whose
    derivatives are finite differences between full steps, each order's from the previous
    order's at the two latest full steps, divided by their distance (`taylorseer_extrapolate`).
    Order 1 is the line through the last two full steps."""

    name = "taylorseer"

    def __init__(self, order: int = 1) -> None:
        if order not in (1, 2):
            raise ValueError(f"taylor_order must be 1 or 2, got {order}")
        self.order = order

    def forecast(self, memory: BranchHistory, step: int, context: ForecastContext) -> torch.Tensor:
        return taylorseer_extrapolate(memory.full_points, step, self.order)


def taylorseer_extrapolate(points: Sequence[tuple[int, torch.Tensor]], step: int, order: int) -> torch.Tensor:
    """TaylorSeer's forecast at `step` from the full steps `points` (step, hidden), oldest first.

    Its reference code keeps, per full step, factors F_0 = h and F_{i+1} = (F_i - F_i at the
    previous full step) / (distance between the two), and forecasts sum_i F_i x^i / i!, x the
    steps since the last full step. With fewer than `order + 1` full steps, the orders it has.
    (Not Newton's interpolating polynomial, which `extrapolate_full_points` is: for order 2 the
    two differ, and the benchmark's baseline is TaylorSeer's own.)
    """
    anchors = points[-(order + 1) :]
    previous_step, factors = anchors[0][0], [anchors[0][1]]
    for full_step, hidden in anchors[1:]:
        distance = full_step - previous_step
        updated = [hidden]
        for i in range(min(len(factors), order)):
            updated.append((updated[i] - factors[i]) / distance)
        previous_step, factors = full_step, updated
    x = step - previous_step
    out = factors[0]
    for i in range(1, len(factors)):
        out = out + factors[i] * (x**i / math.factorial(i))
    return out


def extrapolate_full_points(points: Sequence[tuple[int, torch.Tensor]], step: int, order: int) -> torch.Tensor:
    """The polynomial of degree `order` through the last `order + 1` full steps, at `step` (Newton's
    form): order 0 is the last full step's hidden state (FORA), 1 TaylorSeer's order 1. The LESA
    predictor's `taylor*` bases are these; the TaylorSeer baseline is `taylorseer_extrapolate`."""
    anchors = points[-(order + 1) :]
    return newton_extrapolate([s for s, _ in anchors], [h for _, h in anchors], step)


class LesaForecaster(Forecaster):
    """The learned predictor, fed back with its own forecasts (history holds every step)."""

    name = "lesa"

    def __init__(self, predictor: StagePredictor) -> None:
        self.predictor = predictor
        self.keeps = predictor.max_depth
        self._memo: dict[str, dict[int, tuple]] = {}  # branch -> the predictor's folded steps
        self._memo_times: torch.Tensor | None = None

    def forecast(self, memory: BranchHistory, step: int, context: ForecastContext) -> torch.Tensor:
        if context.timesteps is None:
            raise RuntimeError(
                "LESA needs the schedule's times: call lesa_core.new_generation(model, timesteps=...) "
                "before each generation"
            )
        if torch.is_grad_enabled() and self.predictor.training:
            t_curr = float(context.timesteps[step])
            if self.predictor.stage(t_curr) in self.predictor.config.taylor_stages:
                return extrapolate_full_points(memory.full_points, step, 1)
            return self.predictor.predict(
                memory.history, context.timesteps, t_curr, context.branch, base=self._base(memory, step)
            )
        folded = self._coefficients(context, step, memory.history[-1])
        if folded is None:  # a stage the predictor leaves to TaylorSeer
            return extrapolate_full_points(memory.full_points, step, 1)
        coefficients, constant = folded
        window = pad_history(memory.history, len(coefficients))
        per_channel = isinstance(coefficients[0], torch.Tensor)
        base = self._base(memory, step)
        if base is None:  # h_-1's unit weight and the constant are folded in (see _fold)
            if per_channel:
                out = torch.addcmul(constant, window[0], coefficients[0])
            else:
                out = torch.add(constant, window[0], alpha=coefficients[0])
            window, coefficients = window[1:], coefficients[1:]
        else:
            out = base + constant
        for weight, hidden in zip(coefficients, window, strict=True):
            if per_channel:
                out.addcmul_(hidden, weight)
            else:
                out.add_(hidden, alpha=weight)
        return out

    def _base(self, memory: BranchHistory, step: int) -> torch.Tensor | None:
        """The forecast's base: None for the paper's h_-1 (folded into the coefficients), else the
        extrapolation of the last full steps that the predictor corrects."""
        anchors = self.predictor.base_anchors
        return None if anchors == 0 else extrapolate_full_points(memory.full_points, step, anchors - 1)

    def _coefficients(self, context: ForecastContext, step: int, like: torch.Tensor) -> tuple | None:
        """A step's folded coefficients on `like`'s device and dtype; None where TaylorSeer forecasts.

        Looked up once per step from tables the predictor keeps across generations: a predicted
        step pays for one dictionary lookup here, not for the stage and the KAN.
        """
        if context.timesteps is not self._memo_times:  # a new generation: look the tables up once
            self._memo, self._memo_times = {}, context.timesteps
        table = self._memo.get(context.branch)
        if table is None:
            table = self._memo[context.branch] = self.predictor.folded_steps(context.timesteps, context.branch)
        key = (step, like.device, like.dtype)
        folded = table.get(key, _MISSING)
        if folded is not _MISSING:
            return folded
        t_curr = float(context.timesteps[step])
        if self.predictor.stage(t_curr) in self.predictor.config.taylor_stages:
            table[key] = None
            return None
        # the first forecast on these times, device and dtype: fold every step the experts forecast
        schedule = self.predictor.schedule_coefficients(context.timesteps, context.branch)
        for other, (coefficients, constant) in schedule.items():
            table[(other, like.device, like.dtype)] = self._fold(coefficients, constant, like)
        folded = table.get(key)
        if folded is None:  # a step the predictor's schedule does not predict
            coefficients, constant = self.predictor.step_coefficients(context.timesteps, t_curr, context.branch)
            folded = table[key] = self._fold(coefficients, constant, like)
        return folded

    def _fold(self, coefficients: list, constant: float | torch.Tensor, like: torch.Tensor) -> tuple:
        """A step's coefficients as the forecast sums them, on the hidden states' device and dtype.

        With the paper's base (h_-1), h_-1's unit weight joins its coefficient and the sum starts
        from the constant: one pass over the hidden state per history slot and none more (the
        forecast is memory-bound). Kept per step, device and dtype in the predictor's table, so a
        server converts each step's coefficients once, not on every forecast.
        """
        if self.predictor.base_anchors == 0:
            coefficients = [*coefficients[:-1], coefficients[-1] + 1.0]
        if isinstance(constant, torch.Tensor):  # per-channel weights
            return [c.to(like.device, like.dtype) for c in coefficients], constant.to(like.device, like.dtype)
        return coefficients, torch.tensor(float(constant), dtype=torch.float32, device=like.device)


def make_forecaster(method: str, predictor: StagePredictor | None = None, taylor_order: int = 1) -> Forecaster:
    if method == "none":
        return Forecaster()
    if method == "reuse":
        return ReuseForecaster()
    if method == "taylorseer":
        return TaylorSeerForecaster(taylor_order)
    if method == "lesa":
        if predictor is None:
            raise ValueError("method 'lesa' needs a trained predictor (StagePredictor.from_pretrained(bundle))")
        return LesaForecaster(predictor)
    raise ValueError(f"unknown method {method!r}; known methods: none, reuse, taylorseer, lesa")
