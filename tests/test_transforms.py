"""Paired augmentation: image and mask stay aligned, masks stay binary, everything off is the identity."""

from __future__ import annotations

import pytest
import torch

from device_runtime.core.errors import InputError
from training.data.transforms import AugmentConfig, IntensityJitter, build_train_transform

OFF = dict(rotation=0.0, hflip=False, vflip=False, intensity_shift=0.0, contrast=0.0)

# an asymmetric pair: a bright L in the top-left corner, and its mask
L_SHAPE = torch.tensor([[1, 0, 0, 0],
                        [1, 0, 0, 0],
                        [1, 1, 0, 0],
                        [0, 0, 0, 0]], dtype=torch.float32)[None]


def test_everything_off_is_identity():
    transform = build_train_transform(AugmentConfig(**OFF))
    image, mask = torch.rand(1, 8, 8), (torch.rand(1, 8, 8) > 0.5).float()
    for _ in range(5):
        out_image, out_mask = transform(image, mask)
        assert torch.equal(out_image, image) and torch.equal(out_mask, mask)


@pytest.mark.parametrize("flip, flipped", [("hflip", L_SHAPE.flip(-1)), ("vflip", L_SHAPE.flip(-2))])
def test_flips_move_image_and_mask_together(flip, flipped):
    transform = build_train_transform(AugmentConfig(**{**OFF, flip: True}))
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        image, mask = transform(L_SHAPE * 0.8, L_SHAPE)
        assert torch.equal(image, mask * 0.8)  # still aligned
        assert torch.equal(mask, L_SHAPE) or torch.equal(mask, flipped)
        seen.add(torch.equal(mask, flipped))
    assert seen == {True, False}  # p = 0.5: both outcomes occur in 20 draws


def test_rotation_keeps_mask_binary_and_aligned():
    image = torch.zeros(1, 64, 64)
    image[:, 12:30, 20:50] = 1.0  # an off-centre bar: any rotation moves it
    transform = build_train_transform(AugmentConfig(**{**OFF, "rotation": 40.0}))
    torch.manual_seed(0)
    moved = 0
    for _ in range(10):
        out_image, out_mask = transform(image, image.clone())
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}  # nearest: no new mask values
        # the bilinear image and the nearest mask differ at most along the bar's edge
        assert ((out_image > 0.5).float() != out_mask).float().sum() <= 0.1 * out_mask.sum()
        moved += not torch.equal(out_mask, image)
    assert moved >= 5  # only a draw within a degree or so of 0 leaves a 64x64 mask unchanged


def test_rotation_fills_corners_with_zero():
    transform = build_train_transform(AugmentConfig(**{**OFF, "rotation": 45.0}))
    torch.manual_seed(1)
    image, mask = transform(torch.ones(1, 32, 32), torch.ones(1, 32, 32))
    assert image[0, 0, 0] == 0 and mask[0, 0, 0] == 0 and mask[0, 16, 16] == 1


def test_intensity_jitter_hand_checked(monkeypatch):
    # torch.rand -> 1.0 gives the largest factor (1 + c) and the largest shift (+s)
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.tensor(1.0))
    image = torch.tensor([[[0.2, 0.4]]])  # mean 0.3
    out, mask = IntensityJitter(shift=0.1, contrast=0.5)(image, torch.ones(1, 1, 2))
    # (x - 0.3) * 1.5 + 0.3 + 0.1
    torch.testing.assert_close(out, torch.tensor([[[0.25, 0.55]]]))
    assert torch.equal(mask, torch.ones(1, 1, 2))


@pytest.mark.parametrize("shift, contrast", [(0.1, 0.0), (0.0, 0.2), (0.1, 0.2)])
def test_intensity_stays_in_bounds_and_leaves_mask(shift, contrast):
    transform = build_train_transform(AugmentConfig(**{**OFF, "intensity_shift": shift, "contrast": contrast}))
    torch.manual_seed(0)
    image, mask = torch.rand(1, 16, 16), (torch.rand(1, 16, 16) > 0.5).float()
    for _ in range(10):
        out_image, out_mask = transform(image, mask)
        assert 0 <= out_image.min() and out_image.max() <= 1 and torch.equal(out_mask, mask)
        residual = out_image - image
        if contrast == 0:  # a pure shift, clamped: unclamped pixels move by one constant in [-s, s]
            inside = (out_image > 0) & (out_image < 1)
            assert residual[inside].abs().max() <= shift + 1e-6
            assert residual[inside].max() - residual[inside].min() < 1e-5


@pytest.mark.parametrize("bad", [dict(rotation=-1.0), dict(contrast=1.0), dict(intensity_shift=-0.1)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(InputError):
        AugmentConfig(**bad)


def test_batch_through_dataset_and_loader():
    import numpy as np

    from training.data.dataset import SegmentationDataset

    images = np.random.default_rng(0).random((4, 16, 16), dtype=np.float32)
    masks = (images > 0.7).astype(np.uint8)
    dataset = SegmentationDataset(images, masks, build_train_transform(AugmentConfig()))
    image, mask = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert image.shape == mask.shape == (4, 1, 16, 16) and image.dtype == mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
