"""How a colour mask becomes labels: by an explicit rule, never by luminance.

Rule: a mask stored with colour channels (RGB/BGR, with or without alpha) is read as labels only when its
colour channels are equal at every pixel (a grey mask saved as RGB); the value of any channel is the label.
Any other colour mask is refused, naming the file: a weighted grey of (0, 255, 0) and of (255, 0, 0) differ, so a
nerve painted in colour would silently become another label, or background. Palette PNGs (LabelMe, usgra-seg)
are not colour masks: their palette indices are the labels (`training.data.dataset.read_mask` reads them with Pillow).
"""

from __future__ import annotations

import os

import numpy as np

from device_runtime.core.errors import InputError


def labels_of(array: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """(H, W) labels of a decoded mask (grey, or colour with equal channels); InputError for real colour."""
    if array.ndim == 2:
        return array
    colour = array[..., :3]
    differs = (colour[..., 0] != colour[..., 1]) | (colour[..., 0] != colour[..., 2])
    if differs.any():
        y, x = (int(v[0]) for v in np.nonzero(differs))
        shown = tuple(int(c) for c in colour[y, x][::-1])  # decoded as BGR: shown as RGB
        raise InputError(f"{path}: colour mask (pixel ({x}, {y}) is RGB {shown}); masks must hold labels: save it "
                         "as grey levels or as a palette PNG whose indices are the labels")
    return colour[..., 0]
