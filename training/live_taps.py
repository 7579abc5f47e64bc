"""Kernel taps that read pixels, and a convolution that computes only with those. Same output, less work.

DeepLabV3's ASPP convolves the backbone's last feature map with 3x3 kernels dilated 12, 24 and 36 (torchvision's
rates, chosen for 513x513 crops). A 256x256 frame at output stride 16 gives a 16x16 map: at dilation 24 and 36
every tap but the centre lands outside the map for every output pixel and multiplies the zero padding, so those
two convolutions are 1x1 convolutions computed as 3x3 ones, 3.9 M of the edge model's 11 M parameters doing
nothing. `conv2d_live` convolves with the live span of the kernel only (the padding shifted to match): the
products it skips were exactly zero, and their weights' gradients were exactly zero too, so training and export
are unchanged, and a training step of the edge model at 256x256 costs about 15 % less CPU (2.3 against 2.7
CPU-s, batch 16, one thread, measured here). The parameters keep their full shape: checkpoints are unchanged.
export/bundle/dead_taps.py cuts the same taps out of exported ONNX graphs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def live_taps(size: int, kernel: int, dilation: int, pad_begin: int, stride: int, out: int) -> tuple[int, ...]:
    """Kernel positions (along one axis) that read an input pixel for at least one of the `out` output positions.

    Tap k reads input index y * stride + k * dilation - pad_begin for output y; it is live when some y in
    [0, out) puts that in [0, size), i.e. when [max(0, pad_begin - k*d), min((out-1)*stride, pad_begin - k*d +
    size - 1)] holds a multiple of the stride."""
    live = []
    for k in range(kernel):
        low = max(0, pad_begin - k * dilation)
        high = min((out - 1) * stride, pad_begin - k * dilation + size - 1)
        if low <= high and -(-low // stride) * stride <= high:
            live.append(k)
    return tuple(live)


def live_span(size: int, kernel: int, dilation: int, pad_begin: int, pad_end: int,
              stride: int) -> tuple[int, int, int, int] | None:
    """(first tap, taps, new begin pad, new end pad) of the span of live taps along one axis, with the pads that
    keep every output where it was; None when there is no output, no live tap, or the span needs a negative pad.
    Dead taps between live ones stay in the span (a stride can skip them; slicing cannot)."""
    out = (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        return None
    live = live_taps(size, kernel, dilation, pad_begin, stride, out)
    if not live:
        return None
    first, count = live[0], live[-1] - live[0] + 1
    begin = pad_begin - first * dilation
    end = (out - 1) * stride + (count - 1) * dilation + 1 - size - begin  # the last output's last tap in range
    return None if begin < 0 or end < 0 else (first, count, begin, end)


@functools.lru_cache(maxsize=4096)
def live_window(size: tuple[int, int], kernel: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int],
                stride: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int]] | None:
    """((first row, rows), (first col, cols), (left, right, top, bottom) pads) of the kernel's live span for a
    symmetric-padding convolution over a `size` input; None when every tap is live (or none is)."""
    spans = [live_span(size[axis], kernel[axis], dilation[axis], padding[axis], padding[axis], stride[axis])
             for axis in range(2)]
    if None in spans or (spans[0][1] == kernel[0] and spans[1][1] == kernel[1]):
        return None
    (row, rows, top, bottom), (col, cols, left, right) = spans
    return (row, rows), (col, cols), (left, right, top, bottom)


def conv2d_live(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                groups: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups) computed with the kernel taps that read
    pixels of this input only (zero padding; int stride / padding / dilation pairs). Same result."""
    # under torch.compile the window is worked out once, while tracing: the cache would only make dynamo warn
    find = live_window.__wrapped__ if torch.compiler.is_compiling() else live_window
    window = find(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), tuple(dilation), tuple(padding), tuple(stride))
    if window is None:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    (row, rows), (col, cols), (left, right, top, bottom) = window
    weight = weight[:, :, row:row + rows, col:col + cols]
    dilation = tuple(1 if n == 1 else d for n, d in zip((rows, cols), dilation))
    if left == right and top == bottom:
        return F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)


class LiveTapConv2d(nn.Conv2d):
    """nn.Conv2d whose forward skips the kernel taps that only read zero padding at the input's size (same
    parameters, state dict and output; see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return conv2d_live(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def skip_dead_taps(model: nn.Module) -> nn.Module:
    """Every zero-padded Conv2d of `model` with a kernel wider than 1x1 computes through `conv2d_live` (in place:
    the modules change class, their parameters stay)."""
    for module in model.modules():
        if (type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)
                and max(module.kernel_size) > 1):
            module.__class__ = LiveTapConv2d
    return model


def whole_kernels(model: nn.Module) -> nn.Module:
    """The inverse of `skip_dead_taps` (in place): every LiveTapConv2d computes with its whole kernel again.
    For comparisons (scripts/bench_train.py --dead-taps) and graphs that must keep whole kernels."""
    for module in model.modules():
        if type(module) is LiveTapConv2d:
            module.__class__ = nn.Conv2d
    return model
