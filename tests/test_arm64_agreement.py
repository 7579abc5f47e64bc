"""scripts/arm64_agreement.py: the probe is the runtime's pipeline, and the comparison's figures are right.

The arm64 side itself (a chroot under qemu) is scripts/arm64_check.sh's job and does not run here; these tests
build the work tree it would leave, with a changed copy of the x86 side standing in for arm64.
"""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
from conftest import load_script
from device_helpers import disc_frame, make_bundle

from device_runtime.cli import main as device_main

agreement = load_script("arm64_agreement")


@pytest.fixture
def work(tmp_path):
    """WORK as arm64_check.sh lays it out, x86 side filled by the probe and by `run`; arm64 a copy of it."""
    work = tmp_path / "work"
    bundle = make_bundle(work / "bundles" / "b0", size=(32, 32), int8=True)
    (work / "bundles" / "b0.source").write_text("runs/x/bundle\n")
    frames = work / "frames" / "set0"
    frames.mkdir(parents=True)
    for i, centre in enumerate([(12, 14), (20, 10), (8, 8)]):  # at the model's size: no resampling of the mask
        cv2.imwrite(str(frames / f"f{i}.png"), disc_frame(32, 32, centre=centre, radius=6))
    out = work / "out" / "x86" / "b0" / "model.fp32" / "set0"
    assert agreement.probe(bundle, "model.fp32.onnx", str(frames), out / "probe.npz") == 3
    assert device_main(["run", "--bundle", str(bundle), "--backend", "ort-cpu", "--precision", "fp32",
                        "--source", str(frames), "--masks", str(out / "run" / "masks"), "--quiet"]) == 0
    shutil.copytree(work / "out" / "x86", work / "out" / "arm64")
    return work


def test_files_lists_each_onnx_file_and_which_run_picks(tmp_path):
    bundle = make_bundle(tmp_path / "b", int8=True)
    assert agreement.bundle_files(bundle) == [("fp32", "model.fp32.onnx", True), ("int8", "model.int8.onnx", True)]


def test_probe_masks_are_the_runtimes_masks(work):
    probe = agreement.load_probe(work / "out" / "x86" / "b0" / "model.fp32" / "set0" / "probe.npz")
    assert probe["names"] == ["f0", "f1", "f2"]
    assert probe["prob"].shape == (3, 32, 32) and probe["prob"].dtype == np.float32
    disc = disc_frame(32, 32, centre=(12, 14), radius=6) > 128  # the tiny model's mask is the bright disc
    assert np.array_equal(probe["masks"][0], disc)
    row, = agreement.compare(work)
    assert row["run_equals_probe"] is True  # `run` wrote exactly the probe's masks
    assert row["dice_min"] == 1.0 and row["dp_max"] == 0.0 and row["frames_below_gate"] == 0


def test_compare_measures_a_changed_side(work):
    arm = work / "out" / "arm64" / "b0" / "model.fp32" / "set0"
    with np.load(arm / "probe.npz") as data:
        arrays = {k: data[k].copy() for k in data.files}
    mask = arrays["mask/f1"]
    foreground = int(np.count_nonzero(mask))
    mask[mask.nonzero()[0][0]] = 0  # one row of the disc's pixels lost on "arm64"
    lost = foreground - int(np.count_nonzero(mask))
    arrays["prob"][2, 5, 7] += 0.25
    np.savez_compressed(arm / "probe.npz", **arrays)
    cv2.imwrite(str(arm / "run" / "masks" / "f1.png"), mask.astype(np.uint8) * 255)

    row, = agreement.compare(work)
    expected = 2 * (foreground - lost) / (2 * foreground - lost)
    assert row["dice_min"] == pytest.approx(expected)
    assert row["frames_below_gate"] == int(expected < agreement.DICE_GATE)
    assert row["mask_pixels_differing"] == lost
    assert row["dp_max"] == pytest.approx(0.25, abs=1e-6)
    assert row["dp_mean"] == pytest.approx(0.25 / (3 * 32 * 32), rel=1e-4)
    assert row["run_dice_min"] == pytest.approx(expected)
    assert row["run_equals_probe"] is True
    assert row["bundle"] == "runs/x/bundle"


def test_compare_refuses_different_frames(work, capsys):
    (work / "frames" / "set0" / "f2.png").unlink()
    arm = work / "out" / "arm64" / "b0" / "model.fp32" / "set0" / "probe.npz"
    agreement.probe(work / "bundles" / "b0", "model.fp32.onnx", str(work / "frames" / "set0"), arm)
    assert agreement.main(["compare", "--work", str(work)]) == 1
    assert "different frames" in capsys.readouterr().err


def test_verdict_is_decided_by_the_files_run_runs(capsys):
    base = {"dice_min": 1.0}
    probe_only_fails = [dict(base, run_dice_min=1.0), {"dice_min": 0.9}]
    assert agreement.verdict(probe_only_fails) == 0
    assert "not deciding: worst 0.9000" in capsys.readouterr().out
    assert agreement.verdict([dict(base, run_dice_min=0.99, dice_min=0.99), {"dice_min": 1.0}]) == 2
    assert agreement.verdict([{"dice_min": 0.99}]) == 2  # nothing run by `run`: every row decides
