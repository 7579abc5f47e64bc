"""The quantized layers: QuantConv2d (a convolution, BatchNorm already folded in, whose input, weights, bias and
output sit on the integer grids the deployed int8 graph uses), QuantHardswish, QuantGate and QuantResidual
(the element-wise operations between convolutions, quantized so that ONNX Runtime runs them on integers).

Placement, and why (details in docs/QUANTIZATION.md), with one quantizer per tensor:
- input_quant: TensorRT wants Q/DQ on the input of every weighted layer, so every convolution's input is
  quantized (per tensor, learned bits; the first convolution's input, the grey frame in [0, 1], at 8 bits).
  Where that input already is a quantized tensor (a Hardswish's or residual sum's output, or a quantized
  conv output through ReLU, which keeps the grid), the convolution SHARES that tensor's quantizer
  (qat/prepare.py, `share_input_quantizers`): one grid per tensor, no second rounding, and ONNX Runtime sees
  QuantizeLinear -> DequantizeLinear once.
- weight_quant: per output channel, narrow signed grid (TensorRT's int8 weight range), learned bits.
- bias: on the int32 grid of input step x weight step, as integer kernels add it.
- output_quant: 8 bits on every convolution but the classifier's last one (whose output is the logits).
  ONNX Runtime's CPU kernels only fuse DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv; without a
  quantized output the graph runs in float between convolutions and is slower than FP32.
- Hardswish (x * hardsigmoid(x), as ONNX opset 13 writes it), the squeeze-excitation gate and the residual
  sums: their outputs are quantized too, so that every Mul and Add reads DequantizeLinear and feeds
  QuantizeLinear, the pattern ONNX Runtime fuses into QLinearMul / QLinearAdd / QLinearGlobalAveragePool
  (measured on the edge model, ONNX Runtime 1.32, 2 threads: with Q/DQ on conv inputs and outputs only the
  int8 graph ran at 21.7 ms against FP32's 21.1 and ORT's own PTQ's 16.7; with these quantizers and ReLU run
  as QLinearLeakyRelu, 17.9 ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.live_taps import conv2d_live

from .quantizers import FakeQuant
from .ste import round_ste

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


class QuantConv2d(nn.Module):
    """forward(x) = output_quant(conv2d(input_quant(x), quantized_weight(), quantized_bias(), ...)).

    Args:
        conv: the float convolution, BatchNorm already folded into it.
        weight_bits, activation_bits: initial (or fixed) bitwidths of weights and input.
        learn_weight_bits, learn_activation_bits: whether those bitwidths learn.
        output_bits: bits of the output quantizer (fixed), or None for no output quantizer (the logits).
        b_min, b_max: range of learned bitwidths.
        init_steps: initialise the weight steps from the weights (MSE search).
    """

    def __init__(self, conv: nn.Conv2d, *, weight_bits: int = 8, activation_bits: int = 8,
                 learn_weight_bits: bool = True, learn_activation_bits: bool = True, output_bits: int | None = 8,
                 b_min: int = 2, b_max: int = 8, init_steps: bool = True):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero padding is supported, got {conv.padding_mode!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight = nn.Parameter(conv.weight.detach().clone())
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bias = nn.Parameter(bias.to(self.weight.dtype))
        self.input_quant = FakeQuant(narrow=False, bits=activation_bits, learn_bits=learn_activation_bits,
                                     b_min=b_min, b_max=b_max)
        self.weight_quant = FakeQuant(narrow=True, channels=conv.out_channels, bits=weight_bits,
                                      learn_bits=learn_weight_bits, b_min=b_min, b_max=b_max)
        self.output_quant = (FakeQuant(narrow=False, bits=output_bits, learn_bits=False)
                             if output_bits is not None else None)
        if init_steps:  # off when a state dict will overwrite the steps anyway (loading a checkpoint)
            self.weight_quant.init_from_tensor(self.weight)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight)

    def weight_integers(self) -> torch.Tensor:
        with torch.no_grad():
            return self.weight_quant.quantize_integers(self.weight).to(torch.int8)

    def bias_scale(self) -> torch.Tensor:
        """[C]: input step x weight step of each output channel, the step of the int32 bias."""
        return self.input_quant.step() * self.weight_quant.step()

    def quantized_bias(self) -> torch.Tensor:
        """round(bias / s) * s on the int32 grid (s = bias_scale); straight-through gradient for the rounding."""
        scale = self.bias_scale()
        return torch.clamp(round_ste(self.bias / scale), INT32_MIN, INT32_MAX) * scale

    def bias_integers(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.clamp(torch.round(self.bias / self.bias_scale()), INT32_MIN, INT32_MAX).to(torch.int32)

    def quantizers(self) -> dict[str, FakeQuant]:
        found = {"input_quant": self.input_quant, "weight_quant": self.weight_quant}
        if self.output_quant is not None:
            found["output_quant"] = self.output_quant
        return found

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x)
        # conv2d_live: the kernel taps that only read zero padding are skipped (same output, and their gradient
        # was exactly zero anyway); the weights are quantized whole, so the integers are those of the full kernel
        if self.input_quant.observing or self.weight_quant.bypass:  # initialisation pass, or diagnosis: float weights
            y = conv2d_live(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:  # (diagnosis, input float: no int32 bias grid, which is the input step x the weight step)
            bias = self.bias if self.input_quant.bypass else self.quantized_bias()
            y = conv2d_live(x, self.quantized_weight(), bias, self.stride, self.padding, self.dilation, self.groups)
        return self.output_quant(y) if self.output_quant is not None else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}")


def activation_quantizer(bits: int, learn_bits: bool, b_min: int = 2, b_max: int = 8) -> FakeQuant:
    """A per-tensor activation quantizer (full signed grid)."""
    return FakeQuant(narrow=False, bits=bits, learn_bits=learn_bits, b_min=b_min, b_max=b_max)


class QuantHardswish(nn.Module):
    """hardswish(x) = x * hardsigmoid(x), computed as the exported graph computes it (HardSigmoid, then Mul),
    with the gate hardsigmoid(x) in [0, 1] on a fixed 8-bit grid and the product on `output_quant` (the
    tensor the next layer reads; its bits learn in learned runs). The input is a quantized conv output."""

    def __init__(self, output_quant: FakeQuant):
        super().__init__()
        self.gate_quant = activation_quantizer(8, learn_bits=False)
        self.output_quant = output_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quant(x * self.gate_quant(F.hardsigmoid(x)))


class QuantGate(nn.Module):
    """A squeeze-excitation gate (torchvision's scale_activation, Hardsigmoid) with its output on a fixed 8-bit
    grid, so that the gate x features product reads two dequantized tensors (QLinearMul in ONNX Runtime)."""

    def __init__(self, activation: nn.Module):
        super().__init__()
        self.activation = activation
        self.gate_quant = activation_quantizer(8, learn_bits=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_quant(self.activation(x))


class QuantResidual(nn.Module):
    """A block with a residual connection (torchvision's InvertedResidual with use_res_connect), its sum
    quantized: output_quant(block(x) + x), the tensor the next block reads (QLinearAdd in ONNX Runtime)."""

    def __init__(self, residual_block: nn.Module, output_quant: FakeQuant):
        super().__init__()
        self.block = residual_block.block  # the branch without the sum
        self.output_quant = output_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quant(self.block(x) + x)
