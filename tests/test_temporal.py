"""device_runtime.core.temporal: the filter's arithmetic on hand-made sequences, its settings, and the manifest field."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from device_runtime.core.errors import InputError
from device_runtime.core.manifest import MANIFEST_NAME, Manifest, describe_file, load_manifest, write_manifest
from device_runtime.pipeline import Segmenter
from device_runtime.core.postprocess import Morphology, postprocess
from device_runtime.core.temporal import MaskChange, MotionEstimator, TemporalFilter, TemporalParams
from device_runtime.timing import Timings

SIZE = 96


def texture(seed: int = 0, size: int = SIZE + 40) -> np.ndarray:
    """A float32 image in [0, 1] with features for the optical flow to follow."""
    noise = np.random.default_rng(seed).standard_normal((size, size)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), 2.0)
    return ((blurred - blurred.min()) / (blurred.max() - blurred.min())).astype(np.float32)


def window(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The SIZE x SIZE view at offset (20 + dy, 20 + dx): the scene moved by (-dy, -dx) in the view."""
    return np.ascontiguousarray(image[20 + dy:20 + dy + SIZE, 20 + dx:20 + dx + SIZE])


def uniform(value: float) -> np.ndarray:
    return np.full((SIZE, SIZE), value, np.float32)


def make_filter(alpha=0.5, t_high=None, t_low=None, threshold=0.5, morphology=Morphology(), reset_below=0.5):
    params = TemporalParams(enabled=True, alpha=alpha, t_high=t_high, t_low=t_low, reset_below=reset_below)
    return TemporalFilter(params, threshold, morphology)


def test_a_static_scene_converges_geometrically():
    # after the reset frame (S = q), each frame of p gives S_k = p + (1 - alpha)^k (q - p)
    image, q, p, alpha = texture(), 0.1, 0.9, 0.4
    filt = make_filter(alpha=alpha)
    first = filt(image[:SIZE, :SIZE].copy(), uniform(q))
    assert first.reset and first.similarity is None
    for k in range(1, 16):
        step = filt(image[:SIZE, :SIZE].copy(), uniform(p))
        assert not step.reset and step.similarity == pytest.approx(1.0)
        np.testing.assert_allclose(step.prob, p + (1 - alpha) ** k * (q - p), atol=1e-5)
    assert abs(float(step.prob.mean()) - p) < 0.01


def test_a_cut_resets_to_the_plain_segmentation():
    morphology = Morphology(open_radius=1)
    filt = make_filter(alpha=0.3, t_high=0.7, t_low=0.2, morphology=morphology)
    for _ in range(4):
        filt(window(texture(0), 0, 0), uniform(0.9))
    prob = np.where(texture(5)[:SIZE, :SIZE] > 0.5, 0.8, 0.1).astype(np.float32)
    step = filt(window(texture(1), 0, 0), prob)  # another scene entirely
    assert step.reset and step.similarity < 0.5
    np.testing.assert_array_equal(step.prob, prob)  # no history left
    np.testing.assert_array_equal(step.mask, postprocess(prob, 0.5, morphology))


def test_a_new_frame_size_resets():
    filt = make_filter()
    filt(window(texture(), 0, 0), uniform(0.9))
    smaller = np.ascontiguousarray(texture()[:64, :64])
    step = filt(smaller, np.full((64, 64), 0.2, np.float32))
    assert step.reset and step.prob.shape == (64, 64) and not step.mask.any()


def square(dy: int, dx: int, inside: float = 0.9, outside: float = 0.05) -> np.ndarray:
    """A probability map with a 24x24 square that moves with the view (see `window`)."""
    prob = np.full((SIZE, SIZE), outside, np.float32)
    y, x = 36 - dy, 36 - dx
    prob[y:y + 24, x:x + 24] = inside
    return prob


GRID = np.dstack(np.meshgrid(np.arange(SIZE, dtype=np.float32), np.arange(SIZE, dtype=np.float32)))


def test_a_moving_square_is_tracked_by_the_warp():
    scene, alpha = texture(), 0.3
    warped, still = make_filter(alpha=alpha), make_filter(alpha=alpha, reset_below=-1)
    for t in range(10):
        dy, dx = t, 2 * t  # the scene slides 1 px down and 2 px right per frame
        image, prob = window(scene, -dy, -dx), square(-dy, -dx)
        tracked = warped(image, prob)
        smeared = still.apply(image, prob, None if t == 0 else GRID)  # a flow of zero: no warp
    assert not tracked.reset and tracked.similarity > 0.9  # the flow aligns the moved frames
    truth = prob > 0.5
    dice = lambda m: 2 * np.sum(m & truth) / (np.sum(m) + np.sum(truth))  # noqa: E731
    assert dice(tracked.mask.astype(bool)) > 0.95
    assert dice(smeared.mask.astype(bool)) < 0.85  # without following the motion the average lags behind
    # the estimated flow points from each pixel back to where it was: (-2, -1) pixels
    motion = MotionEstimator()
    motion(window(scene, 0, 0))
    flow = motion(window(scene, -1, -2)) - GRID
    np.testing.assert_allclose(np.median(flow[20:-20, 20:-20].reshape(-1, 2), axis=0), [-2, -1], atol=0.3)


def test_pixels_coming_into_view_take_the_current_probability():
    filt = make_filter(alpha=0.5)
    filt.apply(uniform(0.5), uniform(0.2), None)
    shifted = GRID.copy()
    shifted[..., 0] -= 10  # each pixel was 10 px further left: the ten leftmost columns have no source
    step = filt.apply(uniform(0.5), uniform(0.8), shifted)
    assert not step.reset
    np.testing.assert_allclose(step.prob[:, :9], 0.8, atol=1e-6)
    np.testing.assert_allclose(step.prob[:, 11:], 0.5, atol=1e-6)


def test_hysteresis_keeps_a_pixel_between_the_thresholds():
    # alpha 1: no averaging, so each frame's probability is S; T* = 0.5, t_low 0.3, t_high 0.7
    filt = make_filter(alpha=1.0, t_high=0.7, t_low=0.3)
    image = window(texture(), 0, 0)
    expected = {0.8: 1, 0.5: 1, 0.4: 1, 0.2: 0, 0.6: 0, 0.65: 0, 0.75: 1, 0.35: 1}
    for prob, inside in expected.items():  # in this order: in at 0.8 (T*, reset), kept down to 0.4, out at 0.2...
        step = filt(image, uniform(prob))
        assert step.mask[SIZE // 2, SIZE // 2] == inside, prob


def test_alpha_one_and_thresholds_at_t_star_change_nothing():
    filt, rng = make_filter(alpha=1.0, threshold=0.4, morphology=Morphology(open_radius=1)), np.random.default_rng(3)
    scene = texture()
    for t in range(5):
        prob = cv2.GaussianBlur(rng.random((SIZE, SIZE)).astype(np.float32), (0, 0), 3)
        step = filt(window(scene, t, t), prob)
        np.testing.assert_array_equal(step.mask, postprocess(prob, 0.4, Morphology(open_radius=1)))


@pytest.mark.parametrize("settings, message", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"alpha": "0.5"}, "alpha"), ({"alpha": True}, "alpha"),
    ({"alpha": float("nan")}, "alpha"), ({"t_high": 1.2}, "t_high"), ({"t_low": -0.1}, "t_low"),
    ({"t_low": 0.6, "t_high": 0.4}, "must not exceed"), ({"reset_below": 2}, "reset_below"),
    ({"enabled": "yes"}, "enabled"),
])
def test_settings_are_checked_one_by_one(settings, message):
    with pytest.raises(InputError, match=message):
        TemporalParams(**settings)


def test_settings_from_a_manifest_object():
    assert TemporalParams.from_dict(None) == TemporalParams() == TemporalParams.from_dict({})
    assert TemporalParams.from_dict({"enabled": True, "alpha": 0.3}) == TemporalParams(enabled=True, alpha=0.3)
    with pytest.raises(InputError, match="unknown temporal"):
        TemporalParams.from_dict({"alpha": 0.3, "beta": 1})
    with pytest.raises(InputError, match="object"):
        TemporalParams.from_dict([0.3])
    assert TemporalParams(alpha=0.3).with_overrides(alpha=None, enabled=True) == TemporalParams(enabled=True, alpha=0.3)


def test_thresholds_must_enclose_t_star():
    assert TemporalParams().thresholds(0.4) == (0.4, 0.4)
    assert TemporalParams(t_low=0.2, t_high=0.6).thresholds(0.4) == (0.2, 0.6)
    with pytest.raises(InputError, match="enclose"):
        TemporalParams(t_high=0.3).thresholds(0.4)


@pytest.fixture
def bundle(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    manifest = Manifest(architecture="fake", input_size=(32, 32), threshold=0.3, morphology=Morphology(),
                        files=[describe_file(tmp_path, "m.onnx", "fp32", "onnx")],
                        temporal=TemporalParams(enabled=True, alpha=0.4, t_high=0.5, t_low=0.2))
    write_manifest(tmp_path, manifest)
    return tmp_path, manifest


def test_manifest_round_trips_the_settings_and_an_old_one_gets_the_defaults(bundle):
    folder, written = bundle
    assert load_manifest(folder).temporal == written.temporal
    data = json.loads((folder / MANIFEST_NAME).read_text())
    assert data["temporal"] == {"enabled": True, "alpha": 0.4, "t_high": 0.5, "t_low": 0.2, "reset_below": 0.5}
    del data["temporal"]  # a bundle exported before the filter existed
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    assert load_manifest(folder).temporal == TemporalParams()


@pytest.mark.parametrize("temporal", [{"alpha": 2}, {"t_low": 0.9, "t_high": 0.5}, {"window": 3}, "on"])
def test_manifest_with_bad_settings_is_refused(bundle, temporal):
    folder, _ = bundle
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["temporal"] = temporal
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(InputError, match=f"{MANIFEST_NAME}: malformed manifest .*temporal"):
        load_manifest(folder)


class SequenceNet:
    """Returns the next of a list of logit maps at each call."""

    def __init__(self, logits: list[np.ndarray]):
        self.logits = iter(logits)
        self.input_buffer = np.zeros((1, 1, *logits[0].shape), np.float32)

    def infer(self, batch):
        return next(self.logits)[None, None].astype(np.float32)


def test_segmenter_reports_mask_change_and_reset(bundle):
    _, manifest = bundle
    block = np.full((32, 32), -10.0, np.float32)
    block[8:16, 8:16] = 10.0
    grown = block.copy()
    grown[8:16, 16:24] = 10.0  # twice the area: half of the union is new
    frame = (texture()[:32, :32] * 255).astype(np.uint8)
    # alone, the second frame's mask doubles; the filter (alpha 0.4, t_high 0.5) averages the new half to 0.4
    # and waits for more evidence before it admits it
    for temporal, resets, change in ((TemporalParams(), [None, None], 0.5), (manifest.temporal, [True, False], 0.0)):
        segment = Segmenter(manifest, SequenceNet([block, grown]), temporal=temporal)
        first, second = (segment(frame, Timings()).stats for _ in range(2))
        assert first["mask_change"] is None and second["mask_change"] == pytest.approx(change)
        assert [first["temporal_reset"], second["temporal_reset"]] == resets


def test_mask_change_counts_the_changed_share():
    change, a = MaskChange(), np.zeros((4, 4), np.uint8)
    assert change(a) is None
    assert change(a) == 0.0  # both empty
    b = a.copy()
    b[:2, :2] = 1
    assert change(b) == 1.0
    c = b.copy()
    c[2, :2] = 1  # 6 pixels in the union, 2 changed
    assert change(c) == pytest.approx(1 / 3)
    assert change(np.zeros((2, 2), np.uint8)) is None


@pytest.mark.parametrize("size, margin", [(10, 0), (40, 8), (200, 20)])
def test_the_flow_is_measured_at_a_working_size_and_brought_back(size, margin):
    # 10: DIS refuses so small an image, the flow is measured on an enlargement; 40: as it is; 200: halved
    scene = texture(size=size + 40)
    view = lambda dy, dx: np.ascontiguousarray(scene[20 + dy:20 + dy + size, 20 + dx:20 + dx + size])  # noqa: E731
    motion = MotionEstimator()
    motion(view(0, 0))
    flow = motion(view(-1, -2)) - np.dstack(np.meshgrid(np.arange(size), np.arange(size)))
    assert flow.shape == (size, size, 2) and np.isfinite(flow).all()
    if margin:  # ten pixels hold too little texture to expect the shift back
        inner = flow[margin:-margin, margin:-margin].reshape(-1, 2)
        np.testing.assert_allclose(np.median(inner, axis=0), [-2, -1], atol=0.35)


def test_describe_for_people():
    assert TemporalParams().describe(0.4) == "off: alpha 0.5, t_high 0.4, t_low 0.4, reset below 0.5"
    assert TemporalParams(enabled=True, t_low=0.1).describe(0.4).startswith("on: alpha 0.5, t_high 0.4, t_low 0.1")
