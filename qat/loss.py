"""The QAT loss: the float recipe's BCE + Dice plus a bit cost (QuantU-Net, Boerkamp & Thomas 2025).

    loss = BCE + Dice + lambda * (W / 8 + a * A / 8)

W is the mean weight bitwidth weighted by each layer's live weight count (the weights whose kernel taps read
pixels at the input size: what is deployed, qat/bits.py), A the mean activation bitwidth weighted
by each convolution input's element count at the input size (qat/bits.py), a = activation_bit_weight.
With a target B (`--target-bits`), only the excess is penalised: max(W - B, 0) / 8 and max(A - B, 0) / 8,
so bits are free to stay at B but pay for every bit above it. The gradients of W and A reach every learned
bitwidth straight through the integer rounding; with frozen bits they are constants.

Distillation (`--distill D`, QatConfig.distill): + D x BCE(QAT logits, sigmoid(float logits)), the float model
(eval mode, frozen) as teacher on the same augmented batch. QAT should recover the float model's function
under quantization; on a few hundred frames the masks alone let fine-tuning wander from it (the W8A8 runs on the
small-recipe folds lost 0.010 Dice to float on held-out frames). Knowledge distillation (Hinton et al. 2015) for
low-precision training: Mishra & Marr 2018 ("Apprentice", ICLR), Polino et al. 2018 ("Model compression via
distillation and quantization", ICLR). The soft target's BCE has its minimum, zero gradient, where the
probabilities match the teacher's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.losses import BCEDiceLoss

from .bits import mean_bits


class QatLoss(nn.Module):
    """Returns (loss, parts): parts holds floats "task", "bit_cost", "weight_bits", "activation_bits", and
    "distill" when a teacher's logits are given."""

    def __init__(self, elements: dict[str, int], bce_weight: float = 1.0, dice_weight: float = 1.0,
                 bit_weight: float = 0.25, activation_bit_weight: float = 1.0, target_bits: float = 0.0,
                 weights: dict[str, int] | None = None, distill: float = 0.0):
        """`elements`: qat.bits.activation_elements; `weights`: qat.bits.live_weights (None: every parameter)."""
        super().__init__()
        self.task = BCEDiceLoss(bce_weight, dice_weight)
        self.elements = dict(elements)
        self.weights = dict(weights) if weights is not None else None
        self.bit_weight, self.activation_bit_weight, self.target_bits = bit_weight, activation_bit_weight, target_bits
        self.distill = distill

    def bit_cost(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cost without lambda, W, A)."""
        weight_bits, activation_bits = mean_bits(model, self.elements, self.weights)
        w, a = weight_bits, activation_bits
        if self.target_bits > 0:
            w, a = torch.relu(w - self.target_bits), torch.relu(a - self.target_bits)
        return w / 8.0 + self.activation_bit_weight * a / 8.0, weight_bits, activation_bits

    def forward(self, model: nn.Module, logits: torch.Tensor, target: torch.Tensor,
                teacher_logits: torch.Tensor | None = None):
        task = self.task(logits, target)
        cost, weight_bits, activation_bits = self.bit_cost(model)
        loss = task + self.bit_weight * cost
        parts = {"task": float(task.detach()), "bit_cost": float(cost.detach()),
                 "weight_bits": float(weight_bits.detach()), "activation_bits": float(activation_bits.detach())}
        if teacher_logits is not None:
            distill = F.binary_cross_entropy_with_logits(logits.float(), torch.sigmoid(teacher_logits.float()))
            loss = loss + self.distill * distill
            parts["distill"] = float(distill.detach())
        return loss, parts
