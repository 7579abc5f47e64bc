"""Where results go, any combination: masks, overlay video or images, JSON Lines, a window, an MJPEG preview.

Every sink has `write(frame, result, overlay, timing)` and `close()`: `overlay()` renders the picture (once per
frame, for all the sinks that want it) and `timing()` gives the frame's stage times so far. The window and the
preview run in the loop's thread; the file sinks in a background writer, so that encoding overlaps inference.
`Outputs` closes them all at the end, also after a signal or an error, so the MP4 gets its index (playable)
and the JSONL its last line.
"""

from __future__ import annotations

import io
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
from ..core.fileio import describe_os_error, dumps_strict, write_all, write_bytes
from ..pipeline import Result
from ..sources.frame import Frame
from ..timing import Timings
from .mjpeg import MjpegServer
from .overlay import OverlayRenderer


class MaskSink:
    """One mask per frame at the frame's size, 0/255 uint8, named after the frame (PNG or TIFF).

    Encoded in memory and written whole (`fileio.write_bytes`): OpenCV's imwrite reports success for a PNG on a
    full disk and leaves an empty file."""

    def __init__(self, folder: Path, fmt: str = "png"):
        self.folder, self.fmt = _make_folder(folder, "--masks"), fmt
        self._buffers = BufferPool()

    def write(self, frame: Frame, result: Result, overlay, timing) -> None:
        scaled = self._buffers.get("mask255", result.mask.shape, np.uint8)
        np.multiply(result.mask, 255, out=scaled)  # 0/255: visible in any viewer; > 0 is the nerve
        path = self.folder / f"{frame.name}.{self.fmt}"
        if self.fmt == "tif":
            encoded = io.BytesIO()
            tifffile.imwrite(encoded, scaled, compression="zlib")
            data = encoded.getvalue()
        else:
            data = _encode(scaled, ".png", path, "mask")
        write_bytes(path, data, "--masks")

    def close(self) -> None:
        pass


class OverlayImageSink:
    def __init__(self, folder: Path, fmt: str = "jpg"):
        self.folder, self.fmt = _make_folder(folder, "--overlays"), fmt

    def write(self, frame: Frame, result: Result, overlay, timing) -> None:
        path = self.folder / f"{frame.name}.{self.fmt}"
        write_bytes(path, _encode(overlay(), f".{self.fmt}", path, "overlay"), "--overlays")

    def close(self) -> None:
        pass


def _encode(picture: np.ndarray, suffix: str, path: Path, what: str) -> bytes:
    ok, encoded = cv2.imencode(suffix, picture)
    if not ok:
        raise InputError(f"{path}: OpenCV could not encode the {what} as {suffix}")
    return encoded.tobytes()


class VideoWriteError(OSError):
    """A frame could not be added to the overlay video (full disk, file size limit, I/O error)."""


class OverlayVideoSink:
    """A Matroska (.mkv, mp4v) video of the overlays. Opened at the first frame, whose size it keeps.

    Matroska, because a recording cut short (kill -9, power loss) still plays up to its last complete cluster;
    an MP4 plays nothing until its index is written at the end. A failed write ends the recording at once: it is
    reported once, the writer is closed so the frames before stay playable, and the run fails. OpenCV reports
    few failures (FFmpeg buffers its writes, and the flush at release reports nothing; OpenCV 4 reports none),
    so the room left (free space, the file size limit) is also checked every `_CHECK_EVERY` frames and at the end.
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
        room = _out_of_room(self.path) if ok is False or self.frames % self._CHECK_EVERY == 0 else ""
        if ok is False or room:
            self._failed = True
            self.close()  # what was recorded stays playable
            kept = "what reached the disk stays playable" if self.frames else "nothing was recorded; no file is left"
            raise VideoWriteError(f"--video {self.path}: writing frame {self.frames + 1} failed "
                                  f"({room or 'an I/O error or a quota'}); the recording stops there and {kept}")
        self.frames += 1

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.release()  # flushes FFmpeg's buffer, writes Matroska's cues and duration; reports nothing
        self._writer = None
        if self.frames == 0:
            self.path.unlink(missing_ok=True)  # no frame: the file holds at most a header that plays nothing
        elif not self._failed and (room := _out_of_room(self.path)):
            self._failed = True
            raise VideoWriteError(f"--video {self.path}: the last frames may not have reached the disk ({room}); "
                                  "what did stays playable")


def _quiet_opencv_warnings() -> None:
    try:
        from cv2.utils import logging as cv_logging

        cv_logging.setLogLevel(min(cv_logging.getLogLevel(), cv_logging.LOG_LEVEL_ERROR))
    except (ImportError, AttributeError):  # an OpenCV without the logging module: its warnings stay
        pass


def _out_of_room(path: Path) -> str:
    """Why writes to `path` fail or are about to: "no space left on the device" (under 1 MiB free) or "the file
    size limit (RLIMIT_FSIZE) reached"; "" while there is room."""
    try:
        st = os.statvfs(path.parent)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return "no space left on the device"
    except OSError:
        pass
    try:
        import resource  # POSIX only

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and path.stat().st_size >= limit:
            return "the file size limit (RLIMIT_FSIZE) reached"
    except (ImportError, OSError):
        pass
    return ""


class JsonlSink:
    """One JSON object per frame: its name, size, stats and stage timings; each line one write, unbuffered.

    Lines reach the file whole: a write that fails or stops short (full disk, file size limit) is cut back to
    the last complete line, so the file always parses line by line, and the run fails naming the file. (A kill
    -9 can still cut the line being written, which the kernel may stop between pages.)
    """

    def __init__(self, path: Path, overwrite: bool = False):
        path = Path(path)
        _make_folder(path.parent, "--jsonl")
        self.path, self.lines, self._end = path, 0, 0
        # O_EXCL: an existing file is never truncated unless the user said --overwrite (checked before, too)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            self._fd = os.open(path, flags, 0o644)
        except OSError as err:
            raise InputError(f"--jsonl {path}: cannot write ({describe_os_error(err)})") from None

    def write(self, frame: Frame, result: Result, overlay, timing) -> None:
        if self._fd is None:
            return  # cut back after a failed write: no line after the gap
        record = {"frame": frame.index, "name": frame.name, "height": int(frame.image.shape[0]),
                  "width": int(frame.image.shape[1]), **result.stats, "timings_ms": timing()}
        line = (dumps_strict(record, separators=(",", ":")) + "\n").encode()  # NaN -> null: strict JSON
        try:
            write_all(self._fd, line)
        except OSError as err:
            self._cut_back()
            raise InputError(f"--jsonl {self.path}: writing the line of frame {frame.name} failed "
                             f"({describe_os_error(err)}); the file ends at its last complete line "
                             f"({self.lines} lines)") from None
        self._end += len(line)
        self.lines += 1

    def _cut_back(self) -> None:
        """Truncate to the last complete line; a file left empty is removed (it holds no frame)."""
        os.ftruncate(self._fd, self._end)  # shrinking needs no space, also on a full disk
        os.close(self._fd)
        self._fd = None
        if self._end == 0:
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        except OSError as err:
            raise InputError(f"--jsonl {self.path}: the last lines did not reach the disk "
                             f"({describe_os_error(err)})") from None
        finally:
            os.close(fd)


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

    def close(self) -> list[Exception]:
        """Close every sink even if one fails (the others' files still get finished); returns the failures."""
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # collected: the caller reports them after all are closed
                errors.append(err)
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

    def close(self) -> list[Exception]:
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
        """Close every sink. Raises the first failed write, else the first file sink that failed to close (a
        video or JSONL whose last bytes did not reach the disk): a file not complete fails the run."""
        errors = self.live.close()
        if errors:  # a window or preview that closes badly loses nothing
            print("warning: closing outputs: " + "; ".join(f"{type(e).__name__}: {e}" for e in errors),
                  file=sys.stderr)
        if self.files is not None:
            file_errors = self.files.close()
            self.files.raise_failure()  # a write that failed on the last frames still fails the run
            if file_errors:
                raise InputError(str(file_errors[0])) from None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self.close()
        except Exception:
            if exc_type is None:
                raise
            # the run already ends with its own one line; a close failing behind it (the same full disk) adds none


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
