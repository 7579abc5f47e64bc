"""Would averaging several recipes' models help? Measured post hoc on `nerveseg cv` runs over the same folds.

For each fold: the probabilities of every run's best checkpoint on the fold's validation and test frames, and their
mean; T* and morphology tuned on the validation frames for each (as `nerveseg tune`); the test frames scored. The
first run is the reference; each row's gain over it is paired over the folds (t interval). PyTorch on the CPU, one
thread, no retraining. A diagnostic, not a recipe: the device would run every network on every frame, and a
combination picked after seeing these folds is fitted to them (docs/accuracy.md, the ensemble diagnostic).

    PYTHONPATH=. python scripts/cv_ensemble.py runs/cv5/small-phantom runs/cv5/small-skip runs/cv5/small-b8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cv_flip_tta import t_interval, tuned_test_score  # noqa: E402  (scripts/ is on sys.path when run as a script)
from device_runtime.errors import InputError, exit_code_of  # noqa: E402
from device_runtime.fileio import write_json  # noqa: E402
from export.cv_quant import finished_folds  # noqa: E402
from training.checkpoint import load_model  # noqa: E402
from training.predict import predict_probabilities  # noqa: E402
from training.stages import split_arrays  # noqa: E402


def score_fold(fold_dirs: list[Path]) -> dict:
    """Per run and for the mean of all runs: the fold's test Dice. The folds must hold the same frames."""
    probabilities = {"val": [], "test": []}
    masks, weights = {}, None
    for fold_dir in fold_dirs:
        model, _, cfg = load_model(fold_dir / "checkpoints" / "best.pt")
        weights = cfg.objective_weights
        for split in ("val", "test"):
            images, split_masks, _ = split_arrays(fold_dir, split, cfg)
            if split in masks and not np.array_equal(masks[split], split_masks):
                raise SystemExit(f"{fold_dir}: its {split} frames differ from {fold_dirs[0]}'s; not the same folds")
            masks[split] = split_masks
            probabilities[split].append(predict_probabilities(model, images, torch.device("cpu"), cfg.val_batch_size))
    scores = [tuned_test_score((v, masks["val"]), (t, masks["test"]), weights)["dice"]
              for v, t in zip(probabilities["val"], probabilities["test"])]
    mean = tuned_test_score((np.mean(probabilities["val"], axis=0), masks["val"]),
                            (np.mean(probabilities["test"], axis=0), masks["test"]), weights)["dice"]
    return {"fold": fold_dirs[0].name, "runs": scores, "ensemble": mean}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dirs", type=Path, nargs="+", help="finished `nerveseg cv` runs of the same folds")
    parser.add_argument("--out", type=Path, help="JSON of the per-fold figures (default FIRST_CV_DIR/ensemble.json)")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: run(args), "cv_ensemble")


def run(args) -> None:
    if len(args.cv_dirs) < 2:
        raise InputError("give at least two `nerveseg cv` runs")
    folds = finished_folds(args.cv_dirs[0])
    missing = [str(d / f.name) for d in args.cv_dirs for f in folds if not (d / f.name / "fold.json").is_file()]
    if not 2 <= len(folds) <= 10 or missing:
        raise InputError(f"expected 2 to 10 finished folds in every run; missing: {missing[:3]}")
    torch.set_num_threads(1)
    rows = []
    for fold in folds:
        rows.append(score_fold([d / fold.name for d in args.cv_dirs]))
        r = rows[-1]
        print(f"{r['fold']}: " + "  ".join(f"{d.name} {s:.4f}" for d, s in zip(args.cv_dirs, r["runs"]))
              + f"  ensemble {r['ensemble']:.4f}", flush=True)
    reference = np.array([r["runs"][0] for r in rows])
    columns = {d.name: np.array([r["runs"][i] for r in rows]) for i, d in enumerate(args.cv_dirs)}
    columns["ensemble"] = np.array([r["ensemble"] for r in rows])
    summary = {"runs": [str(d) for d in args.cv_dirs], "folds": rows, "mean": {}}
    for name, values in columns.items():
        gains = values - reference
        low, high = t_interval(gains) if name != args.cv_dirs[0].name else (0.0, 0.0)
        summary["mean"][name] = {"dice": float(values.mean()), "gain": float(gains.mean()), "gain_t95": [low, high]}
        print(f"{name:>24}: mean Dice {values.mean():.4f}, gain over {args.cv_dirs[0].name} {gains.mean():+.4f} "
              f"[{low:+.4f}, {high:+.4f}]")
    write_json(args.out or args.cv_dirs[0] / "ensemble.json", summary)


if __name__ == "__main__":
    sys.exit(main())
