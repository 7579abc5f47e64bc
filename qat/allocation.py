"""Bits allocated by measured sensitivity under the run's budget: activations (`--activation-allocation
sensitivity`) and weights (`--weight-allocation sensitivity`), issue 33, point 3.

A learned run's bit cost weighs a tensor's bits by its elements, and the task loss's pull on a bitwidth (straight
through its rounding) is weak: at a 4-bit activation budget the learned bits went to small tensors and starved the
hardswish outputs and squeeze-excitation products, the kinds whose last bit the model cannot lose, while the ReLU'd
convolution outputs, a quarter of the elements, lose nothing at 3 bits (docs/QUANTIZATION.md, the allocation and
cliff tables). So the bits are chosen here from measurement instead, once, before the fine-tuning:

1. Sensitivity (ZeroQ: Cai et al., "ZeroQ: A Novel Zero Shot Quantization Framework", CVPR 2020): for each
   quantizer the run lowers and each bitwidth it may take, the mean per-pixel Bernoulli KL divergence between the
   float model's output probabilities and the output with that tensor alone quantized at those bits (its step
   chosen as the run chooses it: a weight's from the weight, an activation's from what it sees; every other tensor
   float), on a few training frames.
2. Allocation (the additive-sensitivity model of ZeroQ and HAWQ-V2: Dong et al., NeurIPS 2020): minimise the
   summed sensitivity subject to the weighted mean bits (qat.bits, as the run reports them: activations by the
   elements of the convolution inputs, weights by live weights) being at most the run's bits. Greedily: every
   tensor starts at its fewest bits, then the move with the largest drop in sensitivity per element-bit that still
   fits is taken, until none fits or none helps. Weights and activations are two budgets, allocated apart.

In a fixed-bits run the bits are then fixed for the whole run (a uniform run with mixed bits): the integers trained
are the ones exported, and the means in bits.json count them. Where the bits learn (`--bits learned` with a whole
`--target-bits` / `--target-activation-bits`), the allocation under that budget is where they start, instead of
every tensor at --initial-bits: the gradient and the bit cost move them from there, and the freeze caps the means
(Uhlich et al.'s learned bitwidths, started from ZeroQ's measurement rather than from a uniform guess).

At a 2-bit budget the fixed bits may go down to one (binary weights, [0, 1] activations read through ReLU;
qat/quantizers.py): every grid has at least 2 bits otherwise, the frame's 8 bits put the activation mean above 2, and
nothing could move.

Measured on usgra-seg's five folds (docs/QUANTIZATION.md): the activation measurement took bits from the ReLU'd
convolution outputs and gave them to the residual stream (residual sums, the linear projections feeding them,
depthwise outputs), not to the hardswish outputs, and W4A4 went from 0.049 to 0.025 below float.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import torch
from torch import nn

from .config import lowest_fixed_bits
from .prepare import quant_convs
from .quantizers import TIGHT_MAX_BITS, FakeQuant
from .sensitivity import describe, lowered, observe, only_quantizers, relu_read_ids

BITS_BELOW, BITS_ABOVE = 1, 2  # a tensor may take the run's activation bits B from B - 1 to B + 2


def bit_choices(quantizer: FakeQuant, budget: int) -> list[int]:
    """The bitwidths one quantizer may be given: B - 1 .. B + 2, inside its [b_min, b_max] (tight grids <= 7). A
    fixed bitwidth goes down to 1 where one bit has a grid (FakeQuant.takes_one_bit: binary weights, [0, 1] for a
    ReLU'd activation), so that a 2-bit budget has bits to move; learned bits stay at b_min or above."""
    top = min(quantizer.b_max, TIGHT_MAX_BITS if quantizer.tight else 8)
    one_bit = not quantizer.learns_bits and quantizer.takes_one_bit
    floor = lowest_fixed_bits(quantizer.b_min) if one_bit else quantizer.b_min
    return [b for b in range(budget - BITS_BELOW, budget + BITS_ABOVE + 1) if floor <= b <= top]


def choose_bits(costs: dict[Hashable, dict[int, float]], elements: dict[Hashable, int],
                budget: float) -> dict[Hashable, int]:
    """{key: bits} minimising the summed cost with sum(elements x bits) <= budget x sum(elements) (module doc, 2).

    `costs[key]` maps each bitwidth the key may take to its sensitivity. More bits never cost more in expectation,
    so a measured cost above that of fewer bits (noise) is read as the lower one. Raises ValueError when even the
    fewest bits exceed the budget."""
    cost = {}
    for key, by_bits in costs.items():
        running, cost[key] = float("inf"), {}
        for bits in sorted(by_bits):
            running = min(running, by_bits[bits])
            cost[key][bits] = running
    chosen = {key: min(by_bits) for key, by_bits in cost.items()}
    room = budget * sum(elements[key] for key in cost) - sum(elements[key] * chosen[key] for key in cost)
    if room < -1e-9 * sum(elements.values()):
        raise ValueError(f"even the fewest bits exceed the budget of {budget:g} mean bits")
    while True:
        best = None  # (drop per element-bit, key, bits)
        for key, by_bits in cost.items():
            now = chosen[key]
            for bits in (b for b in by_bits if b > now):
                price = elements[key] * (bits - now)
                drop = by_bits[now] - by_bits[bits]
                if price <= room + 1e-9 and drop > 0 and (best is None or drop / price > best[0]):
                    best = (drop / price, key, bits)
        if best is None:
            return chosen
        _, key, bits = best
        room -= elements[key] * (bits - chosen[key])
        chosen[key] = bits


def reader_elements(model: nn.Module, elements: dict[str, int]) -> dict[int, tuple[FakeQuant, int]]:
    """{id(activation quantizer): (it, elements of every convolution input it quantizes)}: its weight in the mean
    activation bits (qat.bits.mean_bits counts a tensor once per reading convolution)."""
    found: dict[int, tuple[FakeQuant, int]] = {}
    for name, conv in quant_convs(model):
        q = conv.input_quant
        found[id(q)] = (q, found.get(id(q), (q, 0))[1] + elements[name])
    return found


def weight_counts(model: nn.Module, live: dict[str, int]) -> dict[int, tuple[FakeQuant, int]]:
    """{id(weight quantizer): (it, its convolution's live weights)}: its weight in the mean weight bits
    (qat.bits.mean_weight_bits; `live` from qat.bits.live_weights)."""
    return {id(conv.weight_quant): (conv.weight_quant, live[name]) for name, conv in quant_convs(model)}


def bernoulli_kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean per-pixel KL(Bernoulli(reference) || Bernoulli(sigmoid(logits))); `reference` in [0, 1]."""
    eps = 1e-6
    p = reference.clamp(eps, 1 - eps)
    q = torch.sigmoid(logits.double()).clamp(eps, 1 - eps)
    return float((p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).mean())


@torch.no_grad()
def _logits(model: nn.Module, frames: list[torch.Tensor]) -> torch.Tensor:
    """(N, classes, H, W) logits; a segmentation model's output is its "out" entry (torchvision's dict)."""
    outputs = [model(batch) for batch in frames]
    return torch.cat([(out["out"] if isinstance(out, dict) else out).double() for out in outputs])


@torch.no_grad()
def measure(model: nn.Module, choices: dict[int, tuple[FakeQuant, list[int]]], frames: list[torch.Tensor],
            percentile: float, init: str, progress: Callable[[str], None] | None = None) -> dict[int, dict[int, float]]:
    """{id(quantizer): {bits: sensitivity}} (module doc, 1) for each quantizer at each of its bit choices; the model
    in eval mode. An activation's step is chosen by `init` from what the float model shows on `frames`, a weight's
    from its weight, as the run chooses them."""
    was_training = model.training
    model.eval()
    try:
        seen = observe(model, frames, percentile)
        tight = any(q.tight for q, _ in choices.values())
        relu = relu_read_ids(model) if tight else set()
        weights = {id(conv.weight_quant): conv.weight for _, conv in quant_convs(model)}
        with only_quantizers(model):
            reference = torch.sigmoid(_logits(model, frames))
        found: dict[int, dict[int, float]] = {}
        for index, (key, (quantizer, bits_list)) in enumerate(choices.items()):
            found[key] = {}
            for bits in bits_list:
                with lowered(quantizer, bits, weights.get(key), seen.get(key), init, quantizer.tight, key in relu), \
                        only_quantizers(model, [quantizer]):
                    found[key][bits] = bernoulli_kl(reference, _logits(model, frames))
            if progress is not None and (index + 1) % 10 == 0:
                side = "weight" if quantizer.per_channel else "activation"
                progress(f"{side} sensitivity: {index + 1}/{len(choices)} tensors measured")
        return found
    finally:
        model.train(was_training)


def allocate(model: nn.Module, quantizers: Iterable[FakeQuant], budget: int, counts: dict[int, tuple[FakeQuant, int]],
             frames: list[torch.Tensor], percentile: float, init: str,
             progress: Callable[[str], None] | None = None) -> tuple[dict[int, int], list[dict]]:
    """({id(quantizer): bits}, rows for the allocation file) for these quantizers of one side under a mean of
    `budget` bits over that side. `counts`: every quantizer of the side with its weight in the mean
    (`reader_elements` for activations: bits.json's mean over every convolution input, the frame's 8 bits included;
    `weight_counts` for weights). The rows: name, kind, elements (its weight in the mean),
    the bits chosen and the sensitivity at each choice."""
    # a tensor outside the side's mean (the squeeze-excitation scale, which no convolution reads) keeps the run's
    # bits: given bits here it would get them for nothing
    choices = {id(q): (q, bit_choices(q, budget)) for q in quantizers if id(q) in counts}
    # the tensors of the side not allocated here (the frame held at 8 bits, those held as fragile) keep their bits
    # and take their share of the budget first
    room = budget * sum(n for _, n in counts.values()) - sum(q.bits() * n for key, (q, n) in counts.items()
                                                             if key not in choices)
    weights = {key: counts[key][1] for key in choices}
    costs = measure(model, choices, frames, percentile, init, progress)
    chosen = choose_bits(costs, weights, room / sum(weights.values()))
    names = {id(info.quantizer): info for info in describe(model)}
    rows = [{"name": names[key].name, "kind": names[key].kind, "elements": weights[key], "bits": chosen[key],
             "sensitivity": {str(b): round(c, 8) for b, c in costs[key].items()}} for key in choices]
    return chosen, rows
