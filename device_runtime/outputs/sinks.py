"""Where results go, any combination: masks, overlay video or images, JSON Lines, a window, an MJPEG preview.

Every sink has `write(frame, result, overlay, timing)` and `close()`: `overlay()` renders the picture (once per
frame, for all the sinks that want it) and `timing()` gives the frame's stage times so far. The window and the
preview run in the loop's thread; the file sinks in a background writer, so that encoding overlaps inference.
`Outputs` closes them all at the end, also after a signal or an error, so the MP4 gets its index (playable)
and the JSONL its last line.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import tifffile

from ..buffers import BufferPool
from ..config import RunConfig
from ..core.errors import InputError
from ..core.fileio import describe_os_error, dumps_strict
from ..pipeline import Result
from ..sources.frame import Frame
from ..timing import Timings
from .mjpeg import MjpegServer
from .overlay import OverlayRenderer


class MaskSink:
    """One mask per frame at the frame's size, 0/255 uint8, named after the frame (PNG or TIFF)."""

    def __init__(self, folder: Path, fmt: str = "png"):
        self.folder, self.fmt = _make_folder(folder, "--masks"), fmt
        self._buffers = BufferPool()

    def write(self, frame: Frame, result: Result, overlay, timing) -> None:
        scaled = self._buffers.get("mask255", result.mask.shape, np.uint8)
        np.multiply(result.mask, 255, out=scaled)  # 0/255: visible in any viewer; > 0 is the nerve
        path = self.folder / f"{frame.name}.{self.fmt}"
        if self.fmt == "tif":
            tifffile.imwrite(path, scaled, compression="zlib")
        elif not cv2.imwrite(str(path), scaled):
            raise OSError(f"{path}: could not write the mask")

    def close(self) -> None:
        pass


class OverlayImageSink:
    def __init__(self, folder: Path, fmt: str = "jpg"):
        self.folder, self.fmt = _make_folder(folder, "--overlays"), fmt

    def write(self, frame: Frame, result: Result, overlay, timing) -> None:
        path = self.folder / f"{frame.name}.{self.fmt}"
        if not cv2.imwrite(str(path), overlay()):
            raise OSError(f"{path}: could not write the overlay")

    def close(self) -> None:
        pass


class VideoWriteError(OSError):
    """A frame could not be added to the overlay video (full disk, file size limit, I/O error)."""


class OverlayVideoSink:
    """A Matroska (.mkv, mp4v) video of the overlays. Opened at the first frame, whose size it keeps.

    Matroska, because a recording cut short (kill -9, power loss) still plays up to its last complete cluster;
    an MP4 plays nothing until its index is written at the end. A failed write (OpenCV >= 5 reports it) ends
    the recording at once: it is reported once, the writer is closed so the frames before stay playable, and the
    run fails. OpenCV 4 does not report failures, so there the free space is checked every `_CHECK_EVERY` frames.
    """

    _CHECK_EVERY = 25

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = Path(path), fps
        _make_folder(self.path.parent, "--video")
        self._writer = None
        self._size = None
        self._failed = False
        self.frames = 0

    def write(self, frame: Frame, result: Result, overlay, timing) -> None:
        picture = overlay()
        if self._failed:
            return  # the recording ended at a failure; reopening would truncate what it holds
        if self._writer is None:
            self._size = (picture.shape[1], picture.shape[0])
            _quiet_opencv_warnings()  # a failed write is reported by us, once; not by OpenCV, per frame
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self._size)
            if not self._writer.isOpened():
                raise InputError(f"--video {self.path}: cannot write a video here (OpenCV's video writer refused it)")
        if (picture.shape[1], picture.shape[0]) != self._size:
            picture = cv2.resize(picture, self._size, interpolation=cv2.INTER_AREA)
        ok = self._writer.write(picture)  # OpenCV >= 5: a bool; OpenCV 4: None (no report)
        if ok is False or (ok is None and self.frames % self._CHECK_EVERY == 0 and _disk_full(self.path)):
            self.close()  # what was recorded stays playable
            self._failed = True
            raise VideoWriteError(f"--video {self.path}: writing frame {self.frames + 1} failed "
                                  f"({_write_failure_reason(self.path)}); the recording stops there and what "
                                  "reached the disk stays playable")
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()  # writes Matroska's cues and duration; without them the file still plays
            self._writer = None


def _quiet_opencv_warnings() -> None:
    try:
        from cv2.utils import logging as cv_logging

        cv_logging.setLogLevel(min(cv_logging.getLogLevel(), cv_logging.LOG_LEVEL_ERROR))
    except (ImportError, AttributeError):  # an OpenCV without the logging module: its warnings stay
        pass


def _disk_full(path: Path) -> bool:
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def _write_failure_reason(path: Path) -> str:
    return "no space left on the device" if _disk_full(path) else "file size limit, quota or I/O error"


class JsonlSink:
    """One JSON object per frame: its name, size, stats and stage timings; flushed line by line."""

    def __init__(self, path: Path, overwrite: bool = False):
        path = Path(path)
        _make_folder(path.parent, "--jsonl")
        self.path = path
        try:  # "x": an existing file is never truncated unless the user said --overwrite (checked before, too)
            self._file = open(path, "w" if overwrite else "x", encoding="utf-8", buffering=1)  # a crash loses no line
        except OSError as err:
            raise InputError(f"--jsonl {path}: cannot write ({describe_os_error(err)})") from None

    def write(self, frame: Frame, result: Result, overlay, timing) -> None:
        record = {"frame": frame.index, "name": frame.name, "height": int(frame.image.shape[0]),
                  "width": int(frame.image.shape[1]), **result.stats, "timings_ms": timing()}
        self._file.write(dumps_strict(record, separators=(",", ":")) + "\n")  # NaN -> null: strict JSON

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class WindowSink:
    """A desktop window (needs a display and an OpenCV with GUI support). q or Esc stops the run."""

    def __init__(self, stop: threading.Event, title: str = "nerveseg"):
        reason = display_unavailable()
        if reason:
            raise InputError(f"--show: {reason}; use --mjpeg-port for a headless preview")
        self._stop, self._title = stop, title

    def write(self, frame: Frame, result: Result, overlay, timing) -> None:
        cv2.imshow(self._title, overlay())
        if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            self._stop.set()

    def close(self) -> None:
        cv2.destroyAllWindows()


class MjpegSink:
    def __init__(self, host: str, port: int):
        self.server = MjpegServer(host, port)
        print(f"info: MJPEG preview at {self.server.url}", file=sys.stderr, flush=True)

    def write(self, frame: Frame, result: Result, overlay, timing) -> None:
        if self.server.wants_frames():
            self.server.publish(overlay())

    def close(self) -> None:
        self.server.close()


class SinkGroup:
    """Sinks written in turn. The overlay is rendered at most once per frame, and only if a sink asks for it."""

    def __init__(self, sinks: list):
        self.sinks = sinks
        self._renderer = OverlayRenderer()  # one per group: each group's thread has its own buffers

    def write(self, frame: Frame, result: Result, timing: Callable[[], dict]) -> None:
        picture = None

        def overlay() -> np.ndarray:
            nonlocal picture
            if picture is None:
                picture = self._renderer.render(frame.image, result.mask, result.stats)
            return picture

        for sink in self.sinks:
            sink.write(frame, result, overlay, timing)

    def close(self) -> list[str]:
        """Close every sink even if one fails (the others' files still get finished); returns the failures."""
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # collected: the caller reports them after all are closed
                errors.append(f"{type(sink).__name__}: {err}")
        return errors


class BackgroundWriter:
    """Runs the file sinks in their own thread: PNG, JPEG and MP4 encoding overlap the next frame's inference.

    The queue is bounded, so memory stays flat; when the disk is slower than the network the loop waits (as
    output time) and nothing is lost. A failure in the thread (a full disk) stops the run at the next frame.
    """

    def __init__(self, group: SinkGroup, depth: int = 4):
        self.group = group
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._failed = False  # stays set once a write failed: frames still queued are dropped, never written
        self._thread = threading.Thread(target=self._drain, name="outputs", daemon=True)
        self._thread.start()

    def write(self, frame: Frame, result: Result, timing: Callable[[], dict]) -> None:
        self.raise_failure()
        # the segmenter reuses its buffers for the next frame: the thread gets its own copies (a few 100 kB)
        copied = Result(result.mask.copy(), result.model_mask.copy(), result.prob.copy(), result.stats)
        times = timing()  # the frame's times as it is handed over
        self._queue.put((frame, copied, times))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if not self._failed:
                frame, result, times = item
                try:
                    self.group.write(frame, result, lambda: times)
                except Exception as err:  # handed to the loop's thread, which raises it
                    self._error, self._failed = err, True

    def raise_failure(self) -> None:
        err, self._error = self._error, None
        if err is None:
            return
        if isinstance(err, InputError):
            raise err
        if isinstance(err, OSError):
            raise InputError(f"writing outputs failed: {err}") from None
        raise err

    def close(self) -> list[str]:
        self._queue.put(None)
        self._thread.join()
        return self.group.close()


class Outputs:
    """All outputs of a run: window and preview in the loop's thread, files in a background writer."""

    def __init__(self, live_sinks: list, file_sinks: list):
        self.live = SinkGroup(live_sinks)
        self.files = BackgroundWriter(SinkGroup(file_sinks)) if file_sinks else None

    def write(self, frame: Frame, result: Result, timings: Timings) -> None:
        started = time.perf_counter()

        def timing() -> dict:
            # the frame's stages so far; "output" is the time spent on outputs before this call
            ms = timings.current_ms(frame.captured_at)
            ms["output"] = round(1e3 * (time.perf_counter() - started), 3)
            return ms

        self.live.write(frame, result, timing)
        if self.files is not None:
            self.files.write(frame, result, timing)

    def close(self) -> None:
        errors = self.live.close() + (self.files.close() if self.files is not None else [])
        if errors:
            print("warning: closing outputs: " + "; ".join(errors), file=sys.stderr)
        if self.files is not None:
            self.files.raise_failure()  # a write that failed on the last frames still fails the run

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_outputs(cfg: RunConfig, source_fps: float | None, stop: threading.Event) -> Outputs:
    """The sinks `cfg` asks for, opened now (a bad path fails before the first frame); JSONL last among the
    files, so that a frame's line is written after its mask and overlay. The caller has checked the paths
    (`guard.check_outputs`: the runner does, once, before the backend opens)."""
    live, files = [], []
    try:
        if cfg.show:
            live.append(WindowSink(stop))
        if cfg.mjpeg_port is not None:
            live.append(MjpegSink(cfg.host, cfg.mjpeg_port))
        if cfg.masks_dir:
            files.append(MaskSink(cfg.masks_dir, cfg.mask_format))
        if cfg.overlay_dir:
            files.append(OverlayImageSink(cfg.overlay_dir, cfg.overlay_format))
        if cfg.overlay_video:
            files.append(OverlayVideoSink(cfg.overlay_video, cfg.video_fps or source_fps or 25.0))
        if cfg.jsonl:
            files.append(JsonlSink(cfg.jsonl, cfg.overwrite))
    except BaseException:
        SinkGroup(live + files).close()  # a later sink failed to open: close the ones already open
        raise
    return Outputs(live, files)


def display_unavailable() -> str:
    """Why a window cannot open here, or "" if it can."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (DISPLAY is not set)"
    gui = next((line.split(":", 1)[1].strip() for line in cv2.getBuildInformation().splitlines()
                if line.strip().startswith("GUI:")), "")
    if gui.upper() in ("NONE", "NO"):
        return f"this OpenCV ({cv2.__file__}) is built without GUI support (a headless wheel)"
    return ""


def _make_folder(folder: Path, flag: str) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{flag} {folder}: cannot create the folder ({err.strerror or err})") from None
    return folder
