"""The one configuration of a device run, built once from the command line and passed down.

Nothing below `cli.py` reads `sys.argv` or environment switches: a module takes a `RunConfig` (or the few
fields it needs) and nothing else, so a test or the benchmark script can build one directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .core.errors import InputError
from .core.temporal import TemporalParams

BACKENDS = ("auto", "tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu")
PRECISIONS = ("auto", "fp32", "fp16", "int8")  # what runs; "auto" picks per backend (see backends.select_model)
MASK_FORMATS = ("png", "tif")
OVERLAY_FORMATS = ("png", "jpg")


@dataclass(frozen=True)
class RunConfig:
    """Everything `run`, `bench` and `build-engine` need.

    Attributes (the less obvious ones):
        source: what `sources.open_source` understands: a folder, a glob, an image or (multi-page) TIFF, a video
            file, a capture device index or /dev/videoN, an rtsp:// URL, a GStreamer pipeline ("... ! appsink"),
            or "synthetic[:HxW]" (generated frames, as `bench` uses).
        loop: start a file source again at its end (soaks, demos); live sources never end by themselves.
        max_frames: stop after this many processed frames (None = until the source ends or a signal).
        warmup: frames processed but left out of the timing statistics (first-run allocations, lazy init).
        queue_size: frames a live source may hold; when full the oldest is dropped (latest-frame policy).
        capture_timeout_s: how long one capture waits for a live frame before the loop checks for a stop.
        engine_cache: folder for TensorRT engines (None = the bundle folder).
        report_every: print a timing line every N frames (0 = only the summary at the end).
        temporal: settings of `temporal.TemporalParams` that replace the bundle's (e.g. {"enabled": True}).
    """

    bundle: Path
    source: str = "synthetic"
    backend: str = "auto"
    precision: str = "auto"
    threads: int = 0  # ONNX Runtime intra-op threads; 0 lets ONNX Runtime choose (one per physical core)
    loop: bool = False
    max_frames: int | None = None
    warmup: int = 0
    queue_size: int = 2
    capture_timeout_s: float = 0.5
    reconnect_backoff_s: tuple[float, float] = (0.5, 8.0)  # first and longest wait before reopening a live source
    pixel_spacing_mm: float | None = None
    masks_dir: Path | None = None
    mask_format: str = "png"
    overlay_video: Path | None = None
    overlay_dir: Path | None = None
    overlay_format: str = "jpg"
    video_fps: float | None = None  # None = the source's own rate, or 25 when it has none
    jsonl: Path | None = None
    summary_json: Path | None = None
    show: bool = False
    mjpeg_port: int | None = None
    host: str = "127.0.0.1"  # the MJPEG preview is private to the device unless asked otherwise
    report_every: int = 0
    engine_cache: Path | None = None
    workspace_mib: int = 1024
    quiet: bool = False
    overwrite: bool = False  # replace existing output files / write into non-empty output folders (output_guard)
    temporal: dict = field(default_factory=dict)

    def __post_init__(self):
        TemporalParams().with_overrides(**self.temporal)  # each value checked now; against T* when the bundle loads
        _check_choice("--backend", self.backend, BACKENDS)
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_choice("--mask-format", self.mask_format, MASK_FORMATS)
        _check_choice("--overlay-format", self.overlay_format, OVERLAY_FORMATS)
        _check_positive("--pixel-spacing", self.pixel_spacing_mm, allow_none=True)
        _check_positive("--video-fps", self.video_fps, allow_none=True)
        _check_positive("--capture-timeout", self.capture_timeout_s)
        for name, value in (("--max-frames", self.max_frames), ("--queue", self.queue_size)):
            if value is not None and value < 1:
                raise InputError(f"{name} must be at least 1, got {value}")
        for name, value in (("--warmup", self.warmup), ("--threads", self.threads),
                            ("--report-every", self.report_every)):
            if value < 0:
                raise InputError(f"{name} must be 0 or more, got {value}")
        if self.mjpeg_port is not None and not 0 <= self.mjpeg_port <= 65535:
            raise InputError(f"--mjpeg-port must lie in 0..65535 (0 = any free port), got {self.mjpeg_port}")
        if self.workspace_mib < 16:
            raise InputError(f"--workspace must be at least 16 MiB, got {self.workspace_mib}")


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{flag} {value!r} is not one of {', '.join(choices)}")


def _check_positive(flag: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise InputError(f"{flag} must be a positive number, got {value}")
