"""ONNX Runtime's own PTQ baseline, and the exact s8 -> u8/128 activation rewrite."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from device_runtime.core.postprocess import Morphology
from export.bundle.onnx_export import export_onnx
from export.bundle.qdq import activations_to_uint8, qdq_summary
from export.report.ptq import METHODS, calibration_subset, ptq_baseline, quantize_ptq
from training.model import build_model


@pytest.fixture(scope="module")
def float_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("ptq") / "model.fp32.onnx"
    return export_onnx(build_model("mobilenet_v3_large").eval(), path, (64, 64))


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    return rng.random((12, 64, 64), dtype=np.float32)


def _run(path, images, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images[:, None]})[0]


def test_calibration_subset_spreads_over_the_split():
    frames = np.arange(200, dtype=np.float32)[:, None, None]
    chosen = calibration_subset(frames, 64)
    assert len(chosen) == 64 and chosen[0, 0, 0] == 0 and chosen[-1, 0, 0] == 199
    assert len(calibration_subset(frames[:10], 64)) == 10


def test_ptq_is_per_channel_qdq_with_unsigned_activations(float_graph, frames, tmp_path):
    path = quantize_ptq(float_graph, tmp_path / "ptq.onnx", frames, "MinMax")
    model = onnx.load(str(path))
    counts = qdq_summary(model)
    assert counts.get("QuantizeLinear/activation/uint8", 0) > 10
    assert counts.get("DequantizeLinear/weight/int8", 0) > 10
    axes = [a.i for n in model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes and set(axes) <= {0, 1}  # per-channel scales carry an axis
    out = _run(path, frames[:2], ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert out.shape == (2, 1, 64, 64) and np.isfinite(out).all()


def test_baseline_picks_the_best_validation_dice(tiny_run, tmp_path):
    from training.checkpoint import load_model

    model, _, _ = load_model(tiny_run / "checkpoints" / "best.pt")  # trained: no constant tensors for histograms
    graph = export_onnx(model, tmp_path / "model.fp32.onnx", (64, 64))
    frames = np.random.default_rng(1).random((8, 64, 64), dtype=np.float32)
    masks = (frames > 0.5).astype(np.uint8)
    result = ptq_baseline(graph, frames, frames[:4], masks[:4], frames[4:8], masks[4:8], 0.5, Morphology(),
                          tmp_path, methods=("MinMax", "Percentile"))
    assert result.failed == {}
    assert set(result.graphs) == {"MinMax", "Percentile"}
    assert result.best.validation["dice"] == max(g.validation["dice"] for g in result.graphs.values())
    assert result.best.test["images"] == 4 and result.default.test["images"] == 4
    assert set(METHODS) == {"MinMax", "Percentile", "Entropy"}


def test_uint8_rewrite_is_exact_and_keeps_weights_signed(float_graph, frames, tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from export.report.ptq import _reader

    signed = tmp_path / "s8.onnx"  # TensorRT's form: symmetric signed activations, zero point 0
    quantize_static(str(float_graph), str(signed), _reader(frames), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True})
    rewritten = activations_to_uint8(onnx.load(str(signed)))
    onnx.checker.check_model(rewritten)
    unsigned = tmp_path / "u8.onnx"
    onnx.save(rewritten, str(unsigned))
    before, after = qdq_summary(onnx.load(str(signed))), qdq_summary(rewritten)
    assert before.get("QuantizeLinear/activation/int8", 0) > 10 and "QuantizeLinear/activation/int8" not in after
    assert after["QuantizeLinear/activation/uint8"] == before["QuantizeLinear/activation/int8"]
    assert after["DequantizeLinear/weight/int8"] == before["DequantizeLinear/weight/int8"]
    np.testing.assert_array_equal(_run(signed, frames), _run(unsigned, frames))  # the same integers, exactly


def test_uint8_rewrite_refuses_a_quantized_tensor_read_as_integers():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, [4])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])])
    with pytest.raises(ValueError, match="other than DequantizeLinear"):
        activations_to_uint8(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def test_onnx_runtimes_calibration_output_goes_to_a_log_not_the_console(float_graph, frames, tmp_path, capfd):
    import logging

    from export.report.ptq import ORT_LOG

    handlers = list(logging.getLogger().handlers)
    quantize_ptq(float_graph, tmp_path / "ptq.onnx", frames[:4], "Entropy")
    assert logging.getLogger().handlers == handlers  # the capture ended with the call
    out, err = capfd.readouterr()
    assert "histogram" not in out + err and "Number of" not in out + err
    log = (tmp_path / ORT_LOG).read_text()
    assert "quantize_static, Entropy calibration -> ptq.onnx" in log
    assert "Collecting tensor data and making histogram" in log and "Number of tensors" in log
    assert "WARNING root: Please consider pre-processing" in log  # the root logger's lines too


def test_warnings_raised_inside_onnx_runtimes_tools_go_to_the_log_too(tmp_path, capfd):
    """numpy's "invalid value encountered in divide" from ONNX Runtime's range code reached the pipeline's stderr."""
    import warnings

    from export.report.ptq import ORT_LOG, ort_output_to

    with ort_output_to(tmp_path / ORT_LOG):
        np.divide(np.zeros(1), np.zeros(1))  # numpy's RuntimeWarning, as quant_utils raises it
        warnings.warn("from inside", UserWarning)
    with pytest.warns(UserWarning):  # and the caller's warnings are its own again afterwards
        warnings.warn("after", UserWarning)
    out, err = capfd.readouterr()
    assert "invalid value" not in out + err and "from inside" not in out + err
    log = (tmp_path / ORT_LOG).read_text()
    assert "RuntimeWarning: invalid value encountered in divide" in log and "UserWarning: from inside" in log
