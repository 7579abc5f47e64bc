"""Would horizontal-flip test-time augmentation help? Measured post hoc on the fold models of a `nerveseg cv` run.

For each fold: the best checkpoint's probabilities on the fold's validation and test frames, once plain and once
averaged with the horizontal mirror's (the frame flipped, the output flipped back); T* and morphology tuned on the
validation frames for each (as `nerveseg tune`); the test frames scored with each. PyTorch on the CPU, one thread,
no retraining. The plain column reproduces the fold's own PyTorch test Dice (test_metrics.json).

Flipping left-right is the only mirror an ultrasound frame allows (the skin is at the top; the recipes train with
hflip but not vflip). Deploying it would run the network twice per frame, so it is worth building only if it gains
clearly: docs/accuracy.md, ablation (h), gives the decision and its figures.

    PYTHONPATH=. python scripts/cv_flip_tta.py runs/cv5/small-phantom
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.errors import InputError, exit_code_of  # noqa: E402
from device_runtime.fileio import write_json  # noqa: E402
from device_runtime.postprocess import Morphology  # noqa: E402
from export.cv_quant import finished_folds  # noqa: E402
from training.checkpoint import load_model  # noqa: E402
from training.evaluate import evaluate_arrays  # noqa: E402
from training.predict import predict_probabilities  # noqa: E402
from training.stages import split_arrays  # noqa: E402
from training.tune import tune  # noqa: E402


# Student t 97.5 % quantiles by degrees of freedom (folds - 1): few folds, so not the normal 1.96 (no scipy here)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_interval(values: np.ndarray) -> tuple[float, float]:
    """95 % interval of the mean of a few per-fold values (2 to 10 folds)."""
    half = T_975[len(values) - 1] * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def tuned_test_score(val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], weights) -> dict:
    """T* and morphology tuned on (probabilities, masks) of the validation frames, as `nerveseg tune`; then the
    test frames scored with them: {"threshold", "dice"}."""
    tuned = tune(val[0], val[1], weights)
    metrics, _, _ = evaluate_arrays(test[0], test[1], tuned["threshold"], Morphology.from_dict(tuned["morphology"]))
    return {"threshold": tuned["threshold"], "dice": metrics["dice"]}


def plain_and_flipped(model, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) probabilities, and their average with those of the mirrored frames mirrored back."""
    cpu = torch.device("cpu")
    plain = predict_probabilities(model, images, cpu, batch_size)
    mirrored = predict_probabilities(model, np.ascontiguousarray(images[..., ::-1]), cpu, batch_size)[..., ::-1]
    return plain, 0.5 * (plain + mirrored)


def score_fold(fold_dir: Path) -> dict:
    model, _, cfg = load_model(fold_dir / "checkpoints" / "best.pt")
    arrays = {}
    for split in ("val", "test"):
        images, masks, _ = split_arrays(fold_dir, split, cfg)
        arrays[split] = (*plain_and_flipped(model, images, cfg.val_batch_size), masks)
    result = {"fold": fold_dir.name}
    for column, kind in (("plain", 0), ("flip_tta", 1)):
        result[column] = tuned_test_score((arrays["val"][kind], arrays["val"][2]),
                                          (arrays["test"][kind], arrays["test"][2]), cfg.objective_weights)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path, help="a finished `nerveseg cv` run folder")
    parser.add_argument("--out", type=Path, help="JSON of the per-fold figures (default CV_DIR/flip_tta.json)")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: run(args), "cv_flip_tta")


def run(args) -> None:
    folds = finished_folds(args.cv_dir)
    if not 2 <= len(folds) <= 10:
        raise InputError(f"{args.cv_dir}: expected 2 to 10 finished folds of a `nerveseg cv` run, found {len(folds)}")
    torch.set_num_threads(1)
    rows = []
    for fold in folds:
        rows.append(score_fold(fold))
        r = rows[-1]
        print(f"{r['fold']}: plain Dice {r['plain']['dice']:.4f} (T* {r['plain']['threshold']:.2f})  "
              f"flip TTA {r['flip_tta']['dice']:.4f} (T* {r['flip_tta']['threshold']:.2f})", flush=True)
    gains = np.array([r["flip_tta"]["dice"] - r["plain"]["dice"] for r in rows])
    low, high = t_interval(gains)
    summary = {"folds": rows, "mean_plain": float(np.mean([r["plain"]["dice"] for r in rows])),
               "mean_flip_tta": float(np.mean([r["flip_tta"]["dice"] for r in rows])),
               "mean_gain": float(gains.mean()), "gain_t95": [low, high]}
    print(f"mean Dice plain {summary['mean_plain']:.4f}, flip TTA {summary['mean_flip_tta']:.4f}: "
          f"gain {gains.mean():+.4f}, 95 % t interval over folds [{low:+.4f}, {high:+.4f}]")
    write_json(args.out or args.cv_dir / "flip_tta.json", summary)


if __name__ == "__main__":
    sys.exit(main())
