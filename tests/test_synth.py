"""The synthetic phantom: deterministic, subject-structured, plausible, and written in the Kaggle layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from device_runtime.core.errors import InputError
from training.data.dataset import discover, load_pairs, split_samples
from training.data.synth import generate_phantom, write_phantom

SMALL = dict(size=(64, 64), frames_per_subject=4)


def test_shapes_dtypes_and_names():
    images, masks, names = generate_phantom(6, seed=0, size=(48, 80), frames_per_subject=4)
    assert images.shape == masks.shape == (6, 48, 80) and images.dtype == masks.dtype == np.uint8
    assert names == ["1_1", "1_2", "1_3", "1_4", "2_1", "2_2"]  # subjects and frames counted from 1, like Kaggle
    assert set(np.unique(masks)) <= {0, 1}


def test_deterministic_per_seed_and_different_across_seeds():
    first, second, other = (generate_phantom(8, seed, **SMALL) for seed in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first[:2], second[:2]))
    assert not np.array_equal(first[0], other[0])


def test_a_larger_phantom_extends_a_smaller_one():
    small, large = generate_phantom(5, 1, **SMALL), generate_phantom(9, 1, **SMALL)
    assert np.array_equal(small[0], large[0][:5]) and np.array_equal(small[1], large[1][:5])


def test_masks_mostly_non_empty_and_nerves_a_few_percent():
    _, masks, _ = generate_phantom(60, seed=0, size=(128, 128))
    per_frame = masks.reshape(len(masks), -1).mean(1)
    assert (per_frame > 0).mean() >= 0.6  # mostly one nerve; some frames have none
    assert 0.005 < per_frame.mean() < 0.1


def test_frames_of_a_subject_share_anatomy():
    """Probe motion moves a subject's nerve a little; another subject's nerve is elsewhere."""
    _, masks, names = generate_phantom(40, seed=0, size=(128, 128), frames_per_subject=10)

    def iou(a, b):
        union = np.logical_or(a, b).sum()
        return np.logical_and(a, b).sum() / union if union else np.nan

    same = [iou(masks[i], masks[i + 1]) for i in range(39) if names[i].split("_")[0] == names[i + 1].split("_")[0]]
    other = [iou(masks[i], masks[j]) for i in range(0, 40, 10) for j in range(5, 40, 10) if i // 10 != j // 10]
    assert np.nanmean(same) > 0.5 > np.nanmean(other) + 0.3


def test_nerves_brighter_than_frame_on_average():
    """Learnable: hyperechoic target (but overlapping the fascia and speckle, see the images)."""
    images, masks, _ = generate_phantom(20, seed=5, size=(128, 128))
    nerve = images[masks == 1].astype(float)
    assert nerve.mean() > images.mean() + 5
    assert np.percentile(nerve, 10) < np.percentile(images, 75)  # not separable by brightness alone


def test_write_phantom_is_discovered_as_kaggle_with_subjects(tmp_path):
    root = write_phantom(tmp_path / "synthetic", 10, seed=2, **SMALL)
    samples = discover(root)
    assert [s.name for s in samples][:5] == ["1_1", "1_2", "1_3", "1_4", "2_1"]
    assert {s.subject for s in samples} == {"1", "2", "3"}
    assert set(np.unique(tifffile.imread(root / "1_1_mask.tif"))) <= {0, 255}  # stored 0/255, like Kaggle
    images, masks, _ = generate_phantom(10, seed=2, **SMALL)
    loaded_images, loaded_masks = load_pairs(samples, (64, 64))
    np.testing.assert_array_equal(loaded_masks, masks)
    np.testing.assert_allclose(loaded_images, images / 255, atol=1e-6)
    splits = split_samples(samples, seed=0)
    sides = [{s.subject for s in group} for group in splits.values()]
    assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert json.loads((root / "phantom.json").read_text())["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]  # no temporary folder left behind


def test_write_phantom_reuses_the_same_and_refuses_another(tmp_path):
    root = write_phantom(tmp_path / "synthetic", 4, seed=0, **SMALL)
    stamp = (root / "1_1.tif").stat().st_mtime_ns
    assert write_phantom(root, 4, seed=0, **SMALL) == root and (root / "1_1.tif").stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="synthetic: folder already exists"):
        write_phantom(root, 4, seed=1, **SMALL)


@pytest.mark.parametrize("kwargs", [dict(count=0), dict(count=2, seed=-1), dict(count=2, size=(16, 64)),
                                    dict(count=2, frames_per_subject=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(InputError):
        generate_phantom(**kwargs)


def test_calibration_data_holds_the_phantom_frames_its_readme_names():
    """calibration_data/ is 16 sample frames for a device run without a camera; its README says how they are made."""
    from pathlib import Path

    from device_runtime.core.imageio import read_image

    folder = Path(__file__).resolve().parents[1] / "calibration_data"
    committed = sorted(folder.glob("*.png"))
    images, _, names = generate_phantom(16, seed=2016, size=(256, 256), frames_per_subject=1)
    assert sorted(f"phantom_{name}.png" for name in names) == [p.name for p in committed]
    for image, name in zip(images, names):
        stored = read_image(folder / f"phantom_{name}.png")
        assert stored.shape == (256, 256) and stored.dtype == np.uint8
        # identical here; another OpenCV/CPU may round a blur differently by one grey level
        assert np.abs(stored.astype(int) - image).max() <= 1
