"""Datasets on disk -> samples -> a deterministic split -> decoded arrays -> a torch Dataset.

Two layouts are found automatically under a dataset root:

- paired folders: `images/NAME.ext` with `masks/NAME.ext` (tif, tiff, png, jpg, jpeg; the two may differ in ext);
- the Kaggle 2016 layout: `<subject>_<frame>.tif` beside `<subject>_<frame>_mask.tif` in one folder.

Every pair is decoded once (`load_pairs`), through the same `device_runtime.core.preprocess` the device uses, so
the epochs never touch the disk again and the network trains on exactly what it will be fed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import write_json
from device_runtime.core.imageio import IMAGE_SUFFIXES, TIFF_SUFFIXES, read_image
from device_runtime.core.preprocess import frame_to_image, resize_mask

from ..finite import check_finite_array
from .mask_colour import labels_of

SPLITS = ("train", "val", "test")
LAYOUTS = ("images/NAME.ext + masks/NAME.ext", "Kaggle NAME.tif + NAME_mask.tif in one folder")
KAGGLE_MASK_SUFFIX = "_mask"


class DataError(InputError):
    """A dataset on disk that cannot be used; the message names the file or folder and the problem."""


@dataclass(frozen=True)
class Sample:
    name: str  # unique within a dataset, e.g. "0001" or "3_17"
    image: Path
    mask: Path
    subject: str | None  # patient id where the layout has one (Kaggle "<subject>_<frame>"), else None


def natural_key(name: str) -> tuple:
    """Sort key that orders "1_2" before "1_10", as a person would; ties broken by the plain string."""
    # re.split with a group alternates text and digits, so like positions always compare like types
    parts = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
    return parts, name


# ----------------------------------------------------------------------------------------------- discovery


def discover(root: str | os.PathLike) -> list[Sample]:
    """Find every image/mask pair under `root`, in either layout.

    Returns:
        Samples sorted by name (naturally: "2_1" before "10_1").

    Raises:
        DataError: `root` is missing or not a folder, holds no dataset, or an image lacks its mask
            (or a mask its image), or two files share one name.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: dataset folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: is not a folder; give the dataset's root folder")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        samples = _pair(_by_stem(root / "images"), _by_stem(root / "masks"), root / "images", root / "masks")
        if not samples:
            raise DataError(f"{root / 'images'}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    elif (root / "images").is_dir() or (root / "masks").is_dir():
        have, lack = ("images", "masks") if (root / "images").is_dir() else ("masks", "images")
        raise DataError(f"{root}: has {have}/ but no {lack}/ folder; the paired layout needs both")
    else:
        tiffs = _by_stem(root, TIFF_SUFFIXES)
        masks = {stem[: -len(KAGGLE_MASK_SUFFIX)]: p for stem, p in tiffs.items() if stem.endswith(KAGGLE_MASK_SUFFIX)}
        if not masks:
            raise DataError(f"{root}: no dataset found; looked for {LAYOUTS[0]} and for {LAYOUTS[1]}")
        images = {stem: p for stem, p in tiffs.items() if not stem.endswith(KAGGLE_MASK_SUFFIX)}
        samples = [Sample(s.name, s.image, s.mask, s.name.split("_", 1)[0] if "_" in s.name else None)
                   for s in _pair(images, masks, root, root)]
    return sorted(samples, key=lambda s: natural_key(s.name))


def _by_stem(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Image files of one folder by name without extension; hidden files (editor/OS litter) are skipped."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if path.stem in found:
            raise DataError(f"{path}: same name as {found[path.stem].name}; keep one file per name")
        found[path.stem] = path
    return found


def _pair(images: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path) -> list[Sample]:
    lonely = sorted(set(images) - set(masks), key=natural_key)
    if lonely:
        more = f"; {len(lonely) - 1} more images lack a mask" if len(lonely) > 1 else ""
        raise DataError(f"{images[lonely[0]]}: image has no mask in {mask_dir}{more}")
    orphans = sorted(set(masks) - set(images), key=natural_key)
    if orphans:
        more = f"; {len(orphans) - 1} more masks lack an image" if len(orphans) > 1 else ""
        raise DataError(f"{masks[orphans[0]]}: mask has no image in {image_dir}{more}")
    return [Sample(name, images[name], masks[name], None) for name in images]


def group_by_prefix(samples: list[Sample]) -> list[Sample]:
    """Subjects from names "<subject>_<frame>" (the part before the first "_"), for paired folders whose
    names carry the patient; a name without "_" is a subject of its own. Subjects the layout already
    knows (Kaggle) are kept."""
    return [s if s.subject is not None or "_" not in s.name else
            Sample(s.name, s.image, s.mask, s.name.split("_", 1)[0]) for s in samples]


def dataset_folder(samples: list[Sample]) -> Path:
    """The deepest folder holding every file of `samples` (the dataset root for both layouts)."""
    parents = {str(s.image.parent) for s in samples} | {str(s.mask.parent) for s in samples}
    return Path(os.path.commonpath(sorted(parents))) if parents else Path(".")


# ----------------------------------------------------------------------------------------------- split


def split_samples(samples: list[Sample], seed: int, fractions=(0.8, 0.1, 0.1)) -> dict[str, list[Sample]]:
    """Deterministic train/val/test split; whole subjects go to one side when samples have subjects.

    Without subjects the samples are shuffled and cut at rounded fractions, keeping val and test >= 1
    (204 -> 164/20/20, 10 -> 8/1/1, 3 -> 1/1/1). With subjects, see `_split_groups`.

    Returns:
        {"train": [...], "val": [...], "test": [...]}, each sorted by name and non-empty.

    Raises:
        InputError: `fractions` are not three positive numbers summing to 1.
        DataError: fewer than 3 samples (or subjects) to share out.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise InputError(f"split fractions must be three positive numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    samples = sorted(samples, key=lambda s: natural_key(s.name))  # the split must not depend on listing order
    if any(s.subject is not None for s in samples):
        groups: dict[str, list[Sample]] = {}
        for s in samples:  # a frame without a subject is a subject of its own
            groups.setdefault(s.subject if s.subject is not None else f"/{s.name}", []).append(s)
        if len(groups) < 3:
            raise DataError(f"{dataset_folder(samples)}: only {len(groups)} subject(s) ({', '.join(sorted(groups))});"
                            " need at least 3 so that train, val and test each get one")
        keys = sorted(groups, key=natural_key)
        sides = _split_groups([keys[i] for i in rng.permutation(len(keys))], groups, fractions)
    else:
        if len(samples) < 3:
            raise DataError(f"{dataset_folder(samples)}: only {len(samples)} sample(s); need at least 3"
                            " so that train, val and test each get one")
        order = [samples[i] for i in rng.permutation(len(samples))]
        n_val, n_test = (max(1, int(np.floor(len(samples) * f + 0.5))) for f in fractions[1:])
        n_val = min(n_val, len(samples) - 2)  # only bites on tiny sets with large fractions
        n_test = min(n_test, len(samples) - n_val - 1)
        sides = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return {side: sorted(sides[side], key=lambda s: natural_key(s.name)) for side in SPLITS}


def _split_groups(keys: list[str], groups: dict[str, list[Sample]], fractions) -> dict[str, list[Sample]]:
    """Deal shuffled subjects out, each to the side furthest below its frame-count target.

    A side still empty is served first once only as many subjects remain as there are empty sides, so
    every side gets at least one subject.
    """
    total = sum(len(g) for g in groups.values())
    targets = [f * total for f in fractions]
    sides: list[list[Sample]] = [[], [], []]
    for left, key in zip(range(len(keys), 0, -1), keys):
        empty = [i for i in range(3) if not sides[i]]
        candidates = empty if left <= len(empty) else range(3)
        best = max(candidates, key=lambda i: (targets[i] - len(sides[i]), -i))  # ties: train, val, test
        sides[best].extend(groups[key])
    return dict(zip(SPLITS, sides))


def save_split(path: str | os.PathLike, splits: dict[str, list[Sample]], root: str | os.PathLike,
               seed: int | None = None) -> None:
    """Write split.json atomically; file paths inside `root` are stored relative to it (portable runs)."""
    root = Path(os.path.abspath(root))

    def entry(s: Sample) -> dict:
        return {"name": s.name, "image": _relative(s.image, root), "mask": _relative(s.mask, root),
                "subject": s.subject}

    write_json(path, {"root": str(root), "seed": seed, **{side: [entry(s) for s in splits[side]] for side in SPLITS}})


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:
        return str(os.path.abspath(path))


def load_split(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, list[Sample]]:
    """Read split.json back; `root` overrides the stored root (the dataset moved).

    Raises:
        DataError: the file is missing, not JSON, or lacks a split or a field.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        base = Path(root if root is not None else obj["root"])
        return {side: [Sample(e["name"], base / e["image"], base / e["mask"], e["subject"]) for e in obj[side]]
                for side in SPLITS}
    except FileNotFoundError:
        raise DataError(f"{path}: split file does not exist") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not a valid split file (bad JSON: {err})") from None
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: not a valid split file (missing or malformed {err})") from None


# ----------------------------------------------------------------------------------------------- decoding


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask as its label values.

    Palette PNGs (LabelMe, usgra-seg) give their palette indices (0 bg, 1 nerve, 2 vessel...), not the
    colours that OpenCV would expand them to; other colour masks are read only when grey (equal channels),
    and refused otherwise (training/data/mask_colour.py), never turned into luminance.

    Returns:
        (H, W) array in the stored dtype.
    """
    path = Path(path)
    if path.suffix.lower() == ".png" and _is_palette_png(path):
        from PIL import Image  # Pillow comes with matplotlib; only palette masks need it

        try:
            with Image.open(path) as im:
                return np.asarray(im)
        except Exception as err:  # Pillow raises many types for corrupt files; all mean "unreadable"
            raise DataError(f"{path}: cannot decode palette mask ({type(err).__name__}: {err})") from None
    return labels_of(read_image(path), path)


def _is_palette_png(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(26)
    # PNG signature (8), IHDR length (4) + type (4), width (4), height (4), bit depth (1), colour type (1)
    return len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[25] == 3


def load_pairs(samples: list[Sample], size: tuple[int, int], mask_label: int | None = None,
               desc: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Decode every pair once, as the network sees it.

    Args:
        samples: the pairs to decode.
        size: (height, width) of the network input.
        mask_label: None: foreground is any non-zero mask pixel; L: foreground is mask == L on the raw
            label values (multi-label masks such as 0 background, 1 nerve, 2 vessel).
        desc: shows a progress bar with this title when given.

    Returns:
        images: float32 in [0, 1] (grey, 8/16 bit scaled, bilinear resize, `device_runtime.core.preprocess`).
        masks: uint8 in {0, 1}, nearest-neighbour resize.

    Shape:
        images, masks: (N, height, width).

    Raises:
        InputError: a file cannot be read (named).
        DataError: a mask differs in size from its image; no mask has a foreground pixel (or the
            `mask_label` never occurs; the values found are listed).
    """
    if not samples:
        raise DataError("load_pairs: no samples given; the split or dataset is empty")
    height, width = size
    images = np.empty((len(samples), height, width), np.float32)
    masks = np.empty((len(samples), height, width), np.uint8)
    positives = 0
    for i, s in enumerate(tqdm(samples, desc=desc, leave=False, disable=None if desc else True)):
        frame, labels = read_image(s.image), read_mask(s.mask)
        check_finite_array(frame, s.image, "image")  # NaN pixels would make the loss NaN (training/finite.py)
        check_finite_array(labels, s.mask, "mask")
        if labels.shape[:2] != frame.shape[:2]:
            raise DataError(f"{s.mask}: mask is {labels.shape[1]}x{labels.shape[0]} but its image {s.image.name}"
                            f" is {frame.shape[1]}x{frame.shape[0]} (width x height); they must match")
        foreground = (labels > 0) if mask_label is None else (labels == mask_label)
        positives += int(np.count_nonzero(foreground))
        images[i] = frame_to_image(frame, size)
        masks[i] = resize_mask(foreground.astype(np.uint8), size)
    if positives == 0:
        _raise_no_foreground(samples, mask_label)
    return images, masks


def _raise_no_foreground(samples: list[Sample], mask_label: int | None) -> None:
    folder = dataset_folder(samples)
    if mask_label is None:
        raise DataError(f"{folder}: no mask has a foreground (non-zero) pixel; nothing to learn from")
    values: set[int] = set()
    for s in samples:  # the failure path only, so decoding the masks a second time costs nothing in training
        values.update(np.unique(read_mask(s.mask)).tolist())
    shown = sorted(values)[:20]
    raise DataError(f"{folder}: mask_label {mask_label} never occurs in its masks; values found: {shown}"
                    f"{' ...' if len(values) > 20 else ''}; choose one of them, or no mask_label for any non-zero")


class SegmentationDataset(torch.utils.data.Dataset):
    """Decoded frames and masks (from `load_pairs`) as tensors, through an optional paired transform.

    Shape:
        item: image (1, H, W) float32 in [0, 1], mask (1, H, W) float32 in {0, 1}.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, transform=None):
        if images.ndim != 3 or masks.shape != images.shape:
            raise ValueError(f"expected images and masks of one shape (N, H, W), got {images.shape} and {masks.shape}")
        self.images, self.masks, self.transform = images, masks, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # copies, so that no transform or caller can write into the shared arrays
        image = torch.tensor(self.images[i], dtype=torch.float32)[None]
        mask = torch.tensor(self.masks[i], dtype=torch.float32)[None]
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask
