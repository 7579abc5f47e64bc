"""Device runtime figures on this machine: fps and per-stage latency over 500 frames, and memory over a soak.

    python scripts/bench_device.py prepare            # bundle (untrained DeepLabV3-MobileNetV3, 256x256) + frames
    python scripts/bench_device.py fps [--repeat 3]   # 500 frames through `nerveseg-device run`, ONNX Runtime CPU
    python scripts/bench_device.py soak --frames 10000  # resident memory at the start and end of a long run
    python scripts/bench_device.py fps --bundle runs/edge-real/bundle   # a trained bundle of your own instead

The bundle holds torchvision's deeplabv3_mobilenet_v3_large (num_classes=1, a 1-channel first convolution,
weights=None, aux_loss=False) exported untrained to ONNX (opset 17, dynamic batch, "input" -> "logits").
Untrained weights time the same as trained ones; the masks mean nothing. Frames are the usgra-seg images
(../shared/data/usgra-seg, repeated to 500 files) when present, else synthetic 512x512 frames.
The runtime runs as a subprocess through its command line, exactly as on the device; torch is used here only
to build the bundle. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_IMAGES = REPO.parent / "shared" / "data" / "usgra-seg" / "images"
sys.path.insert(0, str(REPO))


def make_bundle(folder: Path, size: int = 256) -> Path:
    import torch
    from torch import nn
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    from device_runtime.core.manifest import Manifest, describe_file, write_manifest
    from device_runtime.core.postprocess import Morphology

    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=1, aux_loss=False)
    stem = model.backbone["0"][0]
    model.backbone["0"][0] = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                                       bias=False)

    class Logits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["out"]

    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(Logits(model).eval(), torch.zeros(1, 1, size, size), str(folder / "model.fp32.onnx"),
                      input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    manifest = Manifest(architecture="deeplabv3_mobilenet_v3_large (untrained)", input_size=(size, size),
                        threshold=0.14, morphology=Morphology(open_radius=2, close_radius=2, min_area=50,
                                                              fill_holes=True),
                        files=[describe_file(folder, "model.fp32.onnx", "fp32", "onnx")])
    write_manifest(folder, manifest)
    return folder


def make_frames(folder: Path, count: int = 500) -> Path:
    import cv2

    from device_runtime.sources.files import synthetic_frames

    folder.mkdir(parents=True, exist_ok=True)
    real = sorted(REAL_IMAGES.glob("*.png")) if REAL_IMAGES.is_dir() else []
    synthetic = [] if real else synthetic_frames(512, 512, count=16)
    for index in range(count):
        target = folder / f"frame_{index:04d}.png"
        if real:
            shutil.copyfile(real[index % len(real)], target)
        else:
            cv2.imwrite(str(target), synthetic[index % len(synthetic)])
    print(f"{count} frames in {folder} ({'usgra-seg images, repeated' if real else 'synthetic 512x512'})")
    return folder


def device(*args: str, log: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "device_runtime", *args]
    print("$ " + " ".join(command), flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    with open(log, "w") if log else open(os.devnull, "w") as stderr:
        return subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
                              check=True)


def fps(work: Path, bundle: Path, repeat: int = 1) -> None:
    """500 frames per configuration of outputs; with --repeat, each several times (this machine is shared)."""
    frames = work / "frames"
    configurations = {
        "jsonl": ["--jsonl", str(work / "out" / "frames.jsonl")],
        "jsonl+masks": ["--jsonl", str(work / "out" / "frames.jsonl"), "--masks", str(work / "out" / "masks")],
    }
    rows = []
    for attempt in range(1, repeat + 1):
        for name, outputs in configurations.items():
            shutil.rmtree(work / "out", ignore_errors=True)
            summary_path = work / f"summary_{name}.json"
            result = device("run", "--bundle", str(bundle), "--source", str(frames), "--backend", "ort-cpu",
                            "--summary-json", str(summary_path), *outputs)
            print(f"--- outputs: {name} (run {attempt} of {repeat})")
            print(result.stdout)
            timing = json.loads(summary_path.read_text())["timing"]
            stages = timing["stages_ms"]
            rows.append((name, attempt, timing["fps"], stages["end_to_end"]["p50"], stages["end_to_end"]["p99"],
                         stages["inference"]["p50"], 100 * timing["outside_inference"]))
    print(f"{'outputs':<12}{'run':>4}{'fps':>8}{'e2e p50':>9}{'e2e p99':>9}{'inf p50':>9}{'outside %':>10}")
    for name, attempt, rate, p50, p99, inference, outside in rows:
        print(f"{name:<12}{attempt:>4}{rate:>8.2f}{p50:>9.2f}{p99:>9.2f}{inference:>9.2f}{outside:>10.1f}")


def soak(work: Path, bundle: Path, frames: int, every: int) -> None:
    source = work / "frames"
    log = work / "soak.log"
    started = time.time()
    result = device("run", "--bundle", str(bundle), "--source", str(source), "--loop", "--max-frames", str(frames),
                    "--backend", "ort-cpu", "--report-every", str(every), "--jsonl", str(work / "soak.jsonl"),
                    "--masks", str(work / "soak_masks"), "--summary-json", str(work / "soak_summary.json"),
                    log=log)
    print(result.stdout)
    rss = [(int(m.group(1)), float(m.group(2)))
           for m in re.finditer(r"\[frame (\d+)\].*rss ([\d.]+) MiB", log.read_text())]
    summary = json.loads((work / "soak_summary.json").read_text())
    first, last = rss[0], rss[-1]
    print(f"soak: {summary['frames']} frames in {time.time() - started:.0f} s, {summary['timing']['fps']:.2f} fps")
    print(f"rss after the first frame {summary['rss_mib']['first_frame']:.1f} MiB; at frame {first[0]} "
          f"{first[1]:.1f} MiB; at frame {last[0]} {last[1]:.1f} MiB; at the last frame "
          f"{summary['rss_mib']['last_frame']:.1f} MiB")
    print(f"change from frame {first[0]} to the last frame: "
          f"{100 * (summary['rss_mib']['last_frame'] / first[1] - 1):+.2f} % (goal: within 5 %)")
    print("rss by frame: " + ", ".join(f"{n}:{v:.1f}" for n, v in rss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("prepare", "fps", "soak", "all"))
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_device")
    parser.add_argument("--frames", type=int, default=10_000, help="soak length")
    parser.add_argument("--report-every", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each fps configuration")
    parser.add_argument("--bundle", type=Path, help="measure this bundle (e.g. runs/edge-real/bundle) instead of "
                        "the untrained one that prepare writes")
    args = parser.parse_args()
    bundle = args.bundle or args.work / "bundle"
    if args.part in ("prepare", "all"):
        make_bundle(args.work / "bundle")
        make_frames(args.work / "frames")
    if args.part in ("fps", "all"):
        fps(args.work, bundle, args.repeat)
    if args.part in ("soak", "all"):
        soak(args.work, bundle, args.frames, args.report_every)


if __name__ == "__main__":
    main()
