"""BCE + Dice, the paper's loss. The module checks its arguments; the mathematics is in plain functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, computed per image and averaged over the batch.

    Per image (not pooled over the batch) so that a frame with a small nerve weighs as much as one with a
    large nerve, which is how mean Dice is scored. `smooth` keeps empty-target images finite.

    Shape:
        logits, target: (N, 1, H, W); target in {0, 1}.
    """
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    intersection = (prob * target).sum(1)
    denominator = prob.sum(1) + target.sum(1)
    return (1.0 - (2.0 * intersection + smooth) / (denominator + smooth)).mean()


def bce_dice_loss(logits, target, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0):
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return bce_weight * bce + dice_weight * soft_dice_loss(logits, target, smooth)


class BCEDiceLoss(nn.Module):
    """bce_weight * BCE-with-logits + dice_weight * (1 - soft Dice).

    Example:
        >>> loss = BCEDiceLoss()
        >>> round(float(loss(torch.full((1, 1, 2, 2), 20.0), torch.ones(1, 1, 2, 2))), 4)
        0.0
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        if bce_weight < 0 or dice_weight < 0 or bce_weight + dice_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got bce={bce_weight}, dice={dice_weight}")
        if smooth <= 0:
            raise ValueError(f"smooth must be positive, got {smooth}")
        self.bce_weight, self.dice_weight, self.smooth = bce_weight, dice_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits shape {tuple(logits.shape)} differs from target shape {tuple(target.shape)}")
        return bce_dice_loss(logits, target, self.bce_weight, self.dice_weight, self.smooth)
