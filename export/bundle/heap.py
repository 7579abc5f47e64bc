"""Keep freed memory in the process while a bundle is checked, instead of handing it to the kernel per tensor.

glibc's malloc serves a block above its mmap threshold (128 KB at first, at most 32 MB) with a fresh mapping and
unmaps it on free, so the next tensor of that size faults in and zeroes every page again. Checking an INT8 bundle
evaluates the fake-quant model many times over (float64, float32, the tie-nudged draws; export/bundle/int8_parity.py),
and each quantizer's rounding and clamping make and free tensors of up to 100 MB (a batch of 8 frames at 320x320 in
float64). Measured on 2026-12-06 (`nerveseg export` of a usgra-seg W4A4 run, 2-core x86, the same files written):
393 s of kernel time for 217 s of computing, 241 million minor page faults; with mmap off and up to 1 GiB of free
heap kept, 65 s for 220 s, 19 million, 2.1x less CPU; peak resident memory 6.0 GB instead of 4.1 GB.

So `kept_freed_memory()` turns mmap off for the check only (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD 1 GiB) and, on
leaving, gives the heap's free memory back (malloc_trim) and sets the thresholds glibc's own adaptation settles at for
tensors this size (mmap above 32 MB, trim above 64 MB): setting any of them by hand stops that adaptation for good,
so restoring "the default" is not possible. ONNX Runtime's CPU kernels draw from their own arena either way. Where the
C library is not glibc (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

KEPT_FREE_BYTES = 1 << 30
MMAP_ABOVE_BYTES = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where glibc's adaptive threshold stops
TRIM_ABOVE_BYTES = 64 << 20  # the adaptive trim threshold: twice the mmap threshold
MMAP_MAX_DEFAULT = 65536


def _glibc():
    """The process's glibc, or None when the C library is another one (or cannot be loaded)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # gnu_get_libc_version exists in glibc only (musl has mallopt, as a stub)
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    return libc


@contextmanager
def kept_freed_memory():
    """Within the block, freed memory stays in the heap for the next tensor (see the module's docstring)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    try:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)
        yield
    finally:  # restored whether or not both settings took
        libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE_BYTES)
        libc.malloc_trim(0)
