"""Frame -> model input. The desktop trains on exactly what the device feeds the network.

Steps: colour -> grey (OpenCV's BGR weights), scale by the dtype's range to [0, 1], bilinear resize.
"""

from __future__ import annotations

import cv2
import numpy as np

from .errors import InputError


def to_gray(frame: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3|4) BGR(A) -> (H, W), same dtype."""
    if frame.ndim == 2:
        return frame
    if frame.ndim == 3 and frame.shape[-1] == 3:
        return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    if frame.ndim == 3 and frame.shape[-1] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2GRAY)
    if frame.ndim == 3 and frame.shape[-1] == 1:
        return frame[..., 0]
    raise InputError(f"expected a grey or BGR frame, got shape {frame.shape}")


def to_unit_float(gray: np.ndarray) -> np.ndarray:
    """Scale to float32 in [0, 1]: integers by their dtype's maximum (8 bit /255, 16 bit /65535)."""
    if gray.dtype == np.bool_:
        return gray.astype(np.float32)
    if np.issubdtype(gray.dtype, np.integer):
        # one pass (convert and scale together): the same float32 operations as astype-then-multiply
        return np.multiply(gray, np.float32(1.0 / np.iinfo(gray.dtype).max), dtype=np.float32)
    if np.issubdtype(gray.dtype, np.floating):
        return np.clip(gray, 0.0, 1.0).astype(np.float32, copy=False)
    raise InputError(f"unsupported pixel type {gray.dtype}; expected 8/16-bit integers or floats")


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (H, W) float image to size = (height, width)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) mask to size = (height, width): no new label values appear."""
    height, width = size
    if mask.shape[:2] == (height, width):
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def frame_to_image(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Any frame -> (height, width) float32 in [0, 1]: the network's view of it."""
    return resize_image(to_unit_float(to_gray(frame)), size)


def preprocess(frame: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Any frame -> float32 (1, 1, height, width) in [0, 1], written into `out` when one is given.

    Example:
        >>> preprocess(np.full((4, 6), 255, np.uint8), (2, 2)).tolist()
        [[[[1.0, 1.0], [1.0, 1.0]]]]
    """
    if out is None:
        return frame_to_image(frame, size)[None, None].copy()
    unit = to_unit_float(to_gray(frame))
    height, width = size
    target = out[0, 0]
    if target.dtype == np.float32 and target.flags.c_contiguous and unit.shape[:2] != (height, width):
        # the same bilinear resize as resize_image, written straight into the caller's buffer (OpenCV would
        # silently allocate a new array for a buffer of another type, hence the check)
        cv2.resize(unit, (width, height), dst=target, interpolation=cv2.INTER_LINEAR)
    else:
        target[...] = resize_image(unit, size)
    return out
