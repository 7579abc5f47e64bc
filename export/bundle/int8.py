"""`nerveseg export --run-dir RUN --qat NAME`: a trained QAT run -> an INT8 bundle, checked, or no bundle.

The bundle holds
    model.fp32.onnx      the float run's model (reference and fallback)
    model.int8.onnx      TensorRT form: int8 weights + per-channel scales, s8 activations, zero point 0
    model.int8.cpu.onnx  the same integers with u8 activations at zero point 128 (x86 ONNX Runtime's fast kernels)
                         (a `--grid x86` run: only this file, its ReLU'd tensors on uint8 with zero point 0)
    manifest.json        T* and morphology of the QAT run, per-layer bits, sizes, parity, which file serves which runtime

One set of integers, two files: the exact rewrite (export.bundle.qdq) costs nothing, and each runtime gets the form its
kernels want; a single s8 file ran 2.7x slower than FP32 on ONNX Runtime x86, a single u8 file is not TensorRT's.

Parity, or no bundle: on the validation frames ONNX Runtime (CPU, the optimisation level the device runs)
must give, for EACH INT8 file, final masks with mean per-frame Dice >= 0.995 against the PyTorch fake-quant
model. Below that the export stops with one line and the previous bundle stays (atomic_dir).
"""

from __future__ import annotations

import copy

import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import atomic_dir, write_json
from device_runtime.core.manifest import Manifest, describe_file, write_manifest
from device_runtime.core.postprocess import Morphology
from training.checkpoint import load_model
from training.evaluation.evaluate import evaluate_arrays
from training.evaluation.predict import predict_probabilities, resolve_device
from training.model import as_deployed
from training.stages import flip_tta_of, split_arrays

from .int8_graph import INT8_OPSET, build_int8_model, layer_constants
from .latency import interleaved_latency
from .onnx_export import export_onnx, tensorrt_problems
from .out_guard import check_bundle_out
from .parity import TOLERANCE, compare, onnx_probabilities, parity_failures
from .portable import portable_config
from .qdq import cpu_form
from .writer import FP32_NAME, ParityError, dataset_description, protected_paths

TENSORRT_NAME = "model.int8.onnx"
CPU_NAME = "model.int8.cpu.onnx"
# which backend runs which INT8 file (device_runtime.backends.selection picks by these): TensorRT wants signed
# activations; ONNX Runtime's CUDA provider runs Q/DQ around float kernels, where the form does not matter
INT8_FILES = {TENSORRT_NAME: ["tensorrt", "ort-tensorrt", "ort-cuda"], CPU_NAME: ["ort-cpu"]}
# a --grid x86 run: unsigned activations do not fit TensorRT's int8, so one file, for ONNX Runtime only
X86_INT8_FILES = {CPU_NAME: ["ort-cpu", "ort-cuda"]}
SCHEME = ("int8 QDQ, explicit quantization: symmetric, zero point 0; weights per output channel (axis 0), "
          "activations per tensor; layers that learned b < 8 bits keep b-bit integers inside int8 (Clip before "
          "QuantizeLinear); biases float on the int32 grid of input x weight scale")
X86_SCHEME = ("int8 QDQ for x86 ONNX Runtime (qat --grid x86): weights int8 per output channel (axis 0), zero point "
              "0; activations per tensor, uint8 with zero point 0 where every reader applies ReLU (the ReLU folded "
              "away), otherwise the signed grid as uint8 with zero point 128; no TensorRT file (its int8 is symmetric)")
EXPORT_TIMING_THREADS = 2


def qat_paths(run_dir: Path, qat_name: str) -> tuple[Path, Path]:
    """RUN/qat/NAME and its best checkpoint; InputError when either is missing."""
    qat_dir = Path(run_dir) / "qat" / qat_name
    if not qat_dir.is_dir():
        found = sorted(p.name for p in (Path(run_dir) / "qat").glob("*") if p.is_dir()) if (Path(run_dir) / "qat").is_dir() else []
        raise InputError(f"{qat_dir}: no such QAT run (found: {', '.join(found) or 'none'}); "
                         f"train one with 'nerveseg qat --run-dir {run_dir} --name {qat_name}'")
    checkpoint = qat_dir / "checkpoints" / "best.pt"
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: not found; the QAT run has not finished an epoch")
    return qat_dir, checkpoint


def load_qat(checkpoint_path: Path, float_arch: str):
    """The QAT model, its checkpoint and configs; InputError for a checkpoint that is not this run's kind."""
    from qat.checkpoint import load_qat_model

    try:
        model, checkpoint, cfg, qcfg = load_qat_model(checkpoint_path)
    except InputError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(f"{checkpoint_path}: cannot rebuild the QAT model ({type(err).__name__}: {first[:200]})") from None
    if cfg.arch != float_arch:
        raise InputError(f"{checkpoint_path}: a {cfg.arch} QAT checkpoint, but the run is {float_arch}")
    if checkpoint.get("threshold") is None or checkpoint.get("morphology") is None:
        raise InputError(f"{checkpoint_path}: has no tuned threshold; the QAT run must finish (it tunes T* and "
                         "morphology on its validation split)")
    return model, checkpoint, cfg, qcfg


def packed_bytes(bits_table: dict, model, graph=None) -> dict:
    """Size of the weights stored at their learned bits: sum(params x bits) / 8, plus what stays wide:
    float32 per-channel weight scales, int32 biases and float32 activation scales. With the INT8 `graph`, each
    layer counts the weights the graph stores (kernels cut to the taps that read pixels, export.bundle.dead_taps)."""
    from qat.prepare import activation_quantizers, quant_convs

    dims = {} if graph is None else {init.name: init.dims for init in graph.graph.initializer}
    stored = {} if graph is None else {
        layer: int(np.prod(dims[names["weight_int8"]])) for layer, names in layer_constants(graph).items()}
    weight_bits = sum(stored.get(row["name"], row.get("live_params", row["params"])) * row["weight_bits"]
                      for row in bits_table["layers"]) / 8
    scales = biases = 0
    for _, conv in quant_convs(model):
        scales += 4 * conv.out_channels
        biases += 4 * conv.out_channels
    activation_scales = 4 * len(activation_quantizers(model))  # one per tensor, however many layers read it
    total = weight_bits + scales + biases + activation_scales
    return {"packed_bytes": int(round(total)), "packed_weight_bytes": int(round(weight_bits)),
            "packed_scale_bias_bytes": scales + biases + activation_scales}


def parity_of(path: Path, images: np.ndarray, references: dict[str, np.ndarray], threshold: float,
              morphology: Morphology) -> dict:
    """Device-level figures (all optimisations, as the runtime runs) against the closer of the `references`
    (evaluations of the fake-quant model by precision, see PARITY REFERENCES), with the QDQ reference-level
    ones (ORT_DISABLE_ALL) and the figures against each reference under `against_<precision>`."""
    deployed = onnx_probabilities(path, images, optimization="all")
    exact = onnx_probabilities(path, images, optimization="none")
    against = {}
    for precision, reference in references.items():
        against[precision] = compare(reference, deployed, threshold, morphology)
        level = compare(reference, exact, threshold, morphology)
        against[precision].update({f"reference_{k}": v for k, v in level.items() if k != "frames"})
    closer = max(against, key=lambda precision: against[precision]["mask_dice"])
    result = dict(against[closer])
    result.update({f"against_{precision}": figures for precision, figures in against.items()})
    result["reference_model"] = f"the PyTorch fake-quant model in {closer} (the closer of {' / '.join(against)})"
    result["optimization"] = "ORT_ENABLE_ALL (reference_*: ORT_DISABLE_ALL)"
    return result


@torch.no_grad()
def float64_probabilities(model: torch.nn.Module, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """(N, H, W) probabilities of the fake-quant model evaluated in float64 on the CPU: the same integer grids
    and float32 steps, without float32's accumulation error. It is the closest evaluation of the integer model
    that integer kernels (ONNX Runtime's QLinearConv, TensorRT) compute."""
    exact = copy.deepcopy(model).cpu().double().eval()
    out = np.empty(images.shape, np.float32)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).double()[:, None]
        out[start:start + len(batch)] = torch.sigmoid(exact(batch)["out"][:, 0]).float().numpy()
    return out


# PARITY REFERENCES: which evaluation of the fake-quant model a file is held to: the closer of two. Measured on
# usgra-seg (edge, 20 validation frames): the PyTorch model in float32 and in float64 agree with each other at mask
# Dice 0.989 only (about 150 roundings: a value within float32 error of a rounding tie goes either way, and the
# difference spreads), so no file can match both at 0.995, and which one a file follows depends on the kernels that
# run it. W8A8: ONNX Runtime runs the x86 file on integer kernels (QLinearConv accumulates exactly in int32): 0.997
# against float64, 0.990 against float32; the signed TensorRT form, emulated in float32: 0.996 against float32,
# 0.990 against float64. Learned bits (Clip before QuantizeLinear below 8 bits, so fewer fused kernels): the x86
# file 0.996 against float32, 0.989 against float64. Both evaluations are the model; the gate asks the graph to
# reproduce one of them as well as the bound, and the manifest records both and the model's own agreement.


# PARITY BOUND: the mask metric is discontinuous. The morphology removes components below a size, so a blob near
# that size appears or vanishes whole on a tiny probability change, and a frame whose mask is that blob scores
# per-frame Dice 0. Measured on usgra-seg (learned-a8-t4, 20 validation frames): the PyTorch model in float32 vs
# float64 0.934 (one frame: 307 pixels against none; pooled Dice 0.980), the x86 file against float64 0.977,
# flipped pixels 1.3e-3. No runtime can reproduce such a model to 0.995 when PyTorch cannot reproduce itself;
# the default still refuses (and says why), `bound_from_model` takes the model's own agreement as the bound and
# the manifest records it (`bound_from_model` per file). The graph's integers are checked exactly by the tests.


def export_int8_bundle(run_dir: str | Path, qat_name: str, out_dir: str | Path | None = None,
                       device: str = "auto", min_mask_dice: float = TOLERANCE["int8"]["mask_dice"],
                       replace: bool = False, bound_from_model: bool = False) -> tuple[Path, Manifest]:
    """Export RUN/qat/NAME as an INT8 bundle (default RUN/qat/NAME/bundle); returns the folder and manifest.

    `min_mask_dice`: the parity bound (0.995, the project's). Only the tests lower it, for 2-epoch 64x64 models
    whose probability maps sit near T* over much of the frame, where any 1-step integer difference flips pixels.
    `bound_from_model` (`--parity-bound-from-model`): where the fake-quant model agrees with itself (float32 vs
    float64) below `min_mask_dice`, hold each file to that agreement instead (see PARITY BOUND).
    """
    from qat.bits import bits_table

    run_dir = Path(run_dir)
    float_path = run_dir / "checkpoints" / "best.pt"
    if not float_path.is_file():
        raise InputError(f"{float_path}: not found; --run-dir must be the float run the QAT run came from")
    qat_dir, qat_path = qat_paths(run_dir, qat_name)
    float_model, float_checkpoint, float_cfg = load_model(float_path)
    model, checkpoint, cfg, qcfg = load_qat(qat_path, float_cfg.arch)
    # the QAT run's test_metrics_onnx.json gets the int8 entry when the bundle goes to its default place; a
    # bundle written elsewhere (--out) leaves the run folder untouched (its manifest holds the same figures)
    write_run_metrics = out_dir is None
    out_dir = Path(out_dir) if out_dir else qat_dir / "bundle"
    # the same rule as the float export (export/out_guard.py): a new folder, or an existing bundle with `replace`
    protected = {**protected_paths(run_dir, float_path), "QAT checkpoint": qat_path}
    if check_bundle_out(out_dir, protected, replace):
        print(f"replacing the bundle {out_dir} (atomically, once the new one is complete)", flush=True)
    threshold, morphology = float(checkpoint["threshold"]), Morphology.from_dict(checkpoint["morphology"])
    flip_tta = flip_tta_of(checkpoint)  # the QAT run tuned T* as its float run deploys: every graph averages alike
    input_size = tuple(cfg.input_size)
    torch_device = resolve_device(device)
    table = bits_table(model, input_size)

    with atomic_dir(out_dir, replace=True) as staging:
        fp32_path = export_onnx(as_deployed(float_model, flip_tta), staging / FP32_NAME, input_size)
        graph = build_int8_model(model, input_size, staging / ".int8-float-twin.onnx", flip_tta)
        (staging / ".int8-float-twin.onnx").unlink()
        x86_only = qcfg.grid == "x86"
        int8_files = X86_INT8_FILES if x86_only else INT8_FILES
        tensorrt_path, cpu_path = staging / TENSORRT_NAME, staging / CPU_NAME
        if not x86_only:
            _save(graph, tensorrt_path)
        _save(cpu_form(graph), cpu_path)

        val_images, _, _ = split_arrays(run_dir, "val", cfg)
        deployed = as_deployed(model, flip_tta)
        references = {  # see PARITY REFERENCES
            "float32": predict_probabilities(deployed.to(torch_device), val_images, torch_device, cfg.val_batch_size,
                                             amp=False),
            "float64": float64_probabilities(deployed, val_images),
        }
        parity = {"model_float32_vs_float64": compare(references["float64"], references["float32"], threshold,
                                                      morphology)}
        own = parity["model_float32_vs_float64"]["mask_dice"]
        for path in [staging / name for name in int8_files]:
            parity[path.name] = result = parity_of(path, val_images, references, threshold, morphology)
            bound = min_mask_dice  # the model's own agreement only where the file misses the project's bound
            if bound_from_model and own < min_mask_dice and parity_failures(result, "int8", min_mask_dice):
                bound = own
            result.update(min_mask_dice=bound, project_min_mask_dice=min_mask_dice,
                          bound_from_model=bound < min_mask_dice)
            own_bound = "the model's own float32-vs-float64 agreement, --parity-bound-from-model"
            failures = parity_failures(result, "int8", bound, own_bound if result["bound_from_model"] else "")
            if failures:
                hint = ("" if bound_from_model or own >= min_mask_dice else
                        f" (the fake-quant model agrees with itself, float32 vs float64, at only {own:.4f}; "
                        "--parity-bound-from-model holds each file to that)")
                written = result.get("reference_mask_dice")  # the QDQ graph run op by op: graph or kernels?
                level = ("" if written is None else
                         f"; the graph run as written (ORT_DISABLE_ALL) agrees at {written:.4f}")
                raise ParityError(f"{path.name}: ONNX Runtime disagrees with the PyTorch fake-quant model (in float32 "
                                  f"and in float64) on {result['frames']} validation frames: {'; '.join(failures)}"
                                  f"{level}; no bundle written{hint}")
        test_images, test_masks, _ = split_arrays(run_dir, "test", cfg)
        test_int8, _, _ = evaluate_arrays(onnx_probabilities(cpu_path, test_images), test_masks, threshold, morphology)
        timed = {"fp32": fp32_path, "int8": cpu_path} | ({} if x86_only else {"int8_tensorrt_form": tensorrt_path})
        timing = interleaved_latency(timed, input_size, threads=EXPORT_TIMING_THREADS, rounds=20)
        problems = [] if x86_only else [f"{TENSORRT_NAME}: {p}" for p in tensorrt_problems(tensorrt_path)]
        problems += [f"{FP32_NAME}: {p}" for p in tensorrt_problems(fp32_path)]
        files = [describe_file(staging, FP32_NAME, "fp32", "onnx")]
        for name, runtimes in int8_files.items():
            entry = describe_file(staging, name, "int8", "onnx")
            entry.runtimes = list(runtimes)
            files.append(entry)
        fp32_bytes, int8_bytes = files[0].bytes, files[1].bytes
        quantization = {
            "scheme": X86_SCHEME if x86_only else SCHEME,
            "grid": qcfg.grid,
            "opset": INT8_OPSET,
            "qat_run": f"qat/{qat_dir.name}",  # relative: bundles travel, machine paths stay home
            "qat_config": portable_config(_plain(qcfg)),  # run_dir is a machine path
            "files": {name: runtimes for name, runtimes in int8_files.items()},
            "layers": table["layers"],
            "mean_weight_bits": table["mean_weight_bits"],
            "mean_activation_bits": table["mean_activation_bits"],
            "mean_bits": table["mean_weight_bits"],  # what the stored model costs per weight
            "fp32_file_bytes": fp32_bytes,
            "int8_file_bytes": int8_bytes,
            "int8_compression": fp32_bytes / int8_bytes,
            **packed_bytes(table, model, graph),
        }
        qat_test = _test_metrics(qat_dir)
        manifest = Manifest(
            architecture=cfg.arch,
            input_size=input_size,
            threshold=threshold,
            morphology=morphology,
            files=files,
            quantization=quantization,
            metrics={"validation": checkpoint.get("validation", {}), "test": qat_test,
                     "test_onnx": {"int8": test_int8},
                     "float_run": {"threshold": float_checkpoint.get("threshold"),
                                   "morphology": float_checkpoint.get("morphology"),
                                   "validation": float_checkpoint.get("validation", {}),
                                   "note": "model.fp32.onnx is the float run's model; the bundle's T* and "
                                           "morphology are the QAT run's"},
                     "parity": parity,
                     "latency_ms": {"ort-cpu": {**{key: timing[key]["median_ms"] for key in timed},
                                                "threads": EXPORT_TIMING_THREADS, "runs": timing["fp32"]["runs"],
                                                "machine": f"{platform.machine()} {platform.processor()}".strip(),
                                                "note": "measured at export, interleaved, batch 1"}},
                     "tensorrt_problems": problems},
            training_config=portable_config(cfg.to_dict()),
            dataset=dataset_description(run_dir, cfg),
        )
        write_manifest(staging, manifest)
    if write_run_metrics:
        _add_onnx_test_metrics(qat_dir / "test_metrics_onnx.json", "int8", test_int8)
    return out_dir, manifest


def _save(model, path: Path) -> None:
    import onnx

    from device_runtime.core.fileio import atomic_path

    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def _plain(obj) -> dict:
    if obj is None:
        return {}
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    from dataclasses import asdict, is_dataclass

    return json.loads(json.dumps(asdict(obj), default=str)) if is_dataclass(obj) else {}


def _test_metrics(qat_dir: Path) -> dict:
    path = qat_dir / "test_metrics.json"
    if not path.is_file():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "per_image"}


def _add_onnx_test_metrics(path: Path, key: str, metrics: dict) -> None:
    """Merge one entry into a run's test_metrics_onnx.json (written atomically)."""
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
    data[key] = metrics
    write_json(path, data)


def format_summary(bundle: Path, manifest: Manifest) -> str:
    """What `nerveseg export --qat` and the pipeline print: parity of each INT8 file, sizes, test Dice, timing."""
    q, m = manifest.quantization, manifest.metrics
    lines = [f"INT8 bundle {bundle}: T* {manifest.threshold:.2f}, mean bits W {q['mean_weight_bits']:.2f} "
             f"A {q['mean_activation_bits']:.2f}"]
    int8_files = q.get("files", INT8_FILES)
    for name in int8_files:
        p = m["parity"][name]
        lines.append(f"  parity {name}: mask Dice {p['mask_dice']:.4f} (>= {p['min_mask_dice']:.4g}), max |dp| "
                     f"{p['max_prob_diff']:.3f}, flipped pixels {p['flipped_fraction']:.2e}; against the fake-quant "
                     f"model in float32 {p['against_float32']['mask_dice']:.4f}, in float64 "
                     f"{p['against_float64']['mask_dice']:.4f}; reference level (ORT_DISABLE_ALL) "
                     f"{p['reference_mask_dice']:.4f}")
    own = m["parity"]["model_float32_vs_float64"]
    lines.append(f"  the fake-quant model itself, float32 vs float64: mask Dice {own['mask_dice']:.4f}, "
                 f"max |dp| {own['max_prob_diff']:.3f}")
    held = [name for name in int8_files if m["parity"][name].get("bound_from_model")]
    if held:
        lines.append(f"  parity bound of {', '.join(held)}: the model's own agreement ({own['mask_dice']:.4f}), not "
                     f"{m['parity'][held[0]]['project_min_mask_dice']} (--parity-bound-from-model)")
    lines.append(f"  size: FP32 {q['fp32_file_bytes'] / 1e6:.2f} MB, INT8 file {q['int8_file_bytes'] / 1e6:.2f} MB "
                 f"({q['int8_compression']:.2f}x smaller), packed at learned bits {q['packed_bytes'] / 1e6:.2f} MB")
    t = m["test_onnx"]["int8"]
    lines.append(f"  test through {CPU_NAME} (ORT CPU): Dice {t['dice']:.4f} IoU {t['iou']:.4f} "
                 f"PA {t['pixel_accuracy']:.4f} ({t['images']} frames)")
    lat = m["latency_ms"]["ort-cpu"]
    tensorrt_form = (f", INT8 TensorRT form (s8) {lat['int8_tensorrt_form']:.1f} ms" if "int8_tensorrt_form" in lat
                     else "; no TensorRT file (--grid x86)")
    lines.append(f"  ORT CPU {lat['threads']} threads at export: FP32 {lat['fp32']:.1f} ms, INT8 ({CPU_NAME}) "
                 f"{lat['int8']:.1f} ms{tensorrt_form}")
    return "\n".join(lines)


def print_problems(manifest: Manifest) -> None:
    for problem in manifest.metrics.get("tensorrt_problems", []):
        print(f"warning: TensorRT would refuse: {problem}", file=sys.stderr)
