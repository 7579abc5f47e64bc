"""Per-layer bitwidths: the table written as bits.json, and the differentiable means the bit cost uses.

Means are weighted: weight bits by each layer's live weight count (what the deployed weights cost in memory),
activation bits by the number of elements of each convolution's input at the model's input size (what the
activations cost in traffic). The input size matters for both: element counts scale with it, and a kernel tap
that only ever reads zero padding at that size is no weight of the deployed model (training/live_taps.py; the
exported graphs do not store it). At 256x256 the edge model's ASPP rate-24/36 kernels keep only their centre:
7.05 M live weights of 10.98 M. Counting all 10.98 M let the bit cost buy cheap bits by squeezing 3.9 M weights
that never touch a pixel to the 2-bit floor: a run reported at 3.75 mean weight bits that way has 4.72 over its
live weights. bits.json keeps both (`params`, `live_params`; `mean_weight_bits` is over live weights).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.live_taps import live_window

from .prepare import probe_forward, quant_convs
from .quantizers import FakeQuant


def conv_input_shapes(model: nn.Module, input_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """(C, H, W) of each QuantConv2d's input for one (1, 1, H, W) frame, by module name (one probe pass)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [conv.register_forward_pre_hook(lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:])))
             for name, conv in quant_convs(model)]
    probe_forward(model, hooks, tuple(input_size))
    return shapes


def activation_elements(model: nn.Module, input_size: tuple[int, int]) -> dict[str, int]:
    """Elements of each QuantConv2d's input for one (1, 1, H, W) frame, by module name."""
    return {name: math.prod(shape) for name, shape in conv_input_shapes(model, input_size).items()}


def live_weights(model: nn.Module, input_size: tuple[int, int]) -> dict[str, int]:
    """Weights of each QuantConv2d whose kernel taps read pixels at this input size, by module name."""
    shapes = conv_input_shapes(model, input_size)
    found = {}
    for name, conv in quant_convs(model):
        window = live_window(shapes[name][1:], tuple(conv.weight.shape[-2:]), tuple(conv.dilation),
                             tuple(conv.padding), tuple(conv.stride))
        out_channels, in_per_group = conv.weight.shape[:2]
        found[name] = conv.weight.numel() if window is None else out_channels * in_per_group * window[0][1] * window[1][1]
    return found


def mean_weight_bits(model: nn.Module, weights: dict[str, int] | None = None) -> torch.Tensor:
    """Mean weight bits as a 0-d tensor whose gradient reaches the learned bitwidths (straight through the
    integer rounding), weighted by `weights` (from `live_weights`; None: every parameter counts)."""
    total = count = 0
    for name, conv in quant_convs(model):
        params = conv.weight.numel() if weights is None else weights[name]
        total = total + params * conv.weight_quant.bits_ste()
        count += params
    return total / count


def mean_bits(model: nn.Module, elements: dict[str, int],
              weights: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean weight bits, mean activation bits) as 0-d tensors whose gradients reach the learned bitwidths
    (straight through the integer rounding). Weighted as in the module doc; `elements` from
    `activation_elements`, `weights` from `live_weights` (None: every parameter counts)."""
    act_sum = act_count = 0
    for name, conv in quant_convs(model):
        act_sum = act_sum + elements[name] * conv.input_quant.bits_ste()
        act_count += elements[name]
    return mean_weight_bits(model, weights), act_sum / act_count


def cap_weight_bits_(model: nn.Module, weights: dict[str, int] | None, target: float,
                     allowed: set[int] | None = None) -> list[tuple[str, int, int]]:
    """Lower frozen weight bitwidths one bit at a time until their mean (weighted by `weights`, the live weight
    counts the bit cost uses; None: every weight) is at most `target`; returns (layer, from, to) for each bit taken.

    `--target-bits` penalises the excess over B while the bits learn, which holds the mean around B, not under
    it (4.02 and 4.11 on real folds). At the freeze the excess is removed: each step takes a bit from the layer
    whose learned continuous bitwidth b_c lies closest above its next lower integer (ceil put it on b, it was
    nearest to b - 1), so the cap keeps the order the training learned. The layer's steps are re-chosen for
    the new bits as at initialisation (the MSE-best clip of its weights); the fine-tuning epochs that follow
    train at exactly these bits, which are the deployed ones. `allowed`: ids of the weight quantizers that may give
    bits (None: all; a tensor held at 8 bits as fragile may not)."""
    convs = [(name, conv) for name, conv in quant_convs(model) if allowed is None or id(conv.weight_quant) in allowed]
    taken = []
    while float(mean_weight_bits(model, weights).detach()) > target + 1e-9:
        lowerable = [(name, conv) for name, conv in convs if conv.weight_quant.bits() > conv.weight_quant.b_min]
        if not lowerable:
            break
        name, conv = min(lowerable, key=lambda item: float(item[1].weight_quant.continuous_bits().detach())
                         - (item[1].weight_quant.bits() - 1))
        quant = conv.weight_quant
        bits = quant.bits()
        with torch.no_grad():
            quant.freeze_bits(bits - 1)
            quant.init_from_tensor(conv.weight)
        taken.append((name, bits, bits - 1))
    return taken


def cap_activation_bits_(model: nn.Module, elements: dict[str, int], target: float,
                         allowed: set[int]) -> list[tuple[str, int, int]]:
    """The activation counterpart of cap_weight_bits_: lower frozen activation bitwidths (the quantizers in
    `allowed`, ids) one bit at a time until the mean activation bits (conv inputs weighted by `elements`, as the bit
    cost counts them) is at most `target`, taking each bit where the learned b_c lies nearest above the next lower
    integer. Returns (quantizer's first reader, from, to) per bit; the caller re-initialises their steps from data
    (qat.prepare.initialise_steps with `only`), as the steps of a lower bitwidth need the observed activations."""
    readers: dict[int, tuple[str, FakeQuant]] = {}
    for name, conv in quant_convs(model):
        if id(conv.input_quant) in allowed:
            readers.setdefault(id(conv.input_quant), (name, conv.input_quant))
    taken = []
    while float(mean_bits(model, elements)[1].detach()) > target + 1e-9:
        lowerable = [(name, q) for name, q in readers.values() if q.bits() > q.b_min]
        if not lowerable:
            break
        name, quant = min(lowerable, key=lambda item: float(item[1].continuous_bits().detach()) - (item[1].bits() - 1))
        bits = quant.bits()
        quant.freeze_bits(bits - 1)
        taken.append((name, bits, bits - 1))
    return taken


def bits_table(model: nn.Module, input_size: tuple[int, int]) -> dict:
    """The content of bits.json: one row per quantized convolution, then the weighted means.

    Returns:
        {"layers": [{"name", "weight_bits", "activation_bits", "params", "live_params", "activation_elements"}...],
         "mean_weight_bits" (over live weights), "mean_weight_bits_all_params", "mean_activation_bits"}
    """
    elements = activation_elements(model, tuple(input_size))
    live = live_weights(model, tuple(input_size))
    layers = []
    for name, conv in quant_convs(model):
        layers.append({"name": name, "weight_bits": conv.weight_quant.bits(), "activation_bits": conv.input_quant.bits(),
                       "params": conv.weight.numel(), "live_params": live[name], "activation_elements": elements[name]})
    count = sum(row["activation_elements"] for row in layers)
    return {
        "layers": layers,
        "mean_weight_bits": sum(r["weight_bits"] * r["live_params"] for r in layers) / sum(r["live_params"] for r in layers),
        "mean_weight_bits_all_params": sum(r["weight_bits"] * r["params"] for r in layers) / sum(r["params"] for r in layers),
        "mean_activation_bits": sum(r["activation_bits"] * r["activation_elements"] for r in layers) / count,
    }
