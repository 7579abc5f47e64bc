"""Issue 12, device: outputs never touch a source, existing outputs are refused, recordings survive faults,
non-finite frames are skipped, a run that processed nothing fails, every JSON is strict."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time

import cv2
import numpy as np
import pytest
import tifffile

from device_helpers import device_cmd, device_env, disc_frame, make_bundle
from device_runtime.cli import main


def strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1, err
    return lines[0]


def _make_source(kind: str, folder):
    """A source of each form, and the files it reads."""
    folder.mkdir(exist_ok=True)
    pngs = []
    for i in range(3):
        path = folder / f"f{i}.png"
        cv2.imwrite(str(path), disc_frame(centre=(20 + i, 24)))
        pngs.append(path)
    if kind == "folder":
        return str(folder), pngs
    if kind == "glob":
        return str(folder / "*.png"), pngs
    if kind == "file":
        return str(pngs[0]), pngs[:1]
    if kind == "tiff":
        path = folder / "stack.tif"
        tifffile.imwrite(path, np.stack([disc_frame(), disc_frame(centre=(22, 26))]), photometric="minisblack")
        return str(path), [path]
    if kind == "video":
        path = folder / "clip.mkv"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
        for i in range(4):
            writer.write(cv2.cvtColor(disc_frame(centre=(20 + i, 24)), cv2.COLOR_GRAY2BGR))
        writer.release()
        return str(path), [path]
    raise ValueError(kind)


SOURCES = ["folder", "glob", "file", "tiff", "video"]


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("flag", ["--masks", "--overlays", "--video", "--jsonl", "--summary-json"])
def test_no_output_ever_lands_on_a_source_file(kind, flag, bundle, tmp_path, capsys):
    spec, files = _make_source(kind, tmp_path / "src")
    before = {p: p.read_bytes() for p in files}
    target = files[0]
    extra = ["--overwrite"]  # even --overwrite never writes over a source file
    if flag in ("--masks", "--overlays"):
        value = str(target.parent)
        fmt = "tif" if target.suffix in (".tif", ".mkv") else "png"  # the source's own extension where it has one
        extra += ["--mask-format", fmt] if flag == "--masks" else ["--overlay-format", "png"]
        could_collide = target.suffix == f".{fmt if flag == '--masks' else 'png'}"
    else:
        value, could_collide = str(target), True
    if flag == "--video" and target.suffix != ".mkv":
        value = str(target.with_suffix(".mkv"))  # the video must be .mkv; point it at a source via a link
        os.symlink(target, value)
    code = main(["run", "--bundle", str(bundle), "--source", spec, flag, value, "--quiet", *extra])
    err = capsys.readouterr().err
    if could_collide:
        assert code == 2 and "source file" in err and len(err.strip().splitlines()) == 1, err
    else:  # frames named stack_pNNNNN or frame_NNNNNN in another format: nothing can be overwritten
        assert code == 0, err
    assert {p: p.read_bytes() for p in files} == before


@pytest.mark.parametrize("flag", ["--video", "--jsonl", "--summary-json"])
def test_an_output_may_not_be_a_bundle_file(flag, bundle, tmp_path, capsys):
    target = bundle / "manifest.json"
    if flag == "--video":
        os.symlink(target, tmp_path / "m.mkv")
        target = tmp_path / "m.mkv"
    before = (bundle / "manifest.json").read_bytes()
    code = main(["run", "--bundle", str(bundle), "--source", "synthetic:48x64", "--max-frames", "2", flag,
                 str(target), "--overwrite", "--quiet"])
    assert code == 2 and "bundle file" in _one_line(capsys)
    assert (bundle / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("flag,make", [("--jsonl", "file"), ("--summary-json", "file"), ("--video", "file"),
                                       ("--masks", "folder"), ("--overlays", "folder")])
def test_existing_outputs_are_refused_unless_overwrite(flag, make, bundle, tmp_path, capsys):
    name = {"--video": "v.mkv", "--jsonl": "f.jsonl", "--summary-json": "s.json"}.get(flag, "out")
    target = tmp_path / name
    if make == "file":
        target.write_text("the user's own file")
    else:
        target.mkdir()
        (target / "keep.txt").write_text("the user's own file")
    args = ["run", "--bundle", str(bundle), "--source", "synthetic:48x64", "--max-frames", "3", flag, str(target),
            "--quiet"]
    assert main(args) == 2
    assert "--overwrite" in _one_line(capsys)
    assert (target if make == "file" else target / "keep.txt").read_text() == "the user's own file"
    assert main(args + ["--overwrite"]) == 0
    if make == "folder":
        assert (target / "keep.txt").read_text() == "the user's own file"  # other files stay
        assert len(list(target.iterdir())) == 4


def test_two_outputs_at_one_path_are_refused(bundle, tmp_path, capsys):
    code = main(["run", "--bundle", str(bundle), "--source", "synthetic:48x64", "--max-frames", "2",
                 "--jsonl", str(tmp_path / "x.json"), "--summary-json", str(tmp_path / "x.json"), "--quiet"])
    assert code == 2 and "same path" in _one_line(capsys)


def test_an_mp4_recording_is_refused_with_the_reason(bundle, tmp_path, capsys):
    code = main(["run", "--bundle", str(bundle), "--source", "synthetic:48x64", "--video", str(tmp_path / "v.mp4")])
    assert code == 2 and ".mkv" in _one_line(capsys) and not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("flag", ["--jsonl", "--summary-json", "--video", "--masks"])
@pytest.mark.parametrize("fault", ["not a directory", "is a directory"])
def test_unwritable_outputs_fail_before_the_first_frame(flag, fault, bundle, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    if fault == "not a directory":
        blocker.write_text("a file where a folder should be")
        target = blocker / ("out.mkv" if flag == "--video" else "out")
    else:
        if flag == "--masks":
            pytest.skip("a folder is what --masks wants")
        target = tmp_path / ("dir.mkv" if flag == "--video" else "dir")
        target.mkdir()
    masks = tmp_path / "masks-first"
    extra = [] if flag == "--masks" else ["--masks", str(masks)]
    code = main(["run", "--bundle", str(bundle), "--source", "synthetic:48x64", "--max-frames", "3", flag, str(target),
                 "--quiet", *extra])
    line = _one_line(capsys)
    assert code != 0 and str(target) in line or str(blocker) in line
    assert not masks.exists() or not any(masks.iterdir())  # nothing ran


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; scripts/faults.py uses a ro mount")
@pytest.mark.parametrize("flag", ["--jsonl", "--summary-json", "--video", "--masks"])
def test_read_only_outputs_fail_before_the_first_frame(flag, bundle, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code = main(["run", "--bundle", str(bundle), "--source", "synthetic:48x64", "--max-frames", "3", flag,
                     str(folder / ("v.mkv" if flag == "--video" else "x")), "--quiet"])
        assert code != 0 and str(folder) in _one_line(capsys)
    finally:
        folder.chmod(0o755)


def _float_tiff(path, nan_pages):
    pages = []
    for i in range(4):
        page = disc_frame(centre=(20 + i, 24)).astype(np.float32) / 255
        if i in nan_pages:
            page[3, 3] = np.nan if i % 2 == 0 else np.inf
        pages.append(page)
    tifffile.imwrite(path, np.stack(pages), photometric="minisblack")
    return path


def test_non_finite_frames_are_skipped_counted_and_json_stays_strict(bundle, tmp_path, capsys):
    source = _float_tiff(tmp_path / "float.tif", nan_pages={1, 2})
    jsonl, summary = tmp_path / "f.jsonl", tmp_path / "s.json"
    code = main(["run", "--bundle", str(bundle), "--source", str(source), "--jsonl", str(jsonl),
                 "--summary-json", str(summary), "--quiet"])
    assert code == 0
    assert capsys.readouterr().err.count("NaN or Inf") == 2
    records = [strict_loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["name"] for r in records] == ["float_p00000", "float_p00003"]
    data = strict_loads(summary.read_text())
    assert data["frames"] == 2 and data["counters"]["nonfinite"] == 2


@pytest.mark.parametrize("case", ["all frames NaN", "no frame decodable"])
def test_a_run_that_processed_no_frame_fails_with_one_line(case, bundle, tmp_path, capsys):
    if case == "all frames NaN":
        source = _float_tiff(tmp_path / "nan.tif", nan_pages={0, 1, 2, 3})
    else:
        source = tmp_path / "broken"
        source.mkdir()
        for i in range(2):
            (source / f"x{i}.png").write_bytes(b"not a png")
    summary = tmp_path / "s.json"
    code = main(["run", "--bundle", str(bundle), "--source", str(source), "--summary-json", str(summary)])
    err = capsys.readouterr().err
    assert code == 2 and "no frame was processed" in err.strip().splitlines()[-1]
    data = strict_loads(summary.read_text())  # the summary still says what happened, in valid JSON
    assert data["frames"] == 0 and data["timing"]["fps"] in (None, 0.0)


_REAL_WRITER = cv2.VideoWriter


class _FailingWriter:
    """cv2.VideoWriter that fails from the 4th frame on, as a full disk does with OpenCV 5."""

    def __init__(self, path, *args):
        self._real = _REAL_WRITER(path, *args)
        self.count = 0

    def isOpened(self):  # noqa: N802
        return self._real.isOpened()

    def write(self, picture):
        self.count += 1
        if self.count > 3:
            return False
        self._real.write(picture)
        return True

    def release(self):
        self._real.release()


def test_a_video_write_error_is_reported_once_and_fails_the_run(bundle, tmp_path, capsys, monkeypatch):
    import device_runtime.outputs.sinks as outputs

    monkeypatch.setattr(outputs.cv2, "VideoWriter", _FailingWriter)
    video = tmp_path / "v.mkv"
    code = main(["run", "--bundle", str(bundle), "--source", "synthetic:48x64", "--loop", "--max-frames", "40",
                 "--video", str(video), "--quiet"])
    line = _one_line(capsys)
    assert code == 2 and "writing frame 4 failed" in line and "stays playable" in line
    monkeypatch.undo()
    assert _count_frames(video) == 3  # frames still queued at the failure never reopen (truncate) it


def _count_frames(path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def _start_recording(bundle, tmp_path, *extra):
    video = tmp_path / "rec.mkv"
    process = subprocess.Popen(device_cmd("run", "--bundle", str(bundle), "--source", "synthetic:96x128", "--loop",
                                          "--video", str(video), "--quiet", *extra),
                               env=device_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not video.exists() or video.stat().st_size < 200_000):
        time.sleep(0.1)
    return process, video


def test_a_recording_killed_with_sigkill_still_plays(bundle, tmp_path):
    process, video = _start_recording(bundle, tmp_path)
    process.kill()
    process.communicate(timeout=30)
    assert _count_frames(video) > 10


def test_a_recording_stopped_by_sigterm_is_complete(bundle, tmp_path):
    process, video = _start_recording(bundle, tmp_path, "--jsonl", str(tmp_path / "f.jsonl"))
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    lines = (tmp_path / "f.jsonl").read_text().splitlines()
    assert _count_frames(video) == len(lines) > 10


def test_a_full_disk_during_recording_ends_in_one_line_and_a_playable_file(bundle, tmp_path):
    limit = 400_000  # bytes: RLIMIT_FSIZE makes every write past it fail with EFBIG, as a full disk does
    video = tmp_path / "rec.mkv"

    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(device_cmd("run", "--bundle", str(bundle), "--source", "synthetic:96x128", "--loop",
                                       "--max-frames", "2000", "--video", str(video), "--quiet"),
                            env=device_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            preexec_fn=limit_files)
    errors = [l for l in result.stderr.splitlines() if "error" in l.lower() or "failed" in l.lower()]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "--video" in errors[0] and "stays playable" in errors[0]
    assert 0 < _count_frames(video)


# ------------------------------------------------------------------------------------------------ MJPEG preview


def _get(port: int, host_header: str, path: str = "/", timeout: float = 5.0) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
        return conn.recv(200)


@pytest.mark.parametrize("host,allowed", [("127.0.0.1:8080", True), ("localhost", True), ("[::1]:9", True),
                                          ("evil.example:8080", False), ("127.0.0.1.evil.example", False)])
def test_preview_on_localhost_checks_the_host_header(host, allowed):
    from device_runtime.outputs.mjpeg import MjpegServer

    server = MjpegServer(port=0)
    try:
        reply = _get(server._server.server_address[1], host)
        assert reply.startswith(b"HTTP/1.0 200") == allowed and reply.startswith(b"HTTP/1.0 403") == (not allowed)
    finally:
        server.close()


def test_preview_bounds_its_clients_and_drops_idle_ones():
    import socket

    from device_runtime.outputs.mjpeg import MjpegServer

    server = MjpegServer(port=0, max_clients=2, idle_timeout_s=0.5)
    port = server._server.server_address[1]
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]  # say nothing
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        extra.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert extra.recv(100) == b""  # over the bound: closed at once, no thread for it
        extra.close()
        time.sleep(1.5)  # the idle ones time out and free their places
        assert _get(port, "localhost").startswith(b"HTTP/1.0 200")
        for conn in idle:
            assert conn.recv(100) == b""  # dropped by the server
            conn.close()
    finally:
        server.close()
