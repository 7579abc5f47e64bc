"""Outputs: masks (PNG, TIFF), overlay images and MP4, JSON Lines, summary, MJPEG preview, the window check."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest
import tifffile

from device_helpers import disc_frame, make_bundle
from device_runtime.config import RunConfig
from device_runtime.core.errors import InputError
from device_runtime.outputs.mjpeg import MjpegServer
from device_runtime.outputs.overlay import OverlayRenderer
from device_runtime.outputs.sinks import Outputs, WindowSink
from device_runtime.runner import run
from device_runtime.sources.files import FileSource
from device_runtime.timing import STAGES

SIZES = [(48, 64), (48, 64), (60, 50), (48, 64)]  # one frame of another size: outputs follow each frame


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def frames():
    kinds = [dict(), dict(dtype=np.uint16), dict(colour=True), dict()]
    return [disc_frame(h, w, centre=(20 + i, 24), **kind) for i, ((h, w), kind) in enumerate(zip(SIZES, kinds))]


def source():
    return FileSource(lambda: iter([(f"f{i}", f) for i, f in enumerate(frames())]), "test frames", fps=12.0)


@pytest.fixture(scope="module")
def outputs_run(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    cfg = RunConfig(bundle=bundle, backend="ort-cpu", masks_dir=out / "masks", overlay_dir=out / "overlays",
                    overlay_video=out / "video" / "overlay.mkv", jsonl=out / "frames.jsonl",
                    summary_json=out / "summary.json", mjpeg_port=0, pixel_spacing_mm=0.2, quiet=True)
    return out, run(cfg, source=source())


def test_masks_at_each_frames_size(outputs_run):
    out, _ = outputs_run
    for i, size in enumerate(SIZES):
        mask = cv2.imread(str(out / "masks" / f"f{i}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == size and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}


def test_tiff_masks(bundle, tmp_path):
    run(RunConfig(bundle=bundle, masks_dir=tmp_path, mask_format="tif", quiet=True), source=source())
    mask = tifffile.imread(tmp_path / "f2.tif")
    assert mask.shape == SIZES[2] and mask.max() == 255


def test_overlay_images(outputs_run):
    out, _ = outputs_run
    for i, size in enumerate(SIZES):
        picture = cv2.imread(str(out / "overlays" / f"f{i}.jpg"))
        assert picture.shape == (*size, 3)


def test_overlay_video_plays_back(outputs_run):
    out, _ = outputs_run
    capture = cv2.VideoCapture(str(out / "video" / "overlay.mkv"))
    assert capture.isOpened() and capture.get(cv2.CAP_PROP_FPS) == pytest.approx(12.0)
    read = []
    while True:
        ok, picture = capture.read()
        if not ok:
            break
        read.append(picture)
    capture.release()
    assert len(read) == len(SIZES) and all(p.shape == (48, 64, 3) for p in read)  # the first frame's size


def test_jsonl_has_stats_and_timings_of_every_frame(outputs_run):
    out, summary = outputs_run
    records = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
    for record, (height, width) in zip(records, SIZES):
        assert (record["height"], record["width"]) == (height, width)
        assert record["area_px"] > 100 and record["components"] == 1
        assert record["area_mm2"] == pytest.approx(record["area_px"] * 0.04)
        assert len(record["centroid"]) == 2 and len(record["bbox"]) == 4
        assert 0.5 < record["mean_prob"] <= 1 and 0 <= record["uncertainty"] <= 1
        assert set(record["timings_ms"]) == {*STAGES, "end_to_end"}
    assert summary["frames"] == 4


def test_summary_json(outputs_run):
    out, _ = outputs_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 4 and summary["stopped_by"] == "end of source"
    assert {"p50", "p90", "p99", "max"} <= set(summary["timing"]["stages_ms"]["inference"])
    assert summary["timing"]["fps"] > 0 and 0 <= summary["timing"]["outside_inference"] <= 1


def test_mjpeg_preview_serves_on_localhost():
    server = MjpegServer(port=0)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        assert server._server.server_address[0] == "127.0.0.1"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(server.url + "frame.jpg", timeout=5)  # 503: nothing published yet
        picture = OverlayRenderer().render(disc_frame(), (disc_frame() > 128).astype(np.uint8))
        server.publish(picture)
        with urllib.request.urlopen(server.url + "frame.jpg", timeout=5) as reply:
            decoded = cv2.imdecode(np.frombuffer(reply.read(), np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == (48, 64, 3)
        with urllib.request.urlopen(server.url + "stream.mjpg", timeout=5) as reply:
            assert reply.headers["Content-Type"].startswith("multipart/x-mixed-replace")
            head = reply.read(200)
        assert head.startswith(b"--nervesegframe\r\nContent-Type: image/jpeg")
        with urllib.request.urlopen(server.url, timeout=5) as reply:
            assert b"/stream.mjpg" in reply.read()
    finally:
        server.close()


def test_mjpeg_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(InputError, match="cannot listen on 127.0.0.1"):
            MjpegServer(port=taken.getsockname()[1])


def test_window_needs_a_display(monkeypatch):
    import threading

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(InputError, match="--show: no display"):
        WindowSink(threading.Event())


def test_every_sink_is_closed_even_if_one_fails(capsys):
    closed = []

    class Sink:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def close(self):
            closed.append(self.name)
            if self.fail:
                raise OSError("disk full")

    Outputs([Sink("a", fail=True)], [Sink("b")]).close()
    assert closed == ["a", "b"] and "disk full" in capsys.readouterr().err  # a preview closing badly: a warning
    closed.clear()
    with pytest.raises(InputError, match="disk full"):  # a file not finished: the run fails
        Outputs([Sink("a")], [Sink("b", fail=True), Sink("c")]).close()
    assert closed == ["a", "b", "c"]


def _disk_full_after(monkeypatch, good_writes: int):
    """fileio.write_all writes `good_writes` times (not counting the probes before the first frame), then half of
    the next data and fails, as a disk filling does."""
    import errno

    from device_runtime.core import fileio
    from device_runtime.outputs import sinks as outputs

    real, calls = fileio.write_all, []

    def write_all(fd, data):
        if bytes(data) != bytes(fileio.PROBE_BYTES):  # a probe writes zeros; they are let through
            calls.append(fd)
        if len(calls) > good_writes:
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(fileio, "write_all", write_all)
    monkeypatch.setattr(outputs, "write_all", write_all)  # the JSONL's own reference


def test_a_failing_file_output_stops_the_run_with_its_message(bundle, tmp_path, monkeypatch, capsys):
    _disk_full_after(monkeypatch, good_writes=3)
    endless = FileSource(lambda: iter([(f"f{i}", disc_frame()) for i in range(1000)]), "many frames")
    with pytest.raises(InputError, match=r"--masks .*f3\.png: writing failed \(No space left on device\)"):
        run(RunConfig(bundle=bundle, masks_dir=tmp_path / "m", quiet=True), source=endless)
    # whole masks or none: no half-written mask, no temporary left behind
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["f0.png", "f1.png", "f2.png"]


def test_overlay_of_16_bit_and_colour_frames():
    renderer = OverlayRenderer()
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 10:20] = 1
    for frame in (disc_frame(dtype=np.uint16), disc_frame(colour=True), disc_frame()):
        picture = renderer.render(frame, mask, {"area_px": 100, "area_mm2": None, "uncertainty": 0.1})
        assert picture.shape == (48, 64, 3) and picture.dtype == np.uint8
        assert picture[15, 15].tolist() != picture[40, 60].tolist()  # tinted inside the mask


def test_outputs_are_checked_once_per_run(bundle, tmp_path, monkeypatch):
    from device_runtime.outputs import guard

    calls, real = [], guard.source_files
    monkeypatch.setattr(guard, "source_files", lambda spec: calls.append(spec) or real(spec))
    run(RunConfig(bundle=bundle, masks_dir=tmp_path / "m", jsonl=tmp_path / "f.jsonl", quiet=True), source=source())
    assert len(calls) == 1 and len(list((tmp_path / "m").iterdir())) == len(SIZES)


def test_outputs_never_overwrite_the_source_folder(bundle, tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), disc_frame())
    with pytest.raises(InputError, match="holds the source file a.png"):
        run(RunConfig(bundle=bundle, source=str(tmp_path), masks_dir=tmp_path, quiet=True))
    assert cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_UNCHANGED).max() == 255  # untouched


def test_a_write_failing_on_the_last_frame_still_fails_the_run(bundle, tmp_path, monkeypatch):
    _disk_full_after(monkeypatch, good_writes=3)
    with pytest.raises(InputError, match="f3.png: writing failed"):
        run(RunConfig(bundle=bundle, masks_dir=tmp_path / "m", quiet=True), source=source())


def test_an_overwritten_mask_is_kept_when_its_new_write_fails(bundle, tmp_path, monkeypatch):
    masks = tmp_path / "m"
    masks.mkdir()
    (masks / "f0.png").write_bytes(b"the earlier run's mask")
    _disk_full_after(monkeypatch, good_writes=0)
    with pytest.raises(InputError, match="f0.png: writing failed"):
        run(RunConfig(bundle=bundle, masks_dir=masks, overwrite=True, quiet=True), source=source())
    assert [p.name for p in masks.iterdir()] == ["f0.png"]
    assert (masks / "f0.png").read_bytes() == b"the earlier run's mask"


@pytest.mark.parametrize("good_lines", [0, 2])
def test_a_jsonl_line_that_fails_is_cut_back_to_the_last_whole_line(bundle, tmp_path, monkeypatch, good_lines):
    jsonl = tmp_path / "f.jsonl"
    _disk_full_after(monkeypatch, good_writes=good_lines)
    with pytest.raises(InputError) as failed:
        run(RunConfig(bundle=bundle, jsonl=jsonl, quiet=True), source=source())
    assert str(failed.value).startswith(f"--jsonl {jsonl}: writing the line of frame f{good_lines} failed")
    if good_lines == 0:
        assert not jsonl.exists()  # no empty file where a log was expected
    else:
        text = jsonl.read_text()
        assert text.endswith("\n") and [json.loads(line)["name"] for line in text.splitlines()] == ["f0", "f1"]


def test_a_video_whose_first_frame_fails_leaves_no_file(bundle, tmp_path, monkeypatch):
    class Refusing:
        def __init__(self, *args):
            self.real = real(*args)

        def isOpened(self):  # noqa: N802 (OpenCV's name)
            return True

        def write(self, picture):
            return False

        def release(self):
            self.real.release()

    real = cv2.VideoWriter
    monkeypatch.setattr(cv2, "VideoWriter", Refusing)
    video = tmp_path / "v.mkv"
    with pytest.raises(InputError, match="writing frame 1 failed .* nothing was recorded; no file is left"):
        run(RunConfig(bundle=bundle, overlay_video=video, quiet=True), source=source())
    assert not video.exists()


@pytest.mark.parametrize("size", [256, 512, 1024])
def test_the_label_is_white_on_a_dark_box_sized_by_the_frame(size):
    """On bright tissue (a white frame) the label stays readable: its box is dark, its text white, and both
    grow with the frame (3.2 % of its height)."""
    picture = OverlayRenderer().render(np.full((size, size), 230, np.uint8), np.zeros((size, size), np.uint8),
                                       {"area_px": 0, "area_mm2": None, "uncertainty": 0.25})
    dark = np.all(picture < 100, axis=2)
    rows, cols = np.nonzero(dark)
    box_h, box_w = rows.max() + 1, cols.max() + 1
    assert rows.min() == 0 and cols.min() == 0  # the top-left corner
    assert 0.04 * size < box_h < 0.08 * size and box_w < size
    box = picture[:box_h, :box_w]
    assert np.median(box) < 100 and (box.min(axis=2) > 170).sum() > 0.02 * box_h * box_w  # light text on it
    assert np.all(picture[box_h + 2:] == 230)  # nothing else drawn (no mask)
