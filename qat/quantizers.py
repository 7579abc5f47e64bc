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
data (qat/step_init.py; init_from_samples says which rule where).

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

Tight activation grids (`set_tight`, `activation_range = "tight"`, below 8 bits): the 2^b levels are split where
the data lie, [-z, 2^b - 1 - z] with z = round(r 2^b) and the share r chosen from the observed values: 0 for a
tensor never negative, a little for a hardswish output (minimum -0.375). A signed grid gives such a tensor b - 1
bits of magnitude (3 bits: 4 levels instead of 8). Below 8 bits the range lies inside int8 with zero point 0 (the
exporter's Clip keeps the b-bit range), so TensorRT and ONNX Runtime run it exactly; at most 7 bits. With the
share r of the levels below zero, b_c = log2(q_max / d + 1) - log2(1 - r) (signed r = 1/2, unsigned 0).

One-bit grids (a fixed bitwidth of 1, given only by the allocation at a 2-bit budget, qat/allocation.py): a
weight's is binary, scale x {-1, +1} by the sign (BinaryConnect, Courbariaux et al. 2015; per-channel scale as in
XNOR-Net, Rastegari et al. 2016, initialised to mean |w| and learned by LSQ): a signed 1-bit grid
[-(2^0 - 1), 2^0 - 1] would be {0} alone, and the narrow 2-bit grid is ternary. An activation's is [0, 1], only
where the grid is unsigned or tight with every reader applying ReLU (`takes_one_bit`): the ReLU'd tensor is either
zero or one step. Both are int8 integers with zero point 0 (the weights stored as computed, the activation by
QuantizeLinear after the Clip to [0, s]), so TensorRT and ONNX Runtime run them as the model does. Learned bits
stay in [b_min, b_max], b_min >= 2.

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

from .ste import BinaryFakeQuantFunction, FakeQuantFunction
from .step_init import Observation, binary_steps, covering_grid, mse_activation_grid, mse_steps

# ceil(b_c - CEIL_MARGIN): a range exactly at the top of a bitwidth's interval (e.g. q_max = 127 d) gives that
# bitwidth even when log2 rounds a hair above the integer.
CEIL_MARGIN = 1e-4
TIGHT_MAX_BITS = 7  # [-z, 2^b - 1 - z] fits int8 with zero point 0 up to 7 bits


class QuantParams(NamedTuple):
    """Everything an exporter needs: fq(x) == clamp(round(x / scale), qmin, qmax) * scale in eval mode (binary
    weights, bits 1: sign(x) * scale, qmin -1, qmax 1; their integers come from quantize_integers)."""

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
        self.relu_read = False  # set_tight: every reader applies ReLU, the tight split stays at z = 0
        self.bypass = False  # qat.sensitivity: hand x on unchanged (the float model's tensor), for diagnosis only
        self.b_min, self.b_max = b_min, b_max
        shape = (channels,) if channels is not None else ()
        self.log2_step = nn.Parameter(torch.zeros(shape))
        # per tensor: log2(q_max) in value units; per channel: log2(n + 1), n = q_max / d in steps (module doc)
        self.log2_range = nn.Parameter(torch.zeros(()))
        # 0 while the bitwidth learns; otherwise the integer bitwidth in force (a buffer: it is state to save)
        self.register_buffer("frozen_bits", torch.tensor(0 if learn_bits else bits, dtype=torch.int64))
        # a tight grid's share of the 2^b levels below zero (z = round(share x 2^b)); -1: not tight (set_tight)
        self.register_buffer("negative_share", torch.tensor(-1.0))
        self.log2_range.requires_grad_(learn_bits)
        self.observing = False
        self.observe_percentile = 0.0  # P > 0: the grid reaches the mean per-batch P-th percentile of |x|, not the max
        self.observe_init = "percentile"  # or "mse": below 8 bits the squared-error search (init_from_samples)
        self.observation: Observation | None = None  # what the observing pass saw (qat/step_init.py)
        self._set_range_for_bits(bits)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before tight grids existed have no negative_share: their grids were not tight
        state_dict.setdefault(prefix + "negative_share", torch.tensor(-1.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the bitwidth -------------------------------------------------------------------------------------
    @property
    def learns_bits(self) -> bool:
        return int(self.frozen_bits) == 0

    @property
    def tight(self) -> bool:
        return float(self.negative_share) >= 0

    def step(self) -> torch.Tensor:
        """The step (scale), 0-d or [C]: a float32 number (the exported scale), in the module's dtype (a float64
        evaluation of the model, export/bundle/int8.py's parity reference, uses the very same steps)."""
        return torch.exp2(self.log2_step.float()).to(self.log2_step.dtype)

    def _share(self) -> float:
        """The share of the 2^b levels below zero: 1/2 on a signed grid, 0 unsigned, the learned split if tight."""
        return float(self.negative_share) if self.tight else 0.0 if self.unsigned else 0.5

    def continuous_bits(self) -> torch.Tensor:
        """b_c, differentiable in the step and range parameters (per-channel steps: in n only). Per tensor, with
        share r of the levels below zero: q_max / d = (1 - r) 2^b - 1, so b_c = log2(q_max / d + 1) - log2(1 - r)."""
        if self.per_channel:
            return self.log2_range + 1.0
        return torch.log2(torch.exp2(self.log2_range) / self.step() + 1.0) - math.log2(1.0 - self._share())

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
    def takes_one_bit(self) -> bool:
        """Whether a fixed bitwidth of 1 has a grid here (module doc): weights (binary), unsigned activations, and
        tight ones every reader takes through ReLU ([0, 1])."""
        return self.per_channel or self.unsigned or self.relu_read

    def binary(self, bits: int) -> bool:
        """Whether `bits` puts this quantizer on the binary weight grid {-1, +1} (no zero: the sign, not round)."""
        return self.per_channel and bits == 1

    def integer_range(self, bits: int) -> tuple[int, int]:
        """(qmin, qmax) of this quantizer's grid at `bits` (binary weights: (-1, 1), without the 0)."""
        if self.binary(bits):
            return -1, 1
        if not self.tight:
            return integer_range(bits, self.narrow, self.unsigned)
        below = min(max(round(float(self.negative_share) * 2 ** bits), 0), 2 ** (bits - 1))
        return -below, 2 ** bits - 1 - below

    @torch.no_grad()
    def set_unsigned(self) -> None:
        """Use the unsigned grid [0, 2^b - 1] (per-tensor quantizers only), keeping the current bits."""
        if self.per_channel:
            raise ValueError("weights stay on the signed grid; only an activation quantizer can be unsigned")
        bits = self.bits()
        self.unsigned = True
        self._set_range_for_bits(bits)

    @torch.no_grad()
    def set_tight(self, read_through_relu: bool = False) -> None:
        """Below 8 bits, let the integer range follow the data: [-z, 2^b - 1 - z], z chosen from the observed values
        at init_from_samples (a signed grid until then). The bits stay at or below TIGHT_MAX_BITS.
        `read_through_relu`: every reader applies ReLU (qat.prepare.quantizers_read_only_through_relu), so z = 0
        for good, [0, 2^b - 1], and the step is chosen for the positive part: ReLU's output, as the x86 grid's
        unsigned quantizers do, but inside int8 with zero point 0."""
        if self.per_channel or self.unsigned:
            raise ValueError("only a signed activation quantizer can be made tight (weights stay symmetric; an "
                             "unsigned one is tight already)")
        if not self.learns_bits and self.bits() > TIGHT_MAX_BITS:
            raise ValueError(f"a quantizer frozen at {self.bits()} bits stays signed (tight grids: <= {TIGHT_MAX_BITS})")
        bits = min(self.bits(), TIGHT_MAX_BITS)
        self.b_max = min(self.b_max, TIGHT_MAX_BITS)
        self.b_min = min(self.b_min, self.b_max)
        self.relu_read = read_through_relu
        self.negative_share.fill_(0.0 if read_through_relu else 0.5)  # signed until the data choose a split
        if self.learns_bits:
            self._set_range_for_bits(bits)
        else:
            self.frozen_bits.fill_(bits)

    @torch.no_grad()
    def _set_range_for_bits(self, bits: int) -> None:
        """Put the range at the top of `bits`' interval: q_max / d = (1 - r) 2^b - 1 (r: _share; narrow weights
        2^(b-1) - 1)."""
        if self.per_channel:
            self.log2_range.fill_(math.log2(2.0 ** (bits - 1)))
        else:
            self.log2_range.copy_(torch.log2(((1.0 - self._share()) * 2.0 ** bits - 1.0) * self.step()))

    @torch.no_grad()
    def project_(self) -> None:
        """Keep the learned bitwidth inside [b_min, b_max] (call after every optimiser step)."""
        if not self.learns_bits:
            return
        keep = 1.0 - (0.5 if self.per_channel else self._share())
        n_low, n_high = keep * 2.0 ** (self.b_min - 1) - 1.0 + 1e-2, keep * 2.0 ** self.b_max - 1.0
        if self.per_channel:
            self.log2_range.clamp_(math.log2(n_low + 1.0), math.log2(n_high + 1.0))
        else:
            step = self.step()
            self.log2_range.clamp_(float(torch.log2(n_low * step)), float(torch.log2(n_high * step)))

    @torch.no_grad()
    def start_bits_at(self, bits: int) -> None:
        """A learning bitwidth starts again from `bits` (inside [b_min, b_max]), at the top of its interval."""
        if not self.learns_bits or not self.b_min <= bits <= self.b_max:
            raise ValueError(f"start_bits_at({bits}): needs a learning bitwidth and bits in "
                             f"[{self.b_min}, {self.b_max}]")
        self._set_range_for_bits(bits)

    @torch.no_grad()
    def freeze_bits(self, bits: int | None = None) -> None:
        """Fix the integer bitwidth (the current one by default); the range parameter stops mattering."""
        bits = self.bits() if bits is None else int(bits)
        if not (2 <= bits <= 8 or (bits == 1 and self.takes_one_bit)):
            raise ValueError(f"freeze_bits({bits}): this quantizer's grids have 2-8 bits"
                             + ("" if self.takes_one_bit else " (one bit: weights, or activations read through ReLU)"))
        self.frozen_bits.fill_(bits)
        self.log2_range.requires_grad_(False)

    # -- the grid -----------------------------------------------------------------------------------------
    def export_params(self) -> QuantParams:
        bits = self.bits()
        qmin, qmax = self.integer_range(bits)
        return QuantParams(self.step().detach(), qmin, qmax, bits)

    def _shaped(self, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return scale.reshape((-1,) + (1,) * (x.dim() - 1)) if self.per_channel else scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        if self.bypass:
            return x
        bits = self.bits_ste()
        b = int(bits.detach().round())
        qmin, qmax = self.integer_range(b)
        scale = self._shaped(self.step(), x)
        per_step = x.numel() // max(1, scale.numel())
        grad_factor = 1.0 / math.sqrt(per_step * qmax)
        if self.binary(b):
            return BinaryFakeQuantFunction.apply(x, scale, grad_factor)
        return FakeQuantFunction.apply(x, scale, bits, qmin, qmax, grad_factor, self._share())

    def in_steps(self, x: torch.Tensor) -> torch.Tensor:
        """x / scale: x in steps of the grid, before rounding and clamping."""
        return x / self._shaped(self.export_params().scale, x)

    def to_grid(self, steps: torch.Tensor) -> torch.Tensor:
        """in_steps' values rounded and clamped to the grid, as float (exact small integers)."""
        p = self.export_params()
        if self.binary(p.bits):
            return torch.where(steps >= 0, 1.0, -1.0).to(steps.dtype)
        return torch.clamp(torch.round(steps), p.qmin, p.qmax)

    def quantize_integers(self, x: torch.Tensor) -> torch.Tensor:
        """round(x / scale) clamped to the grid, as float (exact small integers)."""
        return self.to_grid(self.in_steps(x))

    # -- initialisation from data -------------------------------------------------------------------------
    def _searches_mse(self, bits: int) -> bool:
        """Whether init_from_samples searches the step by squared error at `bits` (reading only the kept sample)."""
        return self.observe_init == "mse" and bits < 8

    def _observe(self, x: torch.Tensor) -> None:
        if self.observation is None:
            if self._searches_mse(self.bits()):
                # the squared-error search reads only the kept sample: no per-batch percentiles to compute (each
                # a sort of up to 2M values, most of the time of a stage change in a bit schedule)
                self.observation = Observation(0.0, self.unsigned or self.relu_read)
            else:
                self.observation = Observation(self.observe_percentile, self.unsigned or self.relu_read,
                                               sides=self.tight)
        self.observation.add(x)

    @torch.no_grad()
    def init_from_samples(self) -> None:
        """Set the step (and a tight grid's split) from what the observing pass saw, at the current bits.

        "percentile" (observe_init, the default): the grid reaches the largest observed magnitude, or with
        `observe_percentile` P > 0 the mean over batches of the P-th percentile of |x| (ONNX Runtime's Percentile
        calibration is the same idea; measured by scripts/diag_activation_init.py, see docs/QUANTIZATION.md).
        Not the squared-error clip used for weights at 8 bits: measured on usgra-seg (edge recipe, W8A8 before
        fine-tuning, 10 validation frames), MSE-chosen activation clips dropped the best-threshold Dice from 0.563
        (float) to ~0.52, the observed maximum kept 0.547. The error is dominated by the many small activations and
        clips the rare large ones. Below 8 bits the balance turns (qat/step_init.py): "mse" searches the step by
        squared error there (and keeps the percentile at 8 bits). A tight grid chooses its split z as well: the
        least squared error ("mse") or the smallest step reaching the percentile on both sides ("percentile").
        """
        seen, self.observation = self.observation, None
        if seen is None:
            raise RuntimeError("init_from_samples: nothing observed; run frames through the model while observing")
        bits = self.bits()  # before the step moves: a per-tensor range is in value units
        search = self._searches_mse(bits)
        if self.tight and self.relu_read:  # [0, 2^b - 1]: the readers see ReLU's output
            qmax = self.integer_range(bits)[1]
            step = (mse_activation_grid(seen.values().clamp_min(0), [(0, qmax)])[2] if search
                    else max(seen.reach_up, 1e-8) / qmax)
        elif self.tight:
            levels = 2 ** bits
            if search:
                splits = sorted({round(z) for z in torch.linspace(0, levels // 2, min(levels // 2 + 1, 17)).tolist()})
                qmin, _, step = mse_activation_grid(seen.values(), [(-z, levels - 1 - z) for z in splits])
                below = -qmin
            else:
                below, step = covering_grid(seen.reach_up, seen.reach_down, levels, levels // 2)
            self.negative_share.fill_(below / levels)
        elif search:
            step = mse_activation_grid(seen.values(), [self.integer_range(bits)])[2]
        else:
            step = seen.reach / self.integer_range(bits)[1]
        self.log2_step.fill_(math.log2(step))
        if self.learns_bits:
            self._set_range_for_bits(bits)

    @torch.no_grad()
    def init_from_tensor(self, w: torch.Tensor) -> None:
        """Set the step from a weight tensor (per channel when per_channel), MSE-best clip at the current bits (at one
        bit the closed form, mean |w|)."""
        rows = (w.detach().reshape(w.shape[0], -1) if self.per_channel else w.detach().reshape(1, -1)).float().cpu()
        bits = self.bits()
        best_step = binary_steps(rows) if self.binary(bits) else mse_steps(rows, *self.integer_range(bits))
        target = best_step if self.per_channel else best_step[0]
        self.log2_step.copy_(torch.log2(target).to(self.log2_step.device).reshape(self.log2_step.shape))
        if self.learns_bits:
            self._set_range_for_bits(bits)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        grid = ("binary" if self.binary(self.bits()) else "unsigned" if self.unsigned else "tight" if self.tight
                else "narrow signed" if self.narrow else "full signed")
        state = "learned" if self.learns_bits else "frozen"
        return f"{kind}, {grid}, bits={self.bits()} ({state}, range [{self.b_min}, {self.b_max}])"
