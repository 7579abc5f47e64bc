"""The fault battery of issues 12 and 35: the real commands against injected faults, and kill -9 at random moments.

Runs `nerveseg` and `nerveseg-device` as a user would (subprocesses, this checkout on PYTHONPATH) on a tiny
phantom run, injecting: outputs that would overwrite what the user owns, read-only folders and full disks
(small tmpfs mounts where this machine allows mounting, else skipped; RLIMIT_FSIZE as a second full-disk
flavour, also for a disk full before the first frame), non-finite and colour data, a checkpoint that would run
code, SIGTERM and kill -9 during a recording, more preview viewers than its bound, and kill -9 at random
moments of `nerveseg pipeline` and of `nerveseg qat --bits learned-a8` (each followed by --resume) and of
`nerveseg export --replace`. Prints one table row per case: case, exit code, the one-line message, whether
the user's files are intact, and PASS/FAIL.

    nice -n 10 python scripts/faults.py --kills 20                 # the full battery (20 + 20 + 10 kills)
    python scripts/faults.py --kills 0 --export-kills 0            # the fault table only (minutes)

The pipeline kills compare each resumed run with an uninterrupted one (same flags): threshold.json, test
metrics, the ONNX test metrics of the bundle and metrics.jsonl without its timing columns must be equal, and a
watcher verifies the bundle (sha256 of every file against its manifest) all along the run, so a bundle half
old and half new would be seen. The QAT kills (--qat-kills, default as many as --kills) compare metrics.jsonl,
bits.json and test_metrics.json with an uninterrupted QAT run's. Exit status 1 if any row fails.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TINY = ["--input-size", "64", "64", "--epochs", "2", "--synth-count", "30", "--batch-size", "4", "--device", "cpu"]
# a pipeline that ran to its end: 0, or 3 when an INT8 export was refused (deterministic: the reference's too)
PIPELINE_FINISHED = (0, 3)
TIMING_KEYS = {"train_images_per_s", "train_seconds"}


def nerveseg(*args) -> list[str]:
    return [sys.executable, "-m", "export.cli", *map(str, args)]


def device(*args) -> list[str]:
    return [sys.executable, "-m", "device_runtime", *map(str, args)]


@dataclass
class Row:
    case: str
    code: int | str
    message: str
    intact: bool
    ok: bool


ROWS: list[Row] = []


def run(cmd, cwd=None, fsize: int | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(cmd, cwd=cwd or REPO, env=ENV, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit)


def one_error_line(stderr: str) -> str | None:
    """The single error line of a failed command, or None when there is a traceback or not exactly one."""
    if "Traceback" in stderr:
        return None
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    return errors[0] if len(errors) == 1 else None


def snapshot(path: Path) -> dict:
    path = Path(path)
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporaries and staging folders left behind (names the atomic writers use)."""
    if not folder.exists():
        return []
    return [str(p) for p in folder.rglob(".*") if p.name.endswith(".tmp") or p.name.endswith(".old")]


def record(case: str, result, intact: bool, expect_ok: bool = False, extra_ok: bool = True, message: str = ""):
    code = result.returncode if hasattr(result, "returncode") else result
    stderr = getattr(result, "stderr", "") or ""
    if expect_ok:
        ok = code == 0 and intact and extra_ok
        message = message or "(ran)"
    else:
        line = one_error_line(stderr)
        ok = code not in (0, None) and line is not None and intact and extra_ok
        message = message or (line if line else ("TRACEBACK " if "Traceback" in stderr else "") + stderr.strip()[-160:])
    ROWS.append(Row(case, code, message.replace(str(WORK), "W"), intact, ok))
    print(f"{'PASS' if ok else 'FAIL'}  {case}: exit {code}  {ROWS[-1].message[:150]}", flush=True)


# ------------------------------------------------------------------------------------------------ mounts


_MOUNTS_WORK: bool | None = None


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", read_only: bool = False, fill=None):
    """A small tmpfs at `path` (full disk) or a read-only one holding what `fill(path)` wrote; None if the
    machine does not allow mounting (no root, a container without CAP_SYS_ADMIN)."""
    global _MOUNTS_WORK
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    _MOUNTS_WORK = mounted
    if not mounted:
        yield None
        return
    try:
        if fill:
            fill(path)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def skipped(case: str, why: str):
    ROWS.append(Row(case, "-", f"skipped: {why}", True, True))
    print(f"SKIP  {case}: {why}", flush=True)


# ------------------------------------------------------------------------------------------------ fixtures


def make_reference(work: Path) -> tuple[Path, float]:
    run_dir = work / "reference"
    started = time.perf_counter()
    result = run(nerveseg("pipeline", *TINY, "--run-dir", run_dir))
    if result.returncode not in PIPELINE_FINISHED:
        sys.exit(f"faults: the reference pipeline failed:\n{result.stderr[-3000:]}")
    return run_dir, time.perf_counter() - started


def frames_folder(work: Path) -> Path:
    import cv2
    import numpy as np

    folder = work / "frames"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        image = (rng.random((96, 128)) * 120).astype(np.uint8)
        cv2.circle(image, (40 + 5 * i, 48), 14, 230, -1)
        cv2.imwrite(str(folder / f"scan_{i:02d}.png"), image)
    return folder


def dataset(work: Path, name: str, kind: str) -> Path:
    """A paired dataset of 6 frames: NaN pixels in every image, or masks painted in colour."""
    import cv2
    import numpy as np
    import tifffile

    root = work / name
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for i in range(6):
        image = np.full((64, 64), 0.3, np.float32)
        image[20:40, 20:40] = 0.8
        if kind == "nan":
            image[3, 3] = np.nan
        tifffile.imwrite(root / "images" / f"{i}.tif", image)
        mask = np.zeros((64, 64, 3), np.uint8)
        mask[20:40, 20:40] = (0, 200, 0) if kind == "colour" else (1, 1, 1)
        cv2.imwrite(str(root / "masks" / f"{i}.png"), mask)
    return root


def evil_checkpoint(work: Path) -> tuple[Path, Path]:
    import torch

    marker = work / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = work / "evil.pt"
    torch.save({"format": "nerveseg-checkpoint-1", "payload": RunsCode()}, path)
    return path, marker


def count_frames(path: Path) -> int:
    import cv2

    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


# ------------------------------------------------------------------------------------------------ cases


def export_cases(work: Path, ref: Path):
    cases = work / "export-cases"
    cases.mkdir()
    run_copy = cases / "run"
    shutil.copytree(ref, run_copy)
    split = json.loads((run_copy / "split.json").read_text())
    split["root"] = str(run_copy / "synthetic")  # the copy's own phantom is its dataset
    (run_copy / "split.json").write_text(json.dumps(split))
    before_run = snapshot(run_copy)

    result = run(nerveseg("export", "--run-dir", run_copy, "--out", run_copy, "--device", "cpu"))
    record("export --out RUN (the run folder)", result, snapshot(run_copy) == before_run)
    result = run(nerveseg("export", "--run-dir", run_copy, "--out", cases, "--device", "cpu"))
    record("export --out the folder holding the run", result, snapshot(run_copy) == before_run)
    result = run(nerveseg("export", "--run-dir", run_copy, "--out", run_copy / "synthetic", "--device", "cpu"))
    record("export --out the dataset", result, snapshot(run_copy) == before_run)

    notes = cases / "notes"
    notes.mkdir()
    (notes / "patient-notes.txt").write_text("irreplaceable")
    result = run(nerveseg("export", "--run-dir", run_copy, "--out", notes, "--device", "cpu"))
    record("export --out a folder of notes", result, snapshot(notes) == {"patient-notes.txt": hashlib.sha256(b"irreplaceable").hexdigest()})

    a_file = cases / "report.pdf"
    a_file.write_bytes(b"%PDF-1.7 the user's report")
    result = run(nerveseg("export", "--run-dir", run_copy, "--out", a_file, "--device", "cpu"))
    record("export --out a file", result, a_file.read_bytes() == b"%PDF-1.7 the user's report"
           and not any(p.name.startswith(".report") for p in cases.iterdir()))

    cwd = cases / "cwd"
    cwd.mkdir()
    (cwd / "mine.txt").write_text("keep")
    result = run(nerveseg("export", "--run-dir", run_copy, "--out", ".", "--device", "cpu"), cwd=cwd)
    record("export --out . (a working folder)", result, (cwd / "mine.txt").read_text() == "keep")

    bundle_before = snapshot(run_copy / "bundle")
    result = run(nerveseg("export", "--run-dir", run_copy, "--out", run_copy / "bundle", "--device", "cpu"))
    record("export over a bundle without --replace", result, snapshot(run_copy / "bundle") == bundle_before)

    (run_copy / "bundle" / "my-notes.txt").write_text("keep")
    result = run(nerveseg("export", "--run-dir", run_copy, "--replace", "--device", "cpu"))
    record("export --replace a bundle holding a foreign file", result,
           (run_copy / "bundle" / "my-notes.txt").read_text() == "keep")
    (run_copy / "bundle" / "my-notes.txt").unlink()

    result = run(nerveseg("export", "--run-dir", run_copy, "--replace", "--device", "cpu"))
    from device_runtime.core.manifest import load_manifest

    load_manifest(run_copy / "bundle")
    record("export --replace an existing bundle", result, not leftovers(run_copy), expect_ok=True,
           message=next((l for l in result.stdout.splitlines() if l.startswith("replacing")), "(no notice)"))

    with tmpfs(cases / "ro", read_only=True) as ro:
        if ro is None:
            skipped("export --out on a read-only file system", "mount not allowed here")
        else:
            before_run = snapshot(run_copy)
            result = run(nerveseg("export", "--run-dir", run_copy, "--out", ro / "bundle", "--device", "cpu"))
            record("export --out on a read-only file system", result, snapshot(run_copy) == before_run)
    with tmpfs(cases / "full", size="1m") as full:
        if full is None:
            skipped("export --out on a full disk (1 MiB tmpfs)", "mount not allowed here")
        else:
            result = run(nerveseg("export", "--run-dir", run_copy, "--out", full / "bundle", "--device", "cpu"))
            record("export --out on a full disk (1 MiB tmpfs)", result, list(full.iterdir()) == [])
    out = cases / "fsize"
    out.mkdir()
    result = run(nerveseg("export", "--run-dir", run_copy, "--out", out / "bundle", "--device", "cpu"),
                 fsize=1 << 20)
    record("export under a 1 MiB file size limit", result, list(out.iterdir()) == [])

    evil, marker = evil_checkpoint(cases)
    result = run(nerveseg("export", "--checkpoint", evil, "--out", cases / "evil-bundle", "--device", "cpu"))
    record("export --checkpoint that would run code", result, not marker.exists())


def train_cases(work: Path, ref: Path):
    cases = work / "train-cases"
    cases.mkdir()
    blocker = cases / "a-file"
    blocker.write_text("x")
    result = run(nerveseg("train", *TINY, "--run-dir", blocker / "run"))
    record("train --run-dir under a file", result, blocker.read_text() == "x")
    result = run(nerveseg("synth", "--out", blocker / "phantom", "--count", "4"))
    record("synth --out under a file", result, blocker.read_text() == "x")
    with tmpfs(cases / "ro", read_only=True) as ro:
        if ro is None:
            skipped("train / synth on a read-only file system", "mount not allowed here")
        else:
            record("train --run-dir on a read-only file system", run(nerveseg("train", *TINY, "--run-dir", ro / "run")), True)
            record("synth --out on a read-only file system", run(nerveseg("synth", "--out", ro / "p", "--count", "4")), True)
    with tmpfs(cases / "full", size="256k") as full:
        if full is None:
            skipped("train / synth on a full disk", "mount not allowed here")
        else:
            result = run(nerveseg("synth", "--out", full / "p", "--count", "40"))
            record("synth --out on a full disk (256 KiB tmpfs)", result, not leftovers(full) and not (full / "p").exists())
            result = run(nerveseg("train", *TINY, "--run-dir", full / "run"))
            record("train --run-dir on a full disk (256 KiB tmpfs)", result, not leftovers(full))

    # a full disk at the first checkpoint: the phantom and config fit, a 13 MB checkpoint does not
    result = run(nerveseg("train", *TINY, "--run-dir", cases / "fsize-run"), fsize=4 << 20)
    record("train, disk full at the checkpoint (RLIMIT_FSIZE 4 MiB)", result,
           not leftovers(cases / "fsize-run") and not (cases / "fsize-run" / "checkpoints" / "last.pt").exists())

    tuned = cases / "tune-ro"
    def copy_run(folder: Path):  # what tune reads and writes; the split points at the reference's phantom
        (folder / "run" / "checkpoints").mkdir(parents=True)
        for name in ("config.toml", "split.json", "checkpoints/best.pt"):
            shutil.copyfile(ref / name, folder / "run" / name)

    with tmpfs(tuned, size="400m", read_only=True, fill=copy_run) as ro:
        if ro is None:
            skipped("tune on a read-only run folder", "mount not allowed here")
        else:
            before = snapshot(ro / "run")
            result = run(nerveseg("tune", "--run-dir", ro / "run", "--device", "cpu"))
            record("tune on a read-only run folder", result, snapshot(ro / "run") == before)

    nan = dataset(cases, "nan-data", "nan")
    result = run(nerveseg("train", *TINY, "--data", nan, "--run-dir", cases / "nan-run"))
    record("train on frames with NaN pixels", result, True, extra_ok="NaN" in (one_error_line(result.stderr) or ""))
    colour = dataset(cases, "colour-data", "colour")
    result = run(nerveseg("train", *TINY, "--data", colour, "--mask-label", "1", "--run-dir", cases / "colour-run"))
    record("train with colour (RGB) masks", result, True, extra_ok="colour mask" in (one_error_line(result.stderr) or ""))
    result = run(nerveseg("train", *TINY, "--mask-label", "0", "--run-dir", cases / "label0"))
    record("train --mask-label 0", result, not (cases / "label0").exists())


def device_cases(work: Path, ref: Path):
    import numpy as np
    import tifffile

    cases = work / "device-cases"
    cases.mkdir()
    bundle = ref / "bundle"
    frames = frames_folder(cases)
    before = snapshot(frames)
    base = ["run", "--bundle", bundle, "--quiet"]

    result = run(device(*base, "--source", frames / "*.png", "--masks", frames))
    record("device: glob source, --masks into its folder", result, snapshot(frames) == before)
    result = run(device(*base, "--source", frames / "scan_00.png", "--overlays", frames, "--overlay-format", "png",
                        "--overwrite"))
    record("device: file source, --overlays into its folder", result, snapshot(frames) == before)
    stack = cases / "stack.tif"
    tifffile.imwrite(stack, np.stack([np.full((64, 64), 90, np.uint8)] * 3), photometric="minisblack")
    stack_before = snapshot(stack)
    result = run(device(*base, "--source", stack, "--jsonl", stack, "--overwrite"))
    record("device: multi-page TIFF source, --jsonl onto it", result, snapshot(stack) == stack_before)
    clip = cases / "clip.mkv"
    result = run(device(*base, "--source", frames, "--video", clip))
    clip_before = snapshot(clip)
    result = run(device(*base, "--source", clip, "--video", clip, "--overwrite"))
    record("device: video source, --video onto it", result, snapshot(clip) == clip_before)
    result = run(device(*base, "--source", frames, "--summary-json", bundle / "manifest.json", "--overwrite"))
    record("device: --summary-json onto the bundle's manifest", result, snapshot(bundle / "manifest.json") ==
           snapshot(ref / "bundle" / "manifest.json"))

    existing = cases / "earlier.jsonl"
    existing.write_text('{"earlier": "run"}\n')
    result = run(device(*base, "--source", frames, "--jsonl", existing))
    record("device: --jsonl exists, no --overwrite", result, existing.read_text() == '{"earlier": "run"}\n')
    (cases / "a-dir.jsonl").mkdir()
    result = run(device(*base, "--source", frames, "--jsonl", cases / "a-dir.jsonl"))
    record("device: --jsonl is a folder", result, True)
    with tmpfs(cases / "ro", read_only=True) as ro:
        if ro is None:
            skipped("device: --summary-json on a read-only file system", "mount not allowed here")
        else:
            masks = cases / "masks-ro"
            result = run(device(*base, "--source", frames, "--masks", masks, "--summary-json", ro / "s.json"))
            record("device: --summary-json read-only (checked before frame 1)", result,
                   not masks.exists() or not any(masks.iterdir()))
    with tmpfs(cases / "full", size="1m") as full:
        if full is None:
            skipped("device: --video on a full disk", "mount not allowed here")
        else:
            result = run(device(*base, "--source", "synthetic:240x320", "--loop", "--max-frames", "3000",
                                "--video", full / "v.mkv"))
            frames_kept = count_frames(full / "v.mkv")
            record("device: --video on a full disk (1 MiB tmpfs)", result, frames_kept > 0,
                   message=f"plays {frames_kept} frames | {one_error_line(result.stderr)}")
    video = cases / "fsize.mkv"
    result = run(device(*base, "--source", "synthetic:240x320", "--loop", "--max-frames", "3000", "--video", video),
                 fsize=1 << 20)
    frames_kept = count_frames(video)
    record("device: --video under a 1 MiB file size limit", result, frames_kept > 0,
           message=f"plays {frames_kept} frames | {one_error_line(result.stderr)}")

    nan = cases / "nan.tif"
    tifffile.imwrite(nan, np.full((3, 32, 32), np.nan, np.float32), photometric="minisblack")
    result = run(device(*base, "--source", nan, "--summary-json", cases / "nan-summary.json"))
    strict = _strict_json(cases / "nan-summary.json")
    record("device: every frame NaN (no frame processed)", result, True, extra_ok=strict)

    for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGKILL, "kill -9")):
        video, jsonl = cases / f"rec-{name[-2:]}.mkv", cases / f"rec-{name[-2:]}.jsonl"
        process = subprocess.Popen(device(*base, "--source", "synthetic:240x320", "--loop", "--video", video,
                                          "--jsonl", jsonl), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not jsonl.exists() or len(jsonl.read_text().splitlines()) < 30):
            time.sleep(0.2)
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
        lines = len(jsonl.read_text().splitlines())
        kept = count_frames(video)
        if sig == signal.SIGTERM:
            record(f"device: {name} during a recording", process.returncode, kept == lines > 0, expect_ok=True,
                   message=f"video plays {kept} frames = {lines} JSONL lines")
        else:
            ok = kept > 0 and process.returncode == -signal.SIGKILL
            ROWS.append(Row(f"device: {name} during a recording", process.returncode, f"killed; the video plays "
                            f"{kept} of the {lines} frames in the JSONL (the last cluster is cut)", kept > 0, ok))
            print(f"{'PASS' if ok else 'FAIL'}  {ROWS[-1].case}: {ROWS[-1].message}", flush=True)


def full_disk_cases(work: Path, ref: Path):
    """Issue 35: every output on a disk already full when the run starts (a filled tmpfs where mounting is
    allowed, and RLIMIT_FSIZE of 4 KiB, which needs no root): exit non-zero before the first frame, one line
    naming the path, no zero-byte file; then a JSONL cut by a file size limit or a disk filling mid-run."""
    cases = work / "full-disk-cases"
    cases.mkdir()
    frames = frames_folder(cases)
    base = ["run", "--bundle", ref / "bundle", "--quiet", "--source", frames]
    outputs = [("--masks", "m"), ("--overlays", "o"), ("--video", "v.mkv"), ("--jsonl", "f.jsonl"),
               ("--summary-json", "s.json")]
    with tmpfs(cases / "full", size="1m", fill=_fill) as full:
        for flag, name in outputs:
            case = f"device: {flag} on a disk full before the first frame (tmpfs)"
            if full is None:
                skipped(case, "mount not allowed here")
                continue
            result = run(device(*base, flag, full / name))
            record(case, result, _no_empty_files(full), extra_ok=str(full / name) in (one_error_line(result.stderr) or ""))
    for flag, name in outputs:
        out = cases / f"fsize-{name}"
        result = run(device(*base, flag, out / name), fsize=4096)
        record(f"device: {flag} under a 4 KiB file size limit (full before frame 1)", result, _no_empty_files(out),
               extra_ok=str(out / name) in (one_error_line(result.stderr) or ""))

    jsonl = cases / "limit.jsonl"
    loop = ["run", "--bundle", ref / "bundle", "--quiet", "--source", "synthetic:96x128", "--loop",
            "--max-frames", "20000"]
    result = run(device(*loop, "--jsonl", jsonl), fsize=100_000)
    record("device: --jsonl under a 100 kB file size limit", result, _strict_lines(jsonl) > 0,
           extra_ok=str(jsonl) in (one_error_line(result.stderr) or ""),
           message=f"{_strict_lines(jsonl)} lines, all strict JSON | {one_error_line(result.stderr)}")
    with tmpfs(cases / "filling", size="256k") as filling:
        if filling is None:
            skipped("device: --jsonl on a disk filling during the run (256 KiB tmpfs)", "mount not allowed here")
        else:
            result = run(device(*loop, "--jsonl", filling / "f.jsonl"))
            lines = _strict_lines(filling / "f.jsonl")
            record("device: --jsonl on a disk filling during the run (256 KiB tmpfs)", result, lines > 0,
                   extra_ok=str(filling / "f.jsonl") in (one_error_line(result.stderr) or ""),
                   message=f"{lines} lines, all strict JSON | {one_error_line(result.stderr)}")


def _fill(folder: Path) -> None:
    """Fill a file system to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(bytes(4096))
    with contextlib.suppress(OSError):  # the last partial block, if any
        with open(folder / "filler-tail", "wb", buffering=0) as handle:
            while True:
                handle.write(b"x")


def _no_empty_files(folder: Path) -> bool:
    """Nothing the run left there but folders and the filler: no empty or partial output, no probe."""
    return not [p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("filler")]


def _strict_lines(path: Path) -> int:
    """How many lines `path` holds, every one strict JSON and the last one ended; -1 when any is not."""
    def refuse(constant):
        raise ValueError(constant)

    try:
        text = path.read_text()
        if text and not text.endswith("\n"):
            return -1
        return len([json.loads(line, parse_constant=refuse) for line in text.splitlines()])
    except (OSError, ValueError):
        return -1


def stream_client(port: int) -> "socket.socket":
    """A viewer of the preview's /stream.mjpg (its request sent)."""
    import socket

    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: localhost\r\n\r\n")
    return client


def stream_served(client, timeout: float = 5.0) -> bool:
    """Whether a picture arrives on this stream (True) or the server closes it (False)."""
    received, deadline = b"", time.monotonic() + timeout
    client.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = client.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return False
        if not chunk:
            return False
        received += chunk
        if b"Content-Type: image/jpeg" in received:
            return True
    raise TimeoutError("neither a picture nor a close")


def preview_bound(port: int, clients: int = 8, leave: int = 2) -> tuple[int, int, bool]:
    """`clients` viewers at once; then `leave` served ones close and new viewers try until as many are served.
    Returns (served at first, places taken after the leaving, whether one more viewer is then refused)."""
    first = [stream_client(port) for _ in range(clients)]
    served = [c for c in first if stream_served(c)]
    for client in served[:leave]:
        client.close()  # the server notices at its next write to them
    taken, deadline = [], time.monotonic() + 10
    while len(taken) < leave and time.monotonic() < deadline:
        client = stream_client(port)
        if stream_served(client):
            taken.append(client)
        else:
            client.close()
            time.sleep(0.05)
    extra = stream_client(port)
    refused = not stream_served(extra)
    for client in first + taken + [extra]:
        client.close()
    return len(served), len(taken), refused


def preview_case(work: Path, ref: Path):
    """Issue 35: 8 viewers of a running preview whose bound is 4: exactly 4 are served, and places freed by
    viewers that leave go to others."""
    import re

    process = subprocess.Popen(device("run", "--bundle", ref / "bundle", "--quiet", "--source", "synthetic:96x128",
                                      "--loop", "--mjpeg-port", "0"), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    port = None
    for line in process.stderr:  # "info: MJPEG preview at http://127.0.0.1:PORT/" comes before the first frame
        found = re.search(r"MJPEG preview at http://127\.0\.0\.1:(\d+)/", line)
        if found:
            port = int(found.group(1))
            break
    try:
        served, taken, refused = preview_bound(port) if port else (0, 0, False)
    finally:
        process.send_signal(signal.SIGTERM)
        err = process.communicate(timeout=60)[1]
    ok = (served, taken, refused) == (4, 2, True) and process.returncode == 0
    ROWS.append(Row("device: 8 preview clients, bound 4; 2 leave, 2 others come", process.returncode,
                    f"{served} of 8 served; {taken} of 2 took the freed places; one more "
                    f"{'refused' if refused else 'SERVED'}" + ("" if port else f" | no port: {err.strip()[-150:]}"),
                    True, ok))
    print(f"{'PASS' if ok else 'FAIL'}  {ROWS[-1].case}: {ROWS[-1].message}", flush=True)


def _strict_json(path: Path) -> bool:
    def refuse(constant):
        raise ValueError(constant)

    try:
        json.loads(path.read_text(), parse_constant=refuse)
        return True
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------ kills


def kill_at(cmd: list[str], at: float) -> bool:
    """Run `cmd` and kill -9 it `at` seconds in; False when it had finished by then."""
    process = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=at)
        return False
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return True


def comparable(run_dir: Path) -> dict:
    """What must not depend on kills: tuned threshold, test metrics (PyTorch and ONNX), the training log."""
    log = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
           for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((run_dir / "bundle" / "manifest.json").read_text())
    return {"threshold": json.loads((run_dir / "threshold.json").read_text()),
            "test": json.loads((run_dir / "test_metrics.json").read_text()),
            "test_onnx": manifest["metrics"]["test_onnx"], "log": log}


class BundleWatcher:
    """Verifies `folder` (every file's sha256 against its manifest) every `period_s` while a command runs.

    A verification can race with the atomic exchange itself (manifest read before it, a model file after), so
    a failure counts only when the next verification, a moment later, fails too: a half-old half-new bundle
    would stay so."""

    def __init__(self, folder: Path, period_s: float = 0.05):
        self.folder, self.period_s = folder, period_s
        self.checks = self.bad = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _verify(self) -> bool:
        from device_runtime.core.errors import InputError
        from device_runtime.core.manifest import load_manifest

        if not self.folder.exists():
            return True
        try:
            load_manifest(self.folder)
            return True
        except (InputError, OSError):
            return False

    def _watch(self):
        while not self._stop.is_set():
            ok = self._verify()
            self.checks += 1
            if not ok:
                time.sleep(0.3)
                if not self._verify():
                    self.bad += 1
            time.sleep(self.period_s)

    def stop(self):
        self._stop.set()
        self._thread.join()


def pipeline_kills(work: Path, ref: Path, seconds: float, kills: int, rng: random.Random):
    expected = comparable(ref)
    results = []
    for i in range(kills):
        run_dir = work / f"pipeline-kill-{i:02d}"
        at = rng.uniform(0.5, seconds)
        watcher = BundleWatcher(run_dir / "bundle")
        killed = kill_at(nerveseg("pipeline", *TINY, "--run-dir", run_dir), at)
        stage = _stage_of(run_dir)
        # a run killed before it wrote config.toml holds nothing to resume: it is started again, as a user would
        cmd = nerveseg("pipeline", "--resume", "--run-dir", run_dir, "--device", "cpu") \
            if (run_dir / "config.toml").is_file() else nerveseg("pipeline", *TINY, "--run-dir", run_dir)
        resumed = run(cmd)
        watcher.stop()
        finished = resumed.returncode in PIPELINE_FINISHED
        equal = finished and comparable(run_dir) == expected
        stale = leftovers(run_dir)
        ok = finished and equal and watcher.bad == 0 and not stale
        results.append(ok)
        print(f"  kill {i + 1}/{kills} at {at:5.1f} s ({'killed in ' + stage if killed else 'had finished'}); "
              f"{'--resume' if '--resume' in cmd else 'restart'} exit {resumed.returncode}; metrics "
              f"{'equal' if equal else 'DIFFER'}; bundle checks {watcher.checks}, inconsistent {watcher.bad}; "
              f"stale temporaries {len(stale)}"
              + ("" if finished else f"\n{resumed.stderr[-1500:]}"), flush=True)
        if ok:
            shutil.rmtree(run_dir)
    passed = sum(results)
    ROWS.append(Row(f"kill -9 at {kills} random moments of pipeline, each + --resume", "0" if passed == kills else "!",
                    f"{passed}/{kills} finished with metrics equal to an uninterrupted run's, bundle never "
                    "inconsistent, no stale temporaries", passed == kills, passed == kills))


def _stage_of(run_dir: Path) -> str:
    if (run_dir / "bundle").exists():
        return "export (bundle present)"
    if (run_dir / "test_metrics.json").exists():
        return "export"
    if (run_dir / "threshold.json").exists():
        return "evaluate"
    if (run_dir / "checkpoints" / "last.pt").exists():
        return "training/tune"
    if (run_dir / "config.toml").exists():
        return "start of training"
    return "start-up"


def export_kills(work: Path, ref: Path, kills: int, rng: random.Random):
    from device_runtime.core.manifest import load_manifest

    run_dir = work / "export-kill-run"
    shutil.copytree(ref, run_dir)
    started = time.perf_counter()
    run(nerveseg("export", "--run-dir", run_dir, "--replace", "--device", "cpu"))
    seconds = time.perf_counter() - started
    consistent = 0
    for i in range(kills):
        at = rng.uniform(0.3, seconds)
        watcher = BundleWatcher(run_dir / "bundle")
        kill_at(nerveseg("export", "--run-dir", run_dir, "--replace", "--device", "cpu"), at)
        watcher.stop()
        try:
            load_manifest(run_dir / "bundle")
            consistent += watcher.bad == 0
        except Exception as err:  # noqa: BLE001 (reported)
            print(f"  export kill {i + 1}: bundle does not verify: {err}", flush=True)
    final = run(nerveseg("export", "--run-dir", run_dir, "--replace", "--device", "cpu"))
    stale = leftovers(run_dir)
    ok = consistent == kills and final.returncode == 0 and not stale
    ROWS.append(Row(f"kill -9 at {kills} random moments of export --replace", final.returncode,
                    f"bundle verified complete after {consistent}/{kills} kills and all along; the next export "
                    f"left {len(stale)} stale temporaries", consistent == kills and not stale, ok))
    print(f"{'PASS' if ok else 'FAIL'}  export kills: {ROWS[-1].message}", flush=True)


QAT_BITS = "learned-a8"


def qat_comparable(qat_dir: Path) -> dict:
    """What must not depend on kills: the QAT log without its timing columns, the bits, the test metrics.
    Compared as canonical JSON text, so that a NaN (which equals nothing) still compares."""
    log = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
           for line in (qat_dir / "metrics.jsonl").read_text().splitlines()]
    return {name: json.dumps(value, sort_keys=True) for name, value in
            (("metrics.jsonl", log), ("bits.json", json.loads((qat_dir / "bits.json").read_text())),
             ("test_metrics.json", json.loads((qat_dir / "test_metrics.json").read_text())))}


def _qat_stage(qat_dir: Path) -> str:
    if (qat_dir / "test_metrics.json").exists():
        return "finish (test metrics written)"
    if (qat_dir / "bits.json").exists():
        return "finish (re-tuning)"
    if (qat_dir / "checkpoints" / "last.pt").exists():
        lines = len((qat_dir / "metrics.jsonl").read_text().splitlines()) if (qat_dir / "metrics.jsonl").exists() else 0
        return f"training ({lines} epochs logged)"
    if (qat_dir / "config.toml").exists():
        return "epoch 1"
    return "start-up"


def qat_kills(work: Path, ref: Path, kills: int, rng: random.Random):
    """Issue 35: kill -9 of `nerveseg qat --bits learned-a8` at random moments, each followed by `--resume` (or,
    when it was killed before it wrote its config, by the same command again, as a user would): metrics.jsonl
    (strict JSON), bits.json and test_metrics.json must equal an uninterrupted run's, no temporaries left."""
    qat = ["qat", "--run-dir", ref, "--device", "cpu"]
    started = time.perf_counter()
    reference = run(nerveseg(*qat, "--bits", QAT_BITS, "--name", "kill-reference"))
    seconds = time.perf_counter() - started
    if reference.returncode != 0:
        ROWS.append(Row(f"kill -9 at {kills} random moments of qat, each + --resume", reference.returncode,
                        f"the uninterrupted QAT run failed: {reference.stderr.strip()[-150:]}", True, False))
        return
    expected = qat_comparable(ref / "qat" / "kill-reference")
    print(f"uninterrupted qat --bits {QAT_BITS}: {seconds:.0f} s", flush=True)
    passed, first_failure = 0, ""
    for i in range(kills):
        name = f"kill-{i:02d}"
        qat_dir = ref / "qat" / name
        at = rng.uniform(0.5, seconds)
        killed = kill_at(nerveseg(*qat, "--bits", QAT_BITS, "--name", name), at)
        stage = _qat_stage(qat_dir)
        again = (qat_dir / "config.toml").is_file()
        resumed = run(nerveseg(*qat, "--name", name, "--resume") if again else
                      nerveseg(*qat, "--bits", QAT_BITS, "--name", name))
        finished = resumed.returncode == 0
        stale = leftovers(qat_dir)
        if finished:
            got = qat_comparable(qat_dir)
            differ = [key for key in expected if got[key] != expected[key]]
            strict = _strict_lines(qat_dir / "metrics.jsonl") > 0
            outcome = (f"{'equal' if not differ else 'DIFFER: ' + ', '.join(differ)}; metrics.jsonl "
                       f"{'strict' if strict else 'NOT strict JSON'}")
        else:
            differ, strict = list(expected), False
            outcome = f"not finished: {one_error_line(resumed.stderr) or resumed.stderr.strip()[-300:]}"
        ok = finished and not differ and strict and not stale
        passed += ok
        line = (f"qat kill {i + 1}/{kills} at {at:5.1f} s ({'killed in ' + stage if killed else 'had finished'}); "
                f"{'--resume' if again else 'restart'} exit {resumed.returncode}; {outcome}; "
                f"stale temporaries {len(stale)}").replace(str(WORK), "W")
        print(f"  {line}", flush=True)
        first_failure = first_failure or ("" if ok else line)
        if ok:
            shutil.rmtree(qat_dir)
    shutil.rmtree(ref / "qat" / "kill-reference", ignore_errors=True)
    ROWS.append(Row(f"kill -9 at {kills} random moments of qat --bits {QAT_BITS}, each + --resume",
                    "0" if passed == kills else "!",
                    f"{passed}/{kills} finished with metrics.jsonl, bits.json and test_metrics.json equal to an "
                    "uninterrupted run's, strict JSON, no stale temporaries"
                    + (f" | first failure: {first_failure}" if first_failure else ""), passed == kills, passed == kills))
    print(f"{'PASS' if passed == kills else 'FAIL'}  qat kills: {ROWS[-1].message}", flush=True)


# ------------------------------------------------------------------------------------------------ main


def print_table() -> None:
    width = max(len(r.case) for r in ROWS)
    print()
    print(f"{'case':<{width}}  exit  intact  result  message")
    for r in ROWS:
        print(f"{r.case:<{width}}  {str(r.code):>4}  {'yes' if r.intact else 'NO':>6}  {'PASS' if r.ok else 'FAIL':>6}  "
              f"{r.message[:200]}")
    print(f"\n{sum(r.ok for r in ROWS)}/{len(ROWS)} cases pass")


WORK = Path("/nonexistent")


def main() -> int:
    global WORK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder, removed)")
    parser.add_argument("--kills", type=int, default=20, help="kill -9 moments of `nerveseg pipeline` (default 20)")
    parser.add_argument("--export-kills", type=int, default=10, help="kill -9 moments of `export --replace`")
    parser.add_argument("--qat-kills", type=int, help="kill -9 moments of `nerveseg qat` (default: as --kills)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--only", choices=["export", "train", "device", "kills"], action="append",
                        help="run only these groups (repeatable)")
    args = parser.parse_args()
    groups = set(args.only or ["export", "train", "device", "kills"])
    WORK = args.work or Path(tempfile.mkdtemp(prefix="nerveseg-faults-"))
    WORK.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    ref, seconds = make_reference(WORK)
    print(f"reference pipeline (tiny phantom: {' '.join(TINY)}): {seconds:.0f} s", flush=True)
    if "export" in groups:
        export_cases(WORK, ref)
    if "train" in groups:
        train_cases(WORK, ref)
    if "device" in groups:
        device_cases(WORK, ref)
        full_disk_cases(WORK, ref)
        preview_case(WORK, ref)
    if "kills" in groups:
        if args.kills:
            pipeline_kills(WORK, ref, seconds, args.kills, rng)
        if args.export_kills:
            export_kills(WORK, ref, args.export_kills, rng)
        qat_kill_count = args.kills if args.qat_kills is None else args.qat_kills
        if qat_kill_count:
            qat_kills(WORK, ref, qat_kill_count, rng)
    print_table()
    print(f"({time.perf_counter() - started:.0f} s; scratch folder {WORK})")
    if not args.work:
        shutil.rmtree(WORK, ignore_errors=True)
    return 0 if all(r.ok for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
