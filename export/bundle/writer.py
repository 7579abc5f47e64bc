"""`nerveseg export`: a tuned checkpoint -> bundle/ with model.fp32.onnx and manifest.json.

The bundle is written in a temporary folder and swapped into place only when the graph has been checked
against PyTorch, so a failed export never leaves a half-written bundle or destroys the previous one.
"""

from __future__ import annotations

import json
from pathlib import Path

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import atomic_dir, write_json
from device_runtime.core.manifest import Manifest, describe_file, write_manifest
from device_runtime.core.postprocess import Morphology
from training.checkpoint import load_model
from training.data.dataset import load_split
from training.evaluation.evaluate import evaluate_arrays
from training.evaluation.predict import predict_probabilities, resolve_device
from training.model import as_deployed
from training.stages import flip_tta_of, split_arrays

from .onnx_export import export_onnx, tensorrt_problems
from .out_guard import check_bundle_out
from .parity import compare, onnx_probabilities, parity_failures
from .portable import dataset_description as portable_dataset, portable_config

FP32_NAME = "model.fp32.onnx"


class ParityError(InputError):
    """The exported graph does not reproduce the PyTorch model within tolerance; no bundle is written."""


def run_dir_of(checkpoint_path: Path) -> Path:
    """runs/NAME/checkpoints/best.pt -> runs/NAME."""
    return checkpoint_path.resolve().parent.parent


def dataset_description(run_dir: Path, cfg) -> dict:
    """Frame counts and a content hash of the split; no path (bundles travel, see export/portable.py)."""
    splits = load_split(run_dir / "split.json")
    return portable_dataset(run_dir, cfg, {name: len(samples) for name, samples in splits.items()})


def protected_paths(run_dir: Path, checkpoint_path: Path) -> dict:
    """What `--out` must never be or hold: the run, the checkpoint, the dataset (from split.json)."""
    protected = {"run folder": run_dir, "checkpoint": checkpoint_path}
    try:
        protected["dataset"] = Path(json.loads((run_dir / "split.json").read_text(encoding="utf-8"))["root"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no split yet: split_arrays below reports that with its own message
    return protected


def test_metrics_of(run_dir: Path) -> dict:
    """The run's PyTorch test metrics (`nerveseg evaluate`) without the per-frame list, or {} before evaluation."""
    path = run_dir / "test_metrics.json"
    if not path.is_file():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "per_image"}


def export_bundle(checkpoint_path: str | Path, out_dir: str | Path | None = None, device: str = "auto",
                  replace: bool = False) -> tuple[Path, Manifest]:
    """Export a tuned checkpoint; returns the bundle folder and its manifest.

    `out_dir` must be a new or empty folder, or (with `replace`) an existing bundle, see export/out_guard.py.

    Parity is checked on the validation frames (ONNX Runtime against PyTorch, eval mode) and the test split
    is scored through the ONNX graph, as the device will run it. A checkpoint tuned with flip averaging
    (`nerveseg tune --flip-tta`) exports a graph that averages each frame with its mirror (FlipAveraged).
    """
    checkpoint_path = Path(checkpoint_path)
    model, checkpoint, cfg = load_model(checkpoint_path)
    if checkpoint.get("threshold") is None:
        raise InputError(f"{checkpoint_path}: has no tuned threshold; run 'nerveseg tune' on its run first")
    run_dir = run_dir_of(checkpoint_path)
    out_dir = Path(out_dir) if out_dir else run_dir / "bundle"
    if check_bundle_out(out_dir, protected_paths(run_dir, checkpoint_path), replace):
        print(f"replacing the bundle {out_dir} (atomically, once the new one is complete)", flush=True)
    threshold, morphology = float(checkpoint["threshold"]), Morphology.from_dict(checkpoint["morphology"])
    torch_device = resolve_device(device)
    cfg = cfg.replace(flip_tta=flip_tta_of(checkpoint))  # what T* was tuned for (and the manifest records)
    model = as_deployed(model, cfg.flip_tta)

    with atomic_dir(out_dir, replace=True) as staging:
        onnx_path = export_onnx(model, staging / FP32_NAME, cfg.input_size)
        val_images, _, _ = split_arrays(run_dir, "val", cfg)
        torch_prob = predict_probabilities(model.to(torch_device), val_images, torch_device, cfg.val_batch_size, amp=False)
        parity = compare(torch_prob, onnx_probabilities(onnx_path, val_images), threshold, morphology)
        failures = parity_failures(parity, "fp32")
        if failures:
            raise ParityError(f"{onnx_path.name}: ONNX Runtime disagrees with PyTorch on {parity['frames']} "
                              f"validation frames: {'; '.join(failures)}")
        test_images, test_masks, _ = split_arrays(run_dir, "test", cfg)
        test_onnx, _, _ = evaluate_arrays(onnx_probabilities(onnx_path, test_images), test_masks, threshold, morphology)
        problems = tensorrt_problems(onnx_path)
        manifest = Manifest(
            architecture=cfg.arch,
            input_size=tuple(cfg.input_size),
            threshold=threshold,
            morphology=morphology,
            files=[describe_file(staging, FP32_NAME, "fp32", "onnx")],
            quantization={"scheme": "none", "mean_bits": 32},
            metrics={"validation": checkpoint.get("validation", {}), "test": test_metrics_of(run_dir),
                     "test_onnx": test_onnx,
                     "parity": {"fp32": parity}, "tensorrt_problems": problems},
            training_config=portable_config(cfg.to_dict()),
            dataset=dataset_description(run_dir, cfg),
        )
        write_manifest(staging, manifest)
    write_json(run_dir / "test_metrics_onnx.json", test_onnx)
    return out_dir, manifest
