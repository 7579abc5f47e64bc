"""The report's PTQ row: ONNX Runtime's own quantize_static of the float graph, made once and kept in RUN/ptq/.

`export.report.ptq.cached_ptq_of_run` (branch int8) quantizes with each calibration (MinMax, Percentile, Entropy) on
training frames, picks the best by validation Dice, and caches the result in RUN/ptq/ptq.json keyed by the float
graph's sha256 and the frame count; scripts/bench_int8.py shares the same folder, so the calibration (minutes on
real data) runs once for both.
"""

from __future__ import annotations

from pathlib import Path

from .rows import PTQ_DIR

FP32_GRAPH = Path("bundle") / "model.fp32.onnx"


def ensure_ptq(run_dir: str | Path) -> Path | None:
    """RUN/ptq/ptq.json, made unless current; None when there is no float bundle to quantize."""
    from .ptq import cached_ptq_of_run

    run_dir = Path(run_dir)
    fp32 = run_dir / FP32_GRAPH
    if not fp32.is_file():
        return None
    cached_ptq_of_run(run_dir, fp32, run_dir / PTQ_DIR)
    return run_dir / PTQ_DIR / "ptq.json"
