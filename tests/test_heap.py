"""export/bundle/heap.py: within `kept_freed_memory` a large tensor comes from the heap (kept when freed), not from a
mapping of its own that is unmapped on free and faulted in afresh next time; outside, glibc maps it again."""

import ctypes

import pytest
import torch

from export.bundle.heap import _glibc, kept_freed_memory

BLOCK = 64 << 20  # above glibc's largest mmap threshold: a mapping of its own by default

pytestmark = pytest.mark.skipif(_glibc() is None, reason="the C library is not glibc: kept_freed_memory changes nothing")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mapped_bytes_while_a_block_lives() -> int:
    """Bytes glibc holds in mappings of their own while a BLOCK-sized tensor is alive, less those before it."""
    mallinfo2 = _glibc().mallinfo2
    mallinfo2.restype = _Mallinfo2
    before = mallinfo2().hblkhd
    block = torch.empty(BLOCK, dtype=torch.uint8)  # torch's CPU allocator asks malloc, as the model's tensors do
    mapped = mallinfo2().hblkhd - before
    del block
    return mapped


def test_a_large_tensor_comes_from_the_heap_inside_and_from_its_own_mapping_outside():
    assert _mapped_bytes_while_a_block_lives() >= BLOCK
    with kept_freed_memory():
        assert _mapped_bytes_while_a_block_lives() == 0
    assert _mapped_bytes_while_a_block_lives() >= BLOCK  # restored: blocks this large are mapped again


def test_an_error_inside_propagates_and_restores():
    with pytest.raises(ZeroDivisionError), kept_freed_memory():
        1 / 0
    assert _mapped_bytes_while_a_block_lives() >= BLOCK
