"""INT8 bundles from a QAT run: parity or no bundle, manifest, both runtimes' files, bad input, the device."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("qat.run", reason="the qat training loop (branch qat) is not merged yet")

from device_runtime.core.errors import InputError  # noqa: E402
from device_runtime.core.manifest import load_manifest  # noqa: E402
from export.bundle.int8 import CPU_NAME, TENSORRT_NAME, export_int8_bundle  # noqa: E402
from export.bundle.int8_graph import layer_constants  # noqa: E402


@pytest.fixture(scope="module")
def qat_run(tiny_run):
    from qat.config import QatConfig
    from qat.run import run_qat

    return run_qat(QatConfig(run_dir=str(tiny_run), name="w8a8", bits="w8a8", epochs=1, observe_frames=8,
                             device="cpu"))


# the tiny run trains 2 epochs at 64x64: its probabilities hover near T* over much of each frame, so a 1-step
# integer difference between PyTorch's and ONNX Runtime's float arithmetic flips pixels; real models meet 0.995
TINY_MIN_MASK_DICE = 0.9


@pytest.fixture(scope="module")
def int8_bundle(qat_run):
    return export_int8_bundle(qat_run.parents[1], qat_run.name, device="cpu", min_mask_dice=TINY_MIN_MASK_DICE)


def test_bundle_has_both_int8_files_parity_and_quantization(int8_bundle, qat_run):
    bundle, manifest = int8_bundle
    loaded = load_manifest(bundle)  # sha256 of every file
    assert {f.path for f in loaded.files} == {"model.fp32.onnx", TENSORRT_NAME, CPU_NAME}
    assert loaded.file("int8", "onnx", "ort-cpu").path == CPU_NAME
    assert loaded.file("int8", "onnx", "tensorrt").path == TENSORRT_NAME
    checkpoint_threshold = json.loads((qat_run / "threshold.json").read_text())
    assert loaded.threshold == pytest.approx(checkpoint_threshold["threshold"])  # the QAT run's T*, not the float's
    assert loaded.morphology.to_dict() == checkpoint_threshold["morphology"]
    for name in (TENSORRT_NAME, CPU_NAME):
        parity = loaded.metrics["parity"][name]
        assert parity["mask_dice"] >= TINY_MIN_MASK_DICE and 0 <= parity["flipped_fraction"] < 0.05
        assert parity["min_mask_dice"] == TINY_MIN_MASK_DICE
        assert "reference_max_prob_diff" in parity
    q = loaded.quantization
    bits = json.loads((qat_run / "bits.json").read_text())
    assert q["layers"] == bits["layers"] and q["mean_weight_bits"] == pytest.approx(8.0)
    # one byte per weight where FP32 stores four, the same taps cut from both (export.bundle.dead_taps); what keeps the file
    # ratio under 4 is the per-channel scales, float biases and graph structure (usgra-seg edge at 256: 3.90x)
    fp32_weights = {i.name: i for i in onnx.load(str(bundle / "model.fp32.onnx")).graph.initializer
                    if len(i.dims) == 4}
    cpu_graph = onnx.load(str(bundle / CPU_NAME))
    initializers = {i.name: i for i in cpu_graph.graph.initializer}
    int8_weights = {layer: initializers[names["weight_int8"]] for layer, names in layer_constants(cpu_graph).items()}
    assert all(i.data_type == onnx.TensorProto.INT8 for i in int8_weights.values())
    assert sum(np.prod(i.dims) for i in int8_weights.values()) == sum(np.prod(i.dims) for i in fp32_weights.values())
    assert q["int8_compression"] > 3.5
    stored = {layer: np.prod(i.dims) for layer, i in int8_weights.items()}  # live taps only
    assert set(stored) == {r["name"] for r in bits["layers"]}
    assert any(stored[r["name"]] < r["params"] for r in bits["layers"])  # 64x64: the ASPP kernels are cut
    expected = sum(stored[r["name"]] * r["weight_bits"] for r in bits["layers"]) / 8
    assert q["packed_weight_bytes"] == round(expected) and q["packed_bytes"] > q["packed_weight_bytes"]
    assert [p for p in loaded.metrics["tensorrt_problems"] if p.startswith(TENSORRT_NAME)] == []
    assert set(loaded.metrics["latency_ms"]["ort-cpu"]) >= {"fp32", "int8"}
    onnx_metrics = json.loads((qat_run / "test_metrics_onnx.json").read_text())
    assert onnx_metrics["int8"]["dice"] == pytest.approx(loaded.metrics["test_onnx"]["int8"]["dice"])


def test_failed_parity_keeps_the_previous_bundle(int8_bundle, qat_run):
    bundle, _ = int8_bundle
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    import export.bundle.int8 as module

    with pytest.raises(InputError, match=r"mask Dice agreement .* < 1\.0.*; the graph run as written "
                                         r"\(ORT_DISABLE_ALL\) agrees at [01]\.\d{4}; no bundle written"):
        module.export_int8_bundle(qat_run.parents[1], qat_run.name, device="cpu", min_mask_dice=1.0 + 1e-9,
                                 replace=True)
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before


def test_a_model_that_cannot_reproduce_itself_is_refused_unless_held_to_its_own_agreement(qat_run, tmp_path,
                                                                                         monkeypatch):
    """Stand-in for a precision-sensitive model: its "float64 evaluation" made the complement of the float32 one,
    so the model agrees with itself at nearly 0; an impossible project bound (> 1) then refuses with the hint, and
    --parity-bound-from-model holds the files to the model's own agreement and records that."""
    import export.bundle.int8 as module
    from training.evaluation.predict import predict_probabilities

    def complement(model, images, batch_size=8):
        return 1.0 - predict_probabilities(model, images, module.torch.device("cpu"), batch_size, amp=False)

    monkeypatch.setattr(module, "float64_probabilities", complement)
    run_dir = qat_run.parents[1]
    with pytest.raises(InputError, match="agrees with itself.*--parity-bound-from-model"):
        module.export_int8_bundle(run_dir, qat_run.name, tmp_path / "strict", device="cpu", min_mask_dice=1.0 + 1e-9)
    assert not (tmp_path / "strict").exists()
    bundle, manifest = module.export_int8_bundle(run_dir, qat_run.name, tmp_path / "held", device="cpu",
                                                 min_mask_dice=1.0 + 1e-9, bound_from_model=True)
    parity = manifest.metrics["parity"]
    own = parity["model_float32_vs_float64"]["mask_dice"]
    for name in (CPU_NAME, TENSORRT_NAME):
        assert parity[name]["bound_from_model"] and parity[name]["project_min_mask_dice"] == 1.0 + 1e-9
        assert parity[name]["min_mask_dice"] == own <= parity[name]["mask_dice"]
    assert "the model's own agreement" in module.format_summary(bundle, manifest)
    # a file that meets the project's bound is held to it, flag or not
    _, kept = module.export_int8_bundle(run_dir, qat_run.name, tmp_path / "met", device="cpu", min_mask_dice=0.0,
                                        bound_from_model=True)
    assert not any(kept.metrics["parity"][name]["bound_from_model"] for name in (CPU_NAME, TENSORRT_NAME))


def test_a_file_below_the_models_own_agreement_is_refused_naming_that_bound(qat_run, tmp_path, monkeypatch):
    """Under --parity-bound-from-model the bound can be the model's own float32/float64 agreement, a long float
    that the user did not type: the refusal says where it comes from. Stand-ins: a float64 evaluation equal to the
    float32 one (own agreement 1.0, below an impossible project bound) and a file that agrees at 0.5."""
    import export.bundle.int8 as module
    from training.evaluation.predict import predict_probabilities

    monkeypatch.setattr(module, "float64_probabilities", lambda model, images, batch_size=8: predict_probabilities(
        model, images, module.torch.device("cpu"), batch_size, amp=False))
    monkeypatch.setattr(module, "parity_of", lambda path, images, references, threshold, morphology: {
        "frames": len(images), "mask_dice": 0.5})
    with pytest.raises(InputError, match=r"mask Dice agreement 0\.5000 < 1\.0000 \(the model's own float32-vs-float64 "
                                         r"agreement, --parity-bound-from-model\); no bundle written"):
        module.export_int8_bundle(qat_run.parents[1], qat_run.name, tmp_path / "b", device="cpu",
                                  min_mask_dice=1.0 + 1e-9, bound_from_model=True)
    assert not (tmp_path / "b").exists()


def test_bad_input_is_one_line(qat_run, tmp_path):
    run_dir = qat_run.parents[1]
    result = subprocess.run([sys.executable, "-m", "export.cli", "export", "--run-dir", str(run_dir), "--qat", "nope"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "no such QAT run" in result.stderr and "w8a8" in result.stderr

    from qat.checkpoint import read_qat_checkpoint, save_qat_checkpoint

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("bundle"))
    path = copy / "qat" / "w8a8" / "checkpoints" / "best.pt"
    checkpoint = read_qat_checkpoint(path)
    save_qat_checkpoint(dict(checkpoint, threshold=None), path)
    with pytest.raises(InputError, match="no tuned threshold"):
        export_int8_bundle(copy, "w8a8", device="cpu", min_mask_dice=TINY_MIN_MASK_DICE)
    other = dict(checkpoint, arch="resnet50", config=dict(checkpoint["config"], arch="resnet50"))
    save_qat_checkpoint(other, path)
    with pytest.raises(InputError, match="best.pt"):
        export_int8_bundle(copy, "w8a8", device="cpu", min_mask_dice=TINY_MIN_MASK_DICE)
    assert not (copy / "qat" / "w8a8" / "bundle").exists()


def test_device_runs_the_int8_bundle_and_says_what_it_took(int8_bundle):
    bundle, _ = int8_bundle
    command = [sys.executable, "-m", "device_runtime", "bench", "--bundle", str(bundle), "--backend", "ort-cpu",
               "--frames", "3", "--size", "64x64", "--warmup", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "--precision auto on ort-cpu" in result.stdout and "manifest measured" in result.stdout
    result = subprocess.run(command + ["--precision", "int8"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and CPU_NAME in result.stdout
    info = subprocess.run([sys.executable, "-m", "device_runtime", "info", "--bundle", str(bundle)],
                          capture_output=True, text=True, cwd=REPO)
    assert info.returncode == 0, info.stderr
    assert TENSORRT_NAME in info.stdout and "parity" in info.stdout and "W8 A8" in info.stdout


def test_parity_is_held_to_the_closer_of_the_float32_and_float64_models(monkeypatch):
    """Both evaluations are the fake-quant model; a graph that reproduces one of them passes, and the figures
    against each are kept."""
    import numpy as np

    import export.bundle.int8 as int8
    from device_runtime.core.postprocess import Morphology

    graph = np.zeros((2, 16, 16), np.float32)
    graph[:, 4:12, 4:12] = 0.9
    monkeypatch.setattr(int8, "onnx_probabilities", lambda path, images, optimization="all": graph)
    shifted = np.zeros_like(graph)
    shifted[:, 4:12, 8:16] = 0.9
    result = int8.parity_of(Path("model.onnx"), np.zeros((2, 16, 16), np.float32),
                            {"float32": shifted, "float64": graph}, 0.5, Morphology(0, 0, 0, False))
    assert result["mask_dice"] == 1.0 and "float64" in result["reference_model"]
    assert result["against_float32"]["mask_dice"] == pytest.approx(0.5)
    assert result["against_float64"]["reference_mask_dice"] == 1.0
