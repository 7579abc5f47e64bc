"""Training augmentation on (image, mask) pairs; evaluation uses none (preprocessing is done by `load_pairs`).

Geometric steps go through torchvision's `transforms.v2` with the mask wrapped as `tv_tensors.Mask`, so one
random draw moves image and mask together and the mask is resampled with nearest neighbour (it stays 0/1).
Randomness comes from torch's generator, which the DataLoader seeds differently in every worker (numpy's
global generator would repeat the same augmentations in each worker).

Besides rotation, flips and intensity, the small-data steps model what varies between ultrasound scans:
zoom / depth setting (random scale and shift), tissue deformation under the probe (a small elastic warp),
the scanner's gain curve (gamma), focus and resolution (blur) and speckle (multiplicative noise). Photometric
steps act on the image only; the mask passes through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import math

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from device_runtime.core.errors import InputError

PairTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class AugmentConfig:
    rotation: float = 15.0  # degrees: a uniform angle in [-rotation, rotation]; 0 = off
    hflip: bool = True
    vflip: bool = True
    intensity_shift: float = 0.1  # add a uniform value in [-s, s]; 0 = off
    contrast: float = 0.2  # scale around the image mean by a uniform factor in [1 - c, 1 + c]; 0 = off
    scale: tuple[float, float] = (1.0, 1.0)  # zoom factor drawn uniformly in [lo, hi]; (1, 1) = off
    translate: float = 0.0  # shift up to this fraction of the frame in x and y; 0 = off
    elastic_alpha: float = 0.0  # elastic warp: displacement sd in pixels, on a third of the frames; 0 = off
    elastic_grid: int = 5  # its smoothness: random displacements at grid x grid points, interpolated between
    gamma: float = 0.0  # gamma log-uniform in [1/(1+g), 1+g]; 0 = off
    blur_sigma: float = 0.0  # Gaussian blur with sigma uniform in [0.1, s] on half the frames; 0 = off
    speckle: float = 0.0  # image * (1 + n), n ~ N(0, sd^2) per pixel with sd uniform in [0, s]; 0 = off

    def __post_init__(self):
        if not 0 <= self.rotation <= 180:
            raise InputError(f"rotation must be in [0, 180] degrees, got {self.rotation}")
        if self.intensity_shift < 0:
            raise InputError(f"intensity_shift must be >= 0, got {self.intensity_shift}")
        if not 0 <= self.contrast < 1:
            raise InputError(f"contrast must be in [0, 1) so that the factor stays positive, got {self.contrast}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise InputError(f"scale must be two numbers 0 < lo <= hi, got {tuple(self.scale)}")
        if not 0 <= self.translate < 0.5:
            raise InputError(f"translate must be in [0, 0.5), got {self.translate}")
        for name in ("elastic_alpha", "gamma", "blur_sigma", "speckle"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.elastic_grid < 2:
            raise InputError(f"elastic_grid must be at least 2, got {self.elastic_grid}")

    @classmethod
    def from_config(cls, cfg) -> "AugmentConfig":
        """The augmentation fields of a TrainConfig (same names)."""
        import dataclasses

        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


class IntensityJitter:
    """Contrast then brightness on the image only, clamped to [0, 1]; the mask passes through.

    Example:
        with contrast factor 2 and shift 0.1, [0.2, 0.4] (mean 0.3) -> [0.1, 0.5] + 0.1 = [0.2, 0.6].
    """

    def __init__(self, shift: float, contrast: float):
        self.shift, self.contrast = shift, contrast

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        factor = 1.0 + self.contrast * (2.0 * torch.rand(()).item() - 1.0)
        offset = self.shift * (2.0 * torch.rand(()).item() - 1.0)
        mean = image.mean(dim=(-2, -1), keepdim=True)
        return ((image - mean) * factor + mean + offset).clamp_(0.0, 1.0), mask


class CoarseElastic(v2.ElasticTransform):
    """torchvision's elastic warp (its kernels: bilinear image, nearest mask) with a cheaper field.

    torchvision blurs a full-resolution noise field with a kernel of 8 sigma, which costs more than all the
    other steps together on a CPU; random displacements at grid x grid points, bicubically interpolated,
    give the same kind of smooth field in a fraction of the time.
    """

    def __init__(self, alpha_px: float, grid: int):
        super().__init__(alpha=alpha_px, sigma=float(grid), interpolation=InterpolationMode.BILINEAR, fill=0)
        self.alpha_px, self.grid = alpha_px, grid

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        coarse = torch.randn(1, 2, self.grid, self.grid) * self.alpha_px
        field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
        # pixels -> the kernel's normalised coordinates ([-1, 1] across the frame)
        field = field * torch.tensor([2.0 / width, 2.0 / height]).view(1, 2, 1, 1)
        return {"displacement": field.permute(0, 2, 3, 1)}  # 1 x H x W x 2


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


class Gamma:
    """image ** gamma with log(gamma) uniform in [-log(1+g), log(1+g)]: brightens or darkens the mid-tones,
    as a scanner's gain curve does, and keeps 0 and 1 fixed."""

    def __init__(self, g: float):
        self.log_range = math.log1p(g)

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return image.clamp(0.0, 1.0).pow(math.exp(_uniform(-self.log_range, self.log_range))), mask


class Blur:
    """Gaussian blur of the image (sigma uniform in [0.1, max]) with probability p; kernel of about 3 sigma."""

    def __init__(self, max_sigma: float, p: float = 0.5):
        self.max_sigma, self.p = max_sigma, p

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if torch.rand(()).item() >= self.p:
            return image, mask
        sigma = _uniform(0.1, max(self.max_sigma, 0.1))
        kernel = 2 * math.ceil(3 * sigma) + 1
        return v2.functional.gaussian_blur(image, [kernel, kernel], [sigma, sigma]), mask


class Speckle:
    """Multiplicative Gaussian noise, image * (1 + n), with a per-frame strength uniform in [0, s]; clamped."""

    def __init__(self, s: float):
        self.s = s

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        sd = _uniform(0.0, self.s)
        return (image * (1.0 + sd * torch.randn_like(image))).clamp_(0.0, 1.0), mask


class Compose:
    """Apply pair transforms in order."""

    def __init__(self, steps: list[PairTransform]):
        self.steps = steps

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        for step in self.steps:
            image, mask = step(image, mask)
        return image, mask


class Geometric:
    """torchvision v2 transforms applied to the pair with one random draw; image bilinear, mask nearest.

    Shape:
        image, mask: (1, H, W) (or (N, 1, H, W): one draw for the whole batch).
    """

    def __init__(self, transform: v2.Transform):
        self.transform = transform

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(Tensor), mask.as_subclass(Tensor)  # plain tensors for the loss and the model


def build_train_transform(cfg: AugmentConfig) -> PairTransform:
    """The training preset; each step left out when its setting is off.

    Order: rotation (with scale and shift, one affine map, when those are on), flips, elastic warp; then on
    the image only: contrast and brightness, gamma, blur, speckle. With everything off the result returns
    its inputs unchanged (an empty `Compose`).
    """
    geometric: list[v2.Transform] = []
    if tuple(cfg.scale) != (1.0, 1.0) or cfg.translate > 0:
        # one affine resampling instead of two (rotation, then zoom): less blur of the image
        geometric.append(v2.RandomAffine(cfg.rotation, translate=(cfg.translate, cfg.translate) if cfg.translate else None,
                                         scale=tuple(cfg.scale), interpolation=InterpolationMode.BILINEAR, fill=0))
    elif cfg.rotation > 0:
        # fill 0 for both: corners rotated in are black in the image and background in the mask
        geometric.append(v2.RandomRotation(cfg.rotation, interpolation=InterpolationMode.BILINEAR, fill=0))
    if cfg.hflip:
        geometric.append(v2.RandomHorizontalFlip(0.5))
    if cfg.vflip:
        geometric.append(v2.RandomVerticalFlip(0.5))
    if cfg.elastic_alpha > 0:
        geometric.append(v2.RandomApply([CoarseElastic(cfg.elastic_alpha, cfg.elastic_grid)], p=1 / 3))
    steps: list[PairTransform] = [Geometric(v2.Compose(geometric))] if geometric else []
    if cfg.intensity_shift > 0 or cfg.contrast > 0:
        steps.append(IntensityJitter(cfg.intensity_shift, cfg.contrast))
    if cfg.gamma > 0:
        steps.append(Gamma(cfg.gamma))
    if cfg.blur_sigma > 0:
        steps.append(Blur(cfg.blur_sigma))
    if cfg.speckle > 0:
        steps.append(Speckle(cfg.speckle))
    return Compose(steps)
