"""The baseline every quantized result is measured against: ONNX Runtime's own post-training quantization.

`quantize_static` of the float graph in QDQ form, per output channel, with ONNX Runtime's recommended types
for x86 (unsigned 8-bit activations, signed 8-bit weights), calibrated on training frames with each of its
three calibrations (MinMax, Percentile, Entropy). The best calibration is chosen by validation Dice after T*
and morphology, never on the test split; the test split is then scored through the chosen graph.

    python -m export.report.ptq --run-dir RUN --out DIR [--frames 64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import atomic_path
from device_runtime.core.manifest import INPUT_NAME
from device_runtime.core.postprocess import Morphology

# MinMax is quantize_static's default calibration: the "default settings" PTQ graph of the comparisons.
METHODS = ("MinMax", "Percentile", "Entropy")
DEFAULT_METHOD = "MinMax"
CALIBRATION_FRAMES = 64
ORT_LOG = "onnxruntime_quantization.log"  # beside the PTQ graphs: what ONNX Runtime's tools printed making them


@dataclass
class PtqGraph:
    method: str
    path: Path
    validation: dict  # metrics.summary of the validation split at T* with morphology
    test: dict = field(default_factory=dict)  # the same on the test split (filled for the chosen graph)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


@dataclass
class PtqBaseline:
    best: PtqGraph  # the calibration with the highest validation Dice
    graphs: dict[str, PtqGraph]  # every calibration that worked, by name
    failed: dict[str, str] = field(default_factory=dict)  # calibration -> why quantize_static failed

    @property
    def default(self) -> PtqGraph:
        return self.graphs.get(DEFAULT_METHOD, self.best)

    def to_dict(self) -> dict:
        return {"best": self.best.method, "graphs": {k: v.to_dict() for k, v in self.graphs.items()},
                "failed": self.failed}


class FrameReader:
    """quantize_static's CalibrationDataReader over (N, H, W) frames in [0, 1], one frame per batch (the histogram
    calibrations, Percentile and Entropy, need every batch of one shape).

    Subclassed lazily (see `_reader`) so importing this module does not import onnxruntime.quantization.
    """

    def __init__(self, frames: np.ndarray, batch_size: int = 1):
        self.frames, self.batch_size, self.position = np.asarray(frames, np.float32), batch_size, 0

    def get_next(self):
        if self.position >= len(self.frames):
            return None
        batch = np.ascontiguousarray(self.frames[self.position:self.position + self.batch_size, None])
        self.position += self.batch_size
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self.position = 0


def _reader(frames: np.ndarray):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(FrameReader, CalibrationDataReader):
        pass

    return Reader(frames)


def calibration_subset(frames: np.ndarray, count: int = CALIBRATION_FRAMES) -> np.ndarray:
    """`count` frames spread evenly over the given (training) frames; all of them when there are fewer."""
    if len(frames) == 0:
        raise InputError("no calibration frames: the training split is empty")
    if len(frames) <= count:
        return frames
    return frames[np.linspace(0, len(frames) - 1, count).round().astype(int)]


@contextlib.contextmanager
def ort_output_to(log_path: Path):
    """Send what ONNX Runtime's quantization tools print (print(): "Collecting tensor data and making histogram
    ...", bin counts, percentiles; the root logger's warnings; numpy's RuntimeWarnings from its range code) to
    `log_path` (appended), not into the output of the command that runs them: the pipeline's output stays its own
    lines, and nothing is lost."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)  # a root with a handler also keeps logging.warning() from adding one on stderr
        try:
            with contextlib.redirect_stdout(log), warnings.catch_warnings():  # catch_warnings restores showwarning
                warnings.simplefilter("always")
                warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: log.write(
                    warnings.formatwarning(message, category, filename, lineno, line))
                yield
        finally:
            root.removeHandler(handler)


def preprocess_for_ptq(fp32_onnx: str | Path, out_path: str | Path, log_dir: str | Path | None = None) -> Path:
    """ONNX Runtime's documented step before quantize_static (shape inference and its basic graph optimisation):
    without it the exporter's Identity nodes hide the conv biases from the quantizer. The baseline gets every
    help ONNX Runtime's own instructions give it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, ort_output_to(Path(log_dir or out_path.parent) / ORT_LOG):
        quant_pre_process(str(fp32_onnx), str(tmp))
    return out_path


def flip_averaging_nodes(onnx_path: str | Path) -> list[str]:
    """The nodes of a flip-averaged graph (training.model.FlipAveraged) outside the network: the mirror and the
    batch of two before the first convolution, the probability average after the network's last Resize (DeepLabV3
    ends by upsampling its logits). [] for a plain graph (no Gather reads the input). The QAT INT8 graph keeps these
    in float; left to quantize_static they would be quantized too (the mean probability on a u8 grid), so the
    baseline is given the same float tail: it is compared as the network it quantizes, not as its averaging."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    nodes = list(graph.node)  # ONNX keeps nodes in topological order
    if not any(n.op_type == "Gather" and INPUT_NAME in n.input for n in nodes):
        return []
    first_conv = next(i for i, n in enumerate(nodes) if n.op_type == "Conv")
    last_resize = max(i for i, n in enumerate(nodes) if n.op_type == "Resize")
    return [n.name for n in nodes[:first_conv] + nodes[last_resize + 1:]]


def quantize_ptq(fp32_onnx: str | Path, out_path: str | Path, frames: np.ndarray, method: str = DEFAULT_METHOD) -> Path:
    """ONNX Runtime's quantize_static of the float graph: QDQ, per channel, u8 activations, s8 weights (the
    averaging around the network of a flip-averaged graph left in float, see flip_averaging_nodes)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ValueError(f"calibration {method!r} is not one of {METHODS}")
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, ort_output_to(out_path.parent / ORT_LOG):
        print(f"--- quantize_static, {method} calibration -> {out_path.name}")
        quantize_static(str(fp32_onnx), str(tmp), _reader(frames), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method),
                        nodes_to_exclude=flip_averaging_nodes(fp32_onnx))
    # not CalibMaxIntermediateOutputs (which would bound the calibrator's memory, ~100 MB per 256x256 frame):
    # in ONNX Runtime 1.32 MinMax then drops each full chunk unmeasured ("No data is collected" at 64 frames)
    return out_path


def ptq_baseline(fp32_onnx: str | Path, calibration_frames: np.ndarray, val_images: np.ndarray, val_masks: np.ndarray,
                 test_images: np.ndarray, test_masks: np.ndarray, threshold: float, morphology: Morphology,
                 out_dir: str | Path, methods=METHODS) -> PtqBaseline:
    """Quantize with each calibration, keep the one with the best validation Dice, score the test split with
    it (and with the default calibration, the other reference of the comparisons)."""
    from training.evaluation.evaluate import evaluate_arrays

    from ..bundle.parity import onnx_probabilities

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = calibration_subset(calibration_frames)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".prepare-") as tmp:  # a step, not a result: 20 MB less
        prepared = preprocess_for_ptq(fp32_onnx, Path(tmp) / "model.fp32.ptq-input.onnx", log_dir=out_dir)
        graphs, failed = _quantize_each(prepared, frames, out_dir, methods, val_images, val_masks, threshold,
                                        morphology)
    if not graphs:
        raise InputError(f"{fp32_onnx}: every ONNX Runtime PTQ calibration failed: {failed}")
    best = max(graphs.values(), key=lambda g: g.validation["dice"])  # first in METHODS order on a tie
    for graph in {best.method: best, DEFAULT_METHOD: graphs.get(DEFAULT_METHOD)}.values():
        if graph is not None:
            graph.test, _, _ = evaluate_arrays(onnx_probabilities(graph.path, test_images), test_masks,
                                               threshold, morphology)
    return PtqBaseline(best, graphs, failed)


def _quantize_each(prepared: Path, frames: np.ndarray, out_dir: Path, methods, val_images: np.ndarray,
                   val_masks: np.ndarray, threshold: float, morphology: Morphology) -> tuple[dict, dict]:
    """quantize_ptq with each calibration method, scored on validation: ({method: PtqGraph}, {method: why failed})."""
    from training.evaluation.evaluate import evaluate_arrays

    from ..bundle.parity import onnx_probabilities

    graphs = {}
    failed = {}
    for method in methods:
        try:
            path = quantize_ptq(prepared, out_dir / f"model.ptq-{method.lower()}.onnx", frames, method)
        except ValueError as err:  # numpy's histogram refuses a tensor of (almost) constant value
            failed[method] = f"{type(err).__name__}: {err}"
            print(f"warning: ONNX Runtime PTQ with {method} calibration failed ({failed[method]}; its output: "
                  f"{out_dir / ORT_LOG})", file=sys.stderr)
            continue
        validation, _, _ = evaluate_arrays(onnx_probabilities(path, val_images), val_masks, threshold, morphology)
        graphs[method] = PtqGraph(method, path, validation)
    return graphs, failed


def ptq_of_run(run_dir: str | Path, fp32_onnx: str | Path, out_dir: str | Path,
               frames: int = CALIBRATION_FRAMES) -> PtqBaseline:
    """ptq_baseline on a float run: calibration on its training split, T* and morphology of its best checkpoint."""
    from training.checkpoint import load_model
    from training.stages import best_checkpoint, split_arrays

    run_dir = Path(run_dir)
    path = best_checkpoint(run_dir)
    _, checkpoint, cfg = load_model(path)
    if checkpoint.get("threshold") is None:
        raise InputError(f"{path}: has no tuned threshold; run 'nerveseg tune --run-dir {run_dir}' first")
    train_images, _, _ = split_arrays(run_dir, "train", cfg)
    val_images, val_masks, _ = split_arrays(run_dir, "val", cfg)
    test_images, test_masks, _ = split_arrays(run_dir, "test", cfg)
    return ptq_baseline(fp32_onnx, calibration_subset(train_images, frames), val_images, val_masks, test_images,
                        test_masks, float(checkpoint["threshold"]), Morphology.from_dict(checkpoint["morphology"]),
                        out_dir)


def cached_ptq_of_run(run_dir: str | Path, fp32_onnx: str | Path, out_dir: str | Path,
                      frames: int = CALIBRATION_FRAMES) -> PtqBaseline:
    """ptq_of_run, or its result read back from out_dir/ptq.json when that was made from the same float graph
    (sha256) with the same frame count and every graph it names is still there (calibration takes minutes)."""
    from device_runtime.core.fileio import sha256_file, write_json

    out_dir = Path(out_dir)
    record = out_dir / "ptq.json"
    key = {"fp32_sha256": sha256_file(fp32_onnx), "frames": frames}
    if record.is_file():
        try:
            data = json.loads(record.read_text())
            if data.get("key") == key:
                graphs = {m: PtqGraph(m, Path(g["path"]), g["validation"], g.get("test", {}))
                          for m, g in data["graphs"].items()}
                if all(g.path.is_file() for g in graphs.values()):
                    return PtqBaseline(graphs[data["best"]], graphs, data.get("failed", {}))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or stale: quantize again
    result = ptq_of_run(run_dir, fp32_onnx, out_dir, frames)
    write_json(record, {"key": key, **result.to_dict()})
    return result


def main(argv: list[str] | None = None) -> int:
    from device_runtime.core.errors import exit_code_of

    parser = argparse.ArgumentParser(prog="python -m export.report.ptq", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a tuned float run")
    parser.add_argument("--onnx", help="its float graph (default RUN/bundle/model.fp32.onnx)")
    parser.add_argument("--out", required=True, help="folder for the PTQ graphs")
    parser.add_argument("--frames", type=int, default=CALIBRATION_FRAMES, help="calibration frames (training split)")
    args = parser.parse_args(argv)

    def go():
        onnx_path = Path(args.onnx) if args.onnx else Path(args.run_dir) / "bundle" / "model.fp32.onnx"
        if not onnx_path.is_file():
            raise InputError(f"{onnx_path}: not found; export the float run first ('nerveseg export')")
        result = cached_ptq_of_run(args.run_dir, onnx_path, args.out, args.frames)
        for graph in result.graphs.values():
            test = f"  test Dice {graph.test['dice']:.4f}" if graph.test else ""
            mark = " (best)" if graph is result.best else ""
            print(f"PTQ {graph.method:<10} validation Dice {graph.validation['dice']:.4f}{test}  {graph.path}{mark}")

    return exit_code_of(go, "export.report.ptq")


if __name__ == "__main__":
    sys.exit(main())
