"""Batched inference of a model over preprocessed frames: the one place desktop code turns images into
probabilities (validation, tuning, evaluation and export parity all use it)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from device_runtime.core.errors import InputError
from device_runtime.core.postprocess import sigmoid


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but no CUDA GPU is available; use --device cpu")
    return device


@contextlib.contextmanager
def strict_float32():
    """IEEE float32 in CUDA's convolutions and matrix products while inside. PyTorch lets cuDNN's convolutions use
    TF32 by default (10-bit mantissa): an export-parity reference computed so on the GPU was 2.8e-3 away from ONNX
    Runtime's float32 in probability (measured on an H100), where the limit is 1e-4. Restores the flags after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA (bf16 where supported: no loss scaling needed), nothing elsewhere."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 32,
                   amp: bool = False) -> np.ndarray:
    """Eval-mode logits, as deployed; without `amp`, in strict float32 on CUDA too (the export's parity reference).

    Shape:
        images: (N, H, W) float32 in [0, 1] -> (N, H, W) float32 logits.
    """
    model.eval()
    out = np.empty(images.shape, np.float32)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))[:, None].to(device)
        with strict_float32() if device.type == "cuda" and not amp else autocast(device, amp):
            logits = model(batch)["out"]
        out[start:start + len(batch)] = logits[:, 0].float().cpu().numpy()
    return out


def predict_probabilities(model, images, device, batch_size: int = 32, amp: bool = False) -> np.ndarray:
    """(N, H, W) float32 probabilities; see predict_logits."""
    return sigmoid(predict_logits(model, images, device, batch_size, amp))
