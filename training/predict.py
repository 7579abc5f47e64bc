"""Batched inference of a model over preprocessed frames: the one place desktop code turns images into
probabilities (validation, tuning, evaluation and export parity all use it)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from device_runtime.errors import InputError
from device_runtime.postprocess import sigmoid


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but no CUDA GPU is available; use --device cpu")
    return device


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA (bf16 where supported: no loss scaling needed), nothing elsewhere."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 32,
                   amp: bool = False) -> np.ndarray:
    """Eval-mode logits, as deployed.

    Shape:
        images: (N, H, W) float32 in [0, 1] -> (N, H, W) float32 logits.
    """
    model.eval()
    out = np.empty(images.shape, np.float32)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))[:, None].to(device)
        with autocast(device, amp):
            logits = model(batch)["out"]
        out[start:start + len(batch)] = logits[:, 0].float().cpu().numpy()
    return out


def predict_probabilities(model, images, device, batch_size: int = 32, amp: bool = False) -> np.ndarray:
    """(N, H, W) float32 probabilities; see predict_logits."""
    return sigmoid(predict_logits(model, images, device, batch_size, amp))
