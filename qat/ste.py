"""The autograd functions of fake quantization: the LSQ step gradient (Esser et al. 2020), the straight-through
input gradient, the bitwidth gradient through the clipping levels (Uhlich et al. 2020), one-bit (binary) weights,
and a straight-through round.
FakeQuant (qat/quantizers.py) says what is learned and why.
"""

from __future__ import annotations

import math

import torch


class FakeQuantFunction(torch.autograd.Function):
    """clamp(round(x / scale), qmin, qmax) * scale, with the LSQ gradient for scale, the straight-through
    gradient for x, and the gradient for the (integer, straight-through) bitwidth through the clip levels."""

    @staticmethod
    def forward(ctx, x, scale, bits, qmin: int, qmax: int, grad_factor: float, share: float):
        """share: the share r of the 2^b levels below zero (signed 1/2, unsigned 0, tight grids between)."""
        ctx.save_for_backward(x, scale, bits)
        ctx.qmin, ctx.qmax, ctx.grad_factor, ctx.share = qmin, qmax, grad_factor, share
        return torch.clamp(torch.round(x / scale), qmin, qmax) * scale

    @staticmethod
    def backward(ctx, grad):
        x, scale, bits = ctx.saved_tensors
        qmin, qmax = ctx.qmin, ctx.qmax
        v = x / scale
        below, above = v < qmin, v > qmax
        inside = ~(below | above)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_scale = grad_bits = None
        if ctx.needs_input_grad[1]:
            local = torch.where(inside, torch.round(v) - v, torch.clamp(v, qmin, qmax))
            grad_scale = (grad * local) * ctx.grad_factor
            dims = [d for d in range(x.dim()) if scale.dim() == 0 or scale.shape[d] == 1]
            grad_scale = grad_scale.sum(dim=dims, keepdim=True).reshape(scale.shape)
        if ctx.needs_input_grad[2]:
            # a clipped element equals qmax * scale (or qmin * scale), qmax = (1 - r) 2^b - 1 and qmin = -r 2^b: d qmax
            # / db = ln2 (1 - r) 2^b, d qmin / db = -ln2 r 2^b. Signed grids (r = 1/2): ln2 * 2^(b-1) on both sides;
            # unsigned (r = 0): ln2 * 2^b, qmin = 0 does not move
            if ctx.share == 0.0:
                slope = math.log(2.0) * 2.0 ** float(bits)
                grad_bits = (grad * scale * above.to(grad.dtype)).sum() * slope
            elif ctx.share == 0.5:
                slope = math.log(2.0) * 2.0 ** (float(bits) - 1.0)
                grad_bits = (grad * scale * (above.to(grad.dtype) - below.to(grad.dtype))).sum() * slope
            else:
                slope = math.log(2.0) * 2.0 ** float(bits)
                sides = above.to(grad.dtype) * (1.0 - ctx.share) - below.to(grad.dtype) * ctx.share
                grad_bits = (grad * scale * sides).sum() * slope
            grad_bits = grad_bits.reshape(bits.shape)
        return grad_x, grad_scale, grad_bits, None, None, None, None


class BinaryFakeQuantFunction(torch.autograd.Function):
    """A one-bit weight grid: scale x (+1 where x >= 0, else -1), per output channel (BinaryConnect, Courbariaux et
    al. 2015; the per-channel scale as in XNOR-Net, Rastegari et al. 2016, but learned by LSQ). The two levels have
    no zero, so it is not clamp(round(x / scale)): the integers are the sign. Gradients: x straight through where
    |x / scale| <= 1 (the grid's range, as LSQ's clip; BNN's hardtanh estimator, Hubara et al. 2016), the scale's by
    LSQ's rule for a clipped element (d(scale x q) / d scale = q, times grad_factor)."""

    @staticmethod
    def forward(ctx, x, scale, grad_factor: float):
        ctx.save_for_backward(x, scale)
        ctx.grad_factor = grad_factor
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype) * scale

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        grad_x = grad * ((x / scale).abs() <= 1) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            signs = torch.where(x >= 0, 1.0, -1.0).to(grad.dtype)
            dims = [d for d in range(x.dim()) if scale.dim() == 0 or scale.shape[d] == 1]
            grad_scale = (grad * signs * ctx.grad_factor).sum(dim=dims, keepdim=True).reshape(scale.shape)
        return grad_x, grad_scale, None


class _RoundSTE(torch.autograd.Function):
    """round(x) forward (half to even), identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


round_ste = _RoundSTE.apply
