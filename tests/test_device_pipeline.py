"""Post-processing and statistics on constructed masks, and the timing statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device_runtime.core.manifest import Manifest
from device_runtime.core.postprocess import Morphology, frame_stats, mask_geometry, sigmoid
from device_runtime.pipeline import Segmenter
from device_runtime.timing import END_TO_END, FRAME, Histogram, Timings


class FakeNet:
    """Returns fixed logits: the post-processing is then known by hand."""

    def __init__(self, logits: np.ndarray):
        self.logits = logits[None, None].astype(np.float32)
        self.input_buffer = np.zeros((1, 1, *logits.shape), np.float32)
        self.calls = 0

    def infer(self, batch):
        assert batch is self.input_buffer  # preprocess wrote straight into the backend's buffer
        self.calls += 1
        return self.logits


def segmenter(logits, morphology=Morphology(), threshold=0.5, spacing=None) -> Segmenter:
    manifest = Manifest(architecture="fake", input_size=logits.shape, threshold=threshold, morphology=morphology,
                        files=[])
    return Segmenter(manifest, FakeNet(logits), spacing)


def block_logits(size=(32, 32), blocks=((8, 16, 4, 12),), inside=10.0, outside=-10.0) -> np.ndarray:
    logits = np.full(size, outside, np.float32)
    for y0, y1, x0, x1 in blocks:
        logits[y0:y1, x0:x1] = inside
    return logits


def test_one_block_scaled_to_the_frame():
    # an 8x8 block at rows 8..15, cols 4..11 of a 32x32 map; the frame is 64x64, so everything doubles
    result = segmenter(block_logits(), spacing=0.1)(np.zeros((64, 64), np.uint8), Timings())
    stats = result.stats
    assert result.mask.shape == (64, 64) and result.mask.dtype == np.uint8
    assert stats["area_px"] == 256 and stats["area_mm2"] == pytest.approx(2.56)
    assert stats["bbox"] == [8, 16, 16, 16]
    assert stats["centroid"] == [15.5, 23.5]
    assert stats["components"] == 1
    assert stats["mean_prob"] == pytest.approx(float(sigmoid(np.float32(10.0))))
    expected_entropy = -(lambda p: p * math.log2(p) + (1 - p) * math.log2(1 - p))(float(sigmoid(np.float32(10.0))))
    assert stats["uncertainty"] == pytest.approx(expected_entropy, rel=1e-3)


def test_mask_is_resized_with_nearest_neighbour_to_an_odd_frame():
    result = segmenter(block_logits())(np.zeros((45, 71, 3), np.uint8), Timings())
    assert result.mask.shape == (45, 71)
    assert set(np.unique(result.mask)) == {0, 1}  # no in-between values from interpolation


def test_two_blocks_are_two_components_and_morphology_from_the_manifest_applies():
    logits = block_logits(blocks=((2, 10, 2, 10), (20, 28, 20, 28), (15, 16, 2, 3)))  # two blocks and a speck
    plain = segmenter(logits)(np.zeros((32, 32), np.uint8), Timings()).stats
    cleaned = segmenter(logits, Morphology(min_area=4))(np.zeros((32, 32), np.uint8), Timings()).stats
    assert plain["components"] == 3 and plain["area_px"] == 129
    assert cleaned["components"] == 2 and cleaned["area_px"] == 128


def test_threshold_comes_from_the_manifest():
    logits = np.full((16, 16), 0.0, np.float32)  # probability 0.5 everywhere
    assert segmenter(logits, threshold=0.4)(np.zeros((16, 16), np.uint8), Timings()).stats["area_px"] == 256
    assert segmenter(logits, threshold=0.6)(np.zeros((16, 16), np.uint8), Timings()).stats["area_px"] == 0


def test_empty_frame_has_no_geometry_and_is_certain():
    stats = segmenter(np.full((16, 16), -30.0, np.float32))(np.zeros((20, 20), np.uint8), Timings()).stats
    assert stats["area_px"] == 0 and stats["centroid"] is None and stats["bbox"] is None
    assert stats["mean_prob"] is None and stats["uncertainty"] < 1e-5


def test_buffers_are_reused_for_frames_of_one_size():
    seg = segmenter(block_logits())
    first = seg(np.zeros((64, 64), np.uint8), Timings()).mask
    second = seg(np.zeros((64, 64), np.uint8), Timings()).mask
    other = seg(np.zeros((40, 40), np.uint8), Timings()).mask
    assert first is second and other is not first


@pytest.mark.parametrize("mask", [
    np.array([[0, 1], [1, 1]], np.uint8),
    np.array([[True, False], [False, False]]),
    np.pad(np.ones((3, 5), np.float32) * 0.5, ((2, 4), (1, 0))),
])
def test_mask_geometry_agrees_with_frame_stats_definition(mask):
    fg = mask != 0
    ys, xs = np.nonzero(fg)
    geometry = mask_geometry(mask)
    assert geometry["area_px"] == fg.sum()
    assert geometry["centroid"] == [xs.mean(), ys.mean()]
    assert geometry["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert frame_stats(mask, np.zeros(mask.shape))["bbox"] == geometry["bbox"]


def test_sigmoid_into_a_buffer_matches_bit_for_bit():
    logits = np.linspace(-40, 40, 1001, dtype=np.float32)
    out = np.empty_like(logits)
    assert sigmoid(logits, out=out) is out
    assert np.array_equal(out, sigmoid(logits))


def test_histogram_percentiles_within_one_percent():
    hist = Histogram()
    for ms in range(1, 101):  # 1..100 ms
        hist.add(ms / 1000)
    assert hist.percentile(50) == pytest.approx(0.050, rel=0.01)
    assert hist.percentile(90) == pytest.approx(0.090, rel=0.01)
    assert hist.percentile(99) == pytest.approx(0.099, rel=0.01)
    assert hist.max == 0.1 and hist.count == 100 and hist.total == pytest.approx(5.05)
    assert math.isnan(Histogram().percentile(50))


def test_timings_leave_warmup_out_and_report_the_inference_share():
    timings = Timings(warmup=2)
    for index in range(6):
        timings.current["inference"] = 0.030 if index >= 2 else 1.0
        timings.current["postprocess"] = 0.010
        timings._frame_started -= 0.040  # pretend the frame took 40 ms
        timings.end_frame(captured_at=timings._frame_started)
    summary = timings.summary()
    assert summary["frames"] == 4 and timings.frames == 6
    assert summary["stages_ms"]["inference"]["p50"] == pytest.approx(30, rel=0.01)
    assert summary["stages_ms"][FRAME]["max"] == pytest.approx(40, rel=0.05)
    assert summary["outside_inference"] == pytest.approx(0.25, abs=0.03)
    assert set(summary["stages_ms"]) >= {"capture", "preprocess", "output", END_TO_END}


def test_buffer_pool_keeps_one_buffer_per_shape_and_stays_bounded():
    from device_runtime.buffers import BufferPool

    pool = BufferPool(max_entries=2)
    a = pool.get("mask", (4, 5), np.uint8)
    b = pool.get("mask", (6, 5), np.uint8)
    assert pool.get("mask", (4, 5), np.uint8) is a and pool.get("mask", (6, 5), np.uint8) is b
    pool.get("mask", (7, 7), np.uint8)  # a third shape: the least recently used one (4, 5) is dropped
    assert pool.get("mask", (6, 5), np.uint8) is b and pool.get("mask", (4, 5), np.uint8) is not a
    assert pool.get("solid", (2, 2, 3), np.uint8, fill=(1, 2, 3))[1, 1].tolist() == [1, 2, 3]
