"""The synthetic ultrasound phantom: the project's embedded default dataset, for demos and tests only.

An ultrasound frame is modelled as tissue reflectivity x depth attenuation x speckle, log-compressed and
gently blurred. The anatomy, drawn into the reflectivity:

- background tissue with horizontal muscle striations, a bright skin line and one or two wavy fascia bands;
- the TARGET: hyperechoic fascicular nerves, a roughly elliptical bright rim (epineurium) around a
  honeycomb of darker fascicles; random size, position and orientation; 0-2 per frame, mostly 1;
- DISTRACTORS: anechoic round vessels with posterior acoustic enhancement below them, and homogeneous
  bright blobs (tendon, fat) as hyperechoic as a nerve but without fascicles.

Frames come from subjects: each subject has its own anatomy, and its frames differ by small probe motion,
fresh speckle and a nerve now and then slipping out of the imaging plane; so a split grouped by subject
(the Kaggle layout written here) is meaningful. Everything is deterministic for a seed, and the frames of
subject s depend only on (seed, s), so a larger phantom extends a smaller one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import atomic_dir


TWO_NERVES = 0.2  # share of subjects with two nerves; the rest have one, so any subject can be trained on
NERVE_DROPOUT = 0.12  # chance that a nerve is out of plane in one frame: frames without a nerve
RECORD = "phantom.json"


@dataclass
class _Subject:
    texture: np.ndarray  # background reflectivity, `margin` wider on each side than a frame
    margin: int
    alpha: float  # attenuation over the full depth
    gain: float
    speckle: float  # speckle contrast: 1 = fully developed Rayleigh speckle
    bands: list[tuple] = field(default_factory=list)  # (depth, thickness, wave amplitude, cycles, phase, brightness)
    nerves: list[dict] = field(default_factory=list)
    vessels: list[tuple] = field(default_factory=list)  # (cy, cx, radius, enhancement)
    blobs: list[tuple] = field(default_factory=list)  # (cy, cx, ry, rx, angle, brightness)


def _texture(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Tissue background: a slow brightness drift plus horizontal striations, a few of them bright."""
    slow = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), 12 * scale)
    slow *= 0.15 / max(float(slow.std()), 1e-6)
    fibres = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), 7 * scale, sigmaY=0.9 * scale)
    fibres /= max(float(fibres.std()), 1e-6)
    bright = np.clip(fibres - 1.4, 0, None)  # only the strongest striations show as bright lines
    return (rng.uniform(0.28, 0.4) * (1 + slow + 0.12 * fibres) + 0.35 * bright).astype(np.float32)


def _far_from(points: list[tuple], cy: float, cx: float, r: float) -> bool:
    return all(np.hypot(cy - py, cx - px) > r + pr + 4 for py, px, pr in points)


def _fascicles(rng: np.random.Generator) -> np.ndarray:
    """(K, 3) fascicle centres and radii (u, v, r) in the nerve's unit disc, by dart throwing."""
    want, radius = rng.integers(5, 13), rng.uniform(0.13, 0.2)
    found: list[tuple] = []
    for _ in range(300):
        u, v = rng.uniform(-0.72, 0.72, 2)
        r = radius * rng.uniform(0.75, 1.2)
        if np.hypot(u, v) + r < 0.8 and all(np.hypot(u - a, v - b) > r + c + 0.04 for a, b, c in found):
            found.append((u, v, r))
            if len(found) == want:
                break
    return np.array(found, np.float32).reshape(-1, 3)


def make_subject(rng: np.random.Generator, size: tuple[int, int]) -> _Subject:
    """One subject's anatomy: texture, fascia, nerves, vessels and blobs placed apart from each other."""
    h, w = size
    s = min(h, w)
    margin = int(0.06 * s) + 1
    subject = _Subject(_texture(rng, (h + 2 * margin, w + 2 * margin), s / 256), margin,
                       alpha=rng.uniform(0.8, 1.8), gain=rng.uniform(0.9, 1.15),
                       speckle=rng.uniform(0.45, 0.7))
    for _ in range(rng.integers(1, 3)):
        subject.bands.append((rng.uniform(0.12, 0.45) * h, rng.uniform(0.008, 0.02) * s, rng.uniform(0, 0.04) * h,
                              rng.uniform(0.3, 1.2), rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.6)))
    placed: list[tuple] = []  # (cy, cx, r): keeps nerves, vessels and blobs apart
    for _ in range(2 if rng.random() < TWO_NERVES else 1):
        for _ in range(50):
            rx = rng.uniform(0.08, 0.15) * s
            cy, cx = rng.uniform(0.3, 0.75) * h, rng.uniform(0.15, 0.85) * w
            if _far_from(placed, cy, cx, rx):
                placed.append((cy, cx, rx))
                subject.nerves.append(dict(cy=cy, cx=cx, rx=rx, ry=rx * rng.uniform(0.55, 0.9),
                                           angle=rng.uniform(-35, 35), wobble=rng.uniform(0.03, 0.09),
                                           lobes=int(rng.integers(2, 6)), phase=rng.uniform(0, 2 * np.pi),
                                           fascicles=_fascicles(rng), interior=rng.uniform(0.42, 0.62),
                                           dark=rng.uniform(0.12, 0.3), rim=rng.uniform(0.6, 0.9)))
                break
    for kind, count in (("vessel", rng.choice(3, p=(0.2, 0.5, 0.3))), ("blob", rng.choice(3, p=(0.4, 0.4, 0.2)))):
        for _ in range(count):
            r = rng.uniform(0.035, 0.08) * s if kind == "vessel" else rng.uniform(0.04, 0.09) * s
            cy, cx = rng.uniform(0.25, 0.8) * h, rng.uniform(0.1, 0.9) * w
            if not _far_from(placed, cy, cx, r):
                continue  # a crowded subject simply gets fewer distractors
            placed.append((cy, cx, r))
            if kind == "vessel":
                subject.vessels.append((cy, cx, r, rng.uniform(0.4, 0.9)))
            else:
                subject.blobs.append((cy, cx, r * rng.uniform(0.5, 0.8), r, rng.uniform(-30, 30),
                                      rng.uniform(0.55, 0.8)))
    return subject


def _ellipse(cy, cx, ry, rx, angle, shape) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Bounding box of an ellipse (with a little room) and its normalised coordinates (u, v) there."""
    reach = 1.2 * max(rx, ry)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, shape[0])
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, shape[1])
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    return (slice(y0, y1), slice(x0, x1)), (c * xx + s * yy) / rx, (c * yy - s * xx) / ry


def _draw_nerve(refl: np.ndarray, mask: np.ndarray, nerve: dict, dy: float, dx: float, rng) -> None:
    """Paint one nerve into `refl` and its filled outline into `mask`, in place."""
    # the probe rocks a little between frames; without an rng the nerve is drawn as it lies (a still scene)
    scale, turn = (rng.uniform(0.95, 1.05), rng.normal(0, 3)) if rng is not None else (1.0, 0.0)
    box, u, v = _ellipse(nerve["cy"] + dy, nerve["cx"] + dx, nerve["ry"] * scale, nerve["rx"] * scale,
                         nerve["angle"] + turn, refl.shape)
    theta = np.arctan2(v, u)
    rho = np.hypot(u, v) / (1 + nerve["wobble"] * np.sin(nerve["lobes"] * theta + nerve["phase"]))
    value = np.full(rho.shape, nerve["interior"], np.float32)
    fas = nerve["fascicles"]
    if len(fas):
        d = np.hypot(u[None] - fas[:, 0, None, None], v[None] - fas[:, 1, None, None]) / fas[:, 2, None, None]
        darkness = np.clip((1.15 - d.min(axis=0)) / 0.3, 0, 1)
        value += (nerve["dark"] - value) * darkness
    rim = np.exp(-(((rho - 0.92) / 0.08) ** 2))
    value += (nerve["rim"] - value) * rim
    weight = np.clip((1.04 - rho) / 0.08, 0, 1)  # soft edge, the same boundary as the mask's
    refl[box] += (value - refl[box]) * weight
    mask[box] |= rho <= 1.0


def _render(subject: _Subject, rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One frame of a subject: (H, W) uint8 image and (H, W) uint8 0/1 mask."""
    s, m = min(size), subject.margin
    dy, dx = np.clip(rng.normal(0, 0.015 * s, 2), -m, m)  # probe motion; the skin stays under the probe
    refl, mask = anatomy(subject, size, dy, dx, rng)
    return render_image(refl, subject, rng), mask


def skin_line(height: int, scale: int) -> np.ndarray:
    """(height, 1) reflectivity of the skin line at the top of a frame whose shorter side is `scale` pixels."""
    yy = np.arange(height, dtype=np.float32)[:, None]
    return 0.9 * np.exp(-((yy / (0.025 * scale)) ** 2))


def anatomy(subject: _Subject, size: tuple[int, int], dy: float, dx: float, rng: np.random.Generator | None,
             skin: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Reflectivity (with the vessels' posterior enhancement) and nerve mask of a subject seen from (dy, dx).

    With an rng, nerves rock and now and then leave the imaging plane; without one the scene is drawn still
    (`training.data.sequences` moves the probe over it). `skin`: draw the skin line at the top.
    """
    h, w = size
    s, m = min(h, w), subject.margin
    oy, ox = int(round(m + dy)), int(round(m + dx))
    refl = subject.texture[oy:oy + h, ox:ox + w].copy()
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    for depth, thick, amp, cycles, phase, bright in subject.bands:
        centre = depth + dy + amp * np.sin(2 * np.pi * cycles * xx / w + phase)
        refl += bright * np.exp(-(((yy - centre) / thick) ** 2))
    if skin:
        refl = np.maximum(refl, skin_line(h, s))
    for cy, cx, ry, rx, angle, bright in subject.blobs:
        box, u, v = _ellipse(cy + dy, cx + dx, ry, rx, angle, (h, w))
        refl[box] += (bright - refl[box]) * np.clip((1 - np.hypot(u, v)) / 0.2, 0, 1)
    mask = np.zeros((h, w), bool)
    for nerve in subject.nerves:
        if rng is None or rng.random() >= NERVE_DROPOUT:
            _draw_nerve(refl, mask, nerve, dy, dx, rng)
    gain = np.ones((h, w), np.float32)
    for cy, cx, r, enhance in subject.vessels:
        cy, cx = cy + dy, cx + dx
        box, u, v = _ellipse(cy, cx, r, r, 0.0, (h, w))
        refl[box] += (0.04 - refl[box]) * np.clip((1 - np.hypot(u, v)) / 0.2, 0, 1)
        # posterior acoustic enhancement: the fluid attenuates less, so tissue below looks brighter
        lateral = np.clip(1 - np.abs(xx - cx) / r, 0, 1) ** 0.5
        below = np.where(yy > cy, np.exp(-(yy - cy - r) / (0.35 * h)), 0)
        gain *= 1 + enhance * lateral * np.minimum(below, 1)
    return refl * gain, mask.astype(np.uint8)


def speckle_field(white: np.ndarray) -> np.ndarray:
    """(2, H, W) white complex Gaussian noise -> the field a transducer sees: blurred by its point spread,
    lateral grain longer than axial (the grain is sized for the frame's shorter side at 256 pixels)."""
    scale = min(white.shape[1:]) / 256
    return np.stack([cv2.GaussianBlur(f, (0, 0), 1.6 * scale, sigmaY=0.9 * scale) for f in white])


def speckle(field_: np.ndarray, contrast: float) -> np.ndarray:
    """(2, H, W) field from `speckle_field` -> (H, W) multiplicative speckle of mean 1 and the given contrast.

    The magnitude of a smoothed complex Gaussian field is Rayleigh distributed; `contrast` 1 = fully developed.
    """
    rayleigh = np.hypot(field_[0], field_[1])
    return 1 + contrast * (rayleigh / float(rayleigh.mean()) - 1)


def render_image(refl: np.ndarray, subject: _Subject, rng: np.random.Generator, field_: np.ndarray | None = None
           ) -> np.ndarray:
    """Reflectivity -> displayed frame: attenuation, Rayleigh speckle, log compression, blur, 8 bit.

    `field_`: the (2, H, W) speckle field (`speckle_field`; a sequence correlates it over frames); None draws a
    fresh one.
    """
    h, w = refl.shape
    scale = min(h, w) / 256
    if field_ is None:
        field_ = speckle_field(rng.standard_normal((2, h, w), dtype=np.float32))
    depth = np.arange(h, dtype=np.float32)[:, None] / h
    signal = refl * np.exp(-subject.alpha * depth) * speckle(field_, subject.speckle) * subject.gain
    shown = np.log1p(6 * np.clip(signal, 0, None)) / np.log1p(6)  # log compression, as scanners display
    shown = cv2.GaussianBlur(shown.astype(np.float32), (0, 0), 0.6 * scale)
    shown += 0.015 * rng.standard_normal(shown.shape, dtype=np.float32)
    return np.clip(shown * 255 + 0.5, 0, 255).astype(np.uint8)


def _check(count: int, seed: int, size, frames_per_subject: int) -> tuple[int, int]:
    if count < 1 or frames_per_subject < 1:
        raise InputError(f"count and frames_per_subject must be >= 1, got {count} and {frames_per_subject}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    if len(size) != 2 or min(size) < 32:
        raise InputError(f"size must be (height, width), each at least 32, got {tuple(size)}")
    return int(size[0]), int(size[1])


def generate_phantom(count: int, seed: int = 0, size: tuple[int, int] = (256, 256),
                     frames_per_subject: int = 10) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Make `count` phantom frames, `frames_per_subject` per subject (the last subject may have fewer).

    Returns:
        images: uint8; masks: uint8 in {0, 1} (nerves filled); names "<subject>_<frame>", both from 1.

    Shape:
        images, masks: (count, height, width) for size = (height, width).
    """
    size = _check(count, seed, size, frames_per_subject)
    images = np.empty((count, *size), np.uint8)
    masks = np.empty((count, *size), np.uint8)
    names = []
    for i in range(count):
        subject_no, frame_no = divmod(i, frames_per_subject)
        if frame_no == 0:
            subject = make_subject(np.random.default_rng([seed, subject_no + 1]), size)
        images[i], masks[i] = _render(subject, np.random.default_rng([seed, subject_no + 1, frame_no + 1]), size)
        names.append(f"{subject_no + 1}_{frame_no + 1}")
    return images, masks, names


def write_phantom(out_dir: str | os.PathLike, count: int, seed: int = 0, size: tuple[int, int] = (256, 256),
                  frames_per_subject: int = 10) -> Path:
    """Write a phantom in the Kaggle layout: `<s>_<f>.tif` and `<s>_<f>_mask.tif` (mask 0/255), plus phantom.json.

    The folder appears complete or not at all. When it already holds a phantom made with the same
    arguments it is reused as is (generation is deterministic), so a re-run need not delete it.

    Raises:
        InputError: `out_dir` exists and holds anything else.
    """
    out_dir = Path(out_dir)
    size = _check(count, seed, size, frames_per_subject)
    record = {"generator": "training.data.synth.generate_phantom", "count": count, "seed": seed, "size": list(size),
              "frames_per_subject": frames_per_subject}
    try:
        if json.loads((out_dir / RECORD).read_text(encoding="utf-8")) == record:
            return out_dir
    except (OSError, ValueError):
        pass  # no usable record: write afresh (atomic_dir refuses a non-empty folder)
    with atomic_dir(out_dir) as tmp:
        images, masks, names = generate_phantom(count, seed, size, frames_per_subject)
        for image, mask, name in zip(images, masks, names):
            tifffile.imwrite(tmp / f"{name}.tif", image)
            tifffile.imwrite(tmp / f"{name}_mask.tif", mask * np.uint8(255))  # stored 0/255, as Kaggle's
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out_dir
