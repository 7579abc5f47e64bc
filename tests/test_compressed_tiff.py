"""LZW- and Deflate-compressed TIFFs: read on the desktop (imagecodecs) and on a device without it (OpenCV's
libtiff), and an LZW dataset trains and runs through `nerveseg-device run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

from device_runtime.core.imageio import iter_tiff_pages, read_image

from conftest import REPO

COMPRESSIONS = ("lzw", "zlib")  # zlib is TIFF's Deflate


def _frames(dtype, pages: int = 1, shape=(40, 56)) -> np.ndarray:
    top = np.iinfo(dtype).max
    return np.random.default_rng(7).integers(0, top, (pages, *shape), endpoint=True).astype(dtype)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_compressed_tiff_reads_exactly(tmp_path, compression, dtype):
    frame = _frames(dtype)[0]
    path = tmp_path / f"frame_{compression}.tif"
    tifffile.imwrite(path, frame, compression=compression)
    assert tifffile.TiffFile(path).pages[0].compression != 1  # really compressed
    out = read_image(path)
    assert out.dtype == dtype and np.array_equal(out, frame)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_compressed_multipage_tiff_pages(tmp_path, compression):
    stack = _frames(np.uint8, pages=3)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, compression=compression, photometric="minisblack")
    pages = list(iter_tiff_pages(path))
    assert len(pages) == 3 and all(np.array_equal(p, s) for p, s in zip(pages, stack))


def test_without_imagecodecs_opencv_decodes_lzw(tmp_path):
    """A device install without imagecodecs: tifffile refuses LZW, the OpenCV fallback reads it exactly."""
    stack = _frames(np.uint16, pages=2)
    grey, colour = tmp_path / "grey.tif", tmp_path / "colour.tif"
    tifffile.imwrite(grey, stack, compression="lzw", photometric="minisblack")
    rgb = np.random.default_rng(1).integers(0, 255, (24, 32, 3), endpoint=True).astype(np.uint8)
    tifffile.imwrite(colour, rgb, compression="lzw", photometric="rgb")
    np.save(tmp_path / "stack.npy", stack)
    np.save(tmp_path / "rgb.npy", rgb)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["imagecodecs"] = None  # as if not installed
        import numpy as np, tifffile
        from device_runtime.core.imageio import iter_tiff_pages, read_image
        try:
            tifffile.imread({str(grey)!r})
            raise SystemExit("tifffile decoded LZW without imagecodecs: this test proves nothing")
        except ValueError as err:
            assert "imagecodecs" in str(err), err
        stack, rgb = np.load({str(tmp_path / 'stack.npy')!r}), np.load({str(tmp_path / 'rgb.npy')!r})
        assert np.array_equal(read_image({str(grey)!r}), stack[0])
        pages = list(iter_tiff_pages({str(grey)!r}))
        assert len(pages) == 2 and all(np.array_equal(p, s) for p, s in zip(pages, stack))
        assert np.array_equal(read_image({str(colour)!r}), rgb[..., ::-1])  # BGR, as from tifffile
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.slow
def test_lzw_dataset_trains_and_runs_on_the_device(tmp_path, capsys):
    """An LZW-compressed Kaggle-layout dataset: train (tiny), tune, export, then `nerveseg-device run` on LZW frames."""
    from device_runtime.cli import main as device_main
    from export.bundle.writer import export_bundle
    from training import stages, train
    from training.config import build_config
    from training.data.synth import generate_phantom

    data = tmp_path / "lzw"
    data.mkdir()
    images, masks, names = generate_phantom(24, seed=3, size=(64, 64), frames_per_subject=4)
    for image, mask, name in zip(images, masks, names):
        tifffile.imwrite(data / f"{name}.tif", image, compression="lzw")
        tifffile.imwrite(data / f"{name}_mask.tif", mask * np.uint8(255), compression="lzw")
    cfg = build_config("quick", data=str(data), run_dir=str(tmp_path / "run"), input_size=(64, 64), epochs=1,
                       batch_size=4, device="cpu", val_batch_size=8)
    run_dir = train.main(cfg)
    stages.tune_run(run_dir, "cpu")
    bundle, _ = export_bundle(run_dir / "checkpoints" / "best.pt", device="cpu")

    frames = tmp_path / "frames"
    frames.mkdir()
    for name in names[:5]:
        (frames / f"{name}.tif").write_bytes((data / f"{name}.tif").read_bytes())
    out = tmp_path / "out"
    code = device_main(["run", "--bundle", str(bundle), "--source", str(frames), "--masks", str(out / "masks"),
                        "--jsonl", str(out / "frames.jsonl")])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
    assert len(records) == 5 and len(list((out / "masks").iterdir())) == 5
