"""export.bundle.dead_taps: kernels cut to the taps that read pixels give the same output (float and int8 weights), and
the exported edge model loses exactly the ASPP kernels that read only padding."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.bundle.dead_taps import drop_dead_taps
from training.live_taps import LiveTapConv2d, conv2d_live, live_taps, whole_kernels


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
    assert live_taps(16, 3, 24, 24, 1, 16) == (1,)  # ASPP rate 24 on a 16x16 map: the centre only
    assert live_taps(16, 3, 12, 12, 1, 16) == (0, 1, 2)  # rate 12 still reaches pixels 12 apart
    assert live_taps(2, 5, 1, 2, 1, 2) == (1, 2, 3)  # a 5-tap kernel over 2 pixels: the outer taps read padding
    for size, kernel, dilation, pad, stride in itertools.product(range(1, 7), (1, 3, 5), (1, 2, 5), (0, 1, 3, 6), (1, 2, 3)):
        out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        if out >= 1:  # the closed form against the definition
            brute = tuple(k for k in range(kernel) if any(0 <= y * stride + k * dilation - pad < size for y in range(out)))
            assert live_taps(size, kernel, dilation, pad, stride, out) == brute


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


def test_exported_edge_model_loses_the_kernel_taps_that_read_padding(tmp_path):
    """At 64x64 (a 4x4 map) ASPP's rates 12, 24 and 36 read only padding outside the centre, and so do the outer
    taps of the last blocks' dilated 5x5 depthwise kernels (at 256x256 only the rate-24 and rate-36 kernels)."""
    from export.bundle.onnx_export import export_onnx
    from training.model import LogitsOnly, build_model

    torch.manual_seed(0)
    model = build_model("mobilenet_v3_large").eval()
    x = np.random.default_rng(1).random((2, 1, 64, 64), dtype=np.float32)
    with torch.no_grad():
        expected = LogitsOnly(model)(torch.from_numpy(x)).numpy()

    def check(path):
        graph = onnx.load(str(path)).graph
        shapes = {i.name: numpy_helper.to_array(i).shape for i in graph.initializer}
        dilated = [n for n in graph.node if n.op_type == "Conv" and any(f"convs.{i}/" in n.name for i in (1, 2, 3))]
        assert len(dilated) == 3 and all(shapes[n.input[1]] == (256, 960, 1, 1) for n in dilated)
        # the Conv reads its cut kernel as an initializer (shapes[...] above), not through a Slice; nothing padded
        assert not any(n.op_type == "Pad" for n in graph.node)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4)

    # the model computes with the live taps only (training.live_taps), so the traced graph holds cut kernels
    check(export_onnx(model, tmp_path / "m.onnx", (64, 64)))
    # a graph of whole kernels (a model without LiveTapConv2d, e.g. the INT8 export's float twin): the pass cuts it
    whole = export_onnx(whole_kernels(model), tmp_path / "whole.onnx", (64, 64))
    assert not any(isinstance(m, LiveTapConv2d) for m in model.modules())
    graph = onnx.load(str(whole))
    assert len(drop_dead_taps(graph)) == 6
    onnx.save(graph, str(tmp_path / "cut.onnx"))
    check(tmp_path / "cut.onnx")
    assert (tmp_path / "cut.onnx").stat().st_size < 0.75 * whole.stat().st_size


def test_conv2d_live_matches_conv2d_with_gradients():
    rng = torch.Generator().manual_seed(0)
    checked = 0
    for kernel, dilation, pad, stride, size, groups in itertools.product((3, 5), (1, 3, 7), (0, 1, 7, 14), (1, 2),
                                                                         ((4, 4), (9, 5), (1, 7)), (1, 2)):
        if min(size) + 2 * pad < dilation * (kernel - 1) + 1:
            continue
        x = torch.randn(2, 4, *size, generator=rng, requires_grad=True)
        w = torch.randn(6, 4 // groups, kernel, kernel, generator=rng, requires_grad=True)
        b = torch.randn(6, generator=rng, requires_grad=True)
        args = ((stride, stride), (pad, pad), (dilation, dilation), groups)
        full = torch.nn.functional.conv2d(x, w, b, *args)
        live = conv2d_live(x, w, b, *args)
        torch.testing.assert_close(live, full, rtol=1e-5, atol=1e-4)
        g = torch.randn_like(full)
        grads_full = torch.autograd.grad(full, (x, w, b), g)
        grads_live = torch.autograd.grad(live, (x, w, b), g)
        for a, c in zip(grads_live, grads_full):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-4)
        checked += 1
    assert checked > 50


def test_the_models_dilated_convolutions_skip_dead_taps_and_keep_their_state_dict():
    from training.model import build_model

    model = build_model("mobilenet_v3_large")
    aspp = model.classifier[0].convs
    assert all(isinstance(aspp[i][0], LiveTapConv2d) for i in (1, 2, 3))
    assert aspp[2][0].weight.shape == (256, 960, 3, 3)  # parameters stay whole: checkpoints are unchanged
    plain = build_model("mobilenet_v3_large")
    plain.load_state_dict(model.state_dict())  # the same keys and shapes
