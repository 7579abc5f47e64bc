"""`nerveseg export --run-dir RUN --qat NAME`: a trained QAT run -> an INT8 bundle of the files that pass the gate.

The bundle holds
    model.fp32.onnx      the float run's model (reference and fallback)
    model.int8.onnx      TensorRT form: int8 weights + per-channel scales, s8 activations, zero point 0
    model.int8.cpu.onnx  the same integers with u8 activations at zero point 128 (x86 ONNX Runtime's fast kernels)
                         (a `--grid x86` run: only this file, its ReLU'd tensors on uint8 with zero point 0)
    manifest.json        T* and morphology of the QAT run, per-layer bits, sizes, parity, which file serves which runtime

One set of integers, two files: the exact rewrite (export.bundle.qdq) costs nothing, and each runtime gets the form its
kernels want; a single s8 file ran 2.7x slower than FP32 on ONNX Runtime x86, a single u8 file is not TensorRT's.

Parity, per file (export/bundle/int8_parity.py): each INT8 file, run by ONNX Runtime CPU as the device runs it, is held
to the fake-quant model's own float32-vs-float64 disagreement on the parity frames (export.bundle.parity.tie_gate), and
each of its activation quantizers to the model's integers, teacher-forced (export.bundle.layer_parity). A
file the gate refuses is left out with one line saying why; the bundle is written with the files that pass, and
refused (the previous bundle kept, atomic_dir) only when none does.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import write_json
from device_runtime.core.manifest import Manifest, describe_file
from device_runtime.core.postprocess import Morphology
from training.checkpoint import load_model
from training.model import as_deployed
from training.evaluation.predict import resolve_device
from training.stages import flip_tta_of

from .writer import FP32_NAME, BundleFiles, BundleSource, ParityError, protected_paths, test_metrics_of, write_bundle
from .int8_graph import INT8_OPSET, build_int8_model, layer_constants
from .int8_parity import FLOOR_KEY, judge_files, model_references, parity_frames
from .latency import interleaved_latency
from .portable import portable_config
from .qdq import cpu_form

TENSORRT_NAME = "model.int8.onnx"
CPU_NAME = "model.int8.cpu.onnx"
# which backend runs which INT8 file (device_runtime.backends picks by these): TensorRT wants signed
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


def export_int8_bundle(run_dir: str | Path, qat_name: str, out_dir: str | Path | None = None,
                       device: str = "auto", replace: bool = False) -> tuple[Path, Manifest]:
    """Export RUN/qat/NAME as an INT8 bundle (default RUN/qat/NAME/bundle); returns the folder and manifest.

    Written by the float export's path (export.bundle.writer.write_bundle): the float run's model.fp32.onnx, checked,
    and beside it the INT8 files that pass the gate (`int8_files`); the QAT run's T* and morphology decide."""
    run_dir = Path(run_dir)
    float_path = run_dir / "checkpoints" / "best.pt"
    if not float_path.is_file():
        raise InputError(f"{float_path}: not found; --run-dir must be the float run the QAT run came from")
    qat_dir, qat_path = qat_paths(run_dir, qat_name)
    float_model, float_checkpoint, float_cfg = load_model(float_path)
    model, checkpoint, cfg, qcfg = load_qat(qat_path, float_cfg.arch)
    # the QAT run tuned T* as its float run deploys: every graph of the bundle averages alike (or none does)
    cfg = cfg.replace(flip_tta=flip_tta_of(checkpoint))
    source = BundleSource(
        run_dir, cfg, as_deployed(float_model, cfg.flip_tta), float(checkpoint["threshold"]),
        Morphology.from_dict(checkpoint["morphology"]), {**protected_paths(run_dir, float_path), "QAT checkpoint": qat_path},
        {"validation": checkpoint.get("validation", {}), "test": test_metrics_of(qat_dir),
         "float_run": {"threshold": float_checkpoint.get("threshold"), "morphology": float_checkpoint.get("morphology"),
                       "validation": float_checkpoint.get("validation", {}),
                       "note": "model.fp32.onnx is the float run's model; the bundle's T* and morphology are the QAT "
                               "run's"}})
    # the QAT run's test_metrics_onnx.json gets the int8 entry when the bundle goes to its default place; a
    # bundle written elsewhere (--out) leaves the run folder untouched (its manifest holds the same figures)
    bundle, manifest = write_bundle(source, Path(out_dir) if out_dir else qat_dir / "bundle", device, replace,
                                    add=lambda staging: int8_files(staging, source, model, qcfg, qat_dir, device))
    if out_dir is None:
        _add_onnx_test_metrics(qat_dir / "test_metrics_onnx.json", "int8", manifest.metrics["test_onnx"]["int8"])
    return bundle, manifest


def int8_files(staging: Path, source: BundleSource, model, qcfg, qat_dir: Path, device: str) -> BundleFiles:
    """The INT8 graphs of the QAT `model` written into `staging`, each judged by the gate; the refused ones
    removed again (one line each on stderr); ParityError when none is left."""
    from qat.bits import bits_table

    cfg, input_size = source.cfg, tuple(source.cfg.input_size)
    graph = build_int8_model(model, input_size, staging / ".int8-float-twin.onnx", cfg.flip_tta)
    (staging / ".int8-float-twin.onnx").unlink()
    x86_only = qcfg.grid == "x86"
    if not x86_only:
        _save(graph, staging / TENSORRT_NAME)
    _save(cpu_form(graph), staging / CPU_NAME)
    written = [CPU_NAME] if x86_only else [TENSORRT_NAME, CPU_NAME]

    parity, kept, refused = keep_passing(staging, written, source, model, device)
    runtimes = file_runtimes(kept)
    cpu_file = next(name for name in kept if "ort-cpu" in runtimes[name])  # what ONNX Runtime CPU runs
    timed = {"fp32": staging / FP32_NAME, "int8": staging / cpu_file}
    if TENSORRT_NAME in kept and cpu_file != TENSORRT_NAME:
        timed["int8_tensorrt_form"] = staging / TENSORRT_NAME
    timing = interleaved_latency(timed, input_size, threads=EXPORT_TIMING_THREADS, rounds=20)
    files = []
    for name in kept:
        files.append(describe_file(staging, name, "int8", "onnx"))
        files[-1].runtimes = list(runtimes[name])
    fp32_bytes = (staging / FP32_NAME).stat().st_size
    table = bits_table(model, input_size)
    quantization = {
        "scheme": X86_SCHEME if x86_only else SCHEME,
        "grid": qcfg.grid,
        "opset": INT8_OPSET,
        "qat_run": f"qat/{qat_dir.name}",  # relative: bundles travel, machine paths stay home
        "qat_config": portable_config(_plain(qcfg)),  # run_dir is a machine path
        "files": runtimes,
        "refused": refused,  # INT8 files the gate left out, and why
        "layers": table["layers"],
        "mean_weight_bits": table["mean_weight_bits"],
        "mean_activation_bits": table["mean_activation_bits"],
        "mean_bits": table["mean_weight_bits"],  # what the stored model costs per weight
        "fp32_file_bytes": fp32_bytes,
        "int8_file_bytes": files[0].bytes,
        "int8_compression": fp32_bytes / files[0].bytes,
        **packed_bytes(table, model, graph),
    }
    latency = {"ort-cpu": {**{key: timing[key]["median_ms"] for key in timed}, "int8_file": cpu_file,
                           "threads": EXPORT_TIMING_THREADS, "runs": timing["fp32"]["runs"],
                           "machine": f"{platform.machine()} {platform.processor()}".strip(),
                           "note": "measured at export, interleaved, batch 1"}}
    return BundleFiles(files, quantization, {"parity": parity, "latency_ms": latency}, test_graph=cpu_file,
                       test_key="int8", tensorrt_files=tuple(name for name in kept if name == TENSORRT_NAME))


def keep_passing(staging: Path, written: list[str], source: BundleSource, model,
                 device: str) -> tuple[dict, list[str], dict[str, str]]:
    """Judge each INT8 file `written` into `staging` on the parity frames (export/bundle/int8_parity.py); remove the ones
    the gate refuses, with one line each on stderr. Returns (the manifest's parity entries, the files kept, {file
    left out: why}); ParityError when none is kept."""
    cfg = source.cfg
    images, frames_from = parity_frames(source.run_dir, cfg)
    deployed = as_deployed(model, cfg.flip_tta)
    references = model_references(deployed, images, resolve_device(device), cfg.val_batch_size)
    parity, refused = judge_files([staging / name for name in written], images, references, source.threshold,
                                  source.morphology, frames_from, deployed)
    for name, why in refused.items():
        (staging / name).unlink()
        print(f"{name} left out of the bundle: {why}", file=sys.stderr, flush=True)
    kept = [name for name in written if name not in refused]
    if not kept:
        raise ParityError("no INT8 bundle: every INT8 file departs from the PyTorch fake-quant model by more than the "
                          "model departs from itself: " + "; ".join(f"{name}: {why}" for name, why in refused.items()))
    return parity, kept, refused


def file_runtimes(kept: list[str]) -> dict[str, list[str]]:
    """{file: the backends that run it} of the INT8 files kept. Both: each runtime its own form (INT8_FILES).
    One: it serves every backend it can run on; ONNX Runtime runs either form on any provider (the TensorRT form
    on x86 only slowly, which the export-time timing tells --precision auto), TensorRT only the signed one."""
    if set(kept) == set(INT8_FILES):
        return {name: list(INT8_FILES[name]) for name in kept}
    (name,) = kept
    return {name: INT8_FILES[TENSORRT_NAME] + ["ort-cpu"] if name == TENSORRT_NAME else X86_INT8_FILES[CPU_NAME]}


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
    """What `nerveseg export --qat` and the pipeline print: which INT8 files the bundle holds, each file's gate
    figures against the model's own noise floor, the files left out and why, sizes, test Dice, timing."""
    q, m = manifest.quantization, manifest.metrics
    held = list(q.get("files", INT8_FILES))
    lines = [f"INT8 bundle written: {bundle} holds {', '.join(held)} (+ {FP32_NAME}); T* {manifest.threshold:.2f}, "
             f"mean bits W {q['mean_weight_bits']:.2f} A {q['mean_activation_bits']:.2f}"]
    floor = m["parity"][FLOOR_KEY]
    lines.append(f"  the fake-quant model against itself (float32 draws vs float64), on {floor['frames']} frames: "
                 f"{_gate_figures(floor)}")
    for name in held:
        p = m["parity"][name]
        lines.append(f"  {name} kept, {p['gate']['worst_ratio']:.2f} of the gate's allowance: {_gate_figures(p)}"
                     f"{_layer_figures(p.get('layers'))}")
    for name, why in q.get("refused", {}).items():
        lines.append(f"  {name} left out: {why}")
    if q.get("grid") == "x86":
        lines.append("  no TensorRT file (--grid x86: unsigned activations do not fit TensorRT's int8)")
    lines.append(f"  size: FP32 {q['fp32_file_bytes'] / 1e6:.2f} MB, INT8 file {q['int8_file_bytes'] / 1e6:.2f} MB "
                 f"({q['int8_compression']:.2f}x smaller), packed at learned bits {q['packed_bytes'] / 1e6:.2f} MB")
    lat = m["latency_ms"]["ort-cpu"]
    cpu_file = lat.get("int8_file", CPU_NAME)
    t = m["test_onnx"]["int8"]
    lines.append(f"  test through {cpu_file} (ORT CPU): Dice {t['dice']:.4f} IoU {t['iou']:.4f} "
                 f"PA {t['pixel_accuracy']:.4f} ({t['images']} frames)")
    tensorrt_form = (f", INT8 TensorRT form (s8) {lat['int8_tensorrt_form']:.1f} ms" if "int8_tensorrt_form" in lat
                     else "")
    lines.append(f"  ORT CPU {lat['threads']} threads at export: FP32 {lat['fp32']:.1f} ms, INT8 ({cpu_file}) "
                 f"{lat['int8']:.1f} ms{tensorrt_form}")
    return "\n".join(lines)


def _gate_figures(p: dict) -> str:
    return (f"flipped pixels {p['flipped_fraction']:.1e}, |dp| median {p['prob_diff_p50']:.1e} p99 "
            f"{p['prob_diff_p99']:.1e} p99.9 {p['prob_diff_p99.9']:.1e} max {p['max_prob_diff']:.3f}")


def _layer_figures(layers: dict | None) -> str:
    """The teacher-forced layer check's worst quantizer (export/bundle/layer_parity.py); bundles written before it
    have none."""
    if not layers or not layers.get("worst"):
        return ""
    worst = layers["worst"]
    return (f"; layer by layer, the worst quantizer {worst['name']} differs in {worst['mismatch_fraction']:.1e} of "
            f"its integers (bound {layers['bound']:g})")


def print_problems(manifest: Manifest) -> None:
    for problem in manifest.metrics.get("tensorrt_problems", []):
        print(f"warning: TensorRT would refuse: {problem}", file=sys.stderr)
