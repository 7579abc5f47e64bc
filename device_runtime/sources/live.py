"""Live sources: a capture thread, a bounded queue that keeps the newest frames, and reopening with backoff.

A camera does not wait for the network: if inference is slower than the frame rate, the oldest queued frame
is dropped (and counted) so that what is shown is always recent. When the stream breaks (cable pulled, RTSP
server restarted) the thread reopens it, waiting 0.5 s, 1 s, 2 s ... up to a limit between tries; the loop
meanwhile sees capture timeouts and keeps running.
"""

from __future__ import annotations

import collections
import re
import sys
import threading
import time
from typing import Callable, Protocol

import cv2
import numpy as np

from ..core.errors import InputError
from .frame import Counters, Frame


class Reader(Protocol):
    """What a live source reads from: cv2.VideoCapture has this shape; tests pass a simulated one."""

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def release(self) -> None: ...


class LiveSource:
    """Frames from a reader, captured in their own thread.

    Args:
        open_reader: returns an open Reader or raises (any exception: the device is not there yet). The
            first call happens here, so a source that never opens is an InputError at start, not a silent wait.
        queue_size: frames held for the loop; a new frame arriving at a full queue pushes out the oldest.
        backoff_s: (first, longest) wait in seconds before reopening after a failure; doubles in between.
    """

    live = True
    finished = False  # a live stream has no end: only a signal or --max-frames stops the run

    def __init__(self, open_reader: Callable[[], Reader], description: str, queue_size: int = 2,
                 backoff_s: tuple[float, float] = (0.5, 8.0), fps: float | None = None):
        self.description, self.fps = description, fps
        self._open_reader, self._backoff = open_reader, backoff_s
        self.counters = Counters()
        try:
            self._reader = open_reader()
        except Exception as err:
            raise InputError(f"source {description}: cannot open ({err})") from None
        self.fps = fps or _reader_fps(self._reader)
        self._queue: collections.deque[Frame] = collections.deque(maxlen=queue_size)
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._capture_loop, name="capture", daemon=True)
        self._thread.start()

    def capture(self, timeout: float | None = 0.5) -> Frame | None:
        """The oldest queued frame, or None if none arrives within `timeout` seconds."""
        with self._ready:
            if not self._queue:
                self._ready.wait(timeout)
            return self._queue.popleft() if self._queue else None

    def _capture_loop(self) -> None:
        reader, delay = self._reader, self._backoff[0]
        while not self._stop.is_set():
            if reader is None:
                reader = self._reopen()
                if reader is None:
                    self._stop.wait(delay)
                    delay = min(2 * delay, self._backoff[1])
                    continue
            started = time.perf_counter()
            ok, image = self._read(reader)
            if not ok:
                self.counters.failures += 1
                _release(reader)
                reader = None
                self._stop.wait(delay)  # do not hammer a device that just failed
                delay = min(2 * delay, self._backoff[1])
                continue
            if image is None or image.ndim < 2 or image.size == 0:
                self.counters.skip(InputError(f"{self.description}: empty frame"))
                continue
            delay = self._backoff[0]
            self._push(image, started)
        _release(reader)

    def _read(self, reader: Reader) -> tuple[bool, np.ndarray | None]:
        try:
            return reader.read()
        except Exception as err:  # a driver error is a failed read: reopen, do not kill the thread
            print(f"warning: {self.description}: read failed ({err})", file=sys.stderr)
            return False, None

    def _reopen(self) -> Reader | None:
        try:
            reader = self._open_reader()
        except Exception as err:
            print(f"warning: {self.description}: reopen failed ({err}); retrying", file=sys.stderr)
            return None
        self.counters.reconnects += 1
        print(f"info: {self.description}: reopened", file=sys.stderr)
        return reader

    def _push(self, image: np.ndarray, started: float) -> None:
        frame = Frame(image, self.counters.read, f"frame_{self.counters.read:06d}", started)
        with self._ready:
            self.counters.read += 1
            if len(self._queue) == self._queue.maxlen:
                self.counters.dropped += 1  # the deque discards the oldest on append
            self._queue.append(frame)
            self._ready.notify()

    def close(self) -> None:
        self._stop.set()
        # a blocked read (a silent RTSP server) may not return soon; the thread is a daemon and releases
        # its reader when it does, so do not wait forever
        self._thread.join(timeout=2.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _reader_fps(reader: Reader) -> float | None:
    get = getattr(reader, "get", None)  # cv2.VideoCapture reports the device's rate; 0 when unknown
    fps = float(get(cv2.CAP_PROP_FPS) or 0.0) if get else 0.0
    return fps if 0 < fps < 1000 else None


def _release(reader: Reader | None) -> None:
    if reader is not None:
        try:
            reader.release()
        except Exception as err:  # releasing a device that already vanished: nothing left to clean up
            print(f"warning: release failed ({err})", file=sys.stderr)


def cv2_video_backends() -> dict[str, bool]:
    """Which of OpenCV's video back-ends this cv2 was built with (pip wheels lack GStreamer)."""
    info = cv2.getBuildInformation()

    def built(name: str) -> bool:
        match = re.search(rf"^\s*{name}:\s*(\S+)", info, re.MULTILINE | re.IGNORECASE)
        return bool(match) and match.group(1).upper() not in ("NO", "NONE")

    return {"gstreamer": built("GStreamer"), "ffmpeg": built("FFMPEG"), "v4l2": built("v4l/v4l2")}


def is_live_spec(spec: str) -> bool:
    return spec.isdigit() or spec.startswith("/dev/video") or _is_stream_url(spec) or _is_gstreamer(spec)


def _is_stream_url(spec: str) -> bool:
    return spec.lower().startswith(("rtsp://", "rtsps://"))


def _is_gstreamer(spec: str) -> bool:
    return "!" in spec and not spec.lower().startswith(("rtsp://", "rtsps://"))


def _opener(spec: str) -> Callable[[], cv2.VideoCapture]:
    """A function that opens `spec` with the right OpenCV back-end and raises if it did not open."""
    if _is_gstreamer(spec):
        if not cv2_video_backends()["gstreamer"]:
            raise InputError(f"source {spec!r} is a GStreamer pipeline, but this cv2 ({cv2.__file__}) has no "
                             "GStreamer support; on a Jetson use the system OpenCV (pip install --no-deps)")
        # appsink hands frames to OpenCV; keeping one buffer and dropping the rest stops the pipeline queueing
        pipeline = spec if "appsink" in spec else f"{spec} ! videoconvert ! appsink drop=true max-buffers=1 sync=false"
        args = (pipeline, cv2.CAP_GSTREAMER)
    elif _is_stream_url(spec):
        # without timeouts a dead RTSP server blocks open/read for about 30 s
        args = (spec, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 5000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000])
    else:
        device = int(spec) if spec.isdigit() else spec
        args = (device, cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY)

    def open_capture() -> cv2.VideoCapture:
        capture = cv2.VideoCapture(*args)
        if not capture.isOpened():
            capture.release()
            raise OSError("OpenCV could not open it; is it connected, and not in use by another program?")
        return capture

    return open_capture


def open_live_source(spec: str, queue_size: int = 2, backoff_s=(0.5, 8.0)) -> LiveSource:
    return LiveSource(_opener(spec), spec, queue_size=queue_size, backoff_s=backoff_s)
