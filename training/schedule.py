"""How long a run trains and how its optimiser steps: the budget, the learning-rate schedule, the optimiser, and
where stochastic weight averaging starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import TrainConfig


@dataclass(frozen=True)
class Budget:
    """How long a run trains: whole epochs, the last one possibly cut at `total_steps`."""

    steps_per_epoch: int
    total_steps: int

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


def plan_budget(cfg: TrainConfig, steps_per_epoch: int) -> Budget:
    steps_per_epoch = max(1, steps_per_epoch)
    return Budget(steps_per_epoch, cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch)


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """lr factor at `step`: linear from 0.01 to 1 over `warmup` steps, then cosine from 1 down to `floor`
    at `total`. Warm-up keeps Adam's first, badly estimated moments from throwing a from-scratch network
    (with freshly initialised BatchNorm) far off; the decay to a small lr settles it.

    Example:
        warmup_cosine(0, 10, 110, 0.0) == 0.01; warmup_cosine(10, 10, 110, 0.0) == 1.0;
        warmup_cosine(60, 10, 110, 0.0) == 0.5; warmup_cosine(110, 10, 110, 0.0) == 0.0.
    """
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def swa_first_step(cfg: TrainConfig, budget: Budget) -> int | None:
    """The optimiser step from which stochastic weight averaging averages (None: no SWA). SWA (Izmailov et al.
    2018, "Averaging weights leads to wider optima and better generalization") averages the weights visited at a
    constant, moderate lr: points around one minimum, whose mean generalises like an ensemble of them. At least the
    last step is averaged, however short the run."""
    if cfg.swa_start <= 0:
        return None
    return min(budget.total_steps - 1, max(1, round(cfg.swa_start * budget.total_steps)))


def build_scheduler(optimizer, cfg: TrainConfig, budget: Budget):
    """`cosine`: the paper's per-epoch cosine (stepped once an epoch); `warmup_cosine`: stepped every
    optimiser step; `none`: constant."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=budget.epochs)
    if cfg.scheduler == "warmup_cosine":
        # a short run (tests, a quick --epochs 2) must not spend itself warming up: at most a quarter of it
        warmup = min(cfg.warmup_steps, budget.total_steps // 4)
        start = swa_first_step(cfg, budget)
        if start is not None:  # SWA: the decay ends where averaging starts, at the constant averaging lr
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: warmup_cosine(step, warmup, start, cfg.swa_lr_ratio))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, budget.total_steps, cfg.min_lr_ratio))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the paper's), or AdamW with decay on convolution weights only: decaying BatchNorm scales and
    biases only fights the normalisation."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
