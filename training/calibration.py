"""Calibration sets for INT8: a few hundred representative TRAINING frames, preprocessed like the model input.

Frames are stored as 8-bit grey PNGs at the network's input size, so reading one back through
`device_runtime.preprocess` gives the model input again (to within 8-bit rounding, < 0.002, far below the
INT8 step of the input). Never take them from the validation or test split: the threshold and the reported
metrics would then have seen those frames.

    python -m training.calibration --split runs/NAME/split.json --out DIR --count 300 --size 256 256
    python -m training.calibration --phantom --out calibration_data --count 16 --seed 2016
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from device_runtime.errors import InputError
from device_runtime.fileio import atomic_path
from device_runtime.imageio import IMAGE_SUFFIXES, read_image
from device_runtime.preprocess import frame_to_image

from .data import Sample, load_split, natural_key
from .synth import generate_phantom


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _write_pngs(out_dir: Path, names: list[str], images) -> list[Path]:
    """Write grey PNGs into `out_dir`, which may exist (it keeps its README) but must hold no images yet."""
    if out_dir.is_dir():
        old = [p for p in out_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        if old:
            raise InputError(f"{out_dir}: already holds {len(old)} images (e.g. {old[0].name}); remove them first,"
                             " so that two calibration sets are never mixed")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in zip(names, images):
        path = out_dir / f"{name}.png"
        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise InputError(f"{path}: cannot encode PNG from an array of shape {image.shape}")
        with atomic_path(path) as tmp:
            tmp.write_bytes(encoded.tobytes())
        paths.append(path)
    return paths


def write_calibration_set(samples: list[Sample], out_dir: str | os.PathLike, count: int,
                          size: tuple[int, int] = (256, 256), seed: int = 0) -> list[Path]:
    """Pick `count` frames of `samples` at random (all of them when fewer) and write them as model inputs.

    Args:
        samples: the training split (never validation or test).
        out_dir: where the PNGs go, named like their samples.
        count: how many frames; a few hundred covers the intensity range well.
        size: (height, width) of the model input.
        seed: which frames are picked; the same seed picks the same frames.

    Returns:
        The written files, in name order.

    Raises:
        InputError: no samples, count < 1, a frame cannot be read, or `out_dir` already holds images.
    """
    if not samples or count < 1:
        raise InputError(f"calibration needs samples and count >= 1, got {len(samples)} samples and count {count}")
    picked = np.random.default_rng(seed).choice(len(samples), min(count, len(samples)), replace=False)
    chosen = sorted((samples[i] for i in picked), key=lambda s: natural_key(s.name))
    images = (_to_uint8(frame_to_image(read_image(s.image), size)) for s in chosen)  # one frame in memory at a time
    return _write_pngs(Path(out_dir), [s.name for s in chosen], images)


def write_phantom_calibration_set(out_dir: str | os.PathLike, count: int = 16, seed: int = 2016,
                                  size: tuple[int, int] = (256, 256)) -> list[Path]:
    """The committed `calibration_data/`: `count` phantom frames, one per subject so that each is different."""
    images, _, names = generate_phantom(count, seed, size, frames_per_subject=1)
    return _write_pngs(Path(out_dir), [f"phantom_{name}" for name in names], images)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write an INT8 calibration set of preprocessed frames.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", type=Path, help="a run's split.json; its TRAIN frames are used")
    source.add_argument("--phantom", action="store_true", help="synthetic phantom frames instead")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must hold no images yet)")
    parser.add_argument("--count", type=int, default=300, help="number of frames (default 300)")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"),
                        help="model input size (default 256 256)")
    parser.add_argument("--seed", type=int, default=0, help="which frames (or which phantom) (default 0)")
    return parser


def main(args: argparse.Namespace) -> list[Path]:
    if args.phantom:
        return write_phantom_calibration_set(args.out, args.count, args.seed, tuple(args.size))
    return write_calibration_set(load_split(args.split)["train"], args.out, args.count, tuple(args.size), args.seed)


if __name__ == "__main__":
    try:
        written = main(get_args_parser().parse_args())
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(written)} frames to {written[0].parent}")
