"""Frame sources: every kind that can run here, undecodable frames, and a live source that fails and recovers."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import tifffile

from device_helpers import disc_frame
from device_runtime.core.errors import InputError
from device_runtime.sources.dispatch import open_source
from device_runtime.sources.live import LiveSource, is_live_spec


def drain(source, limit: int = 1000) -> list:
    frames = []
    with source:
        while len(frames) < limit:
            frame = source.capture(0.5)
            if frame is None:
                if source.finished:
                    break
                continue
            frames.append(frame)
    return frames


@pytest.fixture
def image_folder(tmp_path):
    """Three frames of different kinds: 8-bit grey PNG, 16-bit TIFF, colour JPG."""
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), disc_frame())
    tifffile.imwrite(folder / "b.tif", disc_frame(dtype=np.uint16))
    cv2.imwrite(str(folder / "c.jpg"), disc_frame(colour=True))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_gives_every_image_in_name_order(image_folder):
    frames = drain(open_source(str(image_folder)))
    assert [f.name for f in frames] == ["a", "b", "c"]
    assert [f.index for f in frames] == [0, 1, 2]
    assert frames[1].image.dtype == np.uint16 and frames[2].image.shape == (48, 64, 3)


def test_kaggle_masks_beside_their_frames_are_skipped_by_name_and_counted(tmp_path, capsys):
    folder = tmp_path / "kaggle"
    folder.mkdir()
    for name in ("1_1", "1_2", "2_1"):
        tifffile.imwrite(folder / f"{name}.tif", disc_frame())
        tifffile.imwrite(folder / f"{name}_mask.tif", (disc_frame() > 100).astype(np.uint8) * 255)
    tifffile.imwrite(folder / "scan_mask.tif", disc_frame())  # no scan.tif beside it: a frame of that name
    for spec in (str(folder), str(folder / "*.tif")):
        frames = drain(open_source(spec))
        assert [f.name for f in frames] == ["1_1", "1_2", "2_1", "scan_mask"]
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"info: --source {spec}: 3 mask files (NAME_mask beside NAME, the Kaggle layout) skipped; "
                       "4 frames"]


def test_a_dataset_root_points_at_its_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(InputError, match=f"holds no images .*; its frames may be in {tmp_path / 'images'}"):
        open_source(str(tmp_path))


def test_glob_selects_matching_files(image_folder):
    frames = drain(open_source(str(image_folder / "*.png")))
    assert [f.name for f in frames] == ["a"]


def test_multi_page_tiff_gives_every_page(tmp_path):
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as tif:
        for i in range(4):
            tif.write(disc_frame(dtype=np.uint16, centre=(10 + 5 * i, 20)), photometric="minisblack")
    frames = drain(open_source(str(path)))
    assert [f.name for f in frames] == [f"stack_p{i:05d}" for i in range(4)]
    assert all(f.image.shape == (48, 64) and f.image.dtype == np.uint16 for f in frames)
    assert not np.array_equal(frames[0].image, frames[3].image)


def test_video_file_gives_every_frame(tmp_path):
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    for i in range(7):
        writer.write(disc_frame(colour=True, centre=(10 + 5 * i, 24)))
    writer.release()
    source = open_source(str(path))
    assert source.fps == pytest.approx(10.0)
    frames = drain(source)
    assert len(frames) == 7 and frames[0].image.shape == (48, 64, 3)
    assert source.counters.undecodable == 0


def test_undecodable_frame_is_counted_and_skipped(image_folder, capsys):
    (image_folder / "b2.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    source = open_source(str(image_folder))
    frames = drain(source)
    assert [f.name for f in frames] == ["a", "b", "c"]
    assert source.counters.undecodable == 1 and source.counters.read == 3
    assert "b2.png" in capsys.readouterr().err


def test_loop_starts_a_file_source_again(image_folder):
    frames = drain(open_source(str(image_folder), loop=True), limit=8)
    assert [f.name for f in frames][:6] == ["a", "b", "c", "a", "b", "c"] and len(frames) == 8


def test_synthetic_source_has_the_asked_size():
    frames = drain(open_source("synthetic:30x40"), limit=3)
    assert len(frames) == 3 and frames[0].image.shape == (30, 40)


@pytest.mark.parametrize("spec, needle", [
    ("missing_folder", "no such file or folder"),
    ("*.nothing", "matches no images"),
    ("synthetic:abc", "synthetic:HEIGHTxWIDTH"),
])
def test_bad_source_is_a_clear_error(tmp_path, monkeypatch, spec, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=needle):
        open_source(spec)


def test_empty_folder_and_unknown_file_are_errors(tmp_path):
    with pytest.raises(InputError, match="holds no images"):
        open_source(str(tmp_path))
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(InputError, match="unknown source type"):
        open_source(str(tmp_path / "model.onnx"))
    (tmp_path / "broken.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(InputError, match="cannot open TIFF"):
        open_source(str(tmp_path / "broken.tif"))


@pytest.mark.parametrize("spec, live", [("0", True), ("/dev/video2", True), ("rtsp://10.0.0.2/stream", True),
                                        ("nvarguscamerasrc ! nvvidconv ! appsink", True), ("frames/*.png", False),
                                        ("clip.mp4", False)])
def test_live_specs_are_recognised(spec, live):
    assert is_live_spec(spec) is live


class SimulatedCamera:
    """A generator-backed camera: the first opening delivers `first` frames and then breaks, the next opening
    fails, the one after works for good. Also a frame that arrives empty (undecodable)."""

    def __init__(self, first: int = 5, interval_s: float = 0.002):
        self.openings = 0
        self.first, self.interval_s = first, interval_s

    def open(self):
        self.openings += 1
        if self.openings == 2:
            raise OSError("device busy")  # the reopen fails once: backoff, then try again
        return _Reader(self._frames(self.openings == 1), self.interval_s)

    def _frames(self, breaks: bool):
        for index in range(10**9):
            if breaks and index == self.first:
                return
            yield None if index == 2 else disc_frame(centre=(10 + index % 40, 24))


class _Reader:
    def __init__(self, frames, interval_s):
        self.frames, self.interval_s = frames, interval_s

    def read(self):
        time.sleep(self.interval_s)
        frame = next(self.frames, False)
        if frame is False:
            return False, None  # the stream broke
        return True, frame if frame is not None else np.empty((0,), np.uint8)

    def release(self):
        pass


def test_live_source_reopens_with_backoff_and_goes_on():
    camera = SimulatedCamera()
    source = LiveSource(camera.open, "simulated", queue_size=4, backoff_s=(0.01, 0.05))
    frames = drain(source, limit=12)
    assert len(frames) == 12
    assert camera.openings == 3
    assert source.counters.failures == 1 and source.counters.reconnects == 1
    assert source.counters.undecodable >= 1
    assert [f.index for f in frames] == sorted(f.index for f in frames)


def test_live_source_keeps_the_newest_frames_and_counts_drops():
    source = LiveSource(SimulatedCamera(first=10**9, interval_s=0.001).open, "fast", queue_size=2)
    try:
        time.sleep(0.3)  # the loop is busy: frames pile up and the oldest are dropped
        frame = source.capture(1.0)
        read_before = source.counters.read
    finally:
        source.close()
    assert source.counters.dropped > 10
    assert frame.index >= read_before - 3  # one of the newest, not the first frame captured


def test_live_source_that_never_opens_is_an_error():
    def never():
        raise OSError("no such device")

    with pytest.raises(InputError, match="cannot open"):
        LiveSource(never, "/dev/video9")


def test_live_capture_times_out_without_frames():
    class Silent:
        def read(self):
            time.sleep(0.05)
            return True, np.empty((0,), np.uint8)  # frames arrive, but none decodes

        def release(self):
            pass

    with LiveSource(Silent, "silent") as source:
        started = time.perf_counter()
        assert source.capture(0.1) is None
        assert 0.09 < time.perf_counter() - started < 1.0
        assert not source.finished


def test_live_source_over_a_real_opencv_reader_reopens_at_the_end(tmp_path):
    """cv2.VideoCapture behind the live machinery: the clip ending is a stream failure, reopening replays it."""
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    for i in range(3):
        writer.write(disc_frame(colour=True, centre=(10 + 5 * i, 24)))
    writer.release()

    def open_clip():
        capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            raise OSError("cannot open")
        return capture

    source = LiveSource(open_clip, "clip as a camera", queue_size=16, backoff_s=(0.01, 0.02))
    assert source.fps == pytest.approx(10.0)
    frames = drain(source, limit=7)
    assert len(frames) == 7 and frames[0].image.shape == (48, 64, 3)
    assert source.counters.failures >= 2 and source.counters.reconnects >= 2
