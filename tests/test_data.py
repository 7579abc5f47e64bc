"""Data layer: layouts, bad inputs, the split, split.json, decoding and the Dataset, on tiny generated files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

from device_runtime.core.errors import InputError
from training.data.dataset import (
    DataError, Sample, SegmentationDataset, discover, load_pairs, load_split, save_split, split_samples)

REAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/usgra-seg"

# a 4x4 frame, left half bright; its mask marks exactly that half
HALF = np.array([[1, 1, 0, 0]] * 4, np.uint8)


def upscale(array: np.ndarray, factor: int) -> np.ndarray:
    return array.repeat(factor, 0).repeat(factor, 1)


def write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, array)
    else:
        assert cv2.imwrite(str(path), array)
    return path


def paired(root: Path, names, image_ext=".png", mask_ext=".png", image=HALF * 255, mask=HALF) -> Path:
    for name in names:
        write(root / "images" / f"{name}{image_ext}", image)
        write(root / "masks" / f"{name}{mask_ext}", mask)
    return root


def kaggle(root: Path, names, mask=HALF * 255) -> Path:
    for name in names:
        write(root / f"{name}.tif", HALF * 255)
        write(root / f"{name}_mask.tif", mask)
    return root


def fake_samples(count: int, frames_per_subject: int = 0) -> list[Sample]:
    """Samples that need no files (the split looks at names and subjects only)."""
    def subject(i):
        return str(i // frames_per_subject + 1) if frames_per_subject else None
    return [Sample(f"{i:03d}", Path(f"/d/images/{i:03d}.png"), Path(f"/d/masks/{i:03d}.png"), subject(i))
            for i in range(count)]


# ------------------------------------------------------------------------------------------- discover


@pytest.mark.parametrize("image_ext, mask_ext", [(".png", ".png"), (".tif", ".png"), (".jpg", ".tiff"),
                                                 (".jpeg", ".tif")])
def test_discover_paired(tmp_path, image_ext, mask_ext):
    paired(tmp_path, ["10", "2", "1"], image_ext, mask_ext)
    samples = discover(tmp_path)
    assert [s.name for s in samples] == ["1", "2", "10"]  # natural order
    assert samples[0] == Sample("1", tmp_path / "images" / f"1{image_ext}", tmp_path / "masks" / f"1{mask_ext}", None)


def test_discover_kaggle_has_subjects(tmp_path):
    kaggle(tmp_path, ["10_1", "1_2", "2_1", "1_10", "1_1"])
    (tmp_path / "notes.txt").write_text("ignored")
    samples = discover(tmp_path)
    assert [s.name for s in samples] == ["1_1", "1_2", "1_10", "2_1", "10_1"]
    assert [s.subject for s in samples] == ["1", "1", "1", "2", "10"]
    assert samples[0].mask == tmp_path / "1_1_mask.tif"


def _empty(root):
    root.mkdir()


def _file_root(root):
    root.write_text("not a folder")


def _image_without_mask(root):
    paired(root, ["a", "b"])
    (root / "masks" / "b.png").unlink()


def _mask_without_image(root):
    paired(root, ["a", "b"])
    (root / "images" / "b.png").unlink()


def _kaggle_image_without_mask(root):
    kaggle(root, ["1_1", "1_2"])
    (root / "1_2_mask.tif").unlink()


def _no_masks_folder(root):
    write(root / "images" / "a.png", HALF)


def _empty_images_folder(root):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()


def _two_files_one_name(root):
    paired(root, ["a"])
    write(root / "images" / "a.tif", HALF)


@pytest.mark.parametrize("make, named", [
    (None, "data"),  # missing
    (_file_root, "data"),
    (_empty, "looked for images/NAME.ext"),
    (_image_without_mask, "images/b.png"),
    (_mask_without_image, "masks/b.png"),
    (_kaggle_image_without_mask, "1_2.tif"),
    (_no_masks_folder, "no masks/ folder"),
    (_empty_images_folder, "images: no images"),
    (_two_files_one_name, "a.tif"),
])
def test_discover_errors_name_the_path(tmp_path, make, named):
    root = tmp_path / "data"
    if make:
        make(root)
    with pytest.raises(DataError, match="data") as err:
        discover(root)
    assert named in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------- load_pairs


@pytest.mark.parametrize("image_ext, image, expected", [
    (".png", HALF * 255, 1.0),  # 8 bit
    (".tif", HALF.astype(np.uint16) * 65535, 1.0),  # 16 bit, scaled by its own range
    (".tif", HALF.astype(np.uint16) * 32768, 32768 / 65535),
    (".png", np.dstack([np.zeros_like(HALF)] * 2 + [HALF * 255]), 0.299),  # pure red (BGR) -> OpenCV grey weight
    (".jpg", np.dstack([HALF * 255] * 3), 1.0),  # lossy: checked with a tolerance
])
def test_load_pairs_scales_and_greys(tmp_path, image_ext, image, expected):
    # 16x16 frames; sampled at (2, 4) the bilinear taps fall inside the flat halves, so values are exact
    paired(tmp_path, ["a"], image_ext, ".png", image=upscale(image, 4), mask=upscale(HALF, 4))
    images, masks = load_pairs(discover(tmp_path), (2, 4))
    assert images.shape == masks.shape == (1, 2, 4)
    assert images.dtype == np.float32 and masks.dtype == np.uint8
    np.testing.assert_allclose(images[0], HALF[:2] * expected, atol=0.03 if image_ext == ".jpg" else 0.003)
    np.testing.assert_array_equal(masks[0], HALF[:2])


@pytest.mark.parametrize("mask, mask_label, expected", [
    ([[0, 255], [0, 0]], None, [[0, 1], [0, 0]]),  # Kaggle 0/255
    ([[0, 1], [2, 0]], None, [[0, 1], [1, 0]]),  # any label
    ([[0, 1], [2, 0]], 1, [[0, 1], [0, 0]]),  # nerve only
    ([[0, 1], [2, 0]], 2, [[0, 0], [1, 0]]),  # vessel only
])
def test_load_pairs_mask_label(tmp_path, mask, mask_label, expected):
    paired(tmp_path, ["a"], mask=np.array(mask, np.uint8), image=np.zeros((2, 2), np.uint8))
    _, masks = load_pairs(discover(tmp_path), (2, 2), mask_label)
    np.testing.assert_array_equal(masks[0], expected)


def test_palette_mask_gives_label_indices_not_colours(tmp_path):
    """usgra-seg's masks are palette PNGs; OpenCV would expand them to colours (label 1 -> grey 38)."""
    Image = pytest.importorskip("PIL.Image")
    paired(tmp_path, ["a"], image=np.zeros((2, 2), np.uint8))
    palette = Image.fromarray(np.array([[0, 1], [2, 0]], np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0])
    palette.save(tmp_path / "masks" / "a.png")
    _, nerve = load_pairs(discover(tmp_path), (2, 2), mask_label=1)
    np.testing.assert_array_equal(nerve[0], [[0, 1], [0, 0]])


def test_load_pairs_resizes_masks_nearest(tmp_path):
    mask = upscale(np.array([[0, 1], [1, 0]], np.uint8), 3)  # 6x6
    paired(tmp_path, ["a"], image=mask * 255, mask=mask)
    images, masks = load_pairs(discover(tmp_path), (3, 3))
    # nearest takes source pixels floor(x * 6 / 3) = 0, 2, 4: no new values
    np.testing.assert_array_equal(masks[0], [[0, 0, 1], [0, 0, 1], [1, 1, 0]])
    # bilinear samples the centre (2.5, 2.5), between two 0 and two 1 pixels
    assert images[0, 1, 1] == pytest.approx(0.5, abs=0.003)


def _corrupt_image(root):
    (root / "images" / "b.png").write_bytes(b"not a png")
    return "b.png"


def _mask_other_size(root):
    write(root / "masks" / "b.png", np.ones((2, 3), np.uint8))
    return "3x2"


def _no_positive_pixel(root):
    for name in ("a", "b"):
        write(root / "masks" / f"{name}.png", np.zeros((4, 4), np.uint8))
    return "no mask has a foreground"


@pytest.mark.parametrize("spoil", [_corrupt_image, _mask_other_size, _no_positive_pixel])
def test_load_pairs_errors_name_the_file(tmp_path, spoil):
    root = paired(tmp_path / "data", ["a", "b"])
    expected = spoil(root)
    with pytest.raises(InputError) as err:
        load_pairs(discover(root), (4, 4))
    message = str(err.value)
    assert expected in message and str(root) in message and "\n" not in message


def test_mask_of_another_size_names_both_sizes(tmp_path):
    root = paired(tmp_path, ["a"])
    write(root / "masks" / "a.png", np.ones((2, 3), np.uint8))
    with pytest.raises(DataError, match=r"masks/a\.png: mask is 3x2 but its image a\.png is 4x4"):
        load_pairs(discover(root), (4, 4))


def test_mask_label_that_never_occurs_lists_the_values(tmp_path):
    root = paired(tmp_path / "data", ["a"], mask=np.array([[0, 2], [2, 0]], np.uint8), image=np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match=r"mask_label 1 never occurs.*values found: \[0, 2\]") as err:
        load_pairs(discover(root), (2, 2), mask_label=1)
    assert str(root) in str(err.value)


# ------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("count, sizes", [(3, (1, 1, 1)), (4, (2, 1, 1)), (10, (8, 1, 1)), (25, (19, 3, 3)),
                                          (204, (164, 20, 20))])
def test_split_sizes_and_partition(count, sizes):
    samples = fake_samples(count)
    splits = split_samples(samples, seed=0)
    assert tuple(len(splits[k]) for k in ("train", "val", "test")) == sizes
    names = [s.name for k in ("train", "val", "test") for s in splits[k]]
    assert sorted(names) == sorted(s.name for s in samples)  # every sample exactly once


def test_split_is_deterministic_per_seed():
    samples = fake_samples(50)
    assert split_samples(samples, 7) == split_samples(list(reversed(samples)), 7)  # input order does not matter
    assert split_samples(samples, 7)["val"] != split_samples(samples, 8)["val"]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("frames_per_subject", [1, 7, 10])
def test_split_groups_subjects(seed, frames_per_subject):
    samples = fake_samples(120, frames_per_subject)
    splits = split_samples(samples, seed)
    sides = {s.subject: side for side, group in splits.items() for s in group}
    for side, group in splits.items():
        assert group and all(sides[s.subject] == side for s in group)  # no subject on two sides
    # dealing whole subjects lands within one subject of each target
    for side, fraction in zip(("train", "val", "test"), (0.8, 0.1, 0.1)):
        assert abs(len(splits[side]) - fraction * 120) <= frames_per_subject


def test_split_three_subjects_one_each():
    splits = split_samples(fake_samples(30, 10), seed=0)
    assert sorted(len({s.subject for s in group}) for group in splits.values()) == [1, 1, 1]


@pytest.mark.parametrize("samples, named", [(fake_samples(2), "only 2 sample"),
                                            (fake_samples(20, 10), "only 2 subject")])
def test_split_too_few(samples, named):
    with pytest.raises(DataError, match=named):
        split_samples(samples, 0)


@pytest.mark.parametrize("fractions", [(0.8, 0.2, 0.0), (0.5, 0.5, 0.5), (1.0,)])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(InputError, match="fractions"):
        split_samples(fake_samples(10), 0, fractions)


def test_split_json_round_trip_and_relocation(tmp_path):
    root = kaggle(tmp_path / "data", [f"{s}_{f}" for s in (1, 2, 3, 4) for f in (1, 2)])
    splits = split_samples(discover(root), seed=3)
    save_split(tmp_path / "run" / "split.json", splits, root, seed=3)
    stored = json.loads((tmp_path / "run" / "split.json").read_text())
    assert stored["root"] == str(root) and stored["seed"] == 3
    assert stored["test"][0]["image"] == f"{stored['test'][0]['name']}.tif"  # relative to the root
    assert load_split(tmp_path / "run" / "split.json") == splits
    moved = shutil.move(root, tmp_path / "moved")
    relocated = load_split(tmp_path / "run" / "split.json", root=moved)
    assert all(s.image.is_file() for group in relocated.values() for s in group)


@pytest.mark.parametrize("text", ["{", '{"root": "/x", "train": []}', ""])
def test_load_split_bad_file(tmp_path, text):
    path = tmp_path / "split.json"
    if text:
        path.write_text(text)
    with pytest.raises(DataError, match="split.json"):
        load_split(path)


# ------------------------------------------------------------------------------------------- dataset


def test_dataset_items_and_transform():
    images = np.random.default_rng(0).random((3, 8, 6), dtype=np.float32)
    masks = (images > 0.5).astype(np.uint8)
    image, mask = SegmentationDataset(images, masks)[1]
    assert image.shape == mask.shape == (1, 8, 6) and image.dtype == mask.dtype == torch.float32
    assert torch.equal(image[0], torch.from_numpy(images[1])) and set(mask.unique().tolist()) <= {0.0, 1.0}

    def spoil(image, mask):  # an in-place transform must not reach the shared arrays
        return image.mul_(0), mask.add_(5)

    dataset = SegmentationDataset(images, masks, spoil)
    assert len(dataset) == 3 and dataset[0][1].min() == 5
    assert images[0].max() > 0 and masks[0].max() <= 1


def test_dataset_rejects_mismatched_arrays():
    with pytest.raises(ValueError, match="one shape"):
        SegmentationDataset(np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 5), np.uint8))


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real data not present at {REAL_DATA}")
def test_real_usgra_seg_smoke():
    samples = discover(REAL_DATA)
    assert len(samples) == 204 and all(s.subject is None for s in samples)
    chosen = samples[::51]
    images, nerve = load_pairs(chosen, (256, 256), mask_label=1)
    _, anything = load_pairs(chosen, (256, 256))
    assert images.shape == (4, 256, 256) and 0 <= images.min() and images.max() <= 1
    assert 0.002 < nerve.mean() < 0.15  # the nerve covers a few % of a frame
    assert np.all(nerve <= anything) and anything.sum() > nerve.sum()  # label 2 (vessels) excluded
