"""Does each layer of an INT8 file compute the fake-quant model's integers? A teacher-forced check per quantizer.

Why beside the end-to-end gate (export.bundle.parity.tie_gate): on a trained model the rounding ties cascade through
~50 layers, so the model's float32 and float64 evaluations already disagree widely at the output, and a fault in
one layer (a bias on the wrong grid, per-tensor weight scales, a wrong zero point, a dropped ReLU) changes the
output less than that noise does (docs/QUANTIZATION.md, "How the INT8 parity gate decides"). Here the cascade is cut:

1. the file runs AS WRITTEN (ONNX Runtime CPU, ORT_DISABLE_ALL: every QuantizeLinear executes) on a few frames,
   with the output of each activation quantizer's first QuantizeLinear (named after the quantizer's module path,
   export.bundle.int8_graph.quantizer_constants) added as a graph output: its integers, q - zero point;
2. the fake-quant model (as deployed, flip-averaged where it is; in float64 on the CPU) runs on the same frames
   with a hook on every activation quantizer that records the integers the quantizer computes from its own input,
   clamp(round(x / s), qmin, qmax), and then REPLACES its output by the graph's integers x s (teacher forcing):
   every layer of the model reads exactly what the same layer of the graph read.

So a quantizer's integers differ between graph and model only where that one layer computes something else (a
fault) or where a value lies within float error of a rounding tie (the graph's float32 arithmetic against the
model's float64: a relative 1e-7 or so of a value, and then by one step). Those ties are counted apart and excused
(TIE_TOLERANCE); the verdict: at most LAYER_BOUND x its elements + LAYER_SLACK of each quantizer's other integers
differ.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from device_runtime.core.manifest import INPUT_NAME
from training.model import FlipAveraged

from .int8_graph import quantizer_names
from .parity import OPTIMIZATION_LEVELS

# Frames the check runs on: every element of every quantized tensor of a frame is a sample, so a few frames already
# hold 10^5 - 10^8 integers per quantizer; a fault in one layer moves a share of them, not a rare one. Each frame
# costs one ORT_DISABLE_ALL run with every quantizer's integers kept and one float64 pass of the model.
LAYER_FRAMES = 4
# The largest share of one quantizer's integers that may differ from the model's, plus LAYER_SLACK integers: one tie
# in a small tensor (a squeeze-excitation gate holds ~100 integers on 4 frames) is already a share of 1e-2.
# Measured (docs/QUANTIZATION.md, scripts/parity_faults.py): faithful files and one-ulp nudges of every scale at
# most 3.9e-4 (one integer of a small tensor) on the tiny W8A8 and W4A4 models of the tests and 5.2e-4 on a trained
# real W8A8 model (320x320, flip-averaged); every planted fault at least 2.3e-2 (tiny) and 1.05e-2 (real: a bias on
# the weight grid in one layer) in its worst quantizer. The bound sits 10x below the least fault.
LAYER_BOUND = 1e-3
LAYER_SLACK = 2
# An integer off by one where the model's x / s lies within TIE_TOLERANCE (relative) of a rounding tie k + 1/2 is a
# tie: float32 (the graph) and float64 (the model) round it apart, and neither is wrong. Ties are not rare where a
# step has a simple value: at a W8A8 run's start (the grid alone) a gate quantizer's step is 1/127 to float32
# precision, so every gate of a zero input, hardsigmoid(0) = 0.5, lies at 63.5 steps; on a usgra-seg fold 11 of 960
# integers of one squeeze-excitation gate (1.15 %) differed by one that way, and the check refused a faithful file
# (2026-12-07). 64 float32 ulps: far above a few operations' rounding, far below any planted fault's error.
TIE_TOLERANCE = 64 * 2.0 ** -24


def graph_integers(path: Path, quantizers: set[str]):
    """(integers(frame), unchecked): integers(frame) runs the file as written on one (H, W) float32 frame and
    returns {quantizer: the integers its first QuantizeLinear wrote, q - zero point, int16}; unchecked: the
    quantizers of `quantizers` with no named QuantizeLinear in the file."""
    model = onnx.load(str(path))
    zero_points = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    outputs = {}  # quantizer -> (tensor, zero point)
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.name in quantizers and node.name not in outputs:
            zero_point = zero_points[node.input[2]]
            outputs[node.name] = (node.output[0], zero_point.astype(np.int16))
            model.graph.output.append(helper.make_tensor_value_info(
                node.output[0], helper.np_dtype_to_tensor_dtype(zero_point.dtype), None))
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS["none"]
    options.log_severity_level = 3  # an edited graph's unused initializers are not worth a warning each
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = list(outputs)

    def integers(frame: np.ndarray) -> dict[str, np.ndarray]:
        values = session.run([outputs[name][0] for name in names],
                             {INPUT_NAME: np.ascontiguousarray(frame[None, None], dtype=np.float32)})
        return {name: value.astype(np.int16) - outputs[name][1] for name, value in zip(names, values)}

    return integers, sorted(quantizers - set(outputs))


class _TeacherForcing:
    """Forward hooks on the activation quantizers: count where the model's integers differ from the graph's, then
    hand the graph's on. Only a quantizer's first call in a forward pass is forced (its first QuantizeLinear); a
    shared quantizer called again reads a tensor already on its grid (through ReLU or max-pooling of the forced one)."""

    def __init__(self, quantizers: dict[str, torch.nn.Module]):
        self.quantizers = quantizers
        self.stats: dict[str, dict] = {}  # in the order the forward pass reaches them
        self.graph: dict[str, np.ndarray] = {}
        self.called: set[str] = set()

    def forward(self, model: torch.nn.Module, frame: np.ndarray, graph: dict[str, np.ndarray]) -> None:
        self.graph, self.called = graph, set()
        hooks = [q.register_forward_hook(self._hook(name)) for name, q in self.quantizers.items() if name in graph]
        try:
            model(torch.from_numpy(np.ascontiguousarray(frame[None, None])).double())
        finally:
            for hook in hooks:
                hook.remove()

    def _hook(self, name: str):
        def force(module, args, _output):
            if name in self.called:
                return None
            self.called.add(name)
            x = args[0]
            graph = torch.from_numpy(self.graph[name]).to(x.dtype)
            if graph.shape != x.shape:
                raise ValueError(f"quantizer {name}: the graph's integers have shape {tuple(graph.shape)}, the "
                                 f"model's tensor {tuple(x.shape)}: the file is not this model's graph")
            steps = module.in_steps(x)  # x / s once: its integers and its distance from a tie both read it
            diff = (module.to_grid(steps) - graph).abs()
            tie = (diff == 1) & at_rounding_tie(steps)
            row = self.stats.setdefault(name, {"name": name, "elements": 0, "mismatched": 0, "ties": 0,
                                               "max_abs_diff": 0})
            row["elements"] += diff.numel()
            row["mismatched"] += int(((diff > 0) & ~tie).sum())
            row["ties"] += int(tie.sum())
            row["max_abs_diff"] = max(row["max_abs_diff"], int(diff.max()))
            return graph * module.export_params().scale
        return force


def at_rounding_tie(scaled: torch.Tensor) -> torch.Tensor:
    """Where x / s (`scaled`) lies within TIE_TOLERANCE (relative, at least absolute) of k + 1/2."""
    return (scaled - torch.floor(scaled) - 0.5).abs() <= TIE_TOLERANCE * scaled.abs().clamp(min=1.0)


@torch.no_grad()
def pinned_to_float32_integers(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (float32) with each quantized convolution's weight and bias replaced by their values on its grids:
    the exported integers x steps. Evaluated in float64 the model then rounds them to exactly the integers the graph
    holds; left as they were, a weight within float32 error of a rounding tie rounds the other way in float64 (seen:
    2 of 960 channels of a tiny W4A8 model, every output of those channels off by 1-2 steps), which is the model
    disagreeing with itself, not the graph with the model."""
    from qat.modules import QuantConv2d

    for conv in (module for module in model.modules() if isinstance(module, QuantConv2d)):
        conv.weight.copy_(conv.quantized_weight())
        conv.bias.copy_(conv.quantized_bias())
    return model


@torch.no_grad()
def layer_check(path: Path, deployed: torch.nn.Module, images: np.ndarray, frames: int = LAYER_FRAMES,
                bound: float = LAYER_BOUND) -> dict:
    """The teacher-forced check of one INT8 file against the fake-quant model `deployed` (as the bundle runs it) on
    the first `frames` of `images`. Returns {"frames", "bound", "quantizers": [{"name", "elements", "mismatched",
    "ties" (off by one at a rounding tie: excused), "mismatch_fraction", "max_abs_diff", "ratio": mismatched /
    (bound x elements + LAYER_SLACK)}, ...] in forward
    order, "worst": the row of the largest ratio, "worst_ratio", "unchecked": the quantizers with no QuantizeLinear
    in the file, "passed", "refused_at": the first quantizer (in forward order) over its allowance or None,
    "failure": a phrase naming it}. ValueError where the file's tensors do not fit the model's."""
    from qat.prepare import activation_quantizers

    exact = pinned_to_float32_integers(copy.deepcopy(deployed).cpu()).double().eval()
    inner = exact.model if isinstance(exact, FlipAveraged) else exact  # the graph names the network's modules
    names = quantizer_names(inner)
    quantizers = {names[id(q)]: q for q in activation_quantizers(inner)}
    integers, unchecked = graph_integers(path, set(quantizers))
    forcing = _TeacherForcing(quantizers)
    checked = sorted(set(quantizers) - set(unchecked))
    for frame in images[:frames]:  # one frame at a time: a frame's integers of every quantizer can be large
        forcing.forward(exact, frame, integers(frame))
    rows = [{**row, "mismatch_fraction": row["mismatched"] / max(row["elements"], 1),
             "ratio": row["mismatched"] / (bound * row["elements"] + LAYER_SLACK)} for row in forcing.stats.values()]
    never_run = sorted(set(checked) - set(forcing.stats))
    if never_run:
        raise ValueError(f"{path.name}: quantizers {', '.join(never_run[:3])} are in the file but never ran in the "
                         "model's forward pass")
    worst = max(rows, key=lambda row: row["ratio"], default=None)
    failing = next((row for row in rows if row["ratio"] > 1.0), None)
    failure = None if failing is None else (
        f"{failing['name']}: {failing['mismatch_fraction']:.2%} of its integers differ from the model's "
        f"({failing['mismatched']} of {failing['elements']}, max |diff| {failing['max_abs_diff']}; allowed "
        f"{bound:g} of them + {LAYER_SLACK})")
    return {"frames": len(images[:frames]), "bound": bound, "quantizers": rows, "worst": worst,
            "worst_ratio": worst["ratio"] if worst else 0.0, "unchecked": unchecked,
            "passed": failing is None, "refused_at": failing["name"] if failing else None, "failure": failure}
