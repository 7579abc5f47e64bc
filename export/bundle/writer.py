"""`nerveseg export`: a tuned checkpoint -> bundle/ with model.fp32.onnx and manifest.json; and `write_bundle`,
the one path every bundle is written by (the INT8 export adds its files through it, export/bundle/int8.py).

The bundle is written in a temporary folder and swapped into place only when the graph has been checked
against PyTorch, so a failed export never leaves a half-written bundle or destroys the previous one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from device_runtime.core.errors import InputError, RefusedError
from device_runtime.core.fileio import atomic_dir, write_json
from device_runtime.core.manifest import Manifest, ModelFile, describe_file, write_manifest
from device_runtime.core.postprocess import Morphology
from training.checkpoint import load_model
from training.data.dataset import load_split
from training.evaluation.evaluate import evaluate_arrays
from training.model import as_deployed
from training.evaluation.predict import predict_probabilities, resolve_device
from training.stages import flip_tta_of, split_arrays

from .heap import kept_freed_memory
from .onnx_export import export_onnx, tensorrt_problems
from .out_guard import check_bundle_out
from .parity import compare, onnx_probabilities, parity_failures
from .portable import dataset_description as portable_dataset, portable_config

FP32_NAME = "model.fp32.onnx"


class ParityError(RefusedError):
    """The exported graph does not reproduce the PyTorch model within tolerance; no bundle is written (the
    command lines exit 3 for it: the run was fine, its export was refused)."""


def run_dir_of(checkpoint_path: Path) -> Path:
    """runs/NAME/checkpoints/best.pt -> runs/NAME."""
    return checkpoint_path.resolve().parent.parent


def dataset_description(run_dir: Path, cfg) -> dict:
    """Frame counts and a content hash of the split; no path (bundles travel, see export/bundle/portable.py)."""
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


@dataclass
class BundleSource:
    """What a bundle deploys: the float model of its FP32 graph and the decision rule, from one run."""

    run_dir: Path
    cfg: object  # the run's TrainConfig (input size, split, the manifest's training config)
    model: object  # the float model as deployed (training.model.as_deployed): model.fp32.onnx
    threshold: float
    morphology: Morphology
    protected: dict  # what --out must never be or hold (out_guard)
    metrics: dict = field(default_factory=dict)  # the manifest's "validation" and "test" of the deployed model


@dataclass
class BundleFiles:
    """What an exporter adds to the FP32 graph: its files (already in the staging folder), the manifest's
    `quantization`, its metrics, and which graph scores the test split as the device would run it."""

    files: list[ModelFile] = field(default_factory=list)
    quantization: dict = field(default_factory=lambda: {"scheme": "none", "mean_bits": 32})
    metrics: dict = field(default_factory=dict)  # merged into the manifest's metrics ("parity" entries merged)
    test_graph: str = FP32_NAME
    test_key: str | None = None  # metrics["test_onnx"][test_key]; None: test_onnx is that graph's figures
    tensorrt_files: tuple[str, ...] = ()  # files besides model.fp32.onnx that TensorRT is meant to parse


def write_bundle(source: BundleSource, out_dir: Path, device: str = "auto", replace: bool = False,
                 add: Callable[[Path], BundleFiles] | None = None) -> tuple[Path, Manifest]:
    """Write a bundle to `out_dir` atomically: model.fp32.onnx checked against PyTorch on the validation frames,
    the files `add(staging)` writes beside it, the test split scored through the graph it names, TensorRT's
    parse check, manifest.json. Any exception leaves `out_dir` as it was.

    `out_dir` must be a new or empty folder, or (with `replace`) an existing bundle, see export/bundle/out_guard.py."""
    if check_bundle_out(out_dir, source.protected, replace):
        print(f"replacing the bundle {out_dir} (atomically, once the new one is complete)", flush=True)
    cfg = source.cfg
    # the checks evaluate the model many times over: its freed tensors stay in the heap (export/bundle/heap.py)
    with kept_freed_memory(), atomic_dir(out_dir, replace=True) as staging:
        fp32_path = export_onnx(source.model, staging / FP32_NAME, cfg.input_size)
        val_images, _, _ = split_arrays(source.run_dir, "val", cfg)
        torch_device = resolve_device(device)
        torch_prob = predict_probabilities(source.model.to(torch_device), val_images, torch_device,
                                           cfg.val_batch_size, amp=False)
        parity = compare(torch_prob, onnx_probabilities(fp32_path, val_images), source.threshold, source.morphology)
        failures = parity_failures(parity, "fp32")
        if failures:
            raise ParityError(f"{fp32_path.name}: ONNX Runtime disagrees with PyTorch on {parity['frames']} "
                              f"validation frames: {'; '.join(failures)}")
        added = add(staging) if add else BundleFiles()
        test_images, test_masks, _ = split_arrays(source.run_dir, "test", cfg)
        test_onnx, _, _ = evaluate_arrays(onnx_probabilities(staging / added.test_graph, test_images), test_masks,
                                          source.threshold, source.morphology)
        problems = [f"{name}: {problem}" for name in (*added.tensorrt_files, FP32_NAME)
                    for problem in tensorrt_problems(staging / name)]
        metrics = {**source.metrics, **added.metrics,
                   "test_onnx": test_onnx if added.test_key is None else {added.test_key: test_onnx},
                   "parity": {"fp32": parity, **added.metrics.get("parity", {})}, "tensorrt_problems": problems}
        manifest = Manifest(
            architecture=cfg.arch,
            input_size=tuple(cfg.input_size),
            threshold=source.threshold,
            morphology=source.morphology,
            files=[describe_file(staging, FP32_NAME, "fp32", "onnx"), *added.files],
            quantization=added.quantization,
            metrics=metrics,
            training_config=portable_config(cfg.to_dict()),
            dataset=dataset_description(source.run_dir, cfg),
        )
        write_manifest(staging, manifest)
    return Path(out_dir), manifest


def export_bundle(checkpoint_path: str | Path, out_dir: str | Path | None = None, device: str = "auto",
                  replace: bool = False) -> tuple[Path, Manifest]:
    """Export a tuned checkpoint; returns the bundle folder and its manifest (see `write_bundle`).

    Parity is checked on the validation frames (ONNX Runtime against PyTorch, eval mode) and the test split
    is scored through the ONNX graph, as the device will run it. A checkpoint tuned with flip averaging
    (`nerveseg tune --flip-tta`) exports a graph that averages each frame with its mirror (FlipAveraged).
    """
    checkpoint_path = Path(checkpoint_path)
    model, checkpoint, cfg = load_model(checkpoint_path)
    if checkpoint.get("threshold") is None:
        raise InputError(f"{checkpoint_path}: has no tuned threshold; run 'nerveseg tune' on its run first")
    run_dir = run_dir_of(checkpoint_path)
    cfg = cfg.replace(flip_tta=flip_tta_of(checkpoint))  # what T* was tuned for (and the manifest records)
    source = BundleSource(run_dir, cfg, as_deployed(model, cfg.flip_tta), float(checkpoint["threshold"]),
                          Morphology.from_dict(checkpoint["morphology"]), protected_paths(run_dir, checkpoint_path),
                          {"validation": checkpoint.get("validation", {}), "test": test_metrics_of(run_dir)})
    bundle, manifest = write_bundle(source, Path(out_dir) if out_dir else run_dir / "bundle", device, replace)
    write_json(run_dir / "test_metrics_onnx.json", manifest.metrics["test_onnx"])
    return bundle, manifest
