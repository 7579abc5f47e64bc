"""`nerveseg pipeline`: train -> tune -> evaluate -> export, then a short table of what came out; then the
quantized stages and the accuracy-vs-bitwidth report of what it ran (float, learned bits, W8A8, ORT PTQ)."""

from __future__ import annotations

import time
from pathlib import Path

from training import stages, train
from training.config import TrainConfig

from .bundle import export_bundle


def format_table(threshold: dict, test: dict, test_onnx: dict) -> str:
    rows = [("validation (T*, PyTorch)", threshold["validation"]), ("test (PyTorch)", test), ("test (ONNX, as deployed)", test_onnx)]
    lines = [f"{'split':<26}{'Dice':>8}{'IoU':>8}{'PA':>8}{'pooled':>8}{'frames':>8}"]
    for name, m in rows:
        lines.append(f"{name:<26}{m['dice']:>8.4f}{m['iou']:>8.4f}{m['pixel_accuracy']:>8.4f}{m['pooled_dice']:>8.4f}{m['images']:>8}")
    return "\n".join(lines)


def run_pipeline(cfg: TrainConfig, resume: bool = False) -> Path:
    """Every stage in order on one run folder (training resumed with resume); returns the bundle folder."""
    start = time.perf_counter()
    run_dir = train.main(cfg, resume)
    threshold = stages.tune_run(run_dir, cfg.device)
    test = stages.evaluate_run(run_dir, cfg.device)
    bundle_dir, manifest = export_bundle(run_dir / "checkpoints" / "best.pt", device=cfg.device)
    parity = manifest.metrics["parity"]["fp32"]
    print()
    print(format_table(threshold, test, manifest.metrics["test_onnx"]))
    print(f"T* = {threshold['threshold']:.2f}   morphology {threshold['morphology']}")
    print(f"ONNX parity on {parity['frames']} validation frames: max |dp| {parity['max_prob_diff']:.1e}, "
          f"mask Dice {parity['mask_dice']:.4f}")
    print(f"run:    {run_dir}")
    print(f"bundle: {bundle_dir}   ({time.perf_counter() - start:.0f} s in all)")
    report_stage(run_dir, cfg)
    print(f"({time.perf_counter() - start:.0f} s in all)")
    return bundle_dir


def report_stage(run_dir: Path, cfg: TrainConfig) -> Path:
    """W8A8 QAT beside the learned-bits run (same recipe [qat] schedule), every finished QAT run exported to
    INT8, ONNX Runtime's PTQ of the float graph, then RUN/report/; prints the report's path. Resumable: finished
    runs and bundles are kept (the sweep's rules)."""
    from .sweep import run_sweep

    print()
    report = run_sweep(run_dir, bits=["8"], learned=[], device=cfg.device, command=f"nerveseg pipeline --run-dir {run_dir}")
    print(f"report: {report / 'report.html'}")
    return report
