"""PyTorch model -> ONNX with fixed names and a dynamic batch, and a check that TensorRT can parse it."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from device_runtime.fileio import atomic_path
from device_runtime.manifest import INPUT_NAME, OUTPUT_NAME

from training.model import LogitsOnly

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


def export_onnx(model: torch.nn.Module, path: str | Path, input_size: tuple[int, int]) -> Path:
    """Write the model's logits graph to `path` (atomically): input "input" (batch, 1, H, W) float32 in
    [0, 1], output "logits" (batch, 1, H, W)."""
    wrapped = LogitsOnly(model).eval().cpu()
    example = torch.zeros(1, 1, *input_size)
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices are not actionable here
        # the TorchScript-based exporter: its output for these convolutional graphs is plain, stable ONNX
        torch.onnx.export(wrapped, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
        onnx.checker.check_model(str(tmp))
    return path


def tensorrt_problems(onnx_path: str | Path) -> list[str]:
    """What in the graph TensorRT's ONNX parser would refuse; an empty list when it all fits.

    Checks operator types, the opset, Resize modes, that convolution weights are initializers and that
    QuantizeLinear/DequantizeLinear zero points are 0 (TensorRT quantization is symmetric).
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
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero_point = initializers.get(node.input[2])
            if zero_point is not None and onnx.numpy_helper.to_array(zero_point).any():
                problems.append(f"{where}: zero point must be 0 for TensorRT")
    return problems


def _is_dequantized(model: onnx.ModelProto, tensor: str) -> bool:
    """QDQ graphs feed convolution weights through DequantizeLinear; TensorRT accepts that."""
    return any(n.op_type == "DequantizeLinear" and tensor in n.output for n in model.graph.node)
