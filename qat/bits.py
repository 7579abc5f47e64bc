"""Per-layer bitwidths: the table written as bits.json, and the differentiable means the bit cost uses.

Means are weighted: weight bits by each layer's weight count (what the weights cost in memory), activation
bits by the number of elements of each convolution's input at the model's input size (what the activations
cost in traffic). The input size matters for the latter because the element counts scale with it.
"""

from __future__ import annotations

import torch
from torch import nn

from .prepare import probe_forward, quant_convs


@torch.no_grad()
def activation_elements(model: nn.Module, input_size: tuple[int, int]) -> dict[str, int]:
    """Elements of each QuantConv2d's input for one (1, 1, H, W) frame, by module name."""
    found: dict[str, int] = {}
    hooks = [conv.register_forward_pre_hook(lambda _m, args, name=name: found.__setitem__(name, args[0][0].numel()))
             for name, conv in quant_convs(model)]
    probe_forward(model, hooks, tuple(input_size))
    return found


def mean_bits(model: nn.Module, elements: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean weight bits, mean activation bits) as 0-d tensors whose gradients reach the learned bitwidths
    (straight through the integer rounding). Weighted as in the module doc; `elements` from
    `activation_elements`."""
    weight_sum = weight_count = act_sum = act_count = 0
    for name, conv in quant_convs(model):
        params = conv.weight.numel()
        weight_sum = weight_sum + params * conv.weight_quant.bits_ste()
        weight_count += params
        act_sum = act_sum + elements[name] * conv.input_quant.bits_ste()
        act_count += elements[name]
    return weight_sum / weight_count, act_sum / act_count


def bits_table(model: nn.Module, input_size: tuple[int, int]) -> dict:
    """The content of bits.json: one row per quantized convolution, then the weighted means.

    Returns:
        {"layers": [{"name", "weight_bits", "activation_bits", "params", "activation_elements"}...],
         "mean_weight_bits", "mean_activation_bits"}
    """
    elements = activation_elements(model, tuple(input_size))
    layers = []
    for name, conv in quant_convs(model):
        layers.append({"name": name, "weight_bits": conv.weight_quant.bits(), "activation_bits": conv.input_quant.bits(),
                       "params": conv.weight.numel(), "activation_elements": elements[name]})
    params = sum(row["params"] for row in layers)
    count = sum(row["activation_elements"] for row in layers)
    return {
        "layers": layers,
        "mean_weight_bits": sum(r["weight_bits"] * r["params"] for r in layers) / params,
        "mean_activation_bits": sum(r["activation_bits"] * r["activation_elements"] for r in layers) / count,
    }
