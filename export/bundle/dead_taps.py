"""Kernel taps that only ever read zero padding, cut out of a fixed-size ONNX graph. Exact: same outputs.

DeepLabV3's ASPP convolves the backbone's last feature map with 3x3 kernels dilated 12, 24 and 36 (torchvision's
rates, chosen for 513x513 crops). A 256x256 frame at output stride 16 gives a 16x16 map: at dilation 24 and 36
every tap but the centre lands at least 24 pixels away, outside the map for every output pixel, so it multiplies
the zero padding. 8/9 of those two kernels (3.9 M of the edge model's 11 M parameters) never touch a pixel. At
128x128 (8x8 map) the rate-12 kernel is dead too; the paper's ResNet-50 at output stride 8 loses the rate-36 one.

Cutting each kernel down to its live taps, with the padding shifted to match, gives the same output (the removed
products were exactly zero) from a smaller file and less work. Measured on the usgra-seg edge bundles (256x256,
ONNX Runtime 1.32, 2 threads, interleaved, shared machine): the x86 INT8 file 11.25 -> 7.32 MB and 40.9 -> 32.7
ms with identical logits; the FP32 graph 20.2 -> 19.7 ms. ONNX Runtime does not skip such taps by itself.
Float graphs are traced cut already (the model computes with the live taps, training/live_taps.py); the INT8
graph is built from the full kernels' integers, so this pass cuts it once they are in.

The graph must have a fixed spatial size (nerveseg bundles do: only the batch is dynamic); the live taps are
found from the Conv's input shape (ONNX shape inference), dilations, strides and pads. Weights may be a float
initializer (FP32 graph) or an int8 initializer read through a per-output-channel DequantizeLinear (INT8 graph):
the integers are cut, the per-channel scales stay as they are.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from training.live_taps import live_span


def _spatial_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for info in list(inferred.graph.input) + list(inferred.graph.value_info):
        dims = info.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
            shapes[info.name] = (dims[2].dim_value, dims[3].dim_value)
    return shapes


def _weight_initializer(model: onnx.ModelProto, weight: str, producers: dict, initializers: dict):
    """The initializer holding a Conv's kernel: itself, or the int8 input of its DequantizeLinear (axis 0)."""
    if weight in initializers:
        return initializers[weight]
    node = producers.get(weight)
    if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in initializers:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if axis == 0:  # per output channel (or per tensor): cutting the kernel's spatial axes keeps its scales
            return initializers[node.input[0]]
    return None


def drop_dead_taps(model: onnx.ModelProto) -> list[str]:
    """Cut every Conv kernel of `model` (in place) to the taps that read input pixels; returns one line per Conv
    changed ("name: 3x3 -> 1x1"). Convs whose kernel or pads cannot be read, or whose weights are shared with
    another node, are left as they are."""
    shapes = _spatial_shapes(model)
    initializers = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    changed = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[0] not in shapes:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        tensor = _weight_initializer(model, node.input[1], producers, initializers)
        if tensor is None or readers.get(tensor.name, 0) != 1 or readers.get(node.input[1], 0) != 1:
            continue
        weight = numpy_helper.to_array(tensor)
        if weight.ndim != 4:
            continue
        kernel = weight.shape[2:]
        dilations, strides = attrs.get("dilations", [1, 1]), attrs.get("strides", [1, 1])
        pads = list(attrs.get("pads", [0, 0, 0, 0]))  # ONNX order: begin of each axis, then end of each axis
        size = shapes[node.input[0]]
        spans = [live_span(size[i], kernel[i], dilations[i], pads[i], pads[i + 2], strides[i]) for i in range(2)]
        if None in spans or all(spans[i][1] == kernel[i] for i in range(2)):
            continue  # nothing to cut (or, never in a real graph, nothing live)
        first, count, begin, end = (list(values) for values in zip(*spans))
        cut = weight[:, :, first[0]:first[0] + count[0], first[1]:first[1] + count[1]]
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(cut), tensor.name))
        new_dilations = [1 if count[i] == 1 else dilations[i] for i in range(2)]  # one tap: dilation means nothing
        for name, value in (("kernel_shape", count), ("pads", begin + end), ("dilations", new_dilations)):
            for attribute in [a for a in node.attribute if a.name == name]:
                node.attribute.remove(attribute)
            node.attribute.append(helper.make_attribute(name, value))
        changed.append(f"{node.name or node.output[0]}: {kernel[0]}x{kernel[1]} -> {count[0]}x{count[1]}")
    return changed


def report_cut(file_name: str, input_size: tuple[int, int], cut: list[str]) -> None:
    """One line saying which kernels `drop_dead_taps` cut."""
    print(f"{file_name}: {len(cut)} convolution kernel(s) cut to the taps that read pixels at "
          f"{input_size[0]}x{input_size[1]} (the rest read only zero padding; same output): "
          + ", ".join(line.rsplit(": ", 1)[1] for line in cut), flush=True)
