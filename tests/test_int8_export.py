"""INT8 bundles from a QAT run: the parity gate per file (a file refused is left out, no file left: no bundle),
manifest, both runtimes' files, bad input, the device and what it says the bundle holds."""

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

from conftest import load_script  # noqa: E402
from device_runtime.core.errors import InputError  # noqa: E402
from device_runtime.core.manifest import load_manifest  # noqa: E402
from export.bundle.writer import ParityError  # noqa: E402
from export.bundle.int8 import CPU_NAME, TENSORRT_NAME, export_int8_bundle, format_summary  # noqa: E402
from export.bundle.int8_graph import layer_constants  # noqa: E402
from export.bundle.parity import GATE_FACTOR  # noqa: E402
from export.bundle.qdq import cpu_form as module_cpu_form  # noqa: E402
from training.data.dataset import load_split  # noqa: E402

PLANT = load_script("parity_faults")  # the planted faults, edits of the exported graph


@pytest.fixture(scope="module")
def qat_run(tiny_qat_run):
    return tiny_qat_run


@pytest.fixture(scope="module")
def int8_bundle(qat_run):
    return export_int8_bundle(qat_run.parents[1], qat_run.name, device="cpu")


def test_bundle_has_both_int8_files_parity_and_quantization(int8_bundle, qat_run):
    bundle, manifest = int8_bundle
    loaded = load_manifest(bundle)  # sha256 of every file
    assert {f.path for f in loaded.files} == {"model.fp32.onnx", TENSORRT_NAME, CPU_NAME}
    assert loaded.file("int8", "onnx", "ort-cpu").path == CPU_NAME
    assert loaded.file("int8", "onnx", "tensorrt").path == TENSORRT_NAME
    checkpoint_threshold = json.loads((qat_run / "threshold.json").read_text())
    assert loaded.threshold == pytest.approx(checkpoint_threshold["threshold"])  # the QAT run's T*, not the float's
    assert loaded.morphology.to_dict() == checkpoint_threshold["morphology"]
    # a faithful graph passes with no flag and no lowered bound, measured on every validation and training frame
    split = load_split(qat_run.parents[1] / "split.json")
    floor = loaded.metrics["parity"]["model_float32_vs_float64"]
    assert floor["frames"] == len(split["val"]) + len(split["train"]) and floor["pixels"] == floor["frames"] * 64 * 64
    assert floor["frames_from"] == {"val": len(split["val"]), "train": len(split["train"])}
    for name in (TENSORRT_NAME, CPU_NAME):
        parity = loaded.metrics["parity"][name]
        assert parity["gate"]["passed"] and parity["gate"]["worst_ratio"] <= 1.0, parity["gate"]
        assert parity["frames"] == floor["frames"] and {"prob_diff_p50", "prob_diff_p99.9", "flipped_fraction",
                                                        "reference_max_prob_diff", "against_float64"} <= set(parity)
        layers = parity["layers"]  # the teacher-forced check of every activation quantizer (export/bundle/layer_parity.py)
        assert layers["passed"] and layers["unchecked"] == [] and layers["worst"]["mismatch_fraction"] <= layers["bound"]
        assert len(layers["quantizers"]) > 50 and all(row["max_abs_diff"] <= 1 for row in layers["quantizers"])
    assert loaded.quantization["refused"] == {} and loaded.left_out() == {}
    assert loaded.metrics["parity"]["gate"]["factor"] == GATE_FACTOR
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


def test_no_file_passing_refuses_the_bundle_and_keeps_the_previous_one(int8_bundle, qat_run, monkeypatch):
    bundle, _ = int8_bundle
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    import export.bundle.int8_parity as module

    monkeypatch.setattr(module, "tie_gate", lambda result, floor: {"passed": False, "worst_ratio": 2.0,
                                                                    "failures": ["|dp| p50 1 > 0"]})
    with pytest.raises(ParityError, match=r"no INT8 bundle: every INT8 file departs .*model\.int8\.onnx: on \d+ frames, "
                                          r"as ONNX Runtime CPU runs it: \|dp\| p50 1 > 0; as written "
                                          r"\(ORT_DISABLE_ALL\): \|dp\| p50 1 > 0"):
        export_int8_bundle(qat_run.parents[1], qat_run.name, device="cpu", replace=True)
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before


@pytest.fixture(scope="module")
def tensorrt_form_refused(qat_run, tmp_path_factory):
    """A bundle whose TensorRT form carries a planted fault (every weight scale x2) and whose x86 file is the
    faithful one: the gate leaves the first out and keeps the second."""
    import export.bundle.int8 as module
    from export.bundle.int8_graph import build_int8_model
    from export.bundle.qdq import cpu_form

    faithful = {}

    def faulty_build(*args, **kwargs):
        faithful["graph"] = build_int8_model(*args, **kwargs)
        return PLANT.weight_scale_times(faithful["graph"], 2.0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "build_int8_model", faulty_build)
        patch.setattr(module, "cpu_form", lambda graph: cpu_form(faithful["graph"]))
        return export_int8_bundle(qat_run.parents[1], qat_run.name, tmp_path_factory.mktemp("b") / "bundle",
                                  device="cpu")


def test_a_refused_file_is_left_out_and_the_device_says_what_the_bundle_holds(tensorrt_form_refused, capsys):
    from device_runtime.backends.selection import auto_precision, select_model
    from device_runtime.backends.tensorrt_backend import check_engine_precision, engine_precision

    bundle, manifest = tensorrt_form_refused
    loaded = load_manifest(bundle)
    assert {f.path for f in loaded.files} == {"model.fp32.onnx", CPU_NAME} and not (bundle / TENSORRT_NAME).exists()
    assert set(loaded.left_out()) == {TENSORRT_NAME} and "|dp|" in loaded.left_out()[TENSORRT_NAME]
    assert not loaded.metrics["parity"][TENSORRT_NAME]["gate"]["passed"]  # measured and recorded all the same
    assert loaded.metrics["parity"][CPU_NAME]["gate"]["passed"]
    assert loaded.file("int8", "onnx", "ort-cuda", made_for=True).path == CPU_NAME  # the kept file serves ORT GPU too
    assert [p for p in loaded.metrics["tensorrt_problems"] if p.startswith(TENSORRT_NAME)] == []
    assert loaded.metrics["latency_ms"]["ort-cpu"]["int8_file"] == CPU_NAME
    summary = format_summary(bundle, manifest)
    assert f"holds {CPU_NAME} (+ model.fp32.onnx)" in summary and f"{TENSORRT_NAME} left out: " in summary
    # every weight scale x2: the layer check refuses the first convolution's output, and says so
    assert "layer by layer (teacher-forced, 4 frames): backbone.0.0.output_quant: " in loaded.left_out()[TENSORRT_NAME]
    assert f"{CPU_NAME} kept" in summary and "layer by layer, the worst quantizer " in summary
    # TensorRT: FP16 from the float graph, saying why; --precision int8 refused in one line that says why
    precision, why = auto_precision(loaded, "tensorrt")
    assert precision == "fp16" and "left out at export" in why
    assert engine_precision(loaded, "auto") == "fp16"
    with pytest.raises(InputError, match="TensorRT form was left out at export"):
        select_model(loaded, "tensorrt", "int8")
    with pytest.raises(InputError, match="TensorRT form was left out at export"):
        check_engine_precision(loaded, "int8")
    assert select_model(loaded, "ort-cpu", "int8")[0].path == CPU_NAME
    info = subprocess.run([sys.executable, "-m", "device_runtime", "info", "--bundle", str(bundle)],
                          capture_output=True, text=True, cwd=REPO)
    assert info.returncode == 0, info.stderr
    assert f"{TENSORRT_NAME}" in info.stdout and "left out at export by the parity gate" in info.stdout


def test_an_x86_file_refused_leaves_the_tensorrt_form_for_every_backend(qat_run, tmp_path, monkeypatch):
    import export.bundle.int8 as module
    from device_runtime.backends.selection import select_model

    monkeypatch.setattr(module, "cpu_form", lambda graph: PLANT.bias_on_weight_grid(module_cpu_form(graph)))
    bundle, manifest = export_int8_bundle(qat_run.parents[1], qat_run.name, tmp_path / "bundle", device="cpu")
    loaded = load_manifest(bundle)
    assert {f.path for f in loaded.files} == {"model.fp32.onnx", TENSORRT_NAME}
    assert set(loaded.left_out()) == {CPU_NAME}
    assert select_model(loaded, "ort-cpu", "int8")[0].path == TENSORRT_NAME
    assert select_model(loaded, "tensorrt", "int8")[0].path == TENSORRT_NAME
    # what --precision auto compares on ONNX Runtime CPU is the file it would run: the TensorRT form
    assert loaded.metrics["latency_ms"]["ort-cpu"]["int8_file"] == TENSORRT_NAME
    assert loaded.metrics["test_onnx"]["int8"]["images"] > 0


def test_the_retired_flag_says_it_is_no_longer_needed(capsys):
    import argparse

    from export.cli import _retired_parity_flag, get_args_parser

    args = get_args_parser().parse_args(["export", "--run-dir", "r", "--qat", "w8a8", "--parity-bound-from-model"])
    _retired_parity_flag(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--parity-bound-from-model is no longer needed" in err[0]
    _retired_parity_flag(argparse.Namespace(parity_bound_from_model=False))
    assert capsys.readouterr().err == ""
    assert "--parity-bound-from-model" not in get_args_parser().format_help()


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
        export_int8_bundle(copy, "w8a8", device="cpu")
    other = dict(checkpoint, arch="resnet50", config=dict(checkpoint["config"], arch="resnet50"))
    save_qat_checkpoint(other, path)
    with pytest.raises(InputError, match="best.pt"):
        export_int8_bundle(copy, "w8a8", device="cpu")
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
    """Both evaluations are the fake-quant model; a graph that reproduces one of them is measured against that one,
    and the figures against each are kept."""
    import export.bundle.int8_parity as module
    from device_runtime.core.postprocess import Morphology

    graph = np.zeros((2, 16, 16), np.float32)
    graph[:, 4:12, 4:12] = 0.9
    monkeypatch.setattr(module, "onnx_probabilities", lambda path, images, optimization="all": graph)
    shifted = np.zeros_like(graph)
    shifted[:, 4:12, 8:16] = 0.9
    result = module.parity_of(Path("model.onnx"), np.zeros((2, 16, 16), np.float32),
                              {"float32": shifted, "float64": graph}, 0.5, Morphology(0, 0, 0, False))
    assert result["mask_dice"] == 1.0 and result["max_prob_diff"] == 0.0 and "float64" in result["reference_model"]
    assert result["against_float32"]["mask_dice"] == pytest.approx(0.5)
    assert result["against_float32"]["flipped_fraction"] == pytest.approx(64 / 256)
    assert result["reference_mask_dice"] == 1.0
