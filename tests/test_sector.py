"""The ultrasound image inside a frame's black border (device_runtime.sector), and predictions outside it dropped."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from device_runtime.core.manifest import Manifest
from device_runtime.pipeline import Segmenter
from device_runtime.core.postprocess import Morphology
from device_runtime.sector import imaging_sector
from device_runtime.timing import Timings


def fan_frame(size=256, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A curved probe's fan of speckle on black, a black anechoic vessel inside it and white text in the border;
    returns (frame in [0, 1], the fan's own 0/1 mask)."""
    rng = np.random.default_rng(seed)
    fan = np.zeros((size, size), np.uint8)
    cv2.ellipse(fan, (size // 2, -size // 4), (size, size), 0, 60, 120, 1, -1)
    cv2.circle(fan, (size // 2, -size // 4), size // 3, 0, -1)  # the fan starts below the probe face
    image = (fan * rng.uniform(12, 150, (size, size))).astype(np.uint8)
    cv2.circle(image, (size // 2, int(size * 0.6)), size // 12, 0, -1)  # a vessel lumen: black, inside the fan
    cv2.putText(image, "12 cm", (4, size - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 255, 1)  # annotation in the border
    return image.astype(np.float32) / 255, fan


def test_the_fan_is_found_with_its_black_vessel_and_without_the_border_text():
    image, fan = fan_frame()
    sector = imaging_sector(image)
    assert sector.dtype == np.uint8 and set(np.unique(sector)) == {0, 1}
    assert np.all(sector[fan == 1] == 1)  # every pixel of the image kept: cells are taken whole
    # and no more than the fan's outline (its convex hull: the concave arc under the probe face is filled), to
    # within two cells of the 4-pixel search grid
    outline = np.zeros_like(fan)
    cv2.fillConvexPoly(outline, cv2.convexHull(cv2.findNonZero(fan)), 1)
    assert np.all(sector <= cv2.dilate(outline, np.ones((17, 17), np.uint8)))
    assert sector.sum() < 1.1 * outline.sum()
    assert sector[int(256 * 0.6), 128] == 1  # the black vessel inside the image is image
    assert sector[250, 10:40].sum() == 0  # the text in the border is not


@pytest.mark.parametrize("frame", [np.full((64, 80), 0.3, np.float32), np.zeros((64, 80), np.float32)],
                         ids=["no border", "black frame"])
def test_without_a_border_to_find_the_whole_frame_is_the_image(frame):
    assert imaging_sector(frame).all()


def test_a_prediction_on_the_border_is_dropped_and_reported():
    image, fan = fan_frame(64)
    logits = np.where(fan == 1, -0.5, -8.0).astype(np.float32)  # unsure in the image, sure on the black border
    logits[40:48, 28:36] = 8.0  # inside the fan: kept
    logits[56:64, 0:8] = 8.0  # in the black corner: dropped
    assert fan[44, 32] == 1 and fan[56:64, 0:8].sum() == 0

    class Net:
        input_buffer = np.zeros((1, 1, 64, 64), np.float32)

        def infer(self, batch):
            return logits[None, None]

    manifest = Manifest(architecture="fake", input_size=(64, 64), threshold=0.5, morphology=Morphology(), files=[])
    result = Segmenter(manifest, Net())((image * 255).astype(np.uint8), Timings())
    assert result.mask[44, 32] == 1 and result.mask[56:64, 0:8].sum() == 0
    assert result.stats["area_px"] == 64 and result.stats["outside_sector"] == pytest.approx(0.5)
    # uncertainty over the image only: the border's certain zeros do not water it down
    everywhere = Segmenter(manifest, Net())(np.full((64, 64), 128, np.uint8), Timings()).stats
    assert everywhere["outside_sector"] == 0.0 and result.stats["uncertainty"] > everywhere["uncertainty"]


def test_every_expert_nerve_pixel_of_usgra_seg_lies_inside_the_image_found(real_data):
    from PIL import Image

    from device_runtime.core.preprocess import frame_to_image

    lost, shares = [], []
    for path in sorted((real_data / "images").glob("*.png")):
        image = frame_to_image(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), (256, 256))
        nerve = np.asarray(Image.open(real_data / "masks" / path.name)) == 1
        nerve = cv2.resize(nerve.astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST)
        sector = imaging_sector(image)
        if np.any(nerve & (1 - sector)):
            lost.append(path.name)
        shares.append(sector.mean())
    assert lost == []
    assert np.mean(shares) < 0.9  # and the border (18 to 38 % of these frames) is found, not the whole frame
