"""FP32 export: the ONNX graph matches PyTorch, TensorRT could parse it, the bundle verifies."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from device_runtime.core.errors import InputError
from device_runtime.core.manifest import load_manifest
from export.bundle.writer import FP32_NAME, export_bundle
from export.bundle.onnx_export import export_onnx, tensorrt_problems
from export.bundle.parity import (GATE_FACTOR, GATE_SLACK, PROB_QUANTILES, compare, onnx_probabilities, parity_failures,
                                  quantile_key, tie_gate)
from device_runtime.core.postprocess import Morphology
from training.model import build_model


@pytest.fixture(scope="module")
def bundle(tiny_run):
    return export_bundle(tiny_run / "checkpoints" / "best.pt", device="cpu")


def test_onnx_matches_pytorch_with_dynamic_batch(tmp_path):
    model = build_model("mobilenet_v3_large").eval()
    path = export_onnx(model, tmp_path / "m.onnx", (64, 64))
    images = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)  # batch 3 though exported with 1
    with torch.no_grad():
        reference = torch.sigmoid(model(torch.from_numpy(images)[:, None])["out"][:, 0]).numpy()
    result = compare(reference, onnx_probabilities(path, images), 0.5, Morphology())
    assert result["max_prob_diff"] < 1e-5 and result["mask_dice"] == 1.0
    assert parity_failures(result, "fp32") == []


def test_pixel_statistics_are_pooled_over_frames():
    """Two 2x2 frames; the second departs at one pixel by 0.5 (across T = 0.5): 1 of 8 pixels flipped, |dp| 0 at
    7 of 8 pixels, so the median is 0 and the largest 0.5."""
    reference = np.array([[[0.1, 0.2], [0.9, 0.8]], [[0.1, 0.2], [0.9, 0.8]]], np.float32)
    other = reference.copy()
    other[1, 1, 1] = 0.3
    result = compare(reference, other, 0.5, Morphology())
    assert result["frames"] == 2 and result["pixels"] == 8 and result["flipped_fraction"] == 1 / 8
    assert result["prob_diff_p50"] == 0.0 and result["max_prob_diff"] == pytest.approx(0.5)
    assert result["mean_prob_diff"] == pytest.approx(0.5 / 8)
    assert result["mask_dice"] == pytest.approx((1 + 2 / 3) / 2)  # frame 2: masks of 2 and 1 pixels, 1 shared


def test_the_int8_gate_allows_each_statistic_its_factor_of_the_noise_floor_plus_slack():
    floor = {"flipped_fraction": 1e-3, **{quantile_key(q): 1e-2 for q in PROB_QUANTILES}}
    allowed = {key: GATE_FACTOR * floor[key] + GATE_SLACK[key] for key in floor}
    at_the_bound = dict(allowed)
    verdict = tie_gate(at_the_bound, floor)
    assert verdict["passed"] and verdict["worst_ratio"] == pytest.approx(1.0) and verdict["failures"] == []
    above = dict(allowed, **{"prob_diff_p99": allowed["prob_diff_p99"] * 1.01})
    verdict = tie_gate(above, floor)
    assert not verdict["passed"] and verdict["ratio"]["prob_diff_p99"] == pytest.approx(1.01)
    assert verdict["failures"] == [f"|dp| p99 {above['prob_diff_p99']:.2g} > {GATE_FACTOR:g} x the model's own 0.01 + "
                                   f"{GATE_SLACK['prob_diff_p99']:g}"]
    # a model that agrees with itself exactly still leaves the slack: float32 kernels differ without any tie
    exact = {key: 0.0 for key in floor}
    assert tie_gate({key: GATE_SLACK[key] for key in floor}, exact)["passed"]
    assert not tie_gate(dict(exact, flipped_fraction=2 * GATE_SLACK["flipped_fraction"]), exact)["passed"]


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "resnet50"])
def test_exported_graph_uses_only_what_tensorrt_accepts(arch, tmp_path):
    path = export_onnx(build_model(arch), tmp_path / "m.onnx", (64, 64))
    assert tensorrt_problems(path) == []
    assert "HardSwish" not in {n.op_type for n in onnx.load(str(path)).graph.node}  # see OPSET


def test_tensorrt_check_names_what_it_refuses(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["y"], name="nz"),
         helper.make_node("Resize", ["x", "", "s"], ["z"], name="rs", mode="cubic")],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT64, None),
         helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor("s", onnx.TensorProto.FLOAT, [4], [1, 1, 2, 2])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    problems = tensorrt_problems(path)
    assert any("NonZero" in p for p in problems) and any("cubic" in p for p in problems)


def test_parity_failures_are_reported():
    assert parity_failures({"max_prob_diff": 0.2, "mask_dice": 0.5}, "fp32") != []


def test_bundle_verifies_and_records_parity_and_metrics(bundle, tiny_run):
    bundle_dir, manifest = bundle
    loaded = load_manifest(bundle_dir)  # checks sha256 of every file
    assert loaded.file("fp32").path == FP32_NAME
    assert loaded.input_shape == ["batch", 1, 64, 64]
    threshold = json.loads((tiny_run / "threshold.json").read_text())
    assert loaded.threshold == pytest.approx(threshold["threshold"])
    assert loaded.morphology.to_dict() == threshold["morphology"]
    parity = loaded.metrics["parity"]["fp32"]
    assert parity["max_prob_diff"] < 1e-4 and parity["mask_dice"] >= 0.999
    assert set(loaded.metrics["test_onnx"]) >= {"dice", "iou", "pixel_accuracy", "pooled_dice"}
    assert loaded.metrics["test"]["dice"] == pytest.approx(loaded.metrics["test_onnx"]["dice"], abs=1e-3)
    assert loaded.metrics["tensorrt_problems"] == []
    assert loaded.training_config["arch"] == "mobilenet_v3_large"


def test_failed_export_keeps_the_previous_bundle(bundle, monkeypatch):
    bundle_dir, _ = bundle
    before = {p.name: p.read_bytes() for p in bundle_dir.iterdir()}
    import export.bundle.writer as module

    monkeypatch.setattr(module, "parity_failures", lambda result, precision: ["forced failure"])
    with pytest.raises(InputError, match="forced failure"):
        module.export_bundle(bundle_dir.parent / "checkpoints" / "best.pt", device="cpu", replace=True)
    assert {p.name: p.read_bytes() for p in bundle_dir.iterdir()} == before
    assert [p.name for p in bundle_dir.parent.iterdir() if p.name.startswith(".bundle")] == []


def test_export_of_an_untuned_checkpoint_is_refused(tmp_path, tiny_config):
    from training.checkpoint import make_checkpoint, save_checkpoint

    path = tmp_path / "run" / "checkpoints" / "best.pt"
    save_checkpoint(make_checkpoint(tiny_config, build_model("mobilenet_v3_large")), path)
    with pytest.raises(InputError, match="no tuned threshold"):
        export_bundle(path)


def _qdq_conv_graph(tmp_path, weight_scale, weight_zero_point=0, activation_zero_point=0, axis=0):
    """x -> Q -> DQ -> Conv(DQ(int8 weights)) -> y: the smallest INT8 graph the TensorRT lint reads."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    weight_scale = np.asarray(weight_scale, np.float32)
    initializers = [
        numpy_helper.from_array(np.ones((2, 1, 3, 3), np.int8), "w_q"),
        numpy_helper.from_array(weight_scale, "w_scale"),
        numpy_helper.from_array(np.full(weight_scale.shape, weight_zero_point, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(activation_zero_point, np.int8), "x_zp"),
    ]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="quant_x"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dequant_x"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dequant_w", axis=axis),
             helper.make_node("Conv", ["x_dq", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], initializers)
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_tensorrt_lint_accepts_a_clean_explicit_quantization_graph(tmp_path):
    assert tensorrt_problems(_qdq_conv_graph(tmp_path, [0.1, 0.2])) == []


def test_tensorrt_lint_catches_a_planted_non_zero_zero_point(tmp_path):
    problems = tensorrt_problems(_qdq_conv_graph(tmp_path, [0.1, 0.2], activation_zero_point=3))
    assert any("quant_x" in p and "zero point must be 0" in p for p in problems)
    problems = tensorrt_problems(_qdq_conv_graph(tmp_path, [0.1, 0.2], weight_zero_point=1))
    assert any("dequant_w" in p and "zero point must be 0" in p for p in problems)


def test_tensorrt_lint_requires_per_channel_weight_scales_on_axis_0(tmp_path):
    problems = tensorrt_problems(_qdq_conv_graph(tmp_path, 0.1))  # one scale for both output channels
    assert any("per-tensor weight scale" in p for p in problems)
    problems = tensorrt_problems(_qdq_conv_graph(tmp_path, [0.1, 0.2], axis=1))
    assert any("axis 0" in p for p in problems)


def test_tensorrt_lint_refuses_bad_scales_and_unsigned_or_wide_integers(tmp_path):
    assert any("positive and finite" in p for p in tensorrt_problems(_qdq_conv_graph(tmp_path, [0.1, -0.2])))
    assert any("positive and finite" in p for p in tensorrt_problems(_qdq_conv_graph(tmp_path, [0.1, float("inf")])))
    from export.bundle.qdq import activations_to_uint8

    path = _qdq_conv_graph(tmp_path, [0.1, 0.2])
    onnx.save(activations_to_uint8(onnx.load(str(path))), path)  # the x86 variant: u8/128 activations
    problems = tensorrt_problems(path)
    assert any("uint8 zero point" in p and "INT8 only" in p for p in problems)


def test_tensorrt_lint_refuses_onnxruntime_ptq_int32_biases(tmp_path):
    """ONNX Runtime's quantize_static stores biases as int32 behind DequantizeLinear: not TensorRT's form."""
    import numpy as np
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from export.report.ptq import _reader

    model = build_model("mobilenet_v3_large").eval()
    float_path = export_onnx(model, tmp_path / "m.onnx", (64, 64))
    out = tmp_path / "ptq.onnx"
    quantize_static(str(float_path), str(out), _reader(np.random.default_rng(0).random((2, 64, 64), np.float32)),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    problems = tensorrt_problems(out)
    assert any("INT8 only" in p for p in problems)
