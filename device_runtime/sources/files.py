"""Where frames come from. File sources give every frame in order; live sources give the newest.

`dispatch.open_source(spec)` understands:
    a folder                     every image in it (tif, tiff, png, jpg, jpeg), sorted by name; in the Kaggle 2016
                                 layout, NAME_mask.tif beside NAME.tif is a mask, not a frame: skipped, counted
    a glob ("scans/*.png")       every matching image, sorted (masks skipped as for a folder)
    an image file                one frame; a TIFF gives every page (multi-page TIFF)
    a video file (.mp4, .avi...) every frame
    0, 1, ... or /dev/videoN     a V4L2/USB capture device
    rtsp://...                   an RTSP stream (FFmpeg)
    "... ! appsink"              a GStreamer pipeline (Jetson capture, hardware decode); needs cv2 with GStreamer
    synthetic[:HxW]              generated ultrasound-like frames (bench, soaks)

A frame that cannot be decoded is counted and skipped. The end of a file source ends the run; a live source
that fails is reopened with backoff (see `live.LiveSource`).
"""

from __future__ import annotations

import glob
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from ..core.errors import InputError
from ..core.imageio import IMAGE_SUFFIXES, TIFF_SUFFIXES, iter_tiff_page_results, read_image
from .frame import Counters, Frame

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".ts", ".h264")

Item = tuple[str, "np.ndarray | InputError"]  # (frame name, the decoded image or why it could not be decoded)


_END = object()  # the producer's last item


class FileSource:
    """Frames from files, in order, none dropped: a folder, a glob, a (multi-page) TIFF, a video, or generated.

    A reader thread decodes up to `read_ahead` frames ahead (OpenCV and zlib release the GIL), so decoding the
    next frame overlaps the network's work on this one; the queue is bounded, so memory stays flat.

    Args:
        open_items: returns a fresh iterator over the frames; called again at the end when `loop` is set.
        description: for messages and the summary.
        fps: the file's frame rate where it has one (videos), for the overlay video.
    """

    live = False

    def __init__(self, open_items: Callable[[], Iterator[Item]], description: str, fps: float | None = None,
                 loop: bool = False, read_ahead: int = 4):
        self._open_items, self.description, self.fps, self.loop = open_items, description, fps, loop
        self.counters = Counters()
        self.finished = False
        self._queue: queue.Queue = queue.Queue(maxsize=read_ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="read-ahead", daemon=True)
        self._thread.start()

    def capture(self, timeout: float | None = None) -> Frame | None:
        """The next decodable frame, or None at the end (then `finished` is set). Every frame comes, in order.

        A file frame's `captured_at` is when the loop asked for it: its end-to-end time is the time the loop
        spent on it, not how long it waited, decoded, in the read-ahead queue.
        """
        started = time.perf_counter()
        while not self.finished:
            item = self._queue.get()
            if item is _END:
                self.finished = True
                break
            name, image = item
            if isinstance(image, InputError):
                self.counters.skip(image)
            elif isinstance(image, BaseException):
                raise image  # not bad input but a fault in reading: surface it in the loop's thread
            else:
                self.counters.read += 1
                return Frame(image, self.counters.read - 1, name, started)
        return None

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                had_frames = False
                for name, image in self._open_items():  # decoding happens inside this iteration
                    had_frames = had_frames or not isinstance(image, Exception)
                    if not self._put((name, image)):
                        return
                # a pass without a single good frame would loop forever without output: end instead
                if not (self.loop and had_frames):
                    return
        except Exception as err:  # handed to the loop, which raises it
            self._put(("", err))
        finally:
            self._put(_END)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)  # the generator's finally (an open video or TIFF) runs in that thread

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _image_files(paths: list[Path]) -> Iterator[Item]:
    """One frame per file; a TIFF in a folder gives its first page, as training reads it."""
    for path in paths:
        try:
            yield path.stem, read_image(path)
        except InputError as err:
            yield path.stem, err


def _tiff_pages(path: Path) -> Iterator[Item]:
    for index, image in enumerate(iter_tiff_page_results(path)):
        yield f"{path.stem}_p{index:05d}", image


def _video_frames(path: Path) -> Iterator[Item]:
    """Every frame of a video file. A failed read before the frame count is reached is a bad frame, not the end."""
    capture = cv2.VideoCapture(str(path))
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    index, failures = 0, 0
    try:
        while True:
            ok, image = capture.read()
            if ok and image is not None and image.size:
                failures = 0
                yield f"frame_{index:06d}", image
            else:
                failures += 1
                # the frame count of a container is an estimate: after 3 failures in a row, call it the end
                if index >= count - 1 or failures >= 3:
                    return
                yield f"frame_{index:06d}", InputError(f"{path}: cannot decode frame {index}")
            index += 1
    finally:
        capture.release()


def synthetic_frames(height: int, width: int, count: int = 8, seed: int = 0) -> list[np.ndarray]:
    """Ultrasound-like uint8 frames: speckle, depth attenuation and a bright elliptical 'nerve' that moves."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(1.0, 0.35, height, dtype=np.float32)[:, None]
    frames = []
    for i in range(count):
        speckle = rng.rayleigh(0.25, (height, width)).astype(np.float32) * depth
        centre = (int(width * (0.3 + 0.4 * i / max(count - 1, 1))), height // 2)
        blob = np.zeros((height, width), np.uint8)
        cv2.ellipse(blob, centre, (max(width // 10, 2), max(height // 14, 2)), 15, 0, 360, 1, -1)
        frames.append(np.clip(255 * (speckle + 0.5 * blob), 0, 255).astype(np.uint8))
    return frames


def _cycle(frames: list[np.ndarray]) -> Iterator[Item]:
    index = 0
    while True:
        yield f"frame_{index:06d}", frames[index % len(frames)]
        index += 1


def synthetic_source(spec: str) -> FileSource:
    match = re.fullmatch(r"synthetic(?::(\d+)x(\d+))?", spec)
    if not match:
        raise InputError(f"source {spec!r}: write synthetic or synthetic:HEIGHTxWIDTH, e.g. synthetic:420x580")
    height, width = (int(match.group(1)), int(match.group(2))) if match.group(1) else (420, 580)
    if height < 2 or width < 2:
        raise InputError(f"source {spec!r}: frames must be at least 2x2")
    frames = synthetic_frames(height, width)
    return FileSource(lambda: _cycle(frames), f"synthetic {height}x{width}")


def _sorted_images(paths, spec: str) -> list[Path]:
    """The image files among `paths`, sorted, without the Kaggle layout's masks (NAME_mask.ext beside NAME.ext,
    as training.data pairs them); one line on stderr says how many masks were left out."""
    images = sorted(p for p in map(Path, paths) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    frames = {(p.parent, p.stem) for p in images}
    masks = [p for p in images if p.stem.endswith("_mask") and (p.parent, p.stem[:-len("_mask")]) in frames]
    if masks:
        print(f"info: --source {spec}: {len(masks)} mask files (NAME_mask beside NAME, the Kaggle layout) skipped; "
              f"{len(images) - len(masks)} frames", file=sys.stderr, flush=True)
    skipped = set(masks)
    return [p for p in images if p not in skipped]


def _no_images(path: Path) -> str:
    """Why a folder gave no frames, and where they may be (a dataset root with images/ beside masks/)."""
    hint = f"; its frames may be in {path / 'images'}" if (path / "images").is_dir() else ""
    return f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)}){hint}"


def file_source(spec: str, loop: bool) -> FileSource:
    path = Path(spec)
    if path.is_dir():
        files = _sorted_images(path.iterdir(), spec)
        if not files:
            raise InputError(_no_images(path))
        return FileSource(lambda: _image_files(files), f"folder {path} ({len(files)} files)", loop=loop)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TIFF_SUFFIXES:
            probe = iter_tiff_page_results(path)  # raises now if the file is no TIFF at all
            next(probe, None)
            probe.close()
            return FileSource(lambda: _tiff_pages(path), f"TIFF {path}", loop=loop)
        if suffix in IMAGE_SUFFIXES:
            return FileSource(lambda: _image_files([path]), f"image {path}", loop=loop)
        if suffix in VIDEO_SUFFIXES:
            return _video_source(path, loop)
        raise InputError(f"{path}: unknown source type {suffix!r}; expected an image, a TIFF, a video "
                         f"({', '.join(VIDEO_SUFFIXES)}) or a folder")
    if glob.has_magic(spec):
        files = _sorted_images(glob.glob(os.path.expanduser(spec), recursive=True), spec)
        if not files:
            raise InputError(f"source {spec!r}: the pattern matches no images ({', '.join(IMAGE_SUFFIXES)})")
        return FileSource(lambda: _image_files(files), f"glob {spec} ({len(files)} files)", loop=loop)
    raise InputError(f"source {spec!r}: no such file or folder (nor a device, rtsp:// URL or GStreamer pipeline)")


def _video_source(path: Path, loop: bool) -> FileSource:
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise InputError(f"{path}: cannot open video (OpenCV's FFmpeg backend could not read it)")
        fps = capture.get(cv2.CAP_PROP_FPS) or None
    finally:
        capture.release()
    return FileSource(lambda: _video_frames(path), f"video {path}", fps=fps, loop=loop)

