"""Fake quantization with a learnable step (LSQ) and a learnable integer bitwidth (Uhlich et al. 2020).

One module, `FakeQuant`, serves weights (per output channel, narrow signed grid) and activations (per tensor,
full signed grid). Symmetric, zero point 0, rounding by `torch.round` (half to even, as ONNX QuantizeLinear).

What is computed, always with the integer bitwidth b of the moment:

    qmin, qmax = -(2^(b-1) - 1), 2^(b-1) - 1       (narrow: weights; TensorRT's int8 weight range)
    qmin, qmax = -2^(b-1),       2^(b-1) - 1       (full: activations; at b = 8 exactly QuantizeLinear's int8)
    fq(x) = clamp(round(x / scale), qmin, qmax) * scale

`export_params()` returns exactly (scale, qmin, qmax, b), so the exporter rebuilds the same float32 values.

Why a signed grid for every activation: TensorRT accepts only symmetric int8 with zero point 0. An unsigned
8-bit grid does not fit int8, and an asymmetric one needs a zero point. A non-negative tensor (after ReLU)
on a signed grid leaves the negative half unused: it is quantized with b-1 bits of magnitude. We accept that
and count it honestly (the bit cost counts b, not b-1): the integers trained are the integers deployed, and
the same grid serves ONNX Runtime's u8 kernels by adding 128 (see docs/QUANTIZATION.md).

Step size: LSQ (Esser et al. 2020, "Learned Step Size Quantization"): the gradient of the output with respect
to the step is round(v) - v inside the range and qmin / qmax outside (v = x / step), multiplied by
g = 1 / sqrt(N * qmax) with N the elements per step. The step is stored as log2(step): steps of different
layers span orders of magnitude and the optimiser is Adam, whose update is about lr per step in the
parameter's own units, so a log step moves by a relative amount and stays positive. Steps are initialised from
data: weights by a mean-squared-error search over clipping levels of each channel's values; activations so
that the grid reaches a high percentile (or the maximum) of the magnitudes seen on training frames while
`observing` (see init_from_samples for why not MSE there).

Bitwidth, the parametrisation (Uhlich et al. 2020, "Mixed Precision DNNs: All you need is a good
parametrization", ICLR): learning b directly (or the step and b) gives gradients whose size grows like 2^b
and couples step and range, while learning the step d and the dynamic range q_max gives bounded, decoupled
gradients; b then follows: b = log2(q_max / d + 1) + 1 for a signed grid. Here:

- activations (per tensor): exactly that. Parameters log2(d) and log2(q_max). The continuous bitwidth
  b_c = log2(q_max / d + 1) + 1 is rounded UP to an integer, b = clamp(ceil(b_c), b_min, b_max), with a
  straight-through estimator (db/db_c = 1), and the forward uses the integer grid of b. Task-loss gradient
  reaches b through the clipping level (an element clipped at qmax*d moves by d * dqmax/db per bit), and the
  chain rule through b_c = f(q_max / d) hands clipped elements' gradient to q_max and rounding errors to d,
  the decoupling Uhlich et al. recommend. The bit cost (qat/loss.py) pulls b_c, hence q_max, down.
- weights (per output channel, one bitwidth per layer as the exporter and the bit table want): the steps
  d_c are per channel, so the one dynamic range of the layer is expressed in units of each channel's step,
  n = q_max,c / d_c, shared by the channels and learned as log2(n + 1) (= b_c - 1). The forward and the
  integer bits are the same as above; the difference is that a clipped weight's gradient moves both n and
  d_c (as in LSQ with a learned range), which is harmless for weights, whose distribution changes slowly.

Unsigned activation grids (`set_unsigned`, the x86 grid of `nerveseg qat --grid x86`): a tensor that every
reader takes through ReLU may use [0, 2^b - 1] instead: q = clamp(round(x / d), 0, 2^b - 1) already is ReLU's
output on the grid, one bit more magnitude than the signed grid's upper half, and exactly what ONNX Runtime's
uint8 QuantizeLinear with zero point 0 computes at b = 8. TensorRT cannot run it (its int8 is symmetric with
zero point 0), so such a model is exported for x86 ONNX Runtime only. Same parametrisation with the unsigned
count: b_c = log2(q_max / d + 1).

Ceil (not round) follows Uhlich et al.: the integer grid always covers the learned range. When the bits are
frozen (`freeze_bits`, or a uniform `--bits` run) the integer b is stored in the buffer `frozen_bits` and the
range parameter is no longer used; the step goes on learning by LSQ.

Not QuantU-Net's parametrisation (Boerkamp & Thomas 2025 learn b itself with Brevitas): their form is the
(d, b) one whose gradient Uhlich et al. show to be badly scaled; both give an integer b in the forward pass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

# ceil(b_c - CEIL_MARGIN): a range exactly at the top of a bitwidth's interval (e.g. q_max = 127 d) gives that
# bitwidth even when log2 rounds a hair above the integer.
CEIL_MARGIN = 1e-4
# values per row (weights: per channel) used by the step search; a random subset of longer rows
SEARCH_COLUMNS = 1 << 8
# clipping levels tried, as fractions of the largest magnitude, in the mean-squared-error step search
CLIP_FRACTIONS = torch.linspace(0.05, 1.0, 20)
# values per tensor and batch from which an activation percentile is estimated (observe_percentile)
PERCENTILE_SAMPLE = 2_000_000


class QuantParams(NamedTuple):
    """Everything an exporter needs: fq(x) == clamp(round(x / scale), qmin, qmax) * scale in eval mode."""

    scale: torch.Tensor  # 0-d (per tensor) or [C] (per output channel, axis 0), float32
    qmin: int
    qmax: int
    bits: int


def integer_range(bits: int, narrow: bool, unsigned: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of a signed b-bit grid (narrow drops -2^(b-1) so the grid is symmetric), or [0, 2^b - 1]."""
    if unsigned:
        return 0, 2 ** bits - 1
    top = 2 ** (bits - 1) - 1
    return (-top if narrow else -top - 1), top


class _FakeQuantFunction(torch.autograd.Function):
    """clamp(round(x / scale), qmin, qmax) * scale, with the LSQ gradient for scale, the straight-through
    gradient for x, and the gradient for the (integer, straight-through) bitwidth through the clip levels."""

    @staticmethod
    def forward(ctx, x, scale, bits, qmin: int, qmax: int, grad_factor: float):
        ctx.save_for_backward(x, scale, bits)
        ctx.qmin, ctx.qmax, ctx.grad_factor = qmin, qmax, grad_factor
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
            # a clipped element equals qmax * scale (or qmin * scale). Signed grids: d qmax / db = ln2 * 2^(b-1)
            # and d qmin / db = -ln2 * 2^(b-1); unsigned: d qmax / db = ln2 * 2^b, qmin = 0 does not move
            if qmin == 0:
                slope = math.log(2.0) * 2.0 ** float(bits)
                grad_bits = (grad * scale * above.to(grad.dtype)).sum() * slope
            else:
                slope = math.log(2.0) * 2.0 ** (float(bits) - 1.0)
                grad_bits = (grad * scale * (above.to(grad.dtype) - below.to(grad.dtype))).sum() * slope
            grad_bits = grad_bits.reshape(bits.shape)
        return grad_x, grad_scale, grad_bits, None, None, None


class _RoundSTE(torch.autograd.Function):
    """round(x) forward (half to even), identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


round_ste = _RoundSTE.apply


class FakeQuant(nn.Module):
    """Symmetric fake quantizer with learned step and learned (or frozen) integer bitwidth.

    Args:
        narrow: narrow signed grid [-(2^(b-1)-1), 2^(b-1)-1] (weights) or full [-2^(b-1), 2^(b-1)-1].
        channels: None for one step per tensor; C for one step per output channel (axis 0).
        bits: initial bitwidth (learned runs start here, at the top of its interval).
        learn_bits: False freezes the bitwidth at `bits` for good (fixed 8-bit quantizers, uniform runs).
        b_min, b_max: the range a learned bitwidth stays in.

    Shape:
        x: any; with channels=C, x is (C, ...) (a weight tensor). Output: same as x.
    """

    def __init__(self, *, narrow: bool, channels: int | None = None, bits: int = 8, learn_bits: bool = True,
                 b_min: int = 2, b_max: int = 8):
        super().__init__()
        if not 2 <= b_min <= b_max <= 8:
            raise ValueError(f"need 2 <= b_min <= b_max <= 8, got b_min={b_min}, b_max={b_max}")
        if not b_min <= bits <= b_max and learn_bits:
            raise ValueError(f"initial bits {bits} outside [{b_min}, {b_max}]")
        self.narrow, self.per_channel = narrow, channels is not None
        self.unsigned = False  # set_unsigned: [0, 2^b - 1] (a per-tensor quantizer whose readers all apply ReLU)
        self.b_min, self.b_max = b_min, b_max
        shape = (channels,) if channels is not None else ()
        self.log2_step = nn.Parameter(torch.zeros(shape))
        # per tensor: log2(q_max) in value units; per channel: log2(n + 1), n = q_max / d in steps (module doc)
        self.log2_range = nn.Parameter(torch.zeros(()))
        # 0 while the bitwidth learns; otherwise the integer bitwidth in force (a buffer: it is state to save)
        self.register_buffer("frozen_bits", torch.tensor(0 if learn_bits else bits, dtype=torch.int64))
        self.log2_range.requires_grad_(learn_bits)
        self.observing = False
        self.observe_percentile = 0.0  # P > 0: the grid reaches the mean per-batch P-th percentile of |x|, not the max
        self._peak: float | None = None  # largest |x| seen while observing
        self._percentiles: list[float] = []
        self._set_range_for_bits(bits)

    # -- the bitwidth -------------------------------------------------------------------------------------
    @property
    def learns_bits(self) -> bool:
        return int(self.frozen_bits) == 0

    def step(self) -> torch.Tensor:
        """The step (scale), 0-d or [C]: a float32 number (the exported scale), in the module's dtype (a float64
        evaluation of the model, export/int8.py's parity reference, uses the very same steps)."""
        return torch.exp2(self.log2_step.float()).to(self.log2_step.dtype)

    def continuous_bits(self) -> torch.Tensor:
        """b_c, differentiable in the step and range parameters (per-channel steps: in n only)."""
        if self.per_channel:
            return self.log2_range + 1.0
        return torch.log2(torch.exp2(self.log2_range) / self.step() + 1.0) + self._sign_bit

    def bits_ste(self) -> torch.Tensor:
        """The integer bitwidth as a 0-d float tensor; its gradient passes straight to b_c (or is none)."""
        if not self.learns_bits:
            return self.frozen_bits.to(torch.float32)
        b_c = self.continuous_bits()
        b = torch.clamp(torch.ceil(b_c.detach() - CEIL_MARGIN), self.b_min, self.b_max)
        return b_c + (b - b_c).detach()

    def bits(self) -> int:
        """The integer bitwidth used by the forward pass now."""
        return int(self.bits_ste().detach().round())

    @property
    def _sign_bit(self) -> float:
        """The bit a signed grid spends on the sign: b = log2(q_max / d + 1) + this."""
        return 0.0 if self.unsigned else 1.0

    @torch.no_grad()
    def set_unsigned(self) -> None:
        """Use the unsigned grid [0, 2^b - 1] (per-tensor quantizers only), keeping the current bits."""
        if self.per_channel:
            raise ValueError("weights stay on the signed grid; only an activation quantizer can be unsigned")
        bits = self.bits()
        self.unsigned = True
        self._set_range_for_bits(bits)

    @torch.no_grad()
    def _set_range_for_bits(self, bits: int) -> None:
        """Put the range at the top of `bits`' interval: q_max = (2^(b-1) - 1) * step (unsigned: 2^b - 1)."""
        n = 2.0 ** (bits - self._sign_bit) - 1.0
        if self.per_channel:
            self.log2_range.fill_(math.log2(n + 1.0))
        else:
            self.log2_range.copy_(torch.log2(n * self.step()))

    @torch.no_grad()
    def project_(self) -> None:
        """Keep the learned bitwidth inside [b_min, b_max] (call after every optimiser step)."""
        if not self.learns_bits:
            return
        top = self._sign_bit
        n_low, n_high = 2.0 ** (self.b_min - 1 - top) - 1.0 + 1e-2, 2.0 ** (self.b_max - top) - 1.0
        if self.per_channel:
            self.log2_range.clamp_(math.log2(n_low + 1.0), math.log2(n_high + 1.0))
        else:
            step = self.step()
            self.log2_range.clamp_(float(torch.log2(n_low * step)), float(torch.log2(n_high * step)))

    @torch.no_grad()
    def freeze_bits(self, bits: int | None = None) -> None:
        """Fix the integer bitwidth (the current one by default); the range parameter stops mattering."""
        bits = self.bits() if bits is None else int(bits)
        self.frozen_bits.fill_(bits)
        self.log2_range.requires_grad_(False)

    # -- the grid -----------------------------------------------------------------------------------------
    def export_params(self) -> QuantParams:
        bits = self.bits()
        qmin, qmax = integer_range(bits, self.narrow, self.unsigned)
        return QuantParams(self.step().detach(), qmin, qmax, bits)

    def _shaped(self, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return scale.reshape((-1,) + (1,) * (x.dim() - 1)) if self.per_channel else scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        bits = self.bits_ste()
        b = int(bits.detach().round())
        qmin, qmax = integer_range(b, self.narrow, self.unsigned)
        scale = self._shaped(self.step(), x)
        per_step = x.numel() // max(1, scale.numel())
        grad_factor = 1.0 / math.sqrt(per_step * qmax)
        return _FakeQuantFunction.apply(x, scale, bits, qmin, qmax, grad_factor)

    def quantize_integers(self, x: torch.Tensor) -> torch.Tensor:
        """round(x / scale) clamped to the grid, as float (exact small integers)."""
        p = self.export_params()
        return torch.clamp(torch.round(x / self._shaped(p.scale, x)), p.qmin, p.qmax)

    # -- initialisation from data -------------------------------------------------------------------------
    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        # an unsigned grid reaches only up: the positive part is what it must cover
        magnitude = (x.detach().clamp_min(0) if self.unsigned else x.detach().abs()).flatten()
        self._peak = max(self._peak if self._peak is not None else 0.0, float(magnitude.max()))
        if self.observe_percentile:
            if magnitude.numel() > PERCENTILE_SAMPLE:  # torch.quantile takes at most 16M values; a fixed subset
                pick = torch.randperm(magnitude.numel(), generator=torch.Generator().manual_seed(0))[:PERCENTILE_SAMPLE]
                magnitude = magnitude[pick.to(magnitude.device)]
            self._percentiles.append(float(torch.quantile(magnitude.float(), self.observe_percentile / 100.0)))

    @torch.no_grad()
    def init_from_samples(self) -> None:
        """Set the step so that the grid reaches the largest observed magnitude (or a percentile), at the current bits.

        Not the MSE-best clip used for weights: measured on usgra-seg (edge recipe, W8A8 before any
        fine-tuning, 10 validation frames), MSE-chosen activation clips dropped the best-threshold Dice from
        0.563 (float) to ~0.52, the observed maximum kept 0.547 (8-bit weights alone: 0.562). The
        mean-squared error is dominated by the many small activations and clips the rare large ones that
        carry the nerve. LSQ then learns the step from there (and shrinks it where clipping pays).
        With `observe_percentile` P > 0 the grid reaches the mean over batches of the P-th percentile of |x|
        instead (ONNX Runtime's Percentile calibration is the same idea); measured by
        scripts/diag_activation_init.py, see docs/QUANTIZATION.md.
        """
        if self._peak is None:
            raise RuntimeError("init_from_samples: nothing observed; run frames through the model while observing")
        peak = sum(self._percentiles) / len(self._percentiles) if self._percentiles else self._peak
        peak, self._peak, self._percentiles = max(peak, 1e-8), None, []
        bits = self.bits()  # before the step moves: a per-tensor range is in value units
        _, qmax = integer_range(bits, self.narrow, self.unsigned)
        self.log2_step.fill_(math.log2(peak / qmax))
        if self.learns_bits:
            self._set_range_for_bits(bits)

    @torch.no_grad()
    def init_from_tensor(self, w: torch.Tensor) -> None:
        """Set the step from a weight tensor (per channel when per_channel), MSE-best clip at the current bits."""
        self._init_step(w.detach().reshape(w.shape[0], -1).float().cpu() if self.per_channel
                        else w.detach().reshape(1, -1).float().cpu())

    @torch.no_grad()
    def _init_step(self, rows: torch.Tensor) -> None:
        """rows: (R, M), one row per step. Chooses clip = fraction x max|row| minimising the squared error."""
        bits = self.bits()
        qmin, qmax = integer_range(bits, self.narrow, self.unsigned)
        peak = rows.abs().amax(dim=1).clamp_min(1e-8)  # (R,), from every value
        if rows.shape[1] > SEARCH_COLUMNS:  # the error is estimated on a fixed random subset
            pick = torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(0))[:SEARCH_COLUMNS]
            rows = rows[:, pick]
        best_err = torch.full_like(peak, float("inf"))
        best_step = peak / qmax
        for fraction in CLIP_FRACTIONS.tolist():
            step = (peak * fraction / qmax)[:, None]
            err = ((torch.clamp(torch.round(rows / step), qmin, qmax) * step - rows) ** 2).mean(dim=1)
            better = err < best_err
            best_err, best_step = torch.where(better, err, best_err), torch.where(better, step[:, 0], best_step)
        target = best_step if self.per_channel else best_step[0]
        self.log2_step.copy_(torch.log2(target).to(self.log2_step.device).reshape(self.log2_step.shape))
        if self.learns_bits:
            self._set_range_for_bits(bits)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        grid = "unsigned" if self.unsigned else "narrow signed" if self.narrow else "full signed"
        state = "learned" if self.learns_bits else "frozen"
        return f"{kind}, {grid}, bits={self.bits()} ({state}, range [{self.b_min}, {self.b_max}])"
