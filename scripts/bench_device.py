"""Device runtime figures on this machine: where a frame's time goes, fps and the share outside inference, memory.

    python scripts/bench_device.py prepare [--weights CKPT]  # bundle: DeepLabV3-MobileNetV3 256x256, FP32 + INT8
    python scripts/bench_device.py stages [--against ../main]  # each step of a frame, CPU ms: where the time goes
    python scripts/bench_device.py fps [--repeat 3]   # 500 frames through `nerveseg-device run`, ONNX Runtime CPU
    python scripts/bench_device.py fps --against ../main   # the same, another checkout's runtime interleaved
    python scripts/bench_device.py soak --frames 10000  # resident memory at the start and end of a long run
    python scripts/bench_device.py fps --bundle runs/edge-real/bundle   # a trained bundle of your own instead

The bundle holds DeepLabV3-MobileNetV3 (training.model, one input channel) exported to ONNX at 256x256 as the
project exports it, and ONNX Runtime's quantize_static of it (QDQ, per channel, u8 activations, s8 weights, MinMax
on 16 frames) as its INT8 file. Untrained by default: it times as a trained network does, but its output is one
constant, so its masks are all of the frame or nothing, and post-processing, overlays and mask files cost what
they would not. `prepare --weights RUN/checkpoints/best.pt` starts from a trained checkpoint (its T* and
morphology) instead: masks the size of a nerve. Frames are the usgra-seg
images (../shared/data/usgra-seg/images, read where they are, looped to 500 frames) when present, else
synthetic 512x512 frames written to the work folder. The runtime runs as a subprocess through its command line,
exactly as on the device; torch is used here only to build the bundle. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_IMAGES = REPO.parent / "shared" / "data" / "usgra-seg" / "images"
sys.path.insert(0, os.environ.get("BENCH_RUNTIME", str(REPO)))  # stage-costs runs another checkout's runtime

FRAMES = 500
OUTPUTS = {  # what the fps runs write, per configuration (paths inside the work folder's out/)
    "jsonl": ["--jsonl", "{out}/frames.jsonl"],
    "jsonl+masks": ["--jsonl", "{out}/frames.jsonl", "--masks", "{out}/masks"],
    "jsonl+masks+overlays": ["--jsonl", "{out}/frames.jsonl", "--masks", "{out}/masks", "--overlays", "{out}/overlays"],
}


def make_bundle(folder: Path, frames: list[Path], size: int = 256, weights: Path | None = None) -> Path:
    """FP32 and INT8 (ORT quantize_static, MinMax on 16 frames) of torchvision's untrained DeepLabV3-MobileNetV3,
    or of the nerveseg checkpoint `weights` (with its T* and morphology), exported at size x size."""
    import numpy as np

    from device_runtime.core.imageio import read_image
    from device_runtime.core.manifest import Manifest, describe_file, write_manifest
    from device_runtime.core.postprocess import Morphology
    from device_runtime.core.preprocess import frame_to_image
    from export.bundle.onnx_export import export_onnx
    from export.report.ptq import preprocess_for_ptq, quantize_ptq
    from training.checkpoint import load_model
    from training.model import build_model

    folder.mkdir(parents=True, exist_ok=True)
    if weights:
        model, checkpoint, cfg = load_model(weights)
        threshold, morphology = checkpoint["threshold"], Morphology.from_dict(checkpoint["morphology"])
        architecture = f"{cfg.arch} ({weights})"
    else:  # untrained: times as a trained one does, but its output is one constant: no mask, or all of the frame
        model, threshold, architecture = build_model("mobilenet_v3_large"), 0.14, "mobilenet_v3_large (untrained)"
        morphology = Morphology(open_radius=2, close_radius=2, min_area=50, fill_holes=True)
    export_onnx(model.eval(), folder / "model.fp32.onnx", (size, size))
    calibration = np.stack([frame_to_image(read_image(p), (size, size)) for p in frames[:16]])
    with tempfile.TemporaryDirectory() as tmp:
        prepared = preprocess_for_ptq(folder / "model.fp32.onnx", Path(tmp) / "prepared.onnx", log_dir=folder)
        quantize_ptq(prepared, folder / "model.int8.onnx", calibration, "MinMax")
    manifest = Manifest(architecture=architecture, input_size=(size, size), threshold=threshold, morphology=morphology,
                        files=[describe_file(folder, "model.fp32.onnx", "fp32", "onnx"),
                               describe_file(folder, "model.int8.onnx", "int8", "onnx")])
    write_manifest(folder, manifest)
    print(f"bundle {folder}: {architecture}, FP32 and INT8 (ORT quantize_static) at {size}x{size}, T* {threshold:.2f}")
    return folder


def frame_source(work: Path, images: Path = REAL_IMAGES) -> tuple[str, list[Path]]:
    """The real frames where they are (never copied), else synthetic 512x512 frames written once to work/frames."""
    real = sorted(images.glob("*.png")) if images.is_dir() else []
    if real:
        return str(images), real
    import cv2

    from device_runtime.sources.files import synthetic_frames

    folder = work / "frames"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for index, frame in enumerate(synthetic_frames(512, 512, count=16)):
            cv2.imwrite(str(folder / f"frame_{index:04d}.png"), frame)
    return str(folder), sorted(folder.glob("*.png"))


def device(checkout: Path, *args: str, log: Path | None = None) -> subprocess.CompletedProcess:
    """`nerveseg-device ARGS` of `checkout`; its stderr to `log` (else shown when it fails)."""
    command = [sys.executable, "-m", "device_runtime", *args]
    env = dict(os.environ, PYTHONPATH=str(checkout), PYTHONUNBUFFERED="1")
    if log:
        with open(log, "w") as stderr:
            return subprocess.run(command, env=env, cwd=checkout, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                  check=True)
    result = subprocess.run(command, env=env, cwd=checkout, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


# ------------------------------------------------------------------------------------------------ stages


STEPS = ("decode (imread)", "preprocess", "find the image (sector)", "inference", "postprocess + stats",
         "overlay render", "mask PNG encode+write", "overlay JPEG encode+write", "JSON line")
LOOP_STEPS = ("preprocess", "find the image (sector)", "postprocess + stats")  # in the loop's own thread
JSONL_MASKS = ("decode (imread)", *LOOP_STEPS, "mask PNG encode+write", "JSON line")  # what `--jsonl --masks` costs


def _runtime(room: str, flat: str):
    """device_runtime's module by its place in the rooms (core/, backends/, ...), or by its flat name in a checkout
    from before them (BENCH_RUNTIME may name one: the rival of a comparison)."""
    import importlib

    try:
        return importlib.import_module(f"device_runtime.{room}")
    except ModuleNotFoundError:
        return importlib.import_module(f"device_runtime.{flat}")


def stage_costs(bundle: Path, paths: list[Path], precision: str, threads: int) -> dict[str, list[float]]:
    """{step: [wall ms, CPU ms]} per frame, mean over `paths`, every step run one after the other in this process
    (with the device_runtime this process imports). CPU is time.process_time: every thread of the process,
    ONNX Runtime's workers included; unlike wall time it does not count the waits for other processes."""
    import cv2
    import numpy as np

    OnnxRuntimeBackend = _runtime("core.ort_session", "backends").OnnxRuntimeBackend
    select_model = _runtime("backends.selection", "backends").select_model
    dumps_strict = _runtime("core.fileio", "fileio").dumps_strict
    read_image = _runtime("core.imageio", "imageio").read_image
    load_manifest = _runtime("core.manifest", "manifest").load_manifest
    OverlayRenderer = _runtime("outputs.overlay", "overlay").OverlayRenderer
    Segmenter = _runtime("pipeline", "pipeline").Segmenter
    preprocess = _runtime("core.preprocess", "preprocess").preprocess

    if "sector" in inspect.signature(Segmenter.postprocess).parameters:
        from device_runtime.sector import imaging_sector
    else:  # a runtime from before the sector: the step costs nothing there
        imaging_sector = None
    manifest = load_manifest(bundle)
    model, _ = select_model(manifest, "ort-cpu", precision)
    net = OnnxRuntimeBackend(bundle / model.path, manifest, "ort-cpu", [("CPUExecutionProvider", {})], threads)
    segment, renderer = Segmenter(manifest, net), OverlayRenderer()
    totals = {name: [0.0, 0.0] for name in STEPS}
    with tempfile.TemporaryDirectory() as out:
        for index, path in enumerate(paths):
            marks = [(time.perf_counter(), time.process_time())]

            def mark():
                marks.append((time.perf_counter(), time.process_time()))

            frame = read_image(path)
            mark()
            batch = preprocess(frame, segment.size, out=net.input_buffer)
            mark()
            sector = (imaging_sector(batch[0, 0]),) if imaging_sector else ()
            mark()
            output = net.infer(batch)
            mark()
            result = segment.postprocess(output[0, 0], frame.shape[:2], batch[0, 0], *sector)
            mark()
            picture = renderer.render(frame, result.mask, result.stats)
            mark()
            cv2.imwrite(f"{out}/{index}.png", result.mask * np.uint8(255))
            mark()
            cv2.imwrite(f"{out}/{index}.jpg", picture)
            mark()
            dumps_strict({"frame": index, **result.stats})
            mark()
            for name, (w0, c0), (w1, c1) in zip(STEPS, marks, marks[1:]):
                totals[name][0] += 1e3 * (w1 - w0) / len(paths)
                totals[name][1] += 1e3 * (c1 - c0) / len(paths)
    net.close()
    return totals


def stages(work: Path, bundle: Path, count: int, threads: int, images: Path, checkouts: dict[str, Path],
           repeat: int) -> None:
    """Where a frame's time goes: stage_costs of every checkout's runtime, in turns (`repeat` rounds), per
    precision; CPU ms per step (median over the rounds) and the CPU share outside inference. On a 2-core device
    every step's CPU is taken from the others (the decoder and the file writer run in their own threads), so
    these shares are what the time outside inference is made of."""
    paths = _frames(work, images, count)
    print(f"{count} frames from {paths[0].parent}; ONNX Runtime CPU, {threads or 'default'} threads; "
          f"{repeat} round(s), the runtimes in turns; CPU ms per frame (all threads), median over the rounds")
    for precision in ("int8", "fp32"):
        runs = {label: [] for label in checkouts}
        for _ in range(repeat):
            for label, checkout in checkouts.items():
                result = subprocess.run(
                    [sys.executable, __file__, "stage-costs", "--bundle", str(bundle), "--threads", str(threads),
                     "--precision", precision, "--work", str(work), "--images", str(images), "--stage-frames",
                     str(count)], env=dict(os.environ, BENCH_RUNTIME=str(checkout)), capture_output=True, text=True)
                if result.returncode:
                    raise SystemExit(f"stage-costs in {checkout} failed: {result.stderr.strip()[-2000:]}")
                runs[label].append(json.loads(result.stdout.splitlines()[-1]))
        cpu = {label: {name: sorted(r[name][1] for r in rounds)[len(rounds) // 2] for name in STEPS}
               for label, rounds in runs.items()}
        print(f"--- {precision.upper()}")
        print(f"  {'step':<28}" + "".join(f"{label + ' CPU ms':>16}" for label in cpu))
        for name in STEPS:
            print(f"  {name:<28}" + "".join(f"{steps[name]:>16.3f}" for steps in cpu.values()))
        for title, chosen in (("every output", STEPS), ("--jsonl --masks", JSONL_MASKS), ("the loop's own thread",
                                                                                          LOOP_STEPS)):
            shares = "   ".join(f"{label} {_outside(steps, chosen):.1f} %" for label, steps in cpu.items())
            print(f"  CPU share outside inference, {title}: {shares}")


def _frames(work: Path, images: Path, count: int) -> list[Path]:
    _, paths = frame_source(work, images)
    return [paths[i % len(paths)] for i in range(count)]


def _outside(cpu: dict[str, float], steps) -> float:
    """The share of CPU that `steps` (besides inference) take of themselves plus inference."""
    outside = sum(cpu[name] for name in steps if name != "inference")
    return 100 * outside / (outside + cpu["inference"])


# ------------------------------------------------------------------------------------------------ fps


def fps(work: Path, bundle: Path, repeat: int, checkouts: dict[str, Path], precisions: list[str],
        configurations: list[str], images: Path) -> None:
    """FRAMES real frames per (outputs, precision, checkout), the checkouts interleaved in every round: on a
    shared machine a busy minute then slows every rival alike."""
    source, _ = frame_source(work, images)
    rows = []
    for attempt in range(1, repeat + 1):
        for name in configurations:
            for precision in precisions:
                for label, checkout in checkouts.items():
                    out = work / "out"
                    _remove(out)
                    summary_path = work / "summary.json"
                    summary_path.unlink(missing_ok=True)  # the runtime refuses to overwrite an output
                    outputs = [a.format(out=out) for a in OUTPUTS[name]]
                    result = device(checkout, "run", "--bundle", str(bundle), "--source", source, "--loop",
                                    "--max-frames", str(FRAMES), "--backend", "ort-cpu", "--precision", precision,
                                    "--summary-json", str(summary_path), "--warmup", "10", *outputs)
                    timing = json.loads(summary_path.read_text())["timing"]
                    stages_ms = timing["stages_ms"]
                    rows.append((name, precision, label, attempt, timing["fps"], stages_ms["end_to_end"]["p50"],
                                 stages_ms["inference"]["p50"], 100 * timing["outside_inference"]))
                    print(f"--- {name}, {precision}, {label} (run {attempt} of {repeat})\n{result.stdout}", flush=True)
    print(f"{'outputs':<22}{'prec':>5}{'runtime':>10}{'run':>4}{'fps':>8}{'e2e p50':>9}{'inf p50':>9}{'outside %':>10}")
    for name, precision, label, attempt, rate, p50, inference, outside in rows:
        print(f"{name:<22}{precision:>5}{label:>10}{attempt:>4}{rate:>8.1f}{p50:>9.2f}{inference:>9.2f}"
              f"{outside:>10.1f}")
    print("median share outside inference:")
    for name in configurations:
        for precision in precisions:
            shares = {label: sorted(r[7] for r in rows if r[:3] == (name, precision, label)) for label in checkouts}
            print(f"  {name:<22}{precision:>5}  " + "   ".join(
                f"{label} {values[len(values) // 2]:.1f} %" for label, values in shares.items()))


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def soak(work: Path, bundle: Path, frames: int, every: int, images: Path) -> None:
    source, _ = frame_source(work, images)
    log = work / "soak.log"
    started = time.time()
    _remove(work / "soak_masks")
    for leftover in (work / "soak.jsonl", work / "soak_summary.json"):
        leftover.unlink(missing_ok=True)
    result = device(REPO, "run", "--bundle", str(bundle), "--source", source, "--loop", "--max-frames", str(frames),
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
    parser.add_argument("part", choices=("prepare", "stages", "fps", "soak", "all", "stage-costs"))
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_device")
    parser.add_argument("--frames", type=int, default=10_000, help="soak length")
    parser.add_argument("--stage-frames", type=int, default=200, help="frames of the stages breakdown")
    parser.add_argument("--report-every", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1, help="rounds of stages, runs of each fps configuration")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads of `stages` (0: one per core)")
    parser.add_argument("--precision", default="int8,fp32", help="fps: precisions to run, comma-separated")
    parser.add_argument("--outputs", default="jsonl,jsonl+masks", help=f"fps: any of {', '.join(OUTPUTS)}")
    parser.add_argument("--against", type=Path, help="stages, fps: another checkout (e.g. ../main) whose runtime runs "
                        "in turns with this one's on the same frames and bundle")
    parser.add_argument("--weights", type=Path, help="prepare: a nerveseg checkpoint to export instead of an untrained "
                        "network (e.g. RUN/checkpoints/best.pt)")
    parser.add_argument("--images", type=Path, default=REAL_IMAGES, help="folder of real PNG frames, read in place")
    parser.add_argument("--bundle", type=Path, help="measure this bundle (e.g. runs/edge-real/bundle) instead of "
                        "the untrained one that prepare writes")
    args = parser.parse_args()
    bundle = args.bundle or args.work / "bundle"
    if args.part == "stage-costs":  # one round of `stages`, in the runtime of BENCH_RUNTIME
        print(json.dumps(stage_costs(bundle, _frames(args.work, args.images, args.stage_frames), args.precision,
                                     args.threads)))
        return
    checkouts = {"this": REPO}
    if args.against:
        checkouts[args.against.resolve().name] = args.against.resolve()
    if args.part in ("prepare", "all"):
        make_bundle(args.work / "bundle", frame_source(args.work, args.images)[1], weights=args.weights)
    if args.part in ("stages", "all"):
        stages(args.work, bundle, args.stage_frames, args.threads, args.images, checkouts, args.repeat)
    if args.part in ("fps", "all"):
        fps(args.work, bundle, args.repeat, checkouts, args.precision.split(","), args.outputs.split(","),
            args.images)
    if args.part in ("soak", "all"):
        soak(args.work, bundle, args.frames, args.report_every, args.images)


if __name__ == "__main__":
    main()
