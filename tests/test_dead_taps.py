"""export.dead_taps: kernels cut to the taps that read pixels give the same output (float and int8 weights), and
the exported edge model loses exactly the ASPP kernels that read only padding."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.dead_taps import drop_dead_taps, live_taps


def _conv_graph(weight: np.ndarray, size: tuple[int, int], dilation: int, pad: int, stride: int,
                int8: bool) -> onnx.ModelProto:
    out_channels, in_channels = weight.shape[:2]
    nodes, initializers = [], []
    if int8:
        integers = np.clip(np.round(weight * 20), -127, 127).astype(np.int8)
        scale = np.linspace(0.01, 0.05, out_channels).astype(np.float32)
        initializers += [numpy_helper.from_array(integers, "w_int8"), numpy_helper.from_array(scale, "w_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["w_int8", "w_scale"], ["w"], axis=0))
    else:
        initializers.append(numpy_helper.from_array(weight, "w"))
    initializers.append(numpy_helper.from_array(np.arange(out_channels, dtype=np.float32), "b"))
    nodes.append(helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(weight.shape[2:]),
                                  dilations=[dilation, dilation], pads=[pad] * 4, strides=[stride, stride]))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            ["batch", in_channels, *size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_channels, "h", "w"])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_live_taps_of_known_cases():
    assert live_taps(16, 3, 24, 24, 1, 16) == [1]  # ASPP rate 24 on a 16x16 map: the centre only
    assert live_taps(16, 3, 12, 12, 1, 16) == [0, 1, 2]  # rate 12 still reaches pixels 12 apart
    assert live_taps(2, 5, 1, 2, 1, 2) == [1, 2, 3]  # a 5-tap kernel over 2 pixels: the outer taps read padding


@pytest.mark.parametrize("int8", [False, True])
def test_cut_kernels_give_the_same_output(int8):
    rng = np.random.default_rng(0)
    cut_any = 0
    for kernel, dilation, pad, stride, size in itertools.product((3, 5), (1, 3, 7), (0, 1, 7, 14), (1, 2),
                                                                 ((4, 4), (9, 5), (1, 7))):
        if size[0] + 2 * pad < dilation * (kernel - 1) + 1 or size[1] + 2 * pad < dilation * (kernel - 1) + 1:
            continue  # no output
        weight = rng.normal(size=(4, 3, kernel, kernel)).astype(np.float32)
        model = _conv_graph(weight, size, dilation, pad, stride, int8)
        x = rng.normal(size=(2, 3, *size)).astype(np.float32)
        before = _run(model, x)
        cut = drop_dead_taps(model)
        onnx.checker.check_model(model)
        after = _run(model, x)
        assert after.shape == before.shape
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-4, err_msg=f"{kernel} {dilation} {pad} {stride} {size}")
        if cut:
            cut_any += 1
            stored = numpy_helper.to_array(model.graph.initializer[0])
            assert stored.shape[2] * stored.shape[3] < kernel * kernel  # fewer taps stored
            assert stored.dtype == (np.int8 if int8 else np.float32)
    assert cut_any > 10  # the cases above do exercise cutting, not only the no-op path


def test_exported_edge_model_loses_the_kernel_taps_that_read_padding(tmp_path, capsys):
    from export.onnx_export import export_onnx
    from training.model import LogitsOnly, build_model

    torch.manual_seed(0)
    model = build_model("mobilenet_v3_large").eval()
    # a 4x4 map: ASPP rates 12, 24 and 36 read only padding, and so do the outer taps of the last blocks' dilated
    # 5x5 depthwise kernels (at 256x256 only the rate-24 and rate-36 kernels are cut)
    path = export_onnx(model, tmp_path / "m.onnx", (64, 64))
    assert "6 convolution kernel(s) cut" in capsys.readouterr().out
    graph = onnx.load(str(path)).graph
    shapes = {i.name: numpy_helper.to_array(i).shape for i in graph.initializer}
    dilated = [n for n in graph.node if n.op_type == "Conv" and any(f"convs.{i}/" in n.name for i in (1, 2, 3))]
    assert len(dilated) == 3 and all(shapes[n.input[1]] == (256, 960, 1, 1) for n in dilated)
    x = np.random.default_rng(1).random((2, 1, 64, 64), dtype=np.float32)
    with torch.no_grad():
        expected = LogitsOnly(model)(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    kept = export_onnx(model, tmp_path / "full.onnx", (64, 64), cut_dead_taps=False)
    assert path.stat().st_size < 0.75 * kept.stat().st_size
