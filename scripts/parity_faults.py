"""Plant faults in an INT8 graph and print what the parity gate says of each (the table in docs/QUANTIZATION.md).

    python scripts/parity_faults.py --run-dir RUN --qat NAME [--frames N]

Each fault is an edit of the exported QDQ graph (TensorRT form, export.bundle.int8_graph) with the onnx helpers, the way
an exporter bug would write it: a weight scale off by a factor, a missing or wrong clamp of the b-bit range, a bias
on the wrong grid, per-tensor instead of per-channel weight scales, a wrong zero point, a dropped activation; most
in every layer (a bug of the exporter) and in one layer. The ties-only edits move every scale by one float32 ulp:
only a value within float32 error of a rounding tie rounds the other way. Both forms the export writes (TensorRT,
x86) are measured as written, faithful. tests/test_parity_gate.py runs the same edits on a tiny model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _set(model: onnx.ModelProto, name: str, array) -> None:
    init = next(i for i in model.graph.initializer if i.name == name)
    dtype = numpy_helper.to_array(init).dtype
    init.CopyFrom(numpy_helper.from_array(np.asarray(array).astype(dtype), name))


def _weight_layers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(Conv, the DequantizeLinear of its int8 kernel) in graph order."""
    producer = {out: node for node in model.graph.node for out in node.output}
    return [(node, producer[node.input[1]]) for node in model.graph.node
            if node.op_type == "Conv" and producer.get(node.input[1]) is not None
            and producer[node.input[1]].op_type == "DequantizeLinear"]


def _pick(items: list, where: str) -> list:
    """Every item, or the one in the middle (a layer deep inside the network)."""
    if not items:
        raise ValueError("the graph has nothing this fault edits")
    return items if where == "every" else [items[len(items) // 2]]


def _clips(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The Clip nodes that keep a quantizer below 8 bits inside its b-bit range (export.bundle.int8_graph)."""
    return [n for n in model.graph.node if n.op_type == "Clip" and n.input[1].endswith(".clip_min")]


def _bypass(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Remove `node`, its readers reading its input instead."""
    for reader in model.graph.node:
        for i, name in enumerate(reader.input):
            if name == node.output[0]:
                reader.input[i] = node.input[0]
    model.graph.node.remove(node)


def weight_scale_times(model, factor: float, where: str = "every"):
    model, values = _copy(model), _values(model)
    for _, dq in _pick(_weight_layers(model), where):
        _set(model, dq.input[1], values[dq.input[1]] * np.float32(factor))
    return model


def per_tensor_weights(model, where: str = "every"):
    """Each kernel re-quantized with one scale for the layer (its largest |w| / 127) instead of one per channel."""
    model, values = _copy(model), _values(model)
    for _, dq in _pick(_weight_layers(model), where):
        integers, scales = values[dq.input[0]].astype(np.float32), values[dq.input[1]]
        weights = integers * scales.reshape(-1, *[1] * (integers.ndim - 1))
        scale = np.float32(np.abs(weights).max() / 127)
        _set(model, dq.input[0], np.clip(np.round(weights / scale), -127, 127))
        _set(model, dq.input[1], np.full_like(scales, scale))
    return model


def bias_on_weight_grid(model, where: str = "every"):
    """Biases rounded to the grid of the weight scale s_w alone instead of s_in x s_w."""
    model, values = _copy(model), _values(model)
    for conv, dq in _pick(_weight_layers(model), where):
        step = values[dq.input[1]]
        _set(model, conv.input[2], np.round(values[conv.input[2]] / step) * step)
    return model


def dequantize_zero_point(model, zero_point: int = 1, where: str = "every"):
    """Activations dequantized with zero point `zero_point` where they were quantized with 0: every value one
    step off."""
    model, values = _copy(model), _values(model)
    model.graph.initializer.append(numpy_helper.from_array(np.array(zero_point, np.int8), "zero_point.planted"))
    activations = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in values]
    for node in _pick(activations, where):
        node.input[2] = "zero_point.planted"
    return model


def clamp_missing(model, where: str = "every"):
    """The b-bit Clip of quantizers below 8 bits dropped: int8 saturation instead of the b-bit range."""
    model = _copy(model)
    for node in _pick(_clips(model), where):
        _bypass(model, node)
    return model


def clamp_one_bit_short(model, where: str = "every"):
    """The Clip of b-1 bits where the quantizer learned b (its bounds halved)."""
    model, values = _copy(model), _values(model)
    halved = set()
    for node in _pick(_clips(model), where):
        for name in node.input[1:]:
            if name not in halved:
                halved.add(name)
                _set(model, name, values[name] / 2)
    return model


def relu_dropped(model, where: str = "one"):
    model = _copy(model)
    for node in _pick([n for n in model.graph.node if n.op_type == "Relu"], where):
        _bypass(model, node)
    return model


def scales_nudged(model, direction: int, which: str):
    """Every activation (or weight) scale moved by one float32 ulp: only values within float32 error of a rounding
    tie round the other way."""
    model, values = _copy(model), _values(model)
    if which == "activation":
        names = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in values}
    else:
        names = {dq.input[1] for _, dq in _weight_layers(model)}
    for name in names:
        _set(model, name, np.nextafter(values[name], np.float32(np.inf * direction), dtype=np.float32))
    return model


# name -> edit of the TensorRT-form graph; (every) = in every layer or tensor, as an exporter bug would write it
FAULTS = {
    "weight scale x2 (every layer)": lambda m: weight_scale_times(m, 2.0),
    "weight scale x2 (one layer)": lambda m: weight_scale_times(m, 2.0, "one"),
    "weight scale x1.25 (one layer)": lambda m: weight_scale_times(m, 1.25, "one"),
    "b-bit clamp missing (every)": clamp_missing,
    "b-bit clamp missing (one)": lambda m: clamp_missing(m, "one"),
    "clamp of b-1 bits (every)": clamp_one_bit_short,
    "clamp of b-1 bits (one)": lambda m: clamp_one_bit_short(m, "one"),
    "bias on the s_w grid (every layer)": bias_on_weight_grid,
    "bias on the s_w grid (one layer)": lambda m: bias_on_weight_grid(m, "one"),
    "per-tensor weight scales (every layer)": per_tensor_weights,
    "per-tensor weight scales (one layer)": lambda m: per_tensor_weights(m, "one"),
    "zero point 1 at dequantize (every)": dequantize_zero_point,
    "zero point 1 at dequantize (one)": lambda m: dequantize_zero_point(m, 1, "one"),
    "ReLU dropped (one)": relu_dropped,
    "ReLU dropped (every)": lambda m: relu_dropped(m, "every"),
}
TIES = {
    "activation scales +1 ulp": lambda m: scales_nudged(m, +1, "activation"),
    "activation scales -1 ulp": lambda m: scales_nudged(m, -1, "activation"),
    "weight scales +1 ulp": lambda m: scales_nudged(m, +1, "weight"),
    "weight scales -1 ulp": lambda m: scales_nudged(m, -1, "weight"),
}


def measure(graph: onnx.ModelProto, work: Path, images, references, threshold, morphology, model) -> dict:
    """The gate's figures and verdict of one graph (export.bundle.int8_parity.judge_files on that one file);
    `model`: the fake-quant model as deployed."""
    from export.bundle.int8_parity import judge_files

    path = work / "planted.onnx"
    onnx.save(graph, str(path))
    parity, _ = judge_files([path], images, references, threshold, morphology, {"frames": len(images)}, model)
    return parity[path.name]


def table(rows: dict[str, dict]) -> str:
    """graph -> its worst statistic (at the level, fused or as written, where it is worst) against its allowance;
    the layer check's first quantizer refused, else its worst (the share of its integers that differ, teacher-forced;
    its ratio to the allowance);
    each check's verdict and the gate's (refused when either refuses)."""
    lines = [f"{'graph':<46}{'worst statistic':<28}{'value':>9}{'allowed':>9}{'ratio':>8}  {'stats':<8}"
             f"{'quantizer (first refused, else worst)':<40}{'mismatch':>9}{'max|d|':>7}{'ratio':>9}  {'layers':<8}gate"]
    for name, result in rows.items():
        level = max(("deployed", "as_written"), key=lambda lv: result["gate"][lv]["worst_ratio"])
        gate = result["gate"][level]
        key = max(gate["ratio"], key=gate["ratio"].get)
        value = result[key if level == "deployed" else f"reference_{key}"]
        where = "fused" if level == "deployed" else "as written"
        statistics = result["gate"]["deployed"]["passed"] and result["gate"]["as_written"]["passed"]
        layers = result["layers"]
        worst = layers["worst"] or {"name": "-", "mismatch_fraction": 0.0, "max_abs_diff": 0}
        shown = layers["refused_at"] or worst["name"]  # the first quantizer refused, if any
        row = next((r for r in layers["quantizers"] if r["name"] == shown), worst)
        lines.append(f"{name:<46}{f'{key} ({where})':<28}{value:>9.1e}{gate['allowed'][key]:>9.1e}"
                     f"{gate['ratio'][key]:>8.2f}  {_verdict(statistics):<8}{shown[-39:]:<40}"
                     f"{row['mismatch_fraction']:>9.1e}{row['max_abs_diff']:>7}{row.get('ratio', 0.0):>9.2f}  "
                     f"{_verdict(layers['passed']):<8}{_verdict(result['gate']['passed'])}")
    return "\n".join(lines)


def _verdict(passed: bool) -> str:
    return "passed" if passed else "REFUSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path, help="the float run")
    parser.add_argument("--qat", required=True, help="the QAT run RUN/qat/NAME")
    parser.add_argument("--frames", type=int, default=None, help="parity frames (default: the export's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/parity-faults"), help="scratch folder")
    args = parser.parse_args(argv)

    import torch

    from device_runtime.core.postprocess import Morphology
    from export.bundle.int8 import load_qat, qat_paths
    from export.bundle.int8_graph import build_int8_model
    from export.bundle.int8_parity import PARITY_FRAMES, model_references, parity_frames
    from export.bundle.qdq import cpu_form
    from training.checkpoint import load_model
    from training.model import as_deployed
    from training.stages import flip_tta_of

    _, float_checkpoint, float_cfg = load_model(args.run_dir / "checkpoints" / "best.pt")
    model, checkpoint, cfg, _ = load_qat(qat_paths(args.run_dir, args.qat)[1], float_cfg.arch)
    threshold, morphology = float(checkpoint["threshold"]), Morphology.from_dict(checkpoint["morphology"])
    flip = flip_tta_of(checkpoint)
    args.work.mkdir(parents=True, exist_ok=True)
    graph = build_int8_model(model, tuple(cfg.input_size), args.work / "twin.onnx", flip)
    images, _ = parity_frames(args.run_dir, cfg, args.frames or PARITY_FRAMES)
    deployed = as_deployed(model, flip)
    references = model_references(deployed, images, torch.device("cpu"), cfg.val_batch_size)
    rows = {"faithful: TensorRT form": graph, "faithful: x86 file": cpu_form(graph)}
    rows.update({f"ties: {name}": edit(graph) for name, edit in TIES.items()})
    for name, edit in FAULTS.items():
        try:
            rows[f"fault: {name}"] = edit(graph)
        except ValueError as err:  # e.g. no quantizer below 8 bits: no clamp to drop
            print(f"fault: {name}: not applicable ({err})")
    results = {name: measure(g, args.work, images, references, threshold, morphology, deployed)
               for name, g in rows.items()}
    print(f"{args.run_dir} qat/{args.qat}: {len(images)} frames {tuple(cfg.input_size)}")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
