"""Training augmentation on (image, mask) pairs; evaluation uses none (preprocessing is done by `load_pairs`).

Geometric steps go through torchvision's `transforms.v2` with the mask wrapped as `tv_tensors.Mask`, so one
random draw moves image and mask together and the mask is resampled with nearest neighbour (it stays 0/1).
Randomness comes from torch's generator, which the DataLoader seeds differently in every worker (numpy's
global generator would repeat the same augmentations in each worker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from device_runtime.errors import InputError

PairTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class AugmentConfig:
    rotation: float = 15.0  # degrees: a uniform angle in [-rotation, rotation]; 0 = off
    hflip: bool = True
    vflip: bool = True
    intensity_shift: float = 0.1  # add a uniform value in [-s, s]; 0 = off
    contrast: float = 0.2  # scale around the image mean by a uniform factor in [1 - c, 1 + c]; 0 = off

    def __post_init__(self):
        if not 0 <= self.rotation <= 180:
            raise InputError(f"rotation must be in [0, 180] degrees, got {self.rotation}")
        if self.intensity_shift < 0:
            raise InputError(f"intensity_shift must be >= 0, got {self.intensity_shift}")
        if not 0 <= self.contrast < 1:
            raise InputError(f"contrast must be in [0, 1) so that the factor stays positive, got {self.contrast}")


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
    """The training preset: rotation, flips, contrast and brightness; each step left out when its setting is off.

    With everything off the result returns its inputs unchanged (an empty `Compose`).
    """
    geometric: list[v2.Transform] = []
    if cfg.rotation > 0:
        # fill 0 for both: corners rotated in are black in the image and background in the mask
        geometric.append(v2.RandomRotation(cfg.rotation, interpolation=InterpolationMode.BILINEAR, fill=0))
    if cfg.hflip:
        geometric.append(v2.RandomHorizontalFlip(0.5))
    if cfg.vflip:
        geometric.append(v2.RandomVerticalFlip(0.5))
    steps: list[PairTransform] = [Geometric(v2.Compose(geometric))] if geometric else []
    if cfg.intensity_shift > 0 or cfg.contrast > 0:
        steps.append(IntensityJitter(cfg.intensity_shift, cfg.contrast))
    return Compose(steps)
