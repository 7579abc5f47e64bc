"""Backends: ONNX Runtime end to end on a tiny bundle, backend and model choice, bundle trust, and TensorRT
(the engine cache logic and precision checks everywhere; building and running only where TensorRT is)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from device_helpers import GAIN, disc_frame, fake_tensorrt_modules, make_bundle, tiny_onnx
from device_runtime.backends import tensorrt_backend as trt_backend
from device_runtime.backends.selection import open_backend, resolve_backend, select_model
from device_runtime.config import RunConfig
from device_runtime.core.errors import InputError
from device_runtime.core.manifest import describe_file, load_manifest, write_manifest
from device_runtime.core.metrics import confusion_counts, dice
from device_runtime.runner import run
from device_runtime.sources.files import FileSource


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"), int8=True)


def test_onnxruntime_backend_computes_the_model(bundle):
    manifest = load_manifest(bundle)
    net = open_backend(bundle, manifest, "ort-cpu", "fp32")
    try:
        x = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
        net.input_buffer[:] = x
        out = net.infer(net.input_buffer)
        np.testing.assert_allclose(out, GAIN * (x - 0.5), atol=1e-5)
        assert out is net.infer(x)  # the output buffer is bound once and reused
        assert net.name == "onnxruntime CPUExecutionProvider" and net.model_file == "model.fp32.onnx"
    finally:
        net.close()


def frames_source(frames):
    return FileSource(lambda: iter([(f"f{i}", f) for i, f in enumerate(frames)]), "test frames")


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_run_end_to_end_masks_the_bright_disc(bundle, tmp_path, precision):
    """The whole loop on ONNX Runtime; the INT8 QDQ graph runs unchanged and gives the same masks."""
    frames = [disc_frame(96, 128, centre=(30 + 10 * i, 50), radius=16) for i in range(4)]
    cfg = RunConfig(bundle=bundle, backend="ort-cpu", precision=precision, masks_dir=tmp_path / "masks",
                    quiet=True)
    summary = run(cfg, source=frames_source(frames))
    assert summary["frames"] == 4 and summary["model"] == f"model.{precision}.onnx"
    import cv2

    for i, frame in enumerate(frames):
        mask = cv2.imread(str(tmp_path / "masks" / f"f{i}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == frame.shape
        assert float(dice(confusion_counts(mask > 0, frame > 128), reduction="none")) > 0.9


def test_auto_choices_follow_the_bundle(bundle, tmp_path):
    manifest = load_manifest(bundle)
    # nothing measured on ort-cpu: INT8; measured slower than FP32: FP32; measured faster: INT8
    assert select_model(manifest, "ort-cpu", "auto")[0].path == "model.int8.onnx"
    manifest.metrics["latency_ms"] = {"ort-cpu": {"fp32": 30.0, "int8": 45.0}}
    assert select_model(manifest, "ort-cpu", "auto")[0].path == "model.fp32.onnx"
    assert select_model(manifest, "ort-cuda", "auto")[0].path == "model.int8.onnx"
    manifest.metrics["latency_ms"] = {"ort-cpu": {"fp32": 30.0, "int8": 20.0}}
    assert select_model(manifest, "ort-cpu", "auto")[0].path == "model.int8.onnx"
    assert select_model(manifest, "tensorrt", "auto") == (manifest.file("int8"), "int8")
    assert select_model(manifest, "ort-tensorrt", "fp16") == (manifest.file("fp32"), "fp16")
    only_fp32 = load_manifest(make_bundle(tmp_path / "fp32only"))
    assert select_model(only_fp32, "tensorrt", "auto") == (only_fp32.file("fp32"), "fp16")
    only_int8 = load_manifest(make_bundle(tmp_path / "int8only", fp32=False, int8=True))
    assert select_model(only_int8, "ort-cpu", "auto") == (only_int8.file("int8"), "int8")
    with pytest.raises(InputError, match="fp16 needs TensorRT"):
        select_model(manifest, "ort-cpu", "fp16")
    with pytest.raises(InputError, match="no INT8"):
        select_model(only_fp32, "ort-cpu", "int8")


def test_backend_resolution():
    here = {"tensorrt": "tensorrt is not installed", "ort-tensorrt": "no provider", "ort-cuda": "", "ort-cpu": ""}
    assert resolve_backend("auto", here) == "ort-cuda"
    assert resolve_backend("auto", dict(here, tensorrt="")) == "tensorrt"
    assert resolve_backend("ort-cpu", here) == "ort-cpu"
    with pytest.raises(InputError, match="tensorrt cannot run here: tensorrt is not installed"):
        resolve_backend("tensorrt", here)
    with pytest.raises(InputError, match="not one of"):
        resolve_backend("cuda", here)


def test_tampered_bundle_is_refused(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    data = bytearray((bundle / "model.fp32.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bundle / "model.fp32.onnx").write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256 does not match"):
        run(RunConfig(bundle=bundle, source="synthetic:16x16", max_frames=1, quiet=True))


def test_unknown_format_version_is_refused(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="format version 99"):
        load_manifest(bundle)


def test_graph_that_disagrees_with_the_manifest_input_is_refused(tmp_path):
    bundle = make_bundle(tmp_path / "b", size=(32, 32))
    tiny_onnx(bundle / "model.fp32.onnx", size=(16, 16))  # a 16x16 graph under a 32x32 manifest
    manifest = load_manifest(bundle, verify=False)
    manifest.files = [describe_file(bundle, "model.fp32.onnx", "fp32", "onnx")]  # hashes match: only shape differs
    write_manifest(bundle, manifest)
    with pytest.raises(InputError, match=r"input 'input' is tensor\(float\) \['batch', 1, 16, 16\]"):
        open_backend(bundle, load_manifest(bundle), "ort-cpu")


# --- TensorRT: what runs everywhere -------------------------------------------------------------------------


def test_engine_key_names_gpu_version_precision_and_onnx_hash(tmp_path):
    key = trt_backend.EngineKey("nvidia-jetson-agx-orin-sm87", "10.3.0", "ab" * 32, "fp16")
    path = trt_backend.engine_path(tmp_path, key)
    assert path == tmp_path / f"model.nvidia-jetson-agx-orin-sm87.fp16.trt10.3.0.{'ab' * 8}.engine"
    others = [key.__class__(**{**key.__dict__, field: value}) for field, value in
              (("gpu", "nvidia-geforce-rtx-4090-sm89"), ("tensorrt", "10.4.0"), ("onnx_sha256", "cd" * 32),
               ("precision", "int8"))]
    assert len({trt_backend.engine_path(tmp_path, k) for k in [key, *others]}) == 5


def test_gpu_slug_is_file_safe():
    assert trt_backend.gpu_slug("NVIDIA Jetson AGX Orin", 8, 7) == "nvidia-jetson-agx-orin-sm87"
    assert trt_backend.gpu_slug("Tesla T4 / 16GB", 7, 5) == "tesla-t4-16gb-sm75"


def test_engine_cache_round_trip_and_tamper_detection(tmp_path, capsys):
    key = trt_backend.EngineKey("gpu-sm87", "10.3.0", "ab" * 32, "fp16")
    path = trt_backend.engine_path(tmp_path, key)
    assert trt_backend.cached_engine(path, key) is None
    trt_backend.store_engine(path, key, b"serialized engine")
    assert trt_backend.cached_engine(path, key) == b"serialized engine"
    assert trt_backend.cached_engine(path, key.__class__(**{**key.__dict__, "tensorrt": "10.4.0"})) is None
    path.write_bytes(b"serialized engine, changed")
    assert trt_backend.cached_engine(path, key) is None
    assert "does not match its record" in capsys.readouterr().err


def test_engine_precision_validation(bundle, tmp_path):
    manifest = load_manifest(bundle)
    assert trt_backend.check_engine_precision(manifest, "fp16").path == "model.fp32.onnx"
    assert trt_backend.check_engine_precision(manifest, "fp32").path == "model.fp32.onnx"
    assert trt_backend.check_engine_precision(manifest, "int8").path == "model.int8.onnx"
    with pytest.raises(InputError, match="'int4' is not one of fp32, fp16, int8"):
        trt_backend.check_engine_precision(manifest, "int4")
    with pytest.raises(InputError, match="no INT8 ONNX"):
        trt_backend.check_engine_precision(load_manifest(make_bundle(tmp_path / "fp32")), "int8")


def test_build_engine_command_validates_before_needing_tensorrt(bundle, tmp_path, capsys):
    from device_runtime.cli import main

    assert main(["build-engine", "--bundle", str(bundle), "--precision", "int4"]) == 2
    assert main(["build-engine", "--bundle", str(make_bundle(tmp_path / "f")), "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "int4" in err[0] and "no INT8 ONNX" in err[1]


def test_tensorrt_status_explains_its_absence():
    ok, detail = trt_backend.tensorrt_status()
    assert ok or detail  # either it runs, or the reason is given (info prints it)


# --- TensorRT: the backend's plumbing, against a stand-in (see device_helpers.fake_tensorrt_modules) ------------


@pytest.fixture
def fake_tensorrt(monkeypatch):
    fakes = fake_tensorrt_modules()
    monkeypatch.setitem(sys.modules, "tensorrt", fakes["tensorrt"])
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fakes["cuda.bindings.runtime"])
    return fakes


def test_auto_builds_an_int8_engine_from_the_qdq_onnx_once_and_runs_it(bundle, tmp_path, fake_tensorrt):
    cfg = RunConfig(bundle=bundle, engine_cache=tmp_path, source="synthetic:48x64", max_frames=3, quiet=True)
    summary = run(cfg)
    builds = fake_tensorrt["log"]["builds"]
    assert summary["backend"] == "tensorrt 10.3.0" and summary["frames"] == 3
    assert len(builds) == 1 and builds[0]["onnx"].endswith("model.int8.onnx")
    assert builds[0]["flags"] == {"FP16", "INT8"} and builds[0]["calibrator"] is None  # explicit quantization
    assert builds[0]["profile"] == ("input", (1, 1, 32, 32), (1, 1, 32, 32), (1, 1, 32, 32))
    sha = load_manifest(bundle).file("int8").sha256
    engine = tmp_path / f"model.fake-orin-sm87.int8.trt10.3.0.{sha[:16]}.engine"
    assert summary["model"] == engine.name and engine.with_suffix(".json").is_file()
    run(cfg)
    assert len(builds) == 1 and fake_tensorrt["log"]["executions"] == 6  # the second run used the cache


def test_tensorrt_backend_computes_the_model_and_frees_its_memory(bundle, tmp_path, fake_tensorrt):
    net = open_backend(bundle, load_manifest(bundle), "tensorrt", "fp16", engine_cache=tmp_path)
    assert fake_tensorrt["log"]["builds"][0]["flags"] == {"FP16"}
    x = np.random.default_rng(2).random((1, 1, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(net.infer(x), GAIN * (x - 0.5), rtol=1e-6)
    assert net.infer(x) is net.output_buffer
    net.close()
    assert fake_tensorrt["memory"] == {}


def test_build_engine_command_and_info_with_a_stand_in(bundle, tmp_path, fake_tensorrt, capsys):
    from device_runtime.cli import main

    assert main(["info", "--bundle", str(bundle), "--engine-cache", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "would run    tensorrt" in printed and "(built on first run)" in printed and "fake-orin-sm87" in printed
    assert main(["build-engine", "--bundle", str(bundle), "--precision", "fp16", "--engine-cache", str(tmp_path)]) == 0
    engine = capsys.readouterr().out.strip()
    assert engine.endswith(".engine") and ".fp16." in engine
    assert main(["info", "--bundle", str(bundle), "--engine-cache", str(tmp_path), "--precision", "fp16"]) == 0
    assert "(cached)" in capsys.readouterr().out


# --- TensorRT: where it is installed --------------------------------------------------------------------------


def _needs_tensorrt():
    ok, detail = trt_backend.tensorrt_status()
    if not ok:
        pytest.skip(f"TensorRT backend unavailable here: {detail}")


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engine_builds_caches_and_matches_onnxruntime(bundle, tmp_path, precision):
    _needs_tensorrt()
    manifest = load_manifest(bundle)
    model, _ = select_model(manifest, "tensorrt", precision)
    engine, path = trt_backend.load_or_build_engine(bundle, manifest, model, precision, tmp_path)
    assert list(tmp_path.glob(f"*.{precision}.*.engine")) == [path] and path.with_suffix(".json").is_file()
    assert trt_backend.load_or_build_engine(bundle, manifest, model, precision, tmp_path) == (engine, path)  # cached
    net = trt_backend.TensorRTBackend(engine, manifest)
    reference = open_backend(bundle, manifest, "ort-cpu", "int8" if precision == "int8" else "fp32")
    try:
        x = np.random.default_rng(1).random((1, 1, 32, 32), dtype=np.float32)
        np.testing.assert_allclose(net.infer(x), reference.infer(x), atol=0.1 if precision == "int8" else 0.02)
    finally:
        net.close()
        reference.close()


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_run_end_to_end(bundle, tmp_path):
    _needs_tensorrt()
    cfg = RunConfig(bundle=bundle, backend="tensorrt", engine_cache=tmp_path, source="synthetic:48x64",
                    max_frames=5, quiet=True)
    summary = run(cfg)
    assert summary["frames"] == 5 and summary["backend"].startswith("tensorrt")


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_auto_hands_over_when_a_listed_provider_cannot_start(bundle, monkeypatch, capsys):
    """A GPU build of ONNX Runtime lists CUDA even where its libraries are missing; auto then goes on to CPU,
    while an explicit --backend ort-cuda is refused."""
    from device_runtime.backends import selection

    claims = {"tensorrt": "not installed", "ort-tensorrt": "no provider", "ort-cuda": "", "ort-cpu": ""}
    monkeypatch.setattr(selection, "backend_availability", lambda: claims)
    manifest = load_manifest(bundle)
    net = open_backend(bundle, manifest, "auto")
    assert net.name == "onnxruntime CPUExecutionProvider"
    net.close()
    assert "could not start CUDAExecutionProvider" in capsys.readouterr().err
    with pytest.raises(InputError, match="fell back to CPUExecutionProvider"):
        open_backend(bundle, manifest, "ort-cuda")


def test_two_int8_files_each_serve_their_runtime(tmp_path):
    """The signed graph goes to TensorRT, the unsigned (zero point 128) one to ONNX Runtime on the CPU."""

    bundle = make_bundle(tmp_path / "b", int8=True)
    manifest = load_manifest(bundle)
    tiny_onnx(bundle / "model.int8.cpu.onnx", qdq=True)
    cpu = describe_file(bundle, "model.int8.cpu.onnx", "int8", "onnx")
    cpu.runtimes = ["ort-cpu"]
    manifest.file("int8").runtimes = ["tensorrt", "ort-tensorrt", "ort-cuda"]
    manifest.files.append(cpu)
    write_manifest(bundle, manifest)
    manifest = load_manifest(bundle)
    assert select_model(manifest, "ort-cpu", "int8")[0].path == "model.int8.cpu.onnx"
    assert select_model(manifest, "tensorrt", "auto")[0].path == "model.int8.onnx"
    assert select_model(manifest, "ort-cuda", "int8")[0].path == "model.int8.onnx"
    from device_runtime.backends.tensorrt_backend import check_engine_precision, engine_precision

    assert engine_precision(manifest, "auto") == "int8"
    assert check_engine_precision(manifest, "int8").path == "model.int8.onnx"
    summary = run(RunConfig(bundle=bundle, backend="ort-cpu", source="synthetic:16x16", max_frames=2, quiet=True))
    assert summary["model"] == "model.int8.cpu.onnx"


def test_int8_file_missing_or_tampered_is_one_line(tmp_path):
    import subprocess
    import sys

    from device_helpers import REPO

    bundle = make_bundle(tmp_path / "b", int8=True)
    data = bytearray((bundle / "model.int8.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bundle / "model.int8.onnx").write_bytes(bytes(data))
    cases = {"sha256 does not match": bundle}
    missing = make_bundle(tmp_path / "m", int8=True)
    (missing / "model.int8.onnx").unlink()
    cases["missing"] = missing
    cases["no INT8"] = make_bundle(tmp_path / "f")
    for expected, folder in cases.items():
        result = subprocess.run([sys.executable, "-m", "device_runtime", "bench", "--bundle", str(folder),
                                 "--precision", "int8", "--backend", "ort-cpu", "--frames", "1", "--size", "16x16"],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr


def test_a_bundle_whose_tensorrt_form_was_left_out_says_so_everywhere(tmp_path):
    """An INT8 bundle whose export gate left the TensorRT form out (quantization["refused"]) and kept the x86 file:
    TensorRT falls back to FP16 and says why, `--precision int8` on TensorRT is refused in one line saying why,
    ONNX Runtime runs the x86 file, and `info` lists what the bundle holds and what was left out."""
    from device_runtime.backends.selection import auto_precision
    from device_runtime.info import bundle_lines

    bundle = make_bundle(tmp_path / "b", int8=True)
    manifest = load_manifest(bundle)
    manifest.files[1].runtimes = ["ort-cpu", "ort-cuda"]
    manifest.quantization["refused"] = {"model.int8.trt.onnx": "|dp| p50 0.1 > 3 x the model's own 0.001 + 0.0001"}
    write_manifest(bundle, manifest)
    loaded = load_manifest(bundle)
    assert loaded.left_out() == manifest.quantization["refused"]
    precision, why = auto_precision(loaded, "tensorrt")
    assert precision == "fp16" and "TensorRT INT8 file was left out at export" in why
    with pytest.raises(InputError, match=r"its TensorRT form was left out at export \(model\.int8\.trt\.onnx: \|dp\| "
                                         r"p50 0\.1 > 3 x .*\); use --precision fp16"):
        select_model(loaded, "tensorrt", "int8")
    assert select_model(loaded, "ort-cpu", "int8")[0].path == "model.int8.onnx"
    lines = "\n".join(bundle_lines(loaded))
    assert "model.int8.trt.onnx" in lines and "left out at export by the parity gate: |dp| p50 0.1" in lines
    # an older bundle (no "refused") and a bundle that left nothing out: no such line, the old reasons
    assert load_manifest(make_bundle(tmp_path / "old", int8=True)).left_out() == {}
