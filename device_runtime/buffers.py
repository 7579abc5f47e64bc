"""Arrays allocated once per frame shape and reused for every frame of that shape.

A stream of frames of one size allocates each buffer once; a folder that mixes a few sizes keeps one set per
size instead of reallocating at every change. The pool is bounded, so an endless variety of sizes (a glob over
unrelated images) cannot grow memory without limit: the least recently used shape is forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class BufferPool:
    def __init__(self, max_entries: int = 16):
        self._buffers: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._max = max_entries

    def get(self, name: str, shape: tuple, dtype, fill=None) -> np.ndarray:
        """The buffer `name` of this shape and dtype; new ones are uninitialised, or set to `fill` once."""
        key = (name, tuple(shape), np.dtype(dtype).str)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = np.empty(shape, dtype)
            if fill is not None:
                buffer[...] = fill
            self._buffers[key] = buffer
            if len(self._buffers) > self._max:
                self._buffers.popitem(last=False)
        else:
            self._buffers.move_to_end(key)
        return buffer
