"""Issue 35, device: a full disk before the first frame, JSONL lines written whole, the preview's client bound,
tifffile's warnings. A full disk is provoked without root: RLIMIT_FSIZE in the child (Python ignores SIGXFSZ,
so a write past the limit fails with EFBIG, as one on a full disk fails with ENOSPC)."""

from __future__ import annotations

import json
import resource
import subprocess
import threading

import numpy as np
import pytest
import tifffile

from conftest import load_script
from device_helpers import device_cmd, device_env, make_bundle
from device_runtime.cli import main


faults = load_script("faults")  # the fault battery's own checks, shared


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def _run_limited(bundle, tmp_path, limit: int, *args) -> subprocess.CompletedProcess:
    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(device_cmd("run", "--bundle", str(bundle), "--quiet", *args), env=device_env(tmp_path),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=limit_files)


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if not line.startswith("info:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _strict_lines(path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


@pytest.mark.parametrize("flag,name", [("--masks", "m"), ("--overlays", "o"), ("--video", "v.mkv"),
                                       ("--jsonl", "f.jsonl"), ("--summary-json", "s.json")])
def test_a_full_disk_before_the_first_frame_fails_there_and_leaves_no_empty_file(flag, name, bundle, tmp_path):
    out = tmp_path / "out"
    result = _run_limited(bundle, tmp_path, 4096, "--source", "synthetic:48x64", "--max-frames", "3",
                          flag, str(out / name))
    line = _error_line(result.stderr)
    assert result.returncode == 2 and f"{flag} {out / name}: cannot write here (File too large)" in line
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no empty file, no probe left behind


def test_jsonl_under_a_file_size_limit_ends_at_a_whole_line(bundle, tmp_path):
    jsonl = tmp_path / "f.jsonl"
    limit = 100_000  # past the probe before the first frame; a few hundred lines
    result = _run_limited(bundle, tmp_path, limit, "--source", "synthetic:48x64", "--loop", "--max-frames", "5000",
                          "--jsonl", str(jsonl))
    line = _error_line(result.stderr)
    records = _strict_lines(jsonl)
    assert result.returncode == 2 and line.startswith(f"nerveseg-device: error: --jsonl {jsonl}: writing the line")
    assert f"({len(records)} lines)" in line and "File too large" in line
    assert [r["frame"] for r in records] == list(range(len(records))) and jsonl.stat().st_size <= limit


def test_a_recording_whose_end_does_not_fit_fails_and_what_fits_plays(bundle, tmp_path):
    """FFmpeg buffers, so the last frames reach the disk only at release, which reports nothing: checked there."""
    video = tmp_path / "v.mkv"
    result = _run_limited(bundle, tmp_path, 80_000, "--source", "synthetic:120x160", "--loop", "--max-frames", "20",
                          "--video", str(video))
    line = _error_line(result.stderr)
    assert result.returncode == 2 and f"--video {video}: " in line and "file size limit" in line
    assert 0 < faults.count_frames(video) < 20


@pytest.fixture
def preview():
    from device_runtime.outputs.mjpeg import MjpegServer

    server = MjpegServer(port=0, max_clients=4)
    stop = threading.Event()

    def publish():
        picture = np.zeros((16, 16, 3), np.uint8)
        while not stop.wait(0.02):
            server.publish(picture)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    yield server._server.server_address[1]
    stop.set()
    publisher.join()
    server.close()


def test_more_stream_clients_than_the_bound_get_exactly_the_bound_and_freed_places_are_taken(preview):
    """8 viewers on a bound of 4 (refused ones are closed at once and free no place); 2 served ones leave, 2 new
    viewers take their places, one more is refused. The same check as scripts/faults.py's preview case."""
    assert faults.preview_bound(preview, clients=8, leave=2) == (4, 2, True)


def _multi_page_tiff(path, cut: int | None):
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (3, 48, 64), np.uint8),
                     photometric="minisblack")
    if cut is not None:
        path.write_bytes(path.read_bytes()[:cut])
    return path


def test_a_tiff_cut_short_counts_its_lost_pages_in_one_line_of_ours(bundle, tmp_path, capsys):
    full = _multi_page_tiff(tmp_path / "full.tif", None).stat().st_size
    source = _multi_page_tiff(tmp_path / "cut.tif", full // 2)
    summary = tmp_path / "s.json"
    assert main(["run", "--bundle", str(bundle), "--source", str(source), "--summary-json", str(summary),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("info:")]
    assert len(lines) == 1 and lines[0].startswith(f"warning: skipped a frame: {source}: no page after page 0"), err
    data = json.loads(summary.read_text())
    assert data["frames"] == 1 and data["counters"]["undecodable"] == 1


def test_tifffile_warnings_do_not_reach_stderr_as_lines_of_their_own(bundle, tmp_path):
    """In a child process: Python's last-resort handler, which printed them, is only used without pytest's."""
    source = _multi_page_tiff(tmp_path / "header.tif", 8)
    result = subprocess.run(device_cmd("run", "--bundle", str(bundle), "--source", str(source), "--quiet"),
                            env=device_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    line = _error_line(result.stderr)
    assert result.returncode == 2 and "TIFF holds no readable page; tifffile: invalid offset to first page" in line
