"""Bias correction: give every convolution of the quantized model the float model's per-channel output means.

BatchNorm is folded before QAT (qat/prepare.py), so no statistic re-normalises a channel whose mean the
quantization noise of the layers below shifted; only the folded bias can, and it trains at the weights' small
learning rate. At 4 bits and below that shift is large: measured on the quick phantom model at W4A4 before any
fine-tuning (scripts/diag_lowbit.py, drift table), the squeeze-excitation convolutions' channel means moved by up
to 4 float standard deviations. The correction is the empirical bias correction of Nagel et al. 2019 ("Data-Free
Quantization Through Weight Equalization and Bias Correction", ICCV, section 4.2) measured on training frames, the
folded-BatchNorm counterpart of re-estimating BatchNorm statistics under quantization (Nagel et al. 2022,
"Overcoming Oscillations in Quantization-Aware Training", ICML).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .prepare import quant_convs
from .sensitivity import only_quantizers

# frames of the one correcting pass (all at once: the means are over every frame); more would cost memory (the
# stem's output of 32 frames at 320x320 is 210 MB) and move the means by little
BIAS_FRAMES = 32


@torch.no_grad()
def conv_output_moments(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{conv name: (mean, std) per output channel, float64} of each convolution's output before its output quantizer
    (where BatchNorm was), over `batches` (eval mode)."""
    sums: dict[str, list] = {}
    active: list = [None]
    convs = quant_convs(model)
    owner = {id(conv.output_quant): (name, conv) for name, conv in convs if conv.output_quant is not None}

    def record(name: str, y: torch.Tensor) -> None:
        y = y.double().transpose(0, 1).reshape(y.shape[1], -1)
        acc = sums.setdefault(name, [0, 0.0, 0.0])
        acc[0] += y.shape[1]
        acc[1] = acc[1] + y.sum(1)
        acc[2] = acc[2] + (y ** 2).sum(1)

    def before_output(module, args):
        # a shared quantizer also runs as its readers' input quantizer: only the producing convolution's call counts
        entry = owner.get(id(module))
        if entry is not None and active[0] is entry[1]:
            record(entry[0], args[0])

    hooks = [conv.register_forward_pre_hook(lambda m, a: active.__setitem__(0, m)) for _, conv in convs]
    hooks += [conv.output_quant.register_forward_pre_hook(before_output) for _, conv in convs if conv.output_quant]
    hooks.append(convs[-1][1].register_forward_hook(lambda m, a, y: record(convs[-1][0], y)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    found = {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        found[name] = (mean, (squares / count - mean ** 2).clamp_min(0).sqrt())
    return found


@torch.no_grad()
def own_moments(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """conv_output_moments of the model as it is, quantizers on, over the first BIAS_FRAMES frames of `batches`: the
    reference that `correct_biases` restores after bits move in the middle of a run."""
    return conv_output_moments(model, [torch.cat(list(batches))[:BIAS_FRAMES]])


@torch.no_grad()
def correct_biases(model: nn.Module, batches: Iterable[torch.Tensor],
                   reference: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> float:
    """Move every convolution's bias so that its output channels' means on `batches` (the first BIAS_FRAMES frames)
    are the reference's: by default the float model's (the same model with every quantizer bypassed), as before any
    fine-tuning; returns the largest remaining shift in reference standard deviations.

    `reference` (from `own_moments`, taken before some bits move in the middle of a run: the freeze of a learned run,
    a bit schedule's next stage) restores the means the fine-tuned model had. Fine-tuning moves the biases on
    purpose, to where the quantized network needs them; a correction towards the float model would undo that
    (measured on usgra-seg fold 2's learned W4A4 run, its best checkpoint: validation Dice 0.702 as trained, 0.586
    after a correction towards the float model, docs/QUANTIZATION.md), while towards its own means it moves only
    what the new bits shifted.

    In one pass over all frames at once, layer by layer in forward order: each convolution's correction is
    measured on inputs that the corrections below it already moved, and applied to the output the layers above
    it read. (Correcting every layer at once from one measurement overshoots: a deep chain's means move again
    when the layers below them move; on the quick phantom model at W4A4 that took the Dice from 0.43 to 0.17.)"""
    frames = torch.cat(list(batches))[:BIAS_FRAMES]
    if reference is None:
        with only_quantizers(model):
            reference = conv_output_moments(model, [frames])
    convs = quant_convs(model)
    owner = {id(conv.output_quant): (name, conv) for name, conv in convs if conv.output_quant is not None}
    active: list = [None]

    def corrected(name: str, conv: nn.Module, y: torch.Tensor) -> torch.Tensor:
        before = conv.quantized_bias()
        conv.bias += (reference[name][0] - y.double().mean(dim=(0, 2, 3))).to(conv.bias.dtype)
        # what the convolution now adds, on its int32 bias grid: the layers above see exactly what a new pass gives
        return y + (conv.quantized_bias() - before).to(y.dtype)[None, :, None, None]

    def before_output(module, args):
        entry = owner.get(id(module))
        if entry is not None and active[0] is entry[1]:  # the producing convolution's call, not a reader's
            return (corrected(entry[0], entry[1], args[0]),)
        return None

    hooks = [conv.register_forward_pre_hook(lambda m, a: active.__setitem__(0, m)) for _, conv in convs]
    hooks += [conv.output_quant.register_forward_pre_hook(before_output) for _, conv in convs if conv.output_quant]
    hooks.append(convs[-1][1].register_forward_hook(lambda m, a, y: corrected(convs[-1][0], m, y)))
    was_training = model.training
    model.eval()
    try:
        model(frames)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    now = conv_output_moments(model, [frames])
    return max(float(((now[n][0] - m).abs() / s.clamp_min(1e-6)).max()) for n, (m, s) in reference.items())
