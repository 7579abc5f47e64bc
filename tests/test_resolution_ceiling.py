"""scripts/resolution_ceiling.py: the Dice a mask keeps through a coarse grid (the skip decoder's motivation)."""

import numpy as np
import pytest

from conftest import load_script

resolution_ceiling = load_script("resolution_ceiling")


def _disc(size: int, radius: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return ((y - size / 2) ** 2 + (x - size / 2) ** 2 <= radius ** 2).astype(np.uint8)


def test_a_blob_survives_a_fine_grid_and_fades_on_a_coarse_one():
    disc = _disc(256, 20)  # about 40 pixels across, like a usgra-seg nerve at 256x256
    fine, medium, coarse = (resolution_ceiling.coarse_grid_dice(disc, g) for g in (64, 16, 4))
    assert fine > 0.97 and fine > medium > coarse
    assert coarse == pytest.approx(0.0)  # a 64-pixel cell averages the disc far below 0.5
    assert resolution_ceiling.coarse_grid_dice(np.zeros((32, 32), np.uint8), 8) == 1.0  # nothing to find, none found
