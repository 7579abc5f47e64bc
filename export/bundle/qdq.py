"""ONNX passes on QDQ graphs.

`cpu_form` = `quantize_before_clip` + `activations_to_uint8` + `relu_as_leaky_relu`.

`activations_to_uint8`: the TensorRT form (signed 8-bit activations, zero point 0) -> the x86 form of the SAME
integers. QuantizeLinear computes saturate(round(x / s) + z): with int8 and z = 0 the result q lies in
[-128, 127]; with uint8 and z = 128 it is q + 128 in [0, 255], and DequantizeLinear gives (q + 128 - 128) * s
back. So every activation Q -> DQ pair can be rewritten with the same scale, exactly (measured: max |diff| 0.0
under ORT_DISABLE_ALL). Why bother: ONNX Runtime's x86 integer kernels (QLinearConv, the MLAS u8s8 GEMMs) are
built for unsigned activations and signed weights; the s8/s8 graph ran 2.7x slower than FP32 here, the u8/128
one as fast as ONNX Runtime's own u8 PTQ. Weights stay signed 8-bit with zero point 0.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

U8_ZERO_POINT = 128  # int8 value 0 sits at uint8 128: the shift between the two saturating ranges


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant node outputs by name."""
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def readers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def taken_names(graph: onnx.GraphProto) -> set[str]:
    """Initializer and node output names: what a new tensor must not be called (see `_unique_name`)."""
    return {init.name for init in graph.initializer} | {o for n in graph.node for o in n.output}


def _unique_name(taken: set[str], base: str) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def activations_to_uint8(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose activation QuantizeLinear -> DequantizeLinear pairs run on uint8 with zero point
    z + 128 instead of int8 with zero point z (z = 0 in this project's graphs); weights (DequantizeLinear of an
    initializer) are untouched. Raises ValueError on a pair it cannot rewrite exactly."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    constants = constant_values(model)
    consumers = readers_of(graph)
    taken = taken_names(graph)
    new_zero_points: dict[bytes, str] = {}  # one uint8 initializer per distinct zero point value

    def uint8_zero_point(signed: np.ndarray) -> str:
        shifted = (signed.astype(np.int16) + U8_ZERO_POINT).astype(np.uint8)
        key = shifted.tobytes() + str(shifted.shape).encode()
        if key not in new_zero_points:
            name = _unique_name(taken, "zero_point_u8")
            graph.initializer.append(numpy_helper.from_array(shifted, name))
            new_zero_points[key] = name
        return new_zero_points[key]

    graph_outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue  # a constant being quantized is a weight: it stays signed
        if len(node.input) < 3 or node.input[2] not in constants:
            raise ValueError(f"QuantizeLinear {node.name}: no constant zero point; uint8 is ONNX's default there")
        zero_point = constants[node.input[2]]
        if zero_point.dtype != np.int8:
            continue  # already unsigned (or another type): nothing to do
        readers = consumers.get(node.output[0], [])
        if node.output[0] in graph_outputs or any(r.op_type != "DequantizeLinear" for r in readers):
            raise ValueError(f"QuantizeLinear {node.name}: its int8 output is read by something other than "
                             "DequantizeLinear; rewriting it to uint8 would change that reader")
        name = uint8_zero_point(zero_point)
        node.input[2] = name
        for reader in readers:
            while len(reader.input) < 3:
                reader.input.append("")
            reader.input[2] = name
    # the value_info of rewritten tensors (if any) still says int8: drop them, ONNX infers them again
    rewritten = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[2] in new_zero_points.values()}
    kept = [vi for vi in graph.value_info if vi.name not in rewritten]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    _drop_unused_initializers(graph)
    return model


def relu_as_leaky_relu(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose Relu nodes are LeakyRelu with alpha 0: the same function (x for x >= 0, 0 * x =
    0 below), but ONNX Runtime fuses DequantizeLinear -> LeakyRelu -> QuantizeLinear into one integer
    QLinearLeakyRelu (a table of the 256 input codes), while DequantizeLinear -> Relu -> QuantizeLinear stays
    three float passes. ONNX Runtime folds a Relu into the QuantizeLinear after it only when the zero point is
    the bottom of the range (asymmetric u8), which TensorRT's symmetric grid rules out. Measured on the edge
    model (2 threads): 19.5 -> 17.9 ms. Used for the x86 file only; TensorRT fuses Relu itself."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.op_type == "Relu" and node.domain in ("", "ai.onnx"):
            node.op_type = "LeakyRelu"
            node.attribute.append(onnx.helper.make_attribute("alpha", 0.0))
    return model


def quantize_before_clip(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` where every `Clip -> QuantizeLinear(s, z)` (a quantizer of fewer than 8 bits keeping its
    integers in range) reads `QuantizeLinear(s, z) -> DequantizeLinear(s, z)` of the Clip's input instead.

    Exact: Clip's bounds are qmin * s and qmax * s with integers qmin, qmax inside the 8-bit range, and
    clamp(round(x / s), qmin, qmax) = clamp(saturate(round(x / s)), qmin, qmax), so the QuantizeLinear after the
    Clip gives the same integers (measured: max |diff| 0.0 under ORT_DISABLE_ALL). Why: ONNX Runtime fuses
    `DequantizeLinear -> Conv -> QuantizeLinear` into an integer QLinearConv, and a Clip between the Conv and its
    QuantizeLinear blocks that, so every layer that learned b < 8 activation bits ran as a float convolution
    (the edge model with learned bits: 24.7 ms against 13.2 ms for W8A8 at 2 threads). After the rewrite the
    Conv fuses and the b-bit clamp is a cheap element-wise DequantizeLinear -> Clip -> QuantizeLinear (18.1 ms).
    Used for the x86 file only; TensorRT fuses a Clip into the convolution itself."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    constants = constant_values(model)
    readers = readers_of(graph)
    taken = taken_names(graph)
    ordered = []
    for node in graph.node:
        after = readers.get(node.output[0], []) if node.op_type == "Clip" else []
        if (len(after) == 1 and after[0].op_type == "QuantizeLinear" and node.input[0] not in constants
                and len(after[0].input) == 3 and all(name in constants for name in after[0].input[1:])):
            quantize = after[0]
            # short names: every byte of the file counts against the 3.9x size goal
            integers, grid = _unique_name(taken, "preclip.q"), _unique_name(taken, "preclip.dq")
            ordered.append(onnx.helper.make_node("QuantizeLinear", [node.input[0], *quantize.input[1:]], [integers],
                                                 name=integers))
            ordered.append(onnx.helper.make_node("DequantizeLinear", [integers, *quantize.input[1:]], [grid],
                                                 name=grid))
            node.input[0] = grid
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def cpu_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """The x86 ONNX Runtime file of a TensorRT-form QDQ graph: the same integers, the b-bit clamps after the
    integer convolution (`quantize_before_clip`), u8/128 activations (`activations_to_uint8`) and Relu as
    LeakyRelu(0) (`relu_as_leaky_relu`)."""
    return relu_as_leaky_relu(activations_to_uint8(quantize_before_clip(model)))


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def qdq_summary(model: onnx.ModelProto) -> dict:
    """Counts of activation and weight Q/DQ nodes by integer type: what a test or a report checks."""
    constants = constant_values(model)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        kind = "weight" if node.input[0] in constants else "activation"
        zp = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        dtype = str(zp.dtype) if zp is not None else ("uint8" if node.op_type == "QuantizeLinear" else
                                                       str(constants[node.input[0]].dtype) if kind == "weight" else "?")
        key = f"{node.op_type}/{kind}/{dtype}"
        counts[key] = counts.get(key, 0) + 1
    return counts

