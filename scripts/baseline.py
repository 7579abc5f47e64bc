"""Train and score the plain baseline of scripts/baseline.toml, as deployed.

    python scripts/baseline.py --data ../shared/data/usgra-seg --mask-label 1 --run-dir runs/baseline-real

Same data split as a project run with the same --seed. The last epoch's weights (no best-epoch pick), eval
mode, exported to ONNX and run by ONNX Runtime on the test split at threshold 0.5 with no morphology.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from device_runtime.core.errors import exit_code_of
from device_runtime.core.fileio import write_json
from device_runtime.core.postprocess import Morphology
from export.bundle.onnx_export import export_onnx
from export.bundle.parity import onnx_probabilities
from training import train
from training.checkpoint import load_model
from training.config import build_config
from training.evaluation.evaluate import evaluate_arrays
from training.stages import split_arrays

RECIPE = str(Path(__file__).with_name("baseline.toml"))


def run(args) -> None:
    cfg = build_config(RECIPE, data=args.data, mask_label=args.mask_label, run_dir=args.run_dir, seed=args.seed,
                       epochs=args.epochs, device=args.device, recalibrate_bn=args.recalibrate_bn)
    run_dir = train.main(cfg)
    model, _, cfg = load_model(run_dir / "checkpoints" / "last.pt")
    onnx_path = export_onnx(model, run_dir / "baseline.fp32.onnx", cfg.input_size)
    images, masks, _ = split_arrays(run_dir, "test", cfg)
    result, _, _ = evaluate_arrays(onnx_probabilities(onnx_path, images), masks, 0.5, Morphology())
    write_json(run_dir / "baseline_test_onnx.json", result)
    print(json.dumps({k: result[k] for k in ("dice", "iou", "pixel_accuracy", "pooled_dice", "images")}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--mask-label", type=int)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="ablation: the baseline plus re-estimated BatchNorm statistics (training/batchnorm.py)")
    sys.exit(exit_code_of(lambda: run(parser.parse_args()), "baseline"))
