"""How much Dice can logits on a coarse map reach at all? The ground truth against itself, through a coarse grid.

Each mask (as the network sees it: resized to the input size) is averaged onto a G x G grid (the logit map of
output stride input/G), upsampled bilinearly back to the input size (as DeepLabV3 upsamples its logits) and
thresholded at 0.5; the mean per-frame Dice of that against the mask itself is a ceiling for a network whose
logits live on that grid. It motivated the skip decoder (training.model.SkipDecoder; docs/accuracy.md, (j)).

    PYTHONPATH=. python scripts/resolution_ceiling.py ../shared/data/usgra-seg --mask-label 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import discover, load_pairs  # noqa: E402


def coarse_grid_dice(mask: np.ndarray, grid: int) -> float:
    """Dice of `mask` (H, W in {0, 1}) against itself averaged onto grid x grid, upsampled and thresholded."""
    height, width = mask.shape
    coarse = cv2.resize(mask.astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA)
    back = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR) > 0.5
    total = back.sum() + mask.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(back, mask).sum() / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="dataset root (paired images/ + masks/, or Kaggle layout)")
    parser.add_argument("--mask-label", type=int, help="label value of the nerve (default: mask > 0)")
    parser.add_argument("--size", type=int, default=256, help="network input size (square; default 256)")
    parser.add_argument("--grids", type=int, nargs="+", default=[8, 16, 32, 64])
    args = parser.parse_args()
    _, masks = load_pairs(discover(args.data), (args.size, args.size), args.mask_label)
    print(f"{len(masks)} masks at {args.size}x{args.size}; nerve area median {np.median(masks.mean(axis=(1, 2))):.4f}")
    for grid in args.grids:
        scores = np.array([coarse_grid_dice(m, grid) for m in masks])
        print(f"grid {grid:3d}x{grid:<3d} (output stride {args.size // grid:2d}): mean Dice {scores.mean():.3f}, "
              f"10th percentile {np.percentile(scores, 10):.3f}")


if __name__ == "__main__":
    main()
