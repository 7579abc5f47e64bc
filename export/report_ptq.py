"""The report's PTQ row: ONNX Runtime's own quantize_static of the float graph, made once and kept in RUN/ptq/.

An adapter over `export.ptq` (branch int8), which quantizes with each calibration (MinMax, Percentile,
Entropy) on training frames and picks the best by validation Dice. This module only decides whether it must
run (RUN/ptq/ptq.json missing, or made from another float graph) and records what the report reads:

    RUN/ptq/ptq.json  {"file", "calibration", "threshold", "morphology", "validation": {method: summary},
                       "fp32_sha256", "calibration_frames", "command"}
"""

from __future__ import annotations

from pathlib import Path

from device_runtime.fileio import sha256_file, write_json

from .report_data import PTQ_DIR, read_json

FP32_GRAPH = Path("bundle") / "model.fp32.onnx"


def ptq_is_current(run_dir: Path) -> bool:
    """RUN/ptq/ptq.json exists, its graph exists, and it was made from the float graph now in the bundle."""
    run_dir = Path(run_dir)
    result = read_json(run_dir / PTQ_DIR / "ptq.json")
    fp32 = run_dir / FP32_GRAPH
    return bool(result) and fp32.is_file() and (run_dir / PTQ_DIR / result.get("file", "")).is_file() \
        and result.get("fp32_sha256") == sha256_file(fp32)


def ensure_ptq(run_dir: str | Path, frames: int | None = None) -> Path | None:
    """Make RUN/ptq/ unless it is current; returns ptq.json, or None when there is no float bundle to quantize."""
    from .ptq import CALIBRATION_FRAMES, ptq_of_run

    run_dir = Path(run_dir)
    fp32 = run_dir / FP32_GRAPH
    if not fp32.is_file():
        return None
    path = run_dir / PTQ_DIR / "ptq.json"
    if ptq_is_current(run_dir):
        return path
    frames = frames or CALIBRATION_FRAMES
    print(f"ONNX Runtime PTQ of {fp32} ({', '.join(('MinMax', 'Percentile', 'Entropy'))} on {frames} training frames)")
    result = ptq_of_run(run_dir, fp32, run_dir / PTQ_DIR, frames)
    best = result.best
    write_json(path, {
        "file": Path(best.path).name,
        "calibration": best.method,
        "threshold": best.test.get("threshold"),
        "morphology": best.test.get("morphology"),
        "validation": {name: graph.validation for name, graph in result.graphs.items()},
        "test": {name: graph.test for name, graph in result.graphs.items() if graph.test},
        "fp32_sha256": sha256_file(fp32),
        "calibration_frames": frames,
        "command": f"python -m export.ptq --run-dir {run_dir} --out {run_dir / PTQ_DIR} --frames {frames} "
                   "(quantize_static QDQ, per channel, u8 activations, s8 weights; best calibration by validation Dice)",
        "note": "best of " + ", ".join(f"{n} {g.validation['dice']:.4f}" for n, g in result.graphs.items())
                + " validation Dice",
    })
    return path

