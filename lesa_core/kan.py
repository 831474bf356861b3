"""Kolmogorov-Arnold network in the widely used "efficient KAN" formulation.

Each layer computes, for input x (batch, in):

    y = base_weight @ SiLU(x) + (spline_weight * spline_scaler) @ B(x)

where B(x) are the cubic B-spline basis functions of every input on a uniform grid over
`grid_range`, extended by `spline_order` knots on both sides. Parameter names match the
reference implementation (`base_weight`, `spline_weight`, `spline_scaler`, `grid`) so its
checkpoints load without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class KANLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: tuple[float, float] = (-3.0, 3.0),
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.grid_size = grid_size
        self.spline_order = spline_order
        step = (grid_range[1] - grid_range[0]) / grid_size
        knots = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32) * step + grid_range[0]
        self.register_buffer("grid", knots.expand(in_features, -1).contiguous())
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5))
        # Small spline coefficients: the layer starts close to its SiLU base branch.
        nn.init.uniform_(self.spline_weight, -0.1 / self.grid_size, 0.1 / self.grid_size)

    def b_splines(self, x: torch.Tensor) -> torch.Tensor:
        """B-spline bases of each input feature: (batch, in) -> (batch, in, grid_size + spline_order)."""
        grid = self.grid.to(x.dtype)
        x = x.unsqueeze(-1)
        bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
        for k in range(1, self.spline_order + 1):
            left = (x - grid[:, : -(k + 1)]) / (grid[:, k:-1] - grid[:, : -(k + 1)]) * bases[:, :, :-1]
            right = (grid[:, k + 1 :] - x) / (grid[:, k + 1 :] - grid[:, 1:(-k)]) * bases[:, :, 1:]
            bases = left + right
        return bases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(F.silu(x), self.base_weight)
        scaled_spline = self.spline_weight * self.spline_scaler.unsqueeze(-1)
        spline = F.linear(self.b_splines(x).flatten(1), scaled_spline.flatten(1))
        return base + spline


class KAN(nn.Module):
    """A stack of KANLinear layers, e.g. widths [S+1, 256, 256, 1]."""

    def __init__(
        self,
        widths: Sequence[int],
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: tuple[float, float] = (-3.0, 3.0),
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            KANLinear(w_in, w_out, grid_size, spline_order, grid_range)
            for w_in, w_out in zip(widths[:-1], widths[1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
