"""device_runtime.core.preprocess (frame -> network input) and device_runtime.core.imageio (files -> frames)."""

import cv2
import numpy as np
import pytest
import tifffile

from device_runtime.core.errors import InputError
from device_runtime.core.imageio import iter_tiff_pages, read_image
from device_runtime.core.preprocess import preprocess, resize_mask, to_gray, to_unit_float


@pytest.mark.parametrize(
    "values, dtype, expected",
    [
        ([0, 51, 255], np.uint8, [0.0, 0.2, 1.0]),
        ([0, 13107, 65535], np.uint16, [0.0, 0.2, 1.0]),  # 13107 / 65535 = 0.2
        ([-0.5, 0.25, 1.5], np.float64, [0.0, 0.25, 1.0]),  # floats are clipped, not rescaled
        ([0.0, 0.5, 1.0], np.float32, [0.0, 0.5, 1.0]),
        ([False, True, True], np.bool_, [0.0, 1.0, 1.0]),
    ],
)
def test_to_unit_float(values, dtype, expected):
    out = to_unit_float(np.array([values], dtype=dtype))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("channels, code", [(3, cv2.COLOR_BGR2GRAY), (4, cv2.COLOR_BGRA2GRAY)])
def test_colour_becomes_grey_as_opencv_does(channels, code):
    frame = np.random.default_rng(0).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    expected = cv2.cvtColor(frame, code).astype(np.float32) / 255
    np.testing.assert_allclose(preprocess(frame, (5, 7))[0, 0], expected, atol=1e-6)


def test_grey_with_a_channel_axis_and_bad_channels():
    frame = np.full((4, 4, 1), 255, np.uint8)
    assert to_gray(frame).shape == (4, 4)
    with pytest.raises(InputError, match=r"\(4, 4, 2\)"):
        to_gray(np.zeros((4, 4, 2), np.uint8))


@pytest.mark.parametrize("frame_shape", [(10, 20), (300, 200), (256, 256), (12, 16, 3)])
def test_output_shape_and_dtype(frame_shape):
    frame = np.random.default_rng(0).integers(0, 65536, frame_shape, dtype=np.uint16)
    out = preprocess(frame, (8, 6))  # size is (height, width)
    assert out.shape == (1, 1, 8, 6) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_constant_frame_stays_constant_after_resize():
    np.testing.assert_allclose(preprocess(np.full((4, 6), 255, np.uint8), (2, 2)), 1.0)


def test_out_buffer_is_reused():
    out = np.zeros((1, 1, 4, 6), np.float32)
    first = preprocess(np.full((8, 12), 255, np.uint8), (4, 6), out=out)
    assert first is out and np.all(out == 1.0)
    second = preprocess(np.zeros((8, 12), np.uint8), (4, 6), out=out)
    assert second is out and np.all(out == 0.0)


@pytest.mark.parametrize("size", [(3, 5), (16, 16), (7, 2)])
def test_resize_mask_keeps_label_values(size):
    mask = np.random.default_rng(0).choice(np.array([0, 1, 2], np.uint8), (6, 6))
    resized = resize_mask(mask, size)
    assert resized.shape == size and resized.dtype == np.uint8
    assert set(np.unique(resized)) <= {0, 1, 2}


def test_resize_mask_upsamples_by_repeating():
    mask = np.array([[0, 2], [2, 0]], np.uint8)
    np.testing.assert_array_equal(resize_mask(mask, (4, 4)), np.kron(mask, np.ones((2, 2), np.uint8)))


# imageio


@pytest.mark.parametrize("dtype, maximum", [(np.uint8, 255), (np.uint16, 65535)])
@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_grey_round_trip(tmp_path, dtype, maximum, suffix):
    frame = np.random.default_rng(0).integers(0, maximum + 1, (9, 11), dtype=dtype)
    path = tmp_path / f"frame{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, frame)
    else:
        cv2.imwrite(str(path), frame)
    back = read_image(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, frame)


def test_rgb_tiff_comes_back_bgr(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # red
    tifffile.imwrite(tmp_path / "colour.tif", rgb, photometric="rgb")
    back = read_image(tmp_path / "colour.tif")
    np.testing.assert_array_equal(back, rgb[..., ::-1])
    assert back[0, 0, 2] == 200  # red is OpenCV's last channel


def test_colour_png_is_bgr_too(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 2] = 200
    cv2.imwrite(str(tmp_path / "colour.png"), bgr)
    np.testing.assert_array_equal(read_image(tmp_path / "colour.png"), bgr)


def test_multi_page_tiff(tmp_path):
    pages = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    with tifffile.TiffWriter(tmp_path / "stack.tif") as tif:
        for page in pages:
            tif.write(page, photometric="minisblack")
    frames = list(iter_tiff_pages(tmp_path / "stack.tif"))
    assert len(frames) == 3
    for got, want in zip(frames, pages):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(read_image(tmp_path / "stack.tif"), pages[0])  # the first page


@pytest.mark.parametrize("name", ["broken.tif", "broken.png", "broken.jpg"])
def test_corrupt_file_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match=name):
        read_image(path)


def test_corrupt_tiff_pages_and_missing_file(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(InputError, match="bad.tif"):
        list(iter_tiff_pages(tmp_path / "bad.tif"))
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "absent.png")


def test_tiff_with_a_valid_header_but_no_readable_page(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(InputError, match="bad.tif"):
        list(iter_tiff_pages(tmp_path / "bad.tif"))
