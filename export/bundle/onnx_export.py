"""PyTorch model -> ONNX with fixed names and a dynamic batch, and a check that TensorRT can parse it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from device_runtime.core.fileio import atomic_path
from device_runtime.core.manifest import INPUT_NAME, OUTPUT_NAME

from training.model import LogitsOnly

from .qdq import constant_values, readers_of

# Opset 13: TensorRT 8.4+ (JetPack 5 and later) parses it, per-channel QDQ exists from 13 on, and
# MobileNetV3's HardSwish is written as HardSigmoid * x, which older TensorRT parsers know.
OPSET = 13

# ONNX operators the TensorRT ONNX parser supports (onnx-tensorrt's operator matrix, TensorRT 8.4 and later),
# limited to what convolutional segmentation networks produce. Anything else fails the check.
TENSORRT_OPS = frozenset("""
Abs Add AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv ConvTranspose
DequantizeLinear Div Dropout Elu Equal Erf Exp Expand Flatten Floor Gather Gemm GlobalAveragePool GlobalMaxPool
Greater HardSigmoid Identity LeakyRelu Less Log MatMul Max MaxPool Min Mul Neg Pad Pow PRelu QuantizeLinear
Range ReduceMax ReduceMean ReduceSum Relu Reshape Resize Selu Shape Sigmoid Slice Softmax Softplus Split Sqrt
Squeeze Sub Sum Tanh Tile Transpose Unsqueeze Upsample Where
""".split())
TENSORRT_RESIZE_MODES = {"nearest", "linear"}
TENSORRT_RESIZE_TRANSFORMS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}


def export_onnx(model: torch.nn.Module, path: str | Path, input_size: tuple[int, int],
                custom_opsets: dict[str, int] | None = None) -> Path:
    """Write the model's logits graph to `path` (atomically): input "input" (batch, 1, H, W) float32 in
    [0, 1], output "logits" (batch, 1, H, W). `custom_opsets`: domains of custom nodes the model writes (the
    INT8 export's quantizer markers, replaced before the graph is used). A model built by training.model
    computes with the kernel taps that read pixels only (training.live_taps), so its graph holds cut kernels."""
    wrapped = LogitsOnly(model).eval().cpu()
    example = torch.zeros(1, 1, *input_size)
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices are not actionable here
        # the TorchScript-based exporter: its output for these convolutional graphs is plain, stable ONNX
        torch.onnx.export(wrapped, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False,
                          custom_opsets=custom_opsets)
        onnx.checker.check_model(str(tmp))
    return path


def tensorrt_problems(onnx_path: str | Path) -> list[str]:
    """What in the graph TensorRT's ONNX parser would refuse; an empty list when it all fits.

    Checks operator types, the opset, Resize modes and that convolution weights are initializers; on a graph
    with QuantizeLinear/DequantizeLinear also the explicit-quantization rules (see `qdq_problems`).
    """
    model = onnx.load(str(onnx_path))
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset > 17:
        problems.append(f"opset {opset}: TensorRT 8.5 parses opsets up to 17")
    initializers = {init.name: init for init in model.graph.initializer}
    constants = {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    for node in model.graph.node:
        where = f"{node.op_type} node {node.name or '(unnamed)'}"
        if node.op_type not in TENSORRT_OPS:
            problems.append(f"{where}: operator not supported by TensorRT")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Resize":
            mode = attrs.get("mode", b"nearest").decode()
            transform = attrs.get("coordinate_transformation_mode", b"half_pixel").decode()
            if mode not in TENSORRT_RESIZE_MODES or transform not in TENSORRT_RESIZE_TRANSFORMS:
                problems.append(f"{where}: Resize mode {mode}/{transform} not supported by TensorRT")
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            weight = node.input[1]
            if weight not in initializers and weight not in constants and not _is_dequantized(model, weight):
                problems.append(f"{where}: weights must be an initializer")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        problems += qdq_problems(model, opset)
    return problems


def _is_dequantized(model: onnx.ModelProto, tensor: str) -> bool:
    """QDQ graphs feed convolution weights through DequantizeLinear; TensorRT accepts that."""
    return any(n.op_type == "DequantizeLinear" and tensor in n.output for n in model.graph.node)


def qdq_problems(model: onnx.ModelProto, opset: int | None = None) -> list[str]:
    """TensorRT's explicit-quantization rules (TensorRT developer guide, "Working with Quantized Types"; the
    onnx-tensorrt QuantizeLinear/DequantizeLinear importers), as this project's INT8 graphs must meet them:

    - INT8 only: every Q/DQ zero point is an int8 constant (a missing zero point means uint8 in ONNX), and a
      weight DequantizeLinear reads int8 integers (ORT's int32 bias DQ, uint8 activations: refused);
    - zero points are 0 (TensorRT quantization is symmetric);
    - scales are constants, positive and finite;
    - activations per tensor; Conv weights per output channel, axis 0, one scale per output channel (the
      INT8 export promises that; ConvTranspose would need axis 1);
    - Q/DQ only where TensorRT takes one: a QuantizeLinear feeds only DequantizeLinear (TensorRT fuses the
      pair into the neighbouring layers; a Q read as integers by anything else has no INT8 layer to become),
      a DequantizeLinear reads a QuantizeLinear or a constant, and per-channel QDQ needs opset 13 or later.
    """
    problems = []
    constants = constant_values(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers = readers_of(model.graph)
    graph_outputs = {o.name for o in model.graph.output}
    if opset is not None and opset < 13:
        problems.append(f"opset {opset}: QuantizeLinear/DequantizeLinear with per-channel scales need opset 13+")
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{node.op_type} node {node.name or '(unnamed)'}"
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        scale = constants.get(node.input[1]) if len(node.input) > 1 else None
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            problems.append(f"{where}: scale must be a constant (initializer) for TensorRT")
        elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{where}: scales must be positive and finite (min {np.min(scale):.3g})")
        if len(node.input) > 2 and node.input[2] and zero_point is None:
            problems.append(f"{where}: zero point must be a constant for TensorRT")
        elif zero_point is not None:
            if zero_point.dtype != np.int8:
                problems.append(f"{where}: {zero_point.dtype} zero point; TensorRT explicit quantization is INT8 only")
            if zero_point.any():
                problems.append(f"{where}: zero point must be 0 for TensorRT")
        elif node.op_type == "QuantizeLinear":
            problems.append(f"{where}: no zero point, which ONNX reads as uint8; TensorRT needs an int8 zero point 0")
        if node.op_type == "QuantizeLinear":
            readers = consumers.get(node.output[0], [])
            if node.output[0] in graph_outputs or not readers or any(r.op_type != "DequantizeLinear" for r in readers):
                problems.append(f"{where}: its output must feed only DequantizeLinear (TensorRT fuses Q/DQ pairs)")
            if scale is not None and scale.size != 1:
                problems.append(f"{where}: activations must be quantized per tensor, not per channel")
            continue
        # DequantizeLinear
        source = node.input[0]
        integers = constants.get(source)
        if integers is not None:
            if integers.dtype != np.int8:
                problems.append(f"{where}: dequantizes {integers.dtype} constants; TensorRT takes INT8 weights only")
        elif producers.get(source) is None or producers[source].op_type != "QuantizeLinear":
            problems.append(f"{where}: reads {source!r}, neither a QuantizeLinear nor a constant")
        elif scale is not None and scale.size != 1:
            problems.append(f"{where}: activations must be dequantized per tensor, not per channel")
        for reader in consumers.get(node.output[0], []):
            if reader.op_type != "Conv" or len(reader.input) < 2 or reader.input[1] != node.output[0]:
                continue
            weight = constants.get(source)
            if weight is None or scale is None:
                problems.append(f"{where}: Conv {reader.name} weights must be constant int8 integers")
            elif scale.size == 1 and weight.shape[0] > 1:
                problems.append(f"{where}: per-tensor weight scale on Conv {reader.name}; "
                                "per-output-channel scales (axis 0) are required")
            elif scale.size > 1 and (axis != 0 or scale.shape != (weight.shape[0],)):
                problems.append(f"{where}: Conv {reader.name} weight scales must lie on axis 0, one per output "
                                f"channel ({weight.shape[0]}), found axis {axis}, shape {list(scale.shape)}")
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in producers \
                and producers[node.input[2]].op_type == "DequantizeLinear":
            problems.append(f"Conv node {node.name}: quantized bias; TensorRT takes float biases")
    return problems
