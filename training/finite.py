"""Non-finite numbers stop at the door: frames with NaN/Inf are refused, a NaN loss stops training, and no
checkpoint with a NaN or Inf weight is ever written (the last finite one stays)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from device_runtime.core.errors import InputError


class NonFiniteError(InputError):
    """A frame, a loss or a state that holds NaN or Inf; the message names where."""


def check_finite_array(array: np.ndarray, path: str | os.PathLike, what: str = "image") -> None:
    """Integer arrays always pass; a float array (a float TIFF) with any NaN/Inf pixel is refused."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise NonFiniteError(f"{path}: {what} holds {bad} NaN or Inf pixel(s); fix or remove the file")


def check_finite_loss(loss: torch.Tensor, epoch: int, batch: int) -> float:
    """The loss as a float (the one host sync per batch the loop already made), or stop training."""
    value = float(loss.item())
    if not math.isfinite(value):
        raise NonFiniteError(f"training stopped: the loss became {value} at epoch {epoch + 1}, batch {batch + 1}; "
                             "checkpoints/last.pt keeps the last finite epoch (lower --lr, or check the data)")
    return value


def non_finite_tensors(state: dict) -> list[str]:
    """Names of floating tensors in a state dict that hold NaN or Inf."""
    return [name for name, value in state.items()
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]


def check_finite_state(state: dict, path) -> None:
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteError(f"{path}: not written: the model holds NaN or Inf in {bad[0]}"
                             f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}; the previous file is kept")
