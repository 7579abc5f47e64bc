"""`nerveseg-device`: run, bench, build-engine, info, build-pyz. The only module that reads the command line.

Bad input (a missing or tampered bundle, a source that does not open, a bad flag value) ends with one line
on stderr naming the file or value and the problem, and exit status 2; never a traceback. The exit codes are
listed under --help (cli_help.exit_codes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.cli_help import top_parser
from .config import BACKENDS, MASK_FORMATS, OVERLAY_FORMATS, PRECISIONS, RunConfig
from .core.errors import InputError, exit_code_of


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 420x580, got {text!r}") from None
    return height, width


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, metavar="FOLDER",
                        help="bundle folder (manifest.json and model files), e.g. RUN/bundle or RUN/qat/NAME/bundle")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="auto: TensorRT engine, else ONNX Runtime with TensorRT, CUDA or CPU")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: on TensorRT INT8 when the bundle has it, else FP16; on ONNX Runtime CUDA/CPU "
                             "whichever of FP32/INT8 the manifest measured faster, INT8 where unmeasured")
    parser.add_argument("--threads", type=int, default=0, metavar="N", help="ONNX Runtime threads (0 = one per core)")
    parser.add_argument("--engine-cache", type=Path, metavar="FOLDER",
                        help="folder for TensorRT engines (default: the bundle)")
    parser.add_argument("--workspace", dest="workspace_mib", type=int, default=1024, metavar="MIB",
                        help="TensorRT builder workspace in MiB")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--warmup", type=int, default=0, metavar="N", help="frames left out of the timing statistics")
    parser.add_argument("--pixel-spacing", dest="pixel_spacing_mm", type=float, metavar="MM",
                        help="mm per pixel: areas in mm²")
    parser.add_argument("--report-every", type=int, default=0, metavar="N",
                        help="print a timing line every N frames on stderr (0: only the summary)")
    parser.add_argument("--quiet", action="store_true", help="do not print the summary")
    temporal = parser.add_argument_group("temporal stabilisation (default: the bundle's manifest)")
    temporal.add_argument("--temporal", dest="temporal_mode", choices=("on", "off"),
                          help="carry the probabilities over frames (flow-warped average, hysteresis)")
    temporal.add_argument("--temporal-alpha", type=float, help="weight of the new frame in the average, (0, 1]")
    temporal.add_argument("--temporal-high", type=float, help="a pixel joins the mask above this (>= T*)")
    temporal.add_argument("--temporal-low", type=float, help="a pixel leaves the mask below this (<= T*)")
    temporal.add_argument("--temporal-reset", type=float,
                          help="start afresh when the previous frame, moved along the optical flow, correlates "
                               "with this one below this, in [-1, 1]")
    out = parser.add_argument_group("outputs (any combination)")
    out.add_argument("--masks", dest="masks_dir", type=Path, metavar="FOLDER", help="folder for one mask per frame")
    out.add_argument("--mask-format", default="png", choices=MASK_FORMATS,
                     help="file type of --masks (0/255 at the frame's size; tif: zlib-compressed)")
    out.add_argument("--video", dest="overlay_video", type=Path, metavar="FILE.mkv",
                     help="overlay video (.mkv: Matroska stays playable if the recording is cut short)")
    out.add_argument("--video-fps", type=float, metavar="FPS",
                     help="frame rate of --video (default: the source's, else 25)")
    out.add_argument("--overlays", dest="overlay_dir", type=Path, metavar="FOLDER",
                     help="folder for one overlay image per frame")
    out.add_argument("--overlay-format", default="jpg", choices=OVERLAY_FORMATS, help="file type of --overlays")
    out.add_argument("--jsonl", type=Path, metavar="FILE", help="JSON Lines: stats and timings of each frame")
    out.add_argument("--summary-json", type=Path, metavar="FILE", help="the final timing summary as JSON")
    out.add_argument("--overwrite", action="store_true",
                     help="replace existing output files and write into non-empty output folders (default: refuse)")
    out.add_argument("--show", action="store_true", help="a live window (needs a display)")
    out.add_argument("--mjpeg-port", type=int, metavar="PORT",
                     help="serve an MJPEG preview on this port (0 = any free port)")
    out.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                     help="address of the MJPEG preview (0.0.0.0: reachable from the network)")


def get_args_parser() -> argparse.ArgumentParser:
    parser, add_command = top_parser("nerveseg-device", "Torch-free nerve segmentation runtime for the device: runs a "
                                     "bundle written by `nerveseg export` on frames from files, a camera or a stream.",
                                     refusals=False)

    run = add_command("run", "segment frames from a source and write masks, overlays, video, JSON Lines",
                      "Segment every frame of a source with a bundle: preprocess, infer, threshold T*, morphology, "
                      "then the outputs asked for (none: only the timing summary).")
    _add_model_args(run)
    run.add_argument("--source", required=True, metavar="SOURCE",
                     help="folder, glob, image, multi-page TIFF, video file, device index or /dev/videoN, "
                          "rtsp:// URL, GStreamer pipeline, or synthetic[:HxW]")
    run.add_argument("--loop", action="store_true", help="start a file source again at its end")
    run.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames (default: the source's end)")
    run.add_argument("--queue", dest="queue_size", type=int, default=2, metavar="N",
                     help="live frames held; when full the oldest is dropped")
    run.add_argument("--capture-timeout", dest="capture_timeout_s", type=float, default=0.5, metavar="SECONDS",
                     help="how long one capture waits for a live frame before the loop checks for a stop")
    _add_run_args(run)

    bench = add_command("bench", "time every stage on synthetic frames, no camera needed")
    _add_model_args(bench)
    bench.add_argument("--frames", type=int, default=200, metavar="N", help="timed frames")
    bench.add_argument("--size", type=_size, default=(420, 580), metavar="HxW",
                       help="frame HEIGHTxWIDTH (default: 420x580, a Kaggle 2016 frame)")
    _add_run_args(bench)
    bench.set_defaults(warmup=10)

    engine = add_command("build-engine", "build (or rebuild) the TensorRT engine of a bundle")
    engine.add_argument("--bundle", type=Path, required=True, metavar="FOLDER",
                        help="bundle folder (manifest.json and model files)")
    engine.add_argument("--precision", default="auto",  # checked by check_engine_precision: one line, no usage
                        help="auto, fp32, fp16 or int8; auto: int8 when the bundle has its INT8 QDQ ONNX (explicit "
                             "quantization, no calibrator; float layers in FP16), else fp16")
    engine.add_argument("--engine-cache", type=Path, metavar="FOLDER",
                        help="folder for the engine (default: the bundle)")
    engine.add_argument("--workspace", dest="workspace_mib", type=int, default=1024, metavar="MIB",
                        help="TensorRT builder workspace in MiB")

    info = add_command("info", "what this machine has, and which backend and model file would run")
    info.add_argument("--bundle", type=Path, metavar="FOLDER",
                      help="also verify this bundle and show which model file would run")
    info.add_argument("--backend", default="auto", choices=BACKENDS, help="the backend a run would ask for")
    info.add_argument("--precision", default="auto", choices=PRECISIONS, help="the precision a run would ask for")
    info.add_argument("--engine-cache", type=Path, metavar="FOLDER",
                      help="folder of TensorRT engines (default: the bundle)")
    info.add_argument("--layers", action="store_true", help="list the bits of every layer, not only their counts")

    pyz = add_command("build-pyz", "write the runtime as one file: python3 nerveseg-device.pyz ...")
    pyz.add_argument("--out", type=Path, default=Path("nerveseg-device.pyz"), metavar="FILE",
                     help="the archive to write")
    return parser


_CONFIG_FIELDS = set(RunConfig.__dataclass_fields__)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = {k: v for k, v in vars(args).items() if k in _CONFIG_FIELDS}
    if args.command == "bench":
        height, width = args.size
        if args.frames < 1:
            raise InputError(f"--frames must be at least 1, got {args.frames}")
        values.update(source=f"synthetic:{height}x{width}", loop=True, max_frames=args.warmup + args.frames)
    temporal = {"enabled": {"on": True, "off": False}.get(args.temporal_mode), "alpha": args.temporal_alpha,
                "t_high": args.temporal_high, "t_low": args.temporal_low, "reset_below": args.temporal_reset}
    values["temporal"] = {name: value for name, value in temporal.items() if value is not None}
    return RunConfig(**values)


def _run(args) -> int:
    from .runner import run

    run(config_from_args(args))
    return 0


def _build_engine(args) -> int:
    from .backends import tensorrt_backend
    from .core.manifest import load_manifest

    manifest = load_manifest(args.bundle)
    precision = tensorrt_backend.engine_precision(manifest, args.precision)
    model = tensorrt_backend.check_engine_precision(manifest, precision)  # before importing TensorRT
    if args.workspace_mib < 16:
        raise InputError(f"--workspace must be at least 16 MiB, got {args.workspace_mib}")
    ok, detail = tensorrt_backend.tensorrt_status()
    if not ok:
        raise InputError(f"build-engine needs TensorRT, cuda-python and a GPU: {detail}")
    _, path = tensorrt_backend.load_or_build_engine(args.bundle, manifest, model, precision,
                                                    args.engine_cache or args.bundle, args.workspace_mib, rebuild=True)
    print(path)
    return 0


def _info(args) -> int:
    from .info import report

    print(report(args.bundle, args.backend, args.precision, args.engine_cache, args.layers))
    return 0


def _build_pyz(args) -> int:
    from .pyz import build_pyz

    print(build_pyz(args.out))
    return 0


_COMMANDS = {"run": _run, "bench": _run, "build-engine": _build_engine, "info": _info, "build-pyz": _build_pyz}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # a second Ctrl-C, or one before the run installed its handler, ends with 130 and no traceback
    return exit_code_of(lambda: _COMMANDS[args.command](args), "nerveseg-device")


if __name__ == "__main__":
    sys.exit(main())
