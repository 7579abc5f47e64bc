"""A trained QAT model -> its explicit-quantization (QDQ) ONNX graph, the form TensorRT builds INT8 engines from.

Route: graph surgery on a float export. On a copy of the QAT model, every QuantConv2d becomes a plain
nn.Conv2d holding the quantized float weights and biases, and every activation quantizer becomes a marker
that the exporter writes as a `nerveseg::FakeQuant` node carrying the quantizer's name. The float exporter
writes that graph (same opset, same operators, BatchNorm already folded by prepare_qat), and then, in graph
order:

    marker(x)  -> [Clip(qmin*s, qmax*s) when b < 8] -> QuantizeLinear(s, int8 0) -> DequantizeLinear
    Conv       -> int8 weight initializer -> DequantizeLinear(per-channel scales, axis 0, zero point 0);
                  float bias on the int32 grid (s_in x s_w[c])
    Relu / MaxPool reading a dequantized tensor -> QuantizeLinear -> DequantizeLinear with the SAME scale:
                  exact (ReLU and max of grid points are grid points), and it hands the next operator a
                  dequantized input, the pattern ONNX Runtime's integer kernels are fused from; the same after a
                  Resize of a 1x1 map (a broadcast of one grid point, see _one_pixel_maps)
    a marker whose input already is that quantizer's dequantized output (a shared quantizer after ReLU)
                  adds nothing: the tensor is rounded once, as in the QAT model
    a quantizer on the unsigned x86 grid (qat `--grid x86`, every reader applies ReLU): QuantizeLinear to
                  uint8 with zero point 0, and the Relu after it is dropped (the identity on [0, 255] * s); ONNX
                  Runtime then fuses the convolution and its output straight into one QLinearConv

The integers are taken from the modules (`weight_integers`, `export_params`), never re-derived from the graph:
QuantizeLinear computes saturate(round(x / s)) with round half to even, the fake quantizer
clamp(round(x / s), qmin, qmax) with torch.round (also half to even) and the same float32 s, so the graph holds
the QAT model's integers. At b = 8 the int8 saturation IS the activation grid [-128, 127]; at b < 8 the Clip
keeps the integers inside the b-bit range (round(clip(x, qmin*s, qmax*s) / s) = clamp(round(x / s), qmin, qmax)).

Why surgery, not torch.fake_quantize_* through the exporter: torch's fake-quant kernels multiply by 1/s where
the QAT model and ONNX divide by s (a tie can round differently), their export wants constant Python scales,
and weights would come out as Q(float constant) -> DQ to be folded afterwards anyway. Here every Q/DQ is
placed by us, from the module that owns it.

NAMES. Every name is stored as often as it is used (an activation scale at its initializer and at each
QuantizeLinear and DequantizeLinear), and the exporter's paths ("/model/backbone/backbone.3/block/...") made up
a third of what the INT8 file holds besides its weights (0.26 MB against 7.05 MB of int8 kernels on the edge
model, which put the file ratio to FP32 under the 3.9x asked). So the graph keeps a name where a reader looks a
layer up and numbers the rest: a Conv node carries its layer's module path ("backbone.3.block.1.0") and its
constants are "c<k>.weight_int8", "c<k>.weight_scale", "c<k>.bias" (k-th Conv); activation quantizer k's are
"a<k>.scale" (and "a<k>.clip_min" / "a<k>.clip_max" below 8 bits), and the first QuantizeLinear of each
quantizer is named after its module path; `layer_constants` and `quantizer_constants` read the map back. Zero
points are one shared initializer per type; intermediate tensors are "t<N>"; other nodes are unnamed (ONNX
Runtime and TensorRT name them from their outputs).

Opset 13: the first opset with per-axis QuantizeLinear/DequantizeLinear (the per-channel weight scales); the
float graph uses 13 as well (HardSwish written as HardSigmoid * x), so both graphs share their operators; it
is inside what TensorRT 8.4/8.5 (JetPack 5) parses (up to 17) and what ONNX Runtime's QDQ fusions handle.
Nothing later is needed: opset 19 adds float8 types, 21 int4 and blocked quantization, neither used here.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from training.model import as_deployed

from .dead_taps import drop_dead_taps, report_cut
from .onnx_export import OPSET, export_onnx

INT8_OPSET = OPSET  # see the module doc
WEIGHT_SUFFIX = ".weight_int8"  # layer k's int8 kernel is the initializer "c<k>.weight_int8" (NAMES)
INT8_QMIN, INT8_QMAX = -128, 127
UINT8_QMIN, UINT8_QMAX = 0, 255


MARKER_DOMAIN, MARKER_OP = "nerveseg", "FakeQuant"


class _MarkerFunction(torch.autograd.Function):
    """Identity in PyTorch; a `nerveseg::FakeQuant` node named after its quantizer in the exported graph."""

    @staticmethod
    def forward(ctx, x, name: str):  # noqa: ARG004 (name is for the exporter)
        return x.clone()

    @staticmethod
    def symbolic(g, x, name: str):
        out = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, quantizer_s=name)
        out.setType(x.type())
        return out


class _Marker(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MarkerFunction.apply(x, self.name)


class _TwinConv(nn.Module):
    """A QuantConv2d's place in the float twin: input marker, the conv with quantized weights, output marker."""

    def __init__(self, conv: nn.Conv2d, input_name: str, output_name: str | None):
        super().__init__()
        self.input_marker, self.conv = _Marker(input_name), conv
        self.output_marker = _Marker(output_name) if output_name is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_marker(self.conv(self.input_marker(x)))


def quantizer_names(model: nn.Module) -> dict[int, str]:
    """{id(quantizer): its first module path}: the one name a shared quantizer goes by."""
    from qat.quantizers import FakeQuant

    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FakeQuant):
            names.setdefault(id(module), name)
    return names


def activation_quantizers_by_name(model: nn.Module) -> dict:
    """{name: FakeQuant} of every activation quantizer (per tensor), by its quantizer_names name."""
    from qat.prepare import activation_quantizers

    names = quantizer_names(model)
    return {names[id(q)]: q for q in activation_quantizers(model)}


def float_twin(model: nn.Module, input_size: tuple[int, int]) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """A copy of the QAT model whose QuantConv2d are nn.Conv2d with the quantized weights and biases, whose
    activation quantizers are markers, and the (name, QuantConv2d) of the original in the order the
    convolutions run in a forward pass."""
    from qat.prepare import probe_forward, quant_convs, set_submodule
    from qat.quantizers import FakeQuant

    convs = dict(quant_convs(model))
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name)) for name, m in convs.items()]
    probe_forward(model, hooks, input_size)  # (under no_grad itself)
    if sorted(order) != sorted(convs):
        raise ValueError("each quantized convolution must run exactly once per forward pass")
    twin = copy.deepcopy(model).cpu().eval()
    names = quantizer_names(twin)
    for name in order:
        q = twin.get_submodule(name)
        conv = nn.Conv2d(q.in_channels, q.out_channels, q.kernel_size, q.stride, q.padding, q.dilation, q.groups,
                         bias=True)
        with torch.no_grad():
            conv.weight.copy_(q.quantized_weight())
            conv.bias.copy_(q.quantized_bias())
        output_name = names[id(q.output_quant)] if q.output_quant is not None else None
        set_submodule(twin, name, _TwinConv(conv, names[id(q.input_quant)], output_name))
    for path, module in list(twin.named_modules(remove_duplicate=False)):
        if isinstance(module, FakeQuant) and not module.per_channel:
            set_submodule(twin, path, _Marker(names[id(module)]))
    return twin, [(name, convs[name]) for name in order]


def _scalar(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


class _Builder:
    """Collects the nodes and initializers that the surgery adds."""

    def __init__(self):
        self.initializers: list[onnx.TensorProto] = []
        self.names: set[str] = set()
        self.emitted: dict[str, int] = {}
        self.short: dict[str, str] = {}  # quantizer name -> "a<N>", the prefix of its constants (see NAMES)

    def add(self, tensor: onnx.TensorProto) -> str:
        if tensor.name not in self.names:  # a quantizer's scale is written once, however often it is used
            self.names.add(tensor.name)
            self.initializers.append(tensor)
        return tensor.name

    def activation_qdq(self, name: str, source: str, params, target: str, clip: bool = True,
                       unsigned: bool = False) -> list:
        """[Clip] -> Q -> DQ of quantizer `name` on `source`, the dequantized tensor written as `target`.
        `clip=False` where the input is known to lie inside the b-bit range already. `unsigned`: the quantizer is on
        the x86 grid (uint8, zero point 0); otherwise int8 with zero point 0, which also holds a tight grid's
        [-z, 2^b - 1 - z] below 8 bits (qat FakeQuant.set_tight), the Clip keeping its b-bit range."""
        scale = np.float32(params.scale.detach().cpu().reshape(()).numpy())
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"{name}: activation scale {scale} is not positive and finite")
        full = (UINT8_QMIN, UINT8_QMAX) if unsigned else (INT8_QMIN, INT8_QMAX)
        if params.qmin < full[0] or params.qmax > full[1]:
            raise ValueError(f"{name}: integer range [{params.qmin}, {params.qmax}] does not fit "
                             f"{'uint8' if unsigned else 'int8'}")
        count = self.emitted[name] = self.emitted.get(name, 0) + 1
        short = self.short.setdefault(name, f"a{len(self.short)}")
        prefix = short if count == 1 else f"{short}.{count}"
        nodes = []
        scale_name = self.add(_scalar(f"{short}.scale", scale, np.float32))
        zero_name = self.add(_scalar("zero_point.uint8" if unsigned else "zero_point.int8", 0,
                                     np.uint8 if unsigned else np.int8))  # one per type, shared
        if clip and (params.qmin, params.qmax) != full:  # b < 8: keep the integers in range
            low = self.add(_scalar(f"{short}.clip_min", np.float32(params.qmin) * scale, np.float32))
            high = self.add(_scalar(f"{short}.clip_max", np.float32(params.qmax) * scale, np.float32))
            nodes.append(helper.make_node("Clip", [source, low, high], [f"{prefix}.clipped"]))
            source = f"{prefix}.clipped"
        # the first QuantizeLinear of a quantizer carries its module path: the map from a<N> to the model
        nodes.append(helper.make_node("QuantizeLinear", [source, scale_name, zero_name], [f"{prefix}.int8"],
                                      name=name if count == 1 else None))
        nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}.int8", scale_name, zero_name], [target]))
        return nodes

    def weight_dq(self, layer: str, prefix: str, module) -> tuple[list, str]:
        """The int8 kernel -> DequantizeLinear of layer `layer` (its module path), constants named `prefix`.*"""
        integers = module.weight_integers().cpu().numpy().astype(np.int8)
        scale = module.weight_quant.export_params().scale.detach().cpu().numpy().astype(np.float32).reshape(-1)
        if scale.shape != (integers.shape[0],):
            raise ValueError(f"{layer}: weight scales {scale.shape} are not one per output channel "
                             f"({integers.shape[0]})")
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"{layer}: weight scales must be positive and finite")
        w = self.add(numpy_helper.from_array(integers, prefix + WEIGHT_SUFFIX))
        s = self.add(numpy_helper.from_array(scale, f"{prefix}.weight_scale"))
        # no zero point: for DequantizeLinear it defaults to 0 of the input's type (int8), so [C] zero bytes
        # per layer need not be stored (they cost the 3.9x size goal its margin)
        node = helper.make_node("DequantizeLinear", [w, s], [f"{prefix}.weight"], axis=0)
        return [node], f"{prefix}.weight"


GRID_KEEPING_OPS = ("Relu", "MaxPool")  # a grid point in, a grid point out (qat.prepare.GRID_KEEPING)


def _one_pixel_maps(model: onnx.ModelProto) -> set[str]:
    """Tensors whose inferred shape is (N, C, 1, 1): a Resize of one is a broadcast of its single pixel.

    Why it matters: DeepLabV3's image-pooling branch (ASPPPooling) upsamples a 1x1 map bilinearly and
    concatenates it with the other branches. Every output pixel is the input pixel (weights summing to 1, within
    an ulp, which the following rounding maps back to the same integer), so the branch's own quantizer can sit
    after the Resize as well, like after ReLU. ONNX Runtime then runs that Resize on uint8 and fuses the Concat
    of five dequantized branches into QLinearConcat instead of dequantizing 5 x 256 channels to float (measured
    on the edge model, 1 thread: 16.8 -> 16.5 ms, ORT's own PTQ 16.5)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    found = set()
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") and d.dim_value == 1 for d in dims[2:]):
            found.add(info.name)
    return found


def build_int8_model(model: nn.Module, input_size: tuple[int, int], work_path, flip_tta: bool = False) -> onnx.ModelProto:
    """The QDQ graph of a QAT model: int8 weights, zero point 0; activations signed 8-bit with zero point 0
    (the TensorRT form), except those a `--grid x86` model quantizes unsigned (uint8, zero point 0). With
    `flip_tta`, the graph averages each frame with its mirror around the one network (training.model.FlipAveraged).

    `work_path` receives the intermediate float export (a scratch file inside the bundle's staging folder).
    """
    quantizers = activation_quantizers_by_name(model)
    twin, convs = float_twin(model, input_size)
    export_onnx(as_deployed(twin, flip_tta), work_path, input_size, custom_opsets={MARKER_DOMAIN: 1})
    graph_model = onnx.load(str(work_path))
    graph = graph_model.graph
    conv_nodes = [n for n in graph.node if n.op_type == "Conv"]
    if len(conv_nodes) != len(convs):
        raise ValueError(f"the float export has {len(conv_nodes)} Conv nodes, the QAT model {len(convs)} convolutions")
    values = _constant_values(graph_model)
    one_pixel = _one_pixel_maps(graph_model)
    builder = _Builder()
    # the k-th Conv node is the k-th convolution that ran; k names its constants (c<k>.*, NAMES)
    conv_of = {id(node): (k, name, module) for k, ((name, module), node) in enumerate(zip(convs, conv_nodes))}
    renamed: dict[str, str] = {}  # marker outputs that are an existing dequantized tensor
    dequantized_by: dict[str, str] = {}  # dequantized tensor -> the quantizer that made it
    ordered = []
    for node in graph.node:
        broadcast = node.op_type == "Resize" and node.input[0] in one_pixel  # before renaming: the name inferred
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        if node.domain == MARKER_DOMAIN:
            quantizer = _attribute(node, "quantizer")
            if quantizer not in quantizers:
                raise ValueError(f"marker for an unknown quantizer {quantizer!r}")
            if dequantized_by.get(node.input[0]) == quantizer:  # already rounded by this quantizer
                renamed[node.output[0]] = node.input[0]
                continue
            ordered += builder.activation_qdq(quantizer, node.input[0], quantizers[quantizer].export_params(),
                                              node.output[0], unsigned=quantizers[quantizer].unsigned)
            dequantized_by[node.output[0]] = quantizer
        elif node.op_type == "Conv":
            k, name, module = conv_of[id(node)]
            _check_same_weights(name, module, node, values)
            node.name, prefix = name, f"c{k}"  # the module path; its constants c<k>.* (NAMES)
            w_nodes, w_name = builder.weight_dq(name, prefix, module)
            bias = module.quantized_bias().detach().cpu().numpy().astype(np.float32)
            bias_name = builder.add(numpy_helper.from_array(bias, f"{prefix}.bias"))
            node.input[1] = w_name
            if len(node.input) > 2:
                node.input[2] = bias_name
            else:
                node.input.append(bias_name)
            ordered += w_nodes + [node]
        elif (node.op_type == "Relu" and node.input[0] in dequantized_by
              and quantizers[dequantized_by[node.input[0]]].unsigned):
            renamed[node.output[0]] = node.input[0]  # ReLU of an unsigned grid is the identity: dropped
        elif (node.op_type in GRID_KEEPING_OPS or broadcast) and node.input[0] in dequantized_by:
            quantizer, original = dequantized_by[node.input[0]], node.output[0]
            node.output[0] = f"{original}.float"
            ordered.append(node)
            ordered += builder.activation_qdq(quantizer, node.output[0], quantizers[quantizer].export_params(),
                                              original, clip=False, unsigned=quantizers[quantizer].unsigned)
            dequantized_by[original] = quantizer
        else:
            ordered.append(node)
    for output in graph.output:
        output.name = renamed.get(output.name, output.name)
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(builder.initializers)
    del graph_model.opset_import[:]
    graph_model.opset_import.append(helper.make_opsetid("", INT8_OPSET))
    _remove_dead(graph)
    _compact_names(graph)
    del graph.value_info[:]
    cut = drop_dead_taps(graph_model)  # after the integers are in: the int8 kernels are cut, their scales kept
    if cut:
        report_cut("INT8 graph", input_size, cut)
    graph_model.producer_name = "nerveseg export.bundle.int8"
    onnx.checker.check_model(graph_model)
    return graph_model


def layer_constants(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    """{layer module path: {"weight_int8", "weight_scale", "bias": initializer name}} of an INT8 graph, read from
    each Conv node's name and inputs (the constants themselves are numbered, see NAMES)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    layers = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in producer:
            dq = producer[node.input[1]]
            layers[node.name] = {"weight_int8": dq.input[0], "weight_scale": dq.input[1], "bias": node.input[2]}
    return layers


def quantizer_constants(model: onnx.ModelProto) -> dict[str, str]:
    """{activation quantizer module path: its scale initializer} of an INT8 graph, from the quantizer's named
    QuantizeLinear; the clip bounds of a quantizer below 8 bits sit beside its scale (a<k>.clip_min / clip_max)."""
    return {node.name: node.input[1] for node in model.graph.node if node.op_type == "QuantizeLinear" and node.name}


def _attribute(node: onnx.NodeProto, name: str) -> str:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute).decode()
    raise ValueError(f"node {node.name} has no attribute {name!r}")


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:  # the exporter writes duplicated constants once, behind Identity nodes
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _check_same_weights(name: str, module, node: onnx.NodeProto, values: dict) -> None:
    """The i-th Conv node must be the i-th convolution that ran: its weights are that module's, exactly."""
    weight = values.get(node.input[1])
    expected = module.quantized_weight().detach().cpu().numpy()
    if weight is None or weight.shape != expected.shape or not np.array_equal(weight, expected):
        raise ValueError(f"Conv node {node.name} does not carry the weights of {name}: cannot place its Q/DQ")


def _remove_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads (the old weight Identity nodes) and unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _compact_names(graph: onnx.GraphProto) -> None:
    """Number the intermediate tensors ("t<N>") and drop the names of nodes that are neither a Conv nor a
    quantizer's first QuantizeLinear (see NAMES)."""
    keep = {i.name for i in graph.input} | {o.name for o in graph.output} | {i.name for i in graph.initializer}
    renamed: dict[str, str] = {}
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name not in keep:
                renamed[name] = node.output[i] = f"t{len(renamed)}"
        if node.op_type not in ("Conv", "QuantizeLinear"):
            node.name = ""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
