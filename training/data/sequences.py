"""Videos whose truth is known, to measure temporal stabilisation: there are no labelled ultrasound videos here.

Two kinds, both with a per-frame truth mask and the true motion between consecutive frames:

- phantom sequences: the phantom's anatomy (`training.data.synth`) laid out still on a canvas three frames wide, and a
  probe moving over it: a smooth lateral slide (in most sequences far enough that the nerve leaves the field and
  comes back), in-plane rotation, pressure (vertical shift) and a depth change (zoom about the skin). The speckle
  is partly tied to the tissue (it moves with it) and partly fresh each frame, so it decorrelates frame to frame
  as it does when the probe moves; the skin line and the depth attenuation stay with the probe.
- pseudo-videos of real labelled frames: a smooth random trajectory of affine transforms (shift, rotation, scale
  about the centre) applied to the frame and its mask together, then fresh multiplicative speckle and a gain
  drift per frame. The nerve does not change shape; the frames around it only move and decorrelate.

Motion: `motions[t]` is the 2x3 affine that maps frame t-1's pixels to frame t's (`motions[0]` is the identity),
the form `device_runtime.core.sequence_metrics` takes. Everything is deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

from device_runtime.core.errors import InputError
from device_runtime.core.preprocess import to_gray, to_unit_float

from . import synth

CANVAS_WIDTHS = 3  # the phantom canvas is this many frames wide: room for the nerve to leave the field
LEAVE_SHARE = 0.7  # share of phantom sequences whose slide takes the first nerve out of the field and back
TIED_SPECKLE = (0.5, 0.85)  # range of the share (correlation) of speckle that moves with the tissue
MAX_TURN = 4.0  # degrees of in-plane rotation, at most


@dataclass
class Sequence:
    """A video with its truth. Shape: frames, masks (T, H, W) uint8 (masks 0/1); motions (T, 2, 3) float64."""

    name: str
    frames: np.ndarray
    masks: np.ndarray
    motions: np.ndarray


def smooth_noise(rng: np.random.Generator, frames: int, sigma: float, std: float) -> np.ndarray:
    """(frames,) white noise low-passed by a Gaussian of `sigma` frames, scaled to standard deviation `std`."""
    pad = int(3 * sigma) + 1
    raw = rng.standard_normal(frames + 2 * pad)
    kernel = np.exp(-0.5 * (np.arange(-pad, pad + 1) / sigma) ** 2)
    smooth = np.convolve(raw, kernel / kernel.sum(), mode="same")[pad:pad + frames]
    return smooth * (std / max(float(smooth.std()), 1e-9))


def affine(scale: float, degrees: float, source: tuple[float, float], target: tuple[float, float]) -> np.ndarray:
    """2x3: rotate by `degrees` and scale about `source` (x, y), which lands on `target`."""
    c, s = np.cos(np.radians(degrees)) * scale, np.sin(np.radians(degrees)) * scale
    linear = np.array([[c, -s], [s, c]])
    return np.hstack([linear, (np.asarray(target) - linear @ np.asarray(source))[:, None]])


def _full(a: np.ndarray) -> np.ndarray:
    return np.vstack([a, [0.0, 0.0, 1.0]])


def relative_motions(placements: np.ndarray) -> np.ndarray:
    """(T, 2, 3) scene->frame affines -> (T, 2, 3) frame t-1 -> frame t affines (identity first)."""
    motions = np.empty_like(placements, dtype=np.float64)
    motions[0] = np.eye(2, 3)
    for t in range(1, len(placements)):
        motions[t] = (_full(placements[t]) @ np.linalg.inv(_full(placements[t - 1])))[:2]
    return motions


def rescale_motions(motions: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Motions between frames of `from_size` (height, width) expressed between the same frames resized (cv2.resize's
    pixel-centre convention: x' = (x + 0.5) * w'/w - 0.5) to `to_size`."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    resize = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
    back = np.linalg.inv(resize)
    return np.stack([(resize @ _full(m) @ back)[:2] for m in motions])


def _check(frames: int, size: tuple[int, int]) -> None:
    if frames < 2:
        raise InputError(f"a sequence needs at least 2 frames, got {frames}")
    if len(size) != 2 or min(size) < 32:
        raise InputError(f"size must be (height, width), each at least 32, got {tuple(size)}")


# ----------------------------------------------------------------------------------------------- phantom


def _phantom_path(rng: np.random.Generator, frames: int, size: tuple[int, int], canvas_width: int,
                  nerve: dict | None) -> np.ndarray:
    """(T, 2, 3) canvas->frame affines of a probe sliding, rocking, pressing and changing depth."""
    height, width = size
    t = np.arange(frames)
    pad = height * np.sin(np.radians(MAX_TURN)) + 2  # a rotated frame's bottom corners stay on the canvas
    low, high = width / 2 + pad, canvas_width - width / 2 - pad
    centre = nerve["cx"] if nerve is not None else rng.uniform(low, high)
    if nerve is not None and rng.random() < LEAVE_SHARE:
        # the nerve starts off-centre on the side the probe slides away from; the slide out and back (a raised
        # cosine) goes far enough for its far edge to pass the frame's edge, at a peak speed of 1.5-2.5 % of
        # the frame's width per frame (a brisk slide: about 1 cm/s over a 4 cm field at 25 frames/s is 1 %)
        direction = 1.0 if high - centre > centre - low else -1.0
        lead = rng.uniform(0.15, 0.3) * width
        x = np.full(frames, np.clip(centre + direction * lead, low, high))
        travel = width / 2 + 1.15 * nerve["rx"] + 0.05 * width - abs(x[0] - centre)
        length = min(np.pi * travel / (rng.uniform(0.015, 0.025) * width), 0.9 * frames)
        start = rng.uniform(0.05 * frames, max(0.05 * frames, 0.95 * frames - length))
        inside = (t >= start) & (t <= start + length)
        x += direction * travel * np.where(inside, 0.5 * (1 - np.cos(2 * np.pi * (t - start) / length)), 0)
    else:
        x = np.full(frames, np.clip(centre + rng.uniform(-0.1, 0.1) * width, low, high))
    x = np.clip(x + smooth_noise(rng, frames, 8, 0.02 * width), low, high)
    turn = np.clip(smooth_noise(rng, frames, 12, 2.0), -MAX_TURN, MAX_TURN)
    press = smooth_noise(rng, frames, 10, 0.01 * height)
    zoom = np.full(frames, rng.uniform(1.0, 1.15))
    if rng.random() < 0.5:  # a depth change: the image magnifies about the skin over about 8 frames
        middle, to = rng.uniform(0.2, 0.8) * frames, rng.uniform(1.0, 1.2)
        zoom += (to - zoom) * 0.5 * (1 + np.tanh((t - middle) / 3.0))
    return np.stack([affine(zoom[i], turn[i], (x[i], press[i]), (width / 2, 0.0)) for i in range(frames)])


def phantom_sequence(seed: int, index: int, frames: int = 100, size: tuple[int, int] = (256, 256)) -> Sequence:
    """Phantom sequence `index` of `seed`: (frames, *size) frames, masks and motions."""
    _check(frames, size)
    height, width = size
    canvas = (height, CANVAS_WIDTHS * width)
    subject = synth.make_subject(np.random.default_rng([seed, index, 0]), canvas)
    refl, mask = synth.anatomy(subject, canvas, 0.0, 0.0, None, skin=False)
    rng = np.random.default_rng([seed, index, 1])
    nerve = subject.nerves[0] if subject.nerves else None
    placements = _phantom_path(rng, frames, size, canvas[1], nerve)
    tied = rng.uniform(*TIED_SPECKLE)
    tissue_speckle = synth.speckle_field(rng.standard_normal((2, *canvas), dtype=np.float32))
    tissue_speckle /= float(tissue_speckle.std())
    skin = synth.skin_line(height, min(size))
    out_frames = np.empty((frames, height, width), np.uint8)
    out_masks = np.empty((frames, height, width), np.uint8)
    for t, placement in enumerate(placements):
        frame_rng = np.random.default_rng([seed, index, 2, t])
        warp = lambda a, flags: cv2.warpAffine(a, placement, (width, height), flags=flags,  # noqa: E731
                                                borderMode=cv2.BORDER_REFLECT_101)
        seen = np.maximum(warp(refl, cv2.INTER_LINEAR), skin)  # the skin stays under the probe
        out_masks[t] = warp(mask, cv2.INTER_NEAREST)
        fresh = synth.speckle_field(frame_rng.standard_normal((2, height, width), dtype=np.float32))
        fresh /= float(fresh.std())
        moved = np.stack([warp(f, cv2.INTER_LINEAR) for f in tissue_speckle])
        field_ = tied * moved + np.sqrt(1 - tied ** 2) * fresh
        out_frames[t] = synth.render_image(seen, subject, frame_rng, field_)
    return Sequence(f"phantom-{seed}-{index}", out_frames, out_masks, relative_motions(placements))


def phantom_sequences(count: int, seed: int = 0, frames: int = 100,
                      size: tuple[int, int] = (256, 256)) -> Iterator[Sequence]:
    """`count` phantom sequences, one at a time (a hundred frames of 256x256 are 6.5 MB each)."""
    if count < 1:
        raise InputError(f"count must be at least 1, got {count}")
    for index in range(count):
        yield phantom_sequence(seed, index, frames, size)


# ----------------------------------------------------------------------------------------------- pseudo-videos


def pseudo_video(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, frames: int = 100,
                 name: str = "pseudo", speckle_contrast: float = 0.3) -> Sequence:
    """One labelled frame -> a video: a smooth affine trajectory applied to frame and mask, then per frame
    fresh multiplicative speckle (`speckle_contrast`) and a gain drift.

    Args:
        image: (H, W) frame, any dtype `device_runtime.core.preprocess` reads (grey or colour, 8 or 16 bit).
        mask: (H, W) 0/1 truth.
    """
    grey = to_unit_float(to_gray(np.asarray(image)))
    mask = (np.asarray(mask) != 0).astype(np.uint8)
    if grey.shape != mask.shape:
        raise InputError(f"{name}: image {grey.shape} and mask {mask.shape} differ in size")
    _check(frames, grey.shape)
    height, width = grey.shape
    side = min(height, width)
    shift_x, shift_y = (np.clip(smooth_noise(rng, frames, 10, 0.04 * side), -0.1 * side, 0.1 * side)
                        for _ in range(2))
    turn = np.clip(smooth_noise(rng, frames, 12, 5.0), -12, 12)
    zoom = np.clip(1 + smooth_noise(rng, frames, 15, 0.05), 0.85, 1.15)
    gain = np.clip(1 + smooth_noise(rng, frames, 15, 0.08), 0.75, 1.25)
    centre = ((width - 1) / 2, (height - 1) / 2)
    placements = np.stack([affine(zoom[t], turn[t], centre, (centre[0] + shift_x[t], centre[1] + shift_y[t]))
                           for t in range(frames)])
    out_frames = np.empty((frames, height, width), np.uint8)
    out_masks = np.empty((frames, height, width), np.uint8)
    for t, placement in enumerate(placements):
        # outside the original frame is outside the field: black, and no nerve
        moved = cv2.warpAffine(grey, placement, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out_masks[t] = cv2.warpAffine(mask, placement, (width, height), flags=cv2.INTER_NEAREST,
                                      borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        noise = synth.speckle(synth.speckle_field(rng.standard_normal((2, height, width), dtype=np.float32)),
                              speckle_contrast)
        out_frames[t] = np.clip(moved * noise * gain[t] * 255 + 0.5, 0, 255).astype(np.uint8)
    return Sequence(name, out_frames, out_masks, relative_motions(placements))


def pseudo_videos(samples: list, seed: int = 0, frames: int = 100, mask_label: int | None = None
                  ) -> Iterator[Sequence]:
    """One pseudo-video per labelled sample (`training.data.dataset.Sample`), read from disk one at a time.

    mask_label: None = any non-zero mask pixel is nerve; L = mask == L (usgra-seg: 1).
    """
    from device_runtime.core.imageio import read_image

    from .dataset import read_mask

    if not samples:
        raise InputError("pseudo_videos: no labelled frames given")
    for index, sample in enumerate(samples):
        labels = read_mask(sample.mask)
        truth = labels > 0 if mask_label is None else labels == mask_label
        yield pseudo_video(read_image(sample.image), truth, np.random.default_rng([seed, index]), frames,
                           sample.name)
