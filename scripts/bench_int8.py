"""INT8 on ONNX Runtime CPU, side by side with the float graph and ONNX Runtime's own PTQ, in one run.

    PYTHONPATH=. python scripts/bench_int8.py --run-dir RUN --bundle w8a8=B1 --bundle learned=B2 \
        [--ptq-dir DIR] [--threads 2] [--rounds 40] [--device-frames 200]

RUN is the float run (its bundle/model.fp32.onnx, split.json, T*); each --bundle an INT8 bundle exported from
one of its QAT runs (`nerveseg export --run-dir RUN --qat NAME`). Printed, in this order:

1. ONNX Runtime PTQ of the float graph (quantize_static: QDQ, per channel, u8/s8), MinMax / Percentile /
   Entropy on 64 training frames; the best by validation Dice.
2. Latency: ONNX Runtime CPU, --threads threads, batch 1, the model's input size, every graph timed in turns
   in one loop (float, each bundle's INT8 graph that the runtime picks on ort-cpu, its TensorRT-form graph,
   PTQ default, PTQ best): median and p10/p90 ms.
3. File sizes (the INT8 file must be >= 3.9x smaller than FP32) and packed size at the learned bits.
4. Test Dice through ONNX Runtime (each graph with its own T* and morphology: the float run's for float and
   PTQ, the QAT run's for a bundle) with 95 % bootstrap intervals, and the paired differences to the float
   graph and to the best PTQ graph.
5. Parity figures recorded in each bundle.
6. `nerveseg-device run` (a subprocess, as deployed) over the test frames with each INT8 bundle and the float
   bundle: fps and the share of frame time outside inference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from device_runtime.core.manifest import load_manifest  # noqa: E402
from device_runtime.core.postprocess import Morphology  # noqa: E402

BOOTSTRAP_SAMPLES = 2000


def bootstrap(per_image: np.ndarray, other: np.ndarray | None = None, seed: int = 0) -> tuple[float, float, float]:
    """Mean (or mean paired difference to `other`) and its 95 % percentile-bootstrap interval (training.evaluation.bootstrap)."""
    from training.evaluation.bootstrap import bootstrap_ci, paired_bootstrap_ci

    if other is None:
        return (float(np.mean(per_image)), *bootstrap_ci(per_image, n=BOOTSTRAP_SAMPLES, seed=seed))
    return (float(np.mean(per_image - other)), *paired_bootstrap_ci(per_image, other, n=BOOTSTRAP_SAMPLES, seed=seed))


def test_scores(onnx_path: Path, images, masks, threshold: float, morphology: Morphology):
    from export.bundle.parity import onnx_probabilities
    from training.evaluation.evaluate import evaluate_arrays

    summary, per_image, _ = evaluate_arrays(onnx_probabilities(onnx_path, images), masks, threshold, morphology)
    return summary, per_image


def device_run(bundle: Path, frames_dir: Path, precision: str, threads: int, frames: int) -> dict:
    """`nerveseg-device run` in a subprocess over the test frames (looped to `frames`); its summary JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        summary_path = Path(tmp) / "summary.json"
        command = [sys.executable, "-m", "device_runtime", "run", "--bundle", str(bundle), "--source", str(frames_dir),
                   "--backend", "ort-cpu", "--precision", precision, "--threads", str(threads), "--loop",
                   "--max-frames", str(frames), "--warmup", "10", "--summary-json", str(summary_path), "--quiet"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        if result.returncode != 0:
            raise SystemExit(f"nerveseg-device run failed on {bundle}: {result.stderr.strip()}")
        summary = json.loads(summary_path.read_text())
        summary["stderr"] = result.stderr.strip()
        return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path, help="the float run")
    parser.add_argument("--bundle", action="append", default=[], metavar="NAME=DIR", help="an INT8 bundle (repeat)")
    parser.add_argument("--ptq-dir", type=Path, help="where the PTQ graphs go (default RUN/ptq)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (each runs every graph once)")
    parser.add_argument("--device-frames", type=int, default=200, help="frames per nerveseg-device run")
    parser.add_argument("--calibration-frames", type=int, default=64)
    args = parser.parse_args()

    from export.bundle.latency import interleaved_latency
    from export.report.ptq import cached_ptq_of_run
    from training.checkpoint import load_model
    from training.data.dataset import load_split
    from training.stages import split_arrays

    run_dir = args.run_dir
    float_bundle = run_dir / "bundle"
    fp32 = float_bundle / "model.fp32.onnx"
    if not fp32.is_file():
        raise SystemExit(f"{fp32}: not found; export the float run first")
    bundles = {}
    for item in args.bundle:
        name, _, folder = item.partition("=")
        bundles[name] = (Path(folder), load_manifest(folder))
    _, float_checkpoint, cfg = load_model(run_dir / "checkpoints" / "best.pt")
    float_t, float_morph = float(float_checkpoint["threshold"]), Morphology.from_dict(float_checkpoint["morphology"])
    input_size = tuple(cfg.input_size)

    # 1. PTQ
    ptq = cached_ptq_of_run(run_dir, fp32, args.ptq_dir or run_dir / "ptq", args.calibration_frames)
    print(f"== ONNX Runtime PTQ (quantize_static QDQ per-channel u8 act / s8 weights, {args.calibration_frames} "
          "training frames)")
    for g in ptq.graphs.values():
        print(f"  {g.method:<10} validation Dice {g.validation['dice']:.4f}" + ("   <- best" if g is ptq.best else ""))
    for method, why in ptq.failed.items():
        print(f"  {method:<10} failed: {why}")

    # 2. latency, interleaved
    graphs = {"fp32": fp32}
    for name, (folder, manifest) in bundles.items():
        graphs[f"{name} int8 (ort-cpu pick)"] = folder / manifest.file("int8", "onnx", "ort-cpu").path
        tensorrt_form = manifest.file("int8", "onnx", "tensorrt", made_for=True)
        if tensorrt_form is not None:  # a --grid x86 bundle has none
            graphs[f"{name} int8 TensorRT form"] = folder / tensorrt_form.path
    graphs["PTQ default (MinMax)"] = ptq.default.path
    if ptq.best.method != ptq.default.method:
        graphs[f"PTQ best ({ptq.best.method})"] = ptq.best.path
    timing = interleaved_latency(graphs, input_size, threads=args.threads, rounds=args.rounds)
    base = timing["fp32"]["median_ms"]
    ptq_default = timing["PTQ default (MinMax)"]["median_ms"]
    print(f"\n== latency: ONNX Runtime CPU, {args.threads} threads, batch 1, {input_size[0]}x{input_size[1]}, "
          f"{args.rounds} interleaved rounds")
    for name, t in timing.items():
        print(f"  {name:<34} median {t['median_ms']:7.2f} ms  (p10 {t['p10_ms']:.2f}, p90 {t['p90_ms']:.2f})  "
              f"{base / t['median_ms']:.2f}x vs FP32, {ptq_default / t['median_ms']:.2f}x vs PTQ default")

    # 3. sizes
    fp32_bytes = fp32.stat().st_size
    print(f"\n== sizes: FP32 {fp32_bytes / 1e6:.2f} MB")
    for name, (folder, manifest) in bundles.items():
        q = manifest.quantization
        for f in manifest.files:
            if f.precision == "int8":
                ratio = fp32_bytes / f.bytes
                print(f"  {name}: {f.path} {f.bytes / 1e6:.2f} MB, {ratio:.2f}x smaller "
                      f"({'meets' if ratio >= 3.9 else 'FAILS'} >= 3.9x)")
        print(f"  {name}: packed at learned bits (W {q['mean_weight_bits']:.2f} / A {q['mean_activation_bits']:.2f}) "
              f"{q['packed_bytes'] / 1e6:.2f} MB, {fp32_bytes / q['packed_bytes']:.2f}x smaller")
    for g in {ptq.default.method: ptq.default, ptq.best.method: ptq.best}.values():
        print(f"  PTQ {g.method}: {g.path.stat().st_size / 1e6:.2f} MB, {fp32_bytes / g.path.stat().st_size:.2f}x smaller")

    # 4. test Dice with bootstrap intervals
    test_images, test_masks, _ = split_arrays(run_dir, "test", cfg)
    scores = {"fp32": test_scores(fp32, test_images, test_masks, float_t, float_morph)}
    for name, (folder, manifest) in bundles.items():
        path = folder / manifest.file("int8", "onnx", "ort-cpu").path
        scores[f"{name} int8"] = test_scores(path, test_images, test_masks, manifest.threshold, manifest.morphology)
    scores[f"PTQ default ({ptq.default.method})"] = test_scores(ptq.default.path, test_images, test_masks, float_t, float_morph)
    scores[f"PTQ best ({ptq.best.method})"] = test_scores(ptq.best.path, test_images, test_masks, float_t, float_morph)
    best_ptq = scores[f"PTQ best ({ptq.best.method})"][1]
    print(f"\n== test split through ONNX Runtime ({len(test_images)} frames), mean Dice [95 % bootstrap, "
          f"{BOOTSTRAP_SAMPLES} resamples]; differences paired by frame")
    for name, (summary, per_image) in scores.items():
        mean, low, high = bootstrap(per_image)
        line = f"  {name:<26} Dice {summary['dice']:.4f} [{low:.4f}, {high:.4f}]  IoU {summary['iou']:.4f}  PA {summary['pixel_accuracy']:.4f}"
        if name != "fp32":
            d, dl, dh = bootstrap(per_image, scores["fp32"][1])
            line += f" | vs FP32 {d:+.4f} [{dl:+.4f}, {dh:+.4f}]"
            if "int8" in name:
                d, dl, dh = bootstrap(per_image, best_ptq)
                line += f" | vs PTQ best {d:+.4f} [{dl:+.4f}, {dh:+.4f}]"
        print(line)

    # 5. parity
    print("\n== parity on the validation frames (ONNX Runtime CPU vs the PyTorch fake-quant model)")
    from export.bundle.int8 import format_summary

    for name, (folder, manifest) in bundles.items():
        for line in format_summary(folder, manifest).splitlines():
            if line.startswith(("  parity", "  the fake-quant model")):
                print(f"  {name}:{line[1:]}")

    # 6. the device runtime over the test frames
    samples = load_split(run_dir / "split.json")["test"]
    print(f"\n== nerveseg-device run, ort-cpu, {args.threads} threads, test frames looped to {args.device_frames}")
    with tempfile.TemporaryDirectory() as tmp:
        frames_dir = Path(tmp) / "test-frames"
        frames_dir.mkdir()
        for s in samples:
            os.symlink(s.image, frames_dir / s.image.name)
        runs = [("float bundle", float_bundle, "fp32")]
        runs += [(f"{name} bundle", folder, p) for name, (folder, _) in bundles.items() for p in ("auto", "int8")]
        for label, folder, precision in runs:
            summary = device_run(folder, frames_dir, precision, args.threads, args.device_frames)
            t = summary["timing"]
            inference = t["stages_ms"]["inference"]["p50"]
            took = next((line for line in summary["stderr"].splitlines() if "precision auto" in line), "")
            print(f"  {label:<20} --precision {precision:<5} model {summary['model']:<22} {t['fps']:6.1f} fps, "
                  f"inference p50 {inference:.1f} ms, outside inference {100 * t['outside_inference']:.1f} %"
                  + (f"  [{took.removeprefix('info: ')}]" if took else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
