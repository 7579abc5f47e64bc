"""Calibration sets: training frames written as model inputs, and the committed phantom set."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from device_runtime.errors import InputError
from device_runtime.imageio import read_image
from device_runtime.preprocess import frame_to_image
from training import calibration
from training.data import discover, save_split, split_samples
from training.calibration import write_calibration_set, write_phantom_calibration_set

COMMITTED = Path(__file__).resolve().parents[1] / "calibration_data"


def dataset(root: Path) -> Path:
    """Five 12x12 frames: 16-bit TIFFs and colour PNGs, each a different gradient."""
    ramp = np.linspace(0, 1, 12, dtype=np.float32)[None].repeat(12, 0)
    for i in range(5):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        frame = (ramp ** (i + 1))
        if i % 2:
            tifffile.imwrite(root / "images" / f"{i}.tif", (frame * 65535).astype(np.uint16))
        else:
            cv2.imwrite(str(root / "images" / f"{i}.png"), np.dstack([(frame * 255).astype(np.uint8)] * 3))
        cv2.imwrite(str(root / "masks" / f"{i}.png"), (frame > 0.5).astype(np.uint8))
    return root


def test_frames_are_the_model_input(tmp_path):
    samples = discover(dataset(tmp_path / "data"))
    written = write_calibration_set(samples, tmp_path / "calib", count=3, size=(8, 8), seed=0)
    assert len(written) == 3 and all(p.suffix == ".png" for p in written)
    by_name = {s.name: s for s in samples}
    for path in written:
        stored = read_image(path)
        assert stored.shape == (8, 8) and stored.dtype == np.uint8
        expected = frame_to_image(read_image(by_name[path.stem].image), (8, 8))
        np.testing.assert_allclose(frame_to_image(stored, (8, 8)), expected, atol=0.5 / 255 + 1e-6)


def test_same_seed_same_frames_and_count_capped(tmp_path):
    samples = discover(dataset(tmp_path / "data"))
    pick = [[p.name for p in write_calibration_set(samples, tmp_path / f"c{i}", 3, (8, 8), seed)]
            for i, seed in enumerate((1, 1))]
    assert pick[0] == pick[1]
    assert len(write_calibration_set(samples, tmp_path / "all", 100, (8, 8))) == 5


def test_refuses_a_folder_that_already_holds_images(tmp_path):
    samples = discover(dataset(tmp_path / "data"))
    out = tmp_path / "calib"
    out.mkdir()
    (out / "README.md").write_text("kept")
    write_calibration_set(samples, out, 2, (8, 8))  # a README alone is fine
    with pytest.raises(InputError, match="calib: already holds 2 images"):
        write_calibration_set(samples, out, 2, (8, 8))


def test_command_line_uses_the_train_split_only(tmp_path):
    root = dataset(tmp_path / "data")
    splits = split_samples(discover(root), seed=0)
    save_split(tmp_path / "split.json", splits, root)
    args = calibration.get_args_parser().parse_args(
        ["--split", str(tmp_path / "split.json"), "--out", str(tmp_path / "calib"), "--size", "8", "8"])
    written = calibration.main(args)
    assert {p.stem for p in written} == {s.name for s in splits["train"]}


def test_committed_set_is_what_the_readme_command_makes(tmp_path):
    committed = sorted(COMMITTED.glob("*.png"))
    assert len(committed) == 16 and (COMMITTED / "README.md").is_file()
    fresh = write_phantom_calibration_set(tmp_path, count=16, seed=2016, size=(256, 256))
    assert sorted(p.name for p in fresh) == [p.name for p in committed]
    for path in committed:
        stored, regenerated = read_image(path), read_image(tmp_path / path.name)
        assert stored.shape == (256, 256) and stored.dtype == np.uint8
        # identical here; another OpenCV/CPU may round a blur differently by one grey level
        assert np.abs(stored.astype(int) - regenerated).max() <= 1
