"""`nerveseg pipeline`: train -> tune -> evaluate -> export -> QAT (learned weight bits), then a short table of
what came out; then W8A8 and W4A8 beside it, the INT8 exports, ORT PTQ and the accuracy-vs-bitwidth report of what
it ran."""

from __future__ import annotations

import time
from pathlib import Path

from device_runtime.core.manifest import MANIFEST_NAME, load_manifest
from qat.config import build_qat_config, load_qat_config
from qat.run import format_summary, run_qat
from training import stages, train
from training.config import TrainConfig

from ..bundle.writer import ParityError, export_bundle
from ..bundle.int8 import export_int8_bundle
from ..bundle.int8 import format_summary as format_int8
from ..report.rows import SWEEP_STATE, read_json
from .sweep import SweepState, refusal_key


# The learned-bits run the pipeline shows: weight bits learned per layer from a 4-bit start, the mean held at 4
# by the bit cost on its excess (lambda from the recipe), activations at 8 (the speed of int8 kernels is the same
# at any activation bits, and a b < 8 activation costs a clamp). It is the setting that reaches 4 bits: the former
# default (weights and activations learned from 8) ended at W 6.69 / A 7.09 and lost 0.22 test Dice on the phantom.
# Measured in three phantom pipeline runs (2026-11-26, README): 3.94-4.00 bits, -0.009 to -0.046 against float,
# where W4A8 lost 0.003 to 0.059: 20 test frames do not order the two. PIPELINE_UNIFORM runs beside it: W8A8, and
# W4A8 as the fixed-bits run with the learned run's activations and nearest mean weight bits.
# hold_fragile 4: the four tensors whose one-at-a-time 4-bit drop is largest stay at 8 bits (counted in the mean).
# Without it one phantom seed in three collapsed in the bit-learning epoch (small early layers at 2 bits:
# validation Dice -0.132 against float); with it the worst of three seeds is -0.004 (docs/accuracy.md, the third
# screen, its rule written before the runs).
PIPELINE_LEARNED = {"bits": "learned-a8", "initial_bits": 4, "target_bits": 4.0, "hold_fragile": 4,
                    "name": "learned-a8-i4-t4"}
PIPELINE_UNIFORM = ("8", "W4A8")


def pipeline_runs() -> list[str]:
    """The QAT runs the pipeline makes and exports to INT8: the learned-bits run, then PIPELINE_UNIFORM's."""
    from .sweep import plan

    return [PIPELINE_LEARNED["name"]] + [job.name for job in plan(list(PIPELINE_UNIFORM), [], [])]


def format_table(threshold: dict, test: dict, test_onnx: dict) -> str:
    rows = [("validation (T*, PyTorch)", threshold["validation"]), ("test (PyTorch)", test), ("test (ONNX, as deployed)", test_onnx)]
    lines = [f"{'split':<26}{'Dice':>8}{'IoU':>8}{'PA':>8}{'pooled':>8}{'frames':>8}"]
    for name, m in rows:
        lines.append(f"{name:<26}{m['dice']:>8.4f}{m['iou']:>8.4f}{m['pixel_accuracy']:>8.4f}{m['pooled_dice']:>8.4f}{m['images']:>8}")
    return "\n".join(lines)


def run_pipeline(cfg: TrainConfig, resume: bool = False, qat_epochs: int | None = None) -> Path:
    """Every stage in order on one run folder (training resumed with resume); returns the bundle folder."""
    start = time.perf_counter()
    run_dir = train.main(cfg, resume)
    threshold = stages.tune_run(run_dir, cfg.device)
    test = stages.evaluate_run(run_dir, cfg.device)
    # a resumed pipeline may replace the bundle it wrote itself (RUN/bundle); a fresh one finds none there
    bundle_dir, manifest = export_bundle(run_dir / "checkpoints" / "best.pt", device=cfg.device, replace=resume)
    float_seconds = time.perf_counter() - start
    qat_dir = run_qat_stage(cfg, run_dir, resume, qat_epochs)
    int8_report = int8_stage(run_dir, qat_dir, cfg.device, replace=resume)
    parity = manifest.metrics["parity"]["fp32"]
    print()
    print(format_table(threshold, test, manifest.metrics["test_onnx"]))
    print(f"T* = {threshold['threshold']:.2f}   morphology {threshold['morphology']}")
    print(f"ONNX parity on {parity['frames']} validation frames: max |dp| {parity['max_prob_diff']:.1e}, "
          f"mask Dice {parity['mask_dice']:.4f}")
    print(format_summary(qat_dir))
    print(int8_report)
    print(f"run:    {run_dir}")
    print(f"bundle: {bundle_dir}   ({time.perf_counter() - start:.0f} s in all: float stages "
          f"{float_seconds:.0f} s, QAT {time.perf_counter() - start - float_seconds:.0f} s)")
    report_stage(run_dir, cfg, qat_epochs)
    print(int8_bundles_summary(run_dir))
    print(f"({time.perf_counter() - start:.0f} s in all, report included)")
    return bundle_dir


def report_stage(run_dir: Path, cfg: TrainConfig, qat_epochs: int | None = None) -> Path:
    """W8A8 QAT beside the learned-bits run (the same [qat] schedule and epochs), every finished QAT run exported
    to INT8, ONNX Runtime's PTQ of the float graph, then RUN/report/; prints the report's path. Resumable:
    finished runs and bundles are kept (the sweep's rules)."""
    from .sweep import run_sweep

    print()
    report = run_sweep(run_dir, bits=list(PIPELINE_UNIFORM), learned=[], epochs=qat_epochs, device=cfg.device,
                       command=f"nerveseg pipeline --run-dir {run_dir}")
    print(f"report: {report / 'report.html'}")
    return report


def run_qat_stage(cfg: TrainConfig, run_dir: Path, resume: bool, epochs: int | None = None) -> Path:
    """QAT with learned weight bits (PIPELINE_LEARNED) on the recipe's [qat] schedule (RUN/qat/learned-a8-i4-t4;
    `epochs` overrides its length); resumed when it was started, on its own schedule unless `epochs` is given
    (a run made with --qat-epochs 2 is not stretched to the recipe's 3 by a --resume without it)."""
    qat_dir = Path(run_dir) / "qat" / PIPELINE_LEARNED["name"]
    started = (qat_dir / "checkpoints" / "last.pt").is_file()
    if resume and started and epochs is None:
        epochs = load_qat_config(qat_dir / "config.toml").epochs
    qcfg = build_qat_config(cfg.recipe, run_dir=str(run_dir), device=cfg.device, epochs=epochs, **PIPELINE_LEARNED)
    return run_qat(qcfg, resume=resume and started)


def int8_stage(run_dir: Path, qat_dir: Path, device: str, replace: bool = False) -> str:
    """The QAT run as an INT8 bundle (RUN/qat/NAME/bundle); its summary, or the one line saying why no INT8 file
    passed the gate (no INT8 bundle, the float bundle stands; recorded in RUN/sweep.json as the sweep records its
    own refusals, so the report stage does not export it again)."""
    try:
        bundle, manifest = export_int8_bundle(run_dir, qat_dir.name, device=device, replace=replace)
    except ParityError as err:
        SweepState(run_dir, f"nerveseg pipeline --run-dir {run_dir}").update(
            qat_dir.name, export_error=f"not exported: {err}", export_refused_for=refusal_key(qat_dir))
        return f"no INT8 bundle for {qat_dir.name}: {err}"
    return format_int8(bundle, manifest)


def int8_bundles_summary(run_dir: Path) -> str:
    """One line per QAT run of the pipeline: the INT8 bundle written, where, and which INT8 files it holds (and
    which the gate left out); or that none was written, and why (RUN/sweep.json)."""
    state = (read_json(run_dir / SWEEP_STATE) or {}).get("runs", {})
    lines = ["INT8 bundles:"]
    for qat_dir in sorted(p for p in (run_dir / "qat").glob("*") if p.is_dir() and not p.name.startswith(".")):
        bundle = qat_dir / "bundle"
        if not (bundle / MANIFEST_NAME).is_file():
            why = state.get(qat_dir.name, {}).get("export_error") or "not exported"
            lines.append(f"  {qat_dir.name:<18} NO INT8 bundle ({why.removeprefix('not exported: ')})")
            continue
        manifest = load_manifest(bundle, verify=False)
        held = [f.path for f in manifest.files if f.precision == "int8"]
        left_out = "".join(f"; {name} left out ({why})" for name, why in manifest.quantization.get("refused", {}).items())
        lines.append(f"  {qat_dir.name:<18} INT8 bundle written: {bundle} ({', '.join(held)}){left_out}")
    return "\n".join(lines)


