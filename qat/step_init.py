"""Steps from data: the mean-squared-error clip search, and what an activation quantizer records while it
observes float activations (qat.prepare.initialise_steps).

Weights: per output channel, the clip (a fraction of the channel's largest magnitude) whose grid has the least
squared error on the channel's values (Banner et al. 2019, ACIQ; Nagel et al. 2021, "A White Paper on Neural
Network Quantization", section 3.4: "MSE-based range setting").

Activations: by default the grid reaches a high percentile of |x| (99.99, measured on usgra-seg at 8 bits: FakeQuant
.init_from_samples). At 8 bits that leaves nearly every value unclipped and costs little rounding. At 3-4 bits the
same rule spends the few levels on the rare large values and rounds most of the tensor to zero, so below 8 bits the
step may instead be searched by squared error on a sample of the observed values (`activation_init = "mse"`), and
where the grid may be tight (`activation_range = "tight"`, FakeQuant) the split of the 2^b levels between negative
and positive values is searched with it: the integer range [-z, 2^b - 1 - z], i.e. an asymmetric grid with an
integer zero point z (LSQ+, Bhalgat et al. 2020, for non-ReLU activations such as hardswish, whose outputs reach
only -0.375 below zero; the offset is kept on the integer grid so that QuantizeLinear represents it exactly).
"""

from __future__ import annotations

import math

import torch

# values per row (weights: per channel) used by the weight step search; a random subset of longer rows
SEARCH_COLUMNS = 1 << 8
# clipping levels tried, as fractions of the largest magnitude, in the weights' squared-error search
CLIP_FRACTIONS = torch.linspace(0.05, 1.0, 20)
# steps tried for activations, as fractions of the step that covers the whole observed range (finer: the optimum at
# 3 bits lies far below the maximum)
ACTIVATION_FRACTIONS = torch.linspace(0.01, 1.0, 100)
# values per tensor and batch from which an activation percentile is estimated
PERCENTILE_SAMPLE = 2_000_000
# values per tensor and batch kept for the squared-error search and the diagnosis (scripts/diag_lowbit.py)
KEPT_PER_BATCH = 1 << 14


def _subset(values: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """`count` values drawn at random (with replacement, fixed seed: runs repeat) from a flat tensor, or all."""
    if values.numel() <= count:
        return values
    pick = torch.randint(values.numel(), (count,), generator=torch.Generator().manual_seed(seed))
    return values[pick.to(values.device)]


def mse_steps(rows: torch.Tensor, qmin: int, qmax: int, fractions: torch.Tensor = CLIP_FRACTIONS) -> torch.Tensor:
    """(R,) steps of the rows (R, M): step = fraction x max|row| / qmax, the fraction of `fractions` with the least
    squared error of clamp(round(x / step), qmin, qmax) x step against x (on a fixed random subset of long rows)."""
    peak = rows.abs().amax(dim=1).clamp_min(1e-8)  # (R,), from every value
    if rows.shape[1] > SEARCH_COLUMNS:
        pick = torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(0))[:SEARCH_COLUMNS]
        rows = rows[:, pick]
    best_err = torch.full_like(peak, float("inf"))
    best_step = peak / qmax
    for fraction in fractions.tolist():
        step = (peak * fraction / qmax)[:, None]
        err = ((torch.clamp(torch.round(rows / step), qmin, qmax) * step - rows) ** 2).mean(dim=1)
        better = err < best_err
        best_err, best_step = torch.where(better, err, best_err), torch.where(better, step[:, 0], best_step)
    return best_step


def binary_steps(rows: torch.Tensor) -> torch.Tensor:
    """(R,) steps of the rows (R, M) on the one-bit grid {-1, +1}: mean |row|, the least squared error of
    step x sign(x) against x (XNOR-Net's scale, Rastegari et al. 2016), in closed form."""
    return rows.abs().mean(dim=1).clamp_min(1e-8)


def quantization_mse(values: torch.Tensor, step: float, qmin: int, qmax: int) -> float:
    """mean((clamp(round(x / step), qmin, qmax) x step - x)^2)."""
    return float(((torch.clamp(torch.round(values / step), qmin, qmax) * step - values) ** 2).mean())


def mse_activation_grid(values: torch.Tensor, ranges: list[tuple[int, int]],
                        fractions: torch.Tensor = ACTIVATION_FRACTIONS) -> tuple[int, int, float]:
    """(qmin, qmax, step) with the least squared error on `values` among the integer ranges `ranges` and, for each,
    the steps fraction x (the step whose grid covers both ends of the values)."""
    values = values.float().flatten()
    top, bottom = float(values.max()), float(values.min())
    best = (math.inf, ranges[0][0], ranges[0][1], 1.0)
    for qmin, qmax in ranges:
        cover = max(top / qmax if qmax > 0 else 0.0, bottom / qmin if qmin < 0 else 0.0, 1e-8)
        steps = (fractions * cover).tolist()
        for step in steps:
            err = quantization_mse(values, step, qmin, qmax)
            if err < best[0]:
                best = (err, qmin, qmax, step)
    return best[1], best[2], best[3]


def covering_grid(reach_up: float, reach_down: float, levels: int, max_negative: int) -> tuple[int, float]:
    """(z, step) of the integer range [-z, levels - 1 - z] with the smallest step whose grid reaches `reach_up`
    above zero and `reach_down` below it (both >= 0), z in 0..max_negative: the percentile rule on a tight grid."""
    best = (0, math.inf)
    for z in range(0, max_negative + 1):
        up = reach_up / (levels - 1 - z) if levels - 1 - z > 0 else (math.inf if reach_up > 0 else 0.0)
        down = reach_down / z if z > 0 else (math.inf if reach_down > 0 else 0.0)
        step = max(up, down)
        if step < best[1]:
            best = (z, step)
    return best[0], max(best[1], 1e-8)


class Observation:
    """What an activation quantizer sees while observing float activations, batch by batch.

    `peak`: the largest magnitude (of the positive part on an unsigned grid); `percentiles`: per batch, the P-th
    percentile of the same magnitude (P > 0); `up` / `down`: per batch, the P-th percentile (or maximum) of the
    positive and of the negative part (with `sides`); `bottom`: the smallest value; `sample`: KEPT_PER_BATCH values per batch."""

    def __init__(self, percentile: float = 0.0, unsigned: bool = False, sides: bool = False):
        self.percentile, self.unsigned, self.sides = percentile, unsigned, sides
        self.peak, self.bottom = 0.0, math.inf
        self.percentiles: list[float] = []
        self.up: list[float] = []
        self.down: list[float] = []
        self.kept: list[torch.Tensor] = []

    def _quantile(self, values: torch.Tensor) -> float:
        if not self.percentile:
            return float(values.max())
        if values.numel() > PERCENTILE_SAMPLE:  # torch.quantile takes at most 16M values; a fixed subset
            pick = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:PERCENTILE_SAMPLE]
            values = values[pick.to(values.device)]
        return float(torch.quantile(values.float(), self.percentile / 100.0))

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().flatten()
        # an unsigned grid reaches only up: the positive part is what it must cover
        magnitude = flat.clamp_min(0) if self.unsigned else flat.abs()
        self.peak = max(self.peak, float(magnitude.max()))
        self.bottom = min(self.bottom, float(flat.min()))
        if self.percentile:
            self.percentiles.append(self._quantile(magnitude))
        if self.sides:  # only a tight grid needs them (two more percentiles per batch)
            self.up.append(self._quantile(flat.clamp_min(0)))
            self.down.append(self._quantile((-flat).clamp_min(0)))
        self.kept.append(_subset(flat, KEPT_PER_BATCH, seed=len(self.kept)).float().cpu())

    @property
    def reach(self) -> float:
        """What the percentile rule covers: the mean per-batch percentile of the magnitude, or the largest one."""
        return max(sum(self.percentiles) / len(self.percentiles) if self.percentiles else self.peak, 1e-8)

    @property
    def reach_up(self) -> float:
        return sum(self.up) / len(self.up)

    @property
    def reach_down(self) -> float:
        return sum(self.down) / len(self.down)

    def values(self) -> torch.Tensor:
        return torch.cat(self.kept)
