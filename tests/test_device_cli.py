"""The command line as a user meets it: no torch, one-line errors, clean stops on signals, bench, info, zipapp."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from device_helpers import device_cmd, device_env, disc_frame, make_bundle, run_device
from device_runtime.cli import main


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    for i in range(12):
        cv2.imwrite(str(folder / f"scan_{i:02d}.png"), disc_frame(centre=(15 + 2 * i, 24)))
    return folder


def test_the_blocker_blocks_torch(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import torch"], env=device_env(tmp_path), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "BLOCKED IMPORT: torch" in result.stderr


def test_run_never_imports_torch(bundle, frames, tmp_path):
    out = tmp_path / "out"
    result = run_device(tmp_path, "run", "--bundle", str(bundle), "--source", str(frames), "--masks",
                        str(out / "masks"), "--video", str(out / "o.mkv"), "--overlays", str(out / "ov"), "--jsonl",
                        str(out / "f.jsonl"), "--mjpeg-port", "0", "--report-every", "5", "--pixel-spacing", "0.1")
    assert result.returncode == 0, result.stderr
    assert "BLOCKED IMPORT" not in result.stderr
    assert result.stderr.count("[frame ") == 2  # --report-every 5 over 12 frames
    assert "frames 12 " in result.stdout and "outside inference" in result.stdout
    assert len((out / "f.jsonl").read_text().splitlines()) == 12 and len(list((out / "masks").iterdir())) == 12


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input_is_one_line_without_traceback(bundle, frames, tmp_path, capsys):
    tampered = make_bundle(tmp_path / "tampered")
    with open(tampered / "model.fp32.onnx", "ab") as handle:
        handle.write(b"\0")
    cases = [
        (["--bundle", str(tmp_path / "nowhere"), "--source", str(frames)], "nowhere: bundle folder not found"),
        (["--bundle", str(tampered), "--source", str(frames)], "model.fp32.onnx: sha256 does not match"),
        (["--bundle", str(bundle), "--source", str(tmp_path / "none")], "none': no such file or folder"),
        (["--bundle", str(bundle), "--source", str(frames), "--pixel-spacing", "-1"], "--pixel-spacing must be"),
        (["--bundle", str(bundle), "--source", str(frames), "--backend", "tensorrt"], "tensorrt cannot run here"),
    ]
    for args, needle in cases:
        assert main(["run", *args]) == 2
        line = _one_line_error(capsys)
        assert needle in line and line.startswith("nerveseg-device: error:")


def test_bad_flag_value_is_one_line(bundle, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", "--bundle", str(bundle), "--source", "x", "--precision", "int4"])
    assert stop.value.code == 2
    assert "invalid choice: 'int4'" in _one_line_error(capsys)


def test_tampered_bundle_refused_by_the_real_command(tmp_path, frames):
    tampered = make_bundle(tmp_path / "b")
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["threshold"] = 0.01  # the manifest itself is not hashed, but its model files are
    manifest["files"][0]["sha256"] = "0" * 64
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    result = run_device(tmp_path, "run", "--bundle", str(tampered), "--source", str(frames))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("sha256 does not match the manifest; the file was changed or corrupted")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_frame_and_closes_every_output(bundle, frames, tmp_path, signum):
    jsonl, video = tmp_path / "frames.jsonl", tmp_path / "overlay.mkv"
    process = subprocess.Popen(
        device_cmd("run", "--bundle", str(bundle), "--source", str(frames), "--loop", "--jsonl", str(jsonl),
                   "--video", str(video)),
        env=device_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (jsonl.exists() and jsonl.read_text().count("\n") >= 30):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stopped by signal" in stdout
    lines = jsonl.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line complete
    assert [r["frame"] for r in records] == list(range(len(records)))
    capture = cv2.VideoCapture(str(video))
    played = 0
    while capture.read()[0]:
        played += 1
    capture.release()
    assert played == len(records) >= 30


def test_bench_times_synthetic_frames(bundle, tmp_path, capsys):
    summary_path = tmp_path / "bench.json"
    assert main(["bench", "--bundle", str(bundle), "--frames", "20", "--warmup", "3", "--size", "48x64",
                 "--summary-json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["frames"] == 23 and summary["timing"]["frames"] == 20
    assert summary["source"] == "synthetic 48x64"
    printed = capsys.readouterr().out
    for stage in ("capture", "preprocess", "inference", "postprocess", "output", "end_to_end"):
        assert stage in printed
    assert "fps" in printed and "p99 ms" in printed


def test_info_reports_the_machine_and_the_backend(bundle, capsys):
    assert main(["info", "--bundle", str(bundle)]) == 0
    printed = capsys.readouterr().out
    for needle in ("cv2", "GStreamer", "providers", "CPUExecutionProvider", "tensorrt", "would run", "verified",
                   "model.fp32.onnx"):
        assert needle in printed


def _minimal_site(tmp_path: Path) -> Path:
    """A site folder holding only numpy, OpenCV and ONNX Runtime (links into this environment)."""
    site = tmp_path / "minimal_site"
    site.mkdir()
    for package in ("numpy", "cv2", "onnxruntime"):
        location = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        (site / location.name).symlink_to(location)
        for libs in location.parent.glob("opencv_python*.libs" if package == "cv2" else f"{package}.libs"):
            (site / libs.name).symlink_to(libs)
    return site


def test_zipapp_runs_with_only_numpy_opencv_and_onnxruntime(bundle, frames, tmp_path):
    from device_runtime.pyz import build_pyz

    pyz = build_pyz(tmp_path / "nerveseg-device.pyz")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(_minimal_site(tmp_path))}
    python = [sys.executable, "-S", str(pyz)]  # -S: no site-packages, so no torch, tifffile or anything else
    info = subprocess.run([*python, "info"], env=env, capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert "would run    ort-cpu" in info.stdout
    jsonl = tmp_path / "f.jsonl"
    result = subprocess.run([*python, "run", "--bundle", str(bundle), "--source", str(frames), "--max-frames", "10",
                             "--jsonl", str(jsonl), "--masks", str(tmp_path / "m"), "--mask-format", "tif"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(jsonl.read_text().splitlines()) == 10 and "stopped by max-frames" in result.stdout
    assert len(list((tmp_path / "m").glob("*.tif"))) == 10
    probe = subprocess.run([sys.executable, "-S", "-c", "import torch"], env=env, capture_output=True, timeout=60)
    assert probe.returncode != 0  # the environment really lacks torch


def test_build_pyz_command(tmp_path, capsys):
    assert main(["build-pyz", "--out", str(tmp_path / "x.pyz")]) == 0
    assert (tmp_path / "x.pyz").read_bytes().startswith(b"#!/usr/bin/env python3\n")
    import zipfile

    names = zipfile.ZipFile(tmp_path / "x.pyz").namelist()
    assert "__main__.py" in names and "device_runtime/runner.py" in names and "tifffile/tifffile.py" in names
    package = Path(__file__).resolve().parents[1] / "device_runtime"
    modules = {f"device_runtime/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")}
    assert any("/" in name.removeprefix("device_runtime/") for name in modules)  # the subpackages are there
    assert modules <= set(names), sorted(modules - set(names))  # every module, subpackages included
    assert not any(name.startswith(("training/", "export/", "qat/")) for name in names)
    assert np.any([name == "tifffile/LICENSE" for name in names])
