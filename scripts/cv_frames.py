"""Where does a cross-validated recipe lose its Dice? Per-frame test Dice of a `nerveseg cv` run, as deployed.

Each finished fold's bundle (fold.json is written after the export; model.fp32.onnx with the manifest's T* and
morphology) scores the fold's held-out frames through ONNX Runtime exactly as `nerveseg cv` does
(export.bundle.parity.onnx_probabilities, training.evaluation.evaluate.evaluate_arrays), so each fold's mean equals its Dice in cv.json.
The frames are then grouped: by Dice band (and the share of all the Dice lost that falls there), by the size of the
nerve (terciles of the mask's area at the input size) and by how many separate pieces the mask has; the misses
(Dice < 0.05) are listed with the network's peak probability, which tells a silent miss (nothing above T*) from an
outline put on another structure. It prints a Markdown table and writes one record per frame to FRAMES (default
CV/frames.json). No training; a few seconds a fold on the CPU.

    PYTHONPATH=. python scripts/cv_frames.py runs/cv5/small
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.core.errors import exit_code_of  # noqa: E402
from device_runtime.core.fileio import write_json  # noqa: E402
from device_runtime.core.manifest import load_manifest  # noqa: E402
from export.bundle.parity import onnx_probabilities  # noqa: E402
from export.bundle.writer import FP32_NAME  # noqa: E402
from export.workflows.cv_quant import finished_folds  # noqa: E402
from training.config import load_run_config  # noqa: E402
from training.evaluation.evaluate import evaluate_arrays  # noqa: E402
from training.stages import split_arrays  # noqa: E402

MISS = 0.05
BANDS = ((0.0, MISS), (MISS, 0.3), (0.3, 0.6), (0.6, 0.8), (0.8, 1.0 + 1e-9))


def fold_frames(fold_dir: Path) -> list[dict]:
    """One record per held-out frame of the fold: name, Dice as deployed, mask area and pieces, peak probability."""
    cfg = load_run_config(fold_dir)
    manifest = load_manifest(fold_dir / "bundle")
    images, masks, names = split_arrays(fold_dir, "test", cfg)
    prob = onnx_probabilities(fold_dir / "bundle" / FP32_NAME, images)
    _, per_image, preds = evaluate_arrays(prob, masks, manifest.threshold, manifest.morphology)
    return [{"fold": fold_dir.name, "name": name, "dice": float(d), "mask_area": int(mask.sum()),
             "mask_pieces": cv2.connectedComponents(mask.astype(np.uint8))[0] - 1,
             "predicted_area": int(pred.sum()), "peak_probability": float(p.max())}
            for name, d, mask, pred, p in zip(names, per_image, masks, preds, prob)]


def summary_table(frames: list[dict]) -> str:
    dice = np.array([f["dice"] for f in frames])
    lost = (1.0 - dice).sum()
    lines = [f"{len(frames)} frames, mean Dice {dice.mean():.4f}", "",
             "| group | frames | mean Dice | share of the Dice lost |", "|---|---|---|---|"]

    def row(label: str, chosen: np.ndarray) -> None:
        if chosen.any():
            share = (1.0 - dice[chosen]).sum() / lost if lost > 0 else 0.0
            lines.append(f"| {label} | {int(chosen.sum())} | {dice[chosen].mean():.4f} | {share:.0%} |")

    for low, high in BANDS:
        row(f"Dice {low:.2f}-{min(high, 1.0):.2f}", (dice >= low) & (dice < high))
    area = np.array([f["mask_area"] for f in frames])
    cuts = np.quantile(area, [1 / 3, 2 / 3])
    for label, chosen in (("nerve area, smallest third", area < cuts[0]),
                          ("nerve area, middle third", (area >= cuts[0]) & (area < cuts[1])),
                          ("nerve area, largest third", area >= cuts[1])):
        row(f"{label} (cuts {int(cuts[0])} / {int(cuts[1])} px)", chosen)
    pieces = np.array([f["mask_pieces"] for f in frames])
    row("mask in one piece", pieces == 1)
    row("mask in two or more pieces", pieces >= 2)
    misses = [f for f in frames if f["dice"] < MISS]
    if misses:
        lines += ["", f"misses (Dice < {MISS}): peak probability " +
                  ", ".join(f"{f['fold']}/{f['name']} {f['peak_probability']:.2f}" for f in misses)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path, help="a folder made by `nerveseg cv`")
    parser.add_argument("--frames", type=Path, help="where the per-frame records go (default CV/frames.json)")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: run(args), "cv_frames")


def run(args) -> None:
    frames = [f for fold in finished_folds(args.cv_dir) for f in fold_frames(fold)]
    write_json(args.frames or args.cv_dir / "frames.json", frames)
    print(summary_table(frames))


if __name__ == "__main__":
    sys.exit(main())
