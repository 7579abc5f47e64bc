"""Read what a run folder holds into report rows: the float run, the ORT PTQ baseline, every QAT run.

Nothing here runs a model. Each reader takes files that may or may not exist and says in the row what it
found: a QAT run without test metrics becomes an "incomplete" row with the reason, never an exception.
Broken files that should be readable (a malformed JSON) are bad input: one InputError naming the file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import read_json_object
from device_runtime.core.manifest import MANIFEST_NAME, Manifest, load_manifest
from qat.config import default_keep_start, parse_bits

KINDS = ("float", "ptq", "uniform", "mixed", "learned")  # the report's row order
UNIFORM_NAME = re.compile(r"^w(\d)a(\d)$")
SWEEP_STATE = "sweep.json"  # RUN/sweep.json: written by `nerveseg sweep`, read here for commands and export errors
PTQ_DIR = "ptq"  # RUN/ptq/: the ORT quantize_static baseline (see export/report/ptq_row.py)
CPU_BACKEND = "ort-cpu"  # the device runtime's name for ONNX Runtime's CPU provider


@dataclass
class Row:
    """One model of the report: the table's columns plus what the figures need."""

    name: str
    kind: str  # one of KINDS
    status: str = "complete"  # "complete" or "incomplete"
    scored_by: str = ""  # "ONNX Runtime CPU, model.x.onnx" or "fake-quant (PyTorch)"
    onnx: Path | None = None  # the graph scored and timed through ONNX Runtime; None: not exported
    threshold: float | None = None
    morphology: dict | None = None
    mean_weight_bits: float | None = None
    mean_activation_bits: float | None = None
    metrics: dict = field(default_factory=dict)  # dice, iou, pixel_accuracy, pooled_dice, images
    per_image: np.ndarray | None = None  # per-frame test Dice, in the split's frame order
    # QAT rows: the fake-quant model's per-frame test Dice, kept when the row is scored through ONNX Runtime (the
    # INT8 file's departure from the model it was exported from, frame by frame)
    fake_quant_per_image: np.ndarray | None = None
    dice_ci: tuple[float, float] | None = None
    delta_vs_float: float | None = None
    delta_ci: tuple[float, float] | None = None
    fp32_bytes: int | None = None
    int8_bytes: int | None = None
    packed_bytes: int | None = None
    latency_ms: float | None = None
    parity: dict = field(default_factory=dict)  # mask_dice, max_prob_diff, flip_fraction (as the exporter gives)
    epochs: str = ""  # "6/6" epochs done / planned
    command: str = ""
    settings: dict = field(default_factory=dict)  # a QAT run's config.toml (grid, epochs, ...), for like-for-like pairs
    note: str = ""
    export_status: str = ""  # QAT runs: "INT8 bundle", "INT8 export refused" (parity) or "not exported"
    layers: list = field(default_factory=list)  # bits.json "layers"
    sweep: dict | None = None  # threshold.json "sweep" (Dice etc. against T on validation)
    run_dir: Path | None = None


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, None when the file does not exist; InputError when it is not a JSON object."""
    return read_json_object(path, "JSON") if path.is_file() else None


def read_toml(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})") from None


def epochs_done(run_dir: Path) -> int:
    """Finished epochs: lines of metrics.jsonl (one per epoch, float and QAT runs alike)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def per_image_array(test_metrics: dict, names: list[str] | None) -> np.ndarray | None:
    """test_metrics.json's per-frame Dice in the split's frame order (None when it has none)."""
    per_image = test_metrics.get("per_image")
    if not isinstance(per_image, dict) or not per_image:
        return None
    if names is not None and set(names) <= set(per_image):
        return np.array([per_image[n] for n in names], dtype=np.float64)
    return np.array(list(per_image.values()), dtype=np.float64)


def summary_of(test_metrics: dict) -> dict:
    return {k: test_metrics[k] for k in ("dice", "iou", "pixel_accuracy", "pooled_dice", "images") if k in test_metrics}


def load_bundle(bundle_dir: Path) -> Manifest | None:
    """The bundle's manifest, verified (a bundle whose files fail their sha256 is not scored); None if absent."""
    if not (bundle_dir / MANIFEST_NAME).is_file():
        return None
    return load_manifest(bundle_dir, verify=True)


def file_bytes(manifest: Manifest, bundle_dir: Path, precision: str) -> int | None:
    entry = manifest.file(precision, "onnx")
    if entry is None:
        return None
    return entry.bytes or (bundle_dir / entry.path).stat().st_size


def cpu_int8_file(manifest: Manifest) -> str | None:
    """The INT8 graph ONNX Runtime CPU runs, chosen by the device runtime's own rule (`Manifest.file` with the
    backend): the CPU variant (u8 activations, zero point 128) when the bundle has one, else its INT8 graph."""
    entry = manifest.file("int8", "onnx", CPU_BACKEND)
    return entry.path if entry else None


def onnx_parameter_bytes(onnx_path: Path, float_bytes: int = 4) -> int:
    """Bytes of the graph's initializers at their stored type (int8 1, int32/float 4): the weights' size."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        total += count * (float_bytes if itemsize == 4 and init.data_type == onnx.TensorProto.FLOAT else itemsize)
    return total


def qat_kind(name: str, config: dict | None) -> str:
    """uniform (W = A bits), mixed (fixed W != A, e.g. w4a8) or learned, from the run's bits setting."""
    setting = str((config or {}).get("bits", name)).lower()
    match = UNIFORM_NAME.match(setting) or UNIFORM_NAME.match(name.lower())
    if setting.isdigit():
        return "uniform"
    if match:
        return "uniform" if match.group(1) == match.group(2) else "mixed"
    return "learned"


def qat_command(run_dir: Path, name: str, config: dict | None) -> str:
    """The command that makes this QAT run (from its config.toml), then its INT8 export."""
    config = config or {}
    bits = str(config.get("bits", name))
    parts = [f"nerveseg qat --run-dir {run_dir}", f"--bits {bits}"]
    if bits.startswith("learned"):  # the bit cost only acts where bits are learned (learned, learned-aN)
        parts.append(f"--bit-weight {config.get('bit_weight', 0.25):g}")
        if config.get("target_bits"):
            parts.append(f"--target-bits {config['target_bits']:g}")
        if config.get("initial_bits"):
            parts.append(f"--initial-bits {config['initial_bits']}")
        if config.get("bit_epochs"):  # explicit: --epochs alone would take the recipe's share, not the run's
            parts.append(f"--bit-epochs {config['bit_epochs']}")
    # runs from before the setting existed started from the maximum (0), which is no longer the default
    parts.append(f"--activation-percentile {config.get('activation_percentile', 0):g}")
    if config.get("grid", "tensorrt") != "tensorrt":
        parts.append(f"--grid {config['grid']}")
    if config.get("epochs"):
        parts.append(f"--epochs {config['epochs']}")
    # a fixed-bit run whose keep_start is not its bits' default (a run from before the setting had it off)
    if qat_kind(name, config) != "learned" and "bits" in config:
        keep_start = bool(config.get("keep_start", False))
        if keep_start != default_keep_start(parse_bits(bits)):
            parts.append("--keep-start" if keep_start else "--no-keep-start")
    parts.append(f"--name {name}")
    return " ".join(parts) + f" && nerveseg export --run-dir {run_dir} --qat {name}"


def qat_row(run_dir: Path, qat_dir: Path, names: list[str] | None, sweep_state: dict) -> Row:
    """A row from RUN/qat/NAME/: bits, threshold, test metrics, and its INT8 bundle where exported."""
    name = qat_dir.name
    config = read_toml(qat_dir / "config.toml")
    qat_config = (config or {}).get("qat", config) if config else None  # a [qat] table or flat keys
    state = sweep_state.get("runs", {}).get(name, {})
    row = Row(name=name, kind=qat_kind(name, qat_config), run_dir=qat_dir, settings=dict(qat_config or {}),
              command=state.get("command") or qat_command(run_dir, name, qat_config))
    planned = (qat_config or {}).get("epochs")
    row.epochs = f"{epochs_done(qat_dir)}/{planned}" if planned else str(epochs_done(qat_dir))
    bits = read_json(qat_dir / "bits.json")
    if bits:
        row.mean_weight_bits, row.mean_activation_bits = bits.get("mean_weight_bits"), bits.get("mean_activation_bits")
        row.layers = bits.get("layers", [])
    threshold = read_json(qat_dir / "threshold.json")
    if threshold:
        row.threshold, row.morphology, row.sweep = threshold.get("threshold"), threshold.get("morphology"), threshold.get("sweep")
    test = read_json(qat_dir / "test_metrics.json")
    if test is None:
        row.status = "incomplete"
        done = "training not finished" if not (qat_dir / "checkpoints" / "best.pt").is_file() else "not tuned/evaluated"
        row.note = f"no test_metrics.json ({done}, {row.epochs} epochs)"
        return row
    row.metrics, row.per_image = summary_of(test), per_image_array(test, names)
    row.fake_quant_per_image = row.per_image
    if test.get("selection", {}).get("chosen") == "start":  # qat.checkpoint.choose: validation kept the grid alone
        row.epochs += ", its start deployed"
    row.scored_by = "fake-quant (PyTorch)"
    bundle_dir = qat_dir / "bundle"
    manifest = load_bundle(bundle_dir)
    if manifest is None:
        row.note = state.get("export_error") or "not exported: scored as the fake-quant PyTorch model"
        row.export_status = "INT8 export refused" if state.get("export_refused_for") else "not exported"
        if row.layers:  # weights at their learned bits, no scales: what a packed export would hold at least
            row.packed_bytes = int(round(sum(layer.get("live_params", layer["params"]) * layer["weight_bits"]
                                             for layer in row.layers) / 8))
        return row
    fill_from_bundle(row, manifest, bundle_dir)
    row.export_status = "INT8 bundle"
    return row


def fill_from_bundle(row: Row, manifest: Manifest, bundle_dir: Path) -> None:
    """Sizes, parity, deployed T*/morphology and the CPU graph of an INT8 bundle."""
    row.threshold, row.morphology = manifest.threshold, manifest.morphology.to_dict()
    row.fp32_bytes = file_bytes(manifest, bundle_dir, "fp32")
    row.int8_bytes = file_bytes(manifest, bundle_dir, "int8")
    packed = (manifest.quantization or {}).get("packed_bytes")  # export.bundle.int8: weights at their bits + scales, biases
    row.packed_bytes = int(packed) if isinstance(packed, (int, float)) else None
    cpu_path = cpu_int8_file(manifest)
    # export.bundle.int8 keys parity by file name: the figures of the graph that is scored here
    row.parity = dict(manifest.metrics.get("parity", {}).get(cpu_path, {}))
    if cpu_path:
        row.onnx = bundle_dir / cpu_path
        row.scored_by = f"ONNX Runtime CPU, {cpu_path}"


def float_row(run_dir: Path, cfg, names: list[str] | None) -> tuple[Row, Manifest | None]:
    """The float FP32 model: its bundle's ONNX graph when exported, else the PyTorch test metrics."""
    test = read_json(run_dir / "test_metrics.json")
    if test is None:
        raise InputError(f"{run_dir / 'test_metrics.json'}: not found; the float run must be tuned and evaluated "
                         f"first ('nerveseg tune' and 'nerveseg evaluate --run-dir {run_dir}')")
    row = Row(name="float", kind="float", run_dir=run_dir, mean_weight_bits=32.0, mean_activation_bits=32.0,
              metrics=summary_of(test), per_image=per_image_array(test, names), scored_by="PyTorch FP32",
              command=float_command(run_dir, cfg), epochs=f"{epochs_done(run_dir)}/{cfg.epochs}")
    threshold = read_json(run_dir / "threshold.json")
    if threshold:
        row.threshold, row.morphology, row.sweep = threshold.get("threshold"), threshold.get("morphology"), threshold.get("sweep")
    bundle_dir = run_dir / "bundle"
    manifest = load_bundle(bundle_dir)
    if manifest is None:
        row.note = "no bundle: scored in PyTorch (run 'nerveseg export' for the ONNX figures)"
        return row, None
    row.threshold, row.morphology = manifest.threshold, manifest.morphology.to_dict()
    entry = manifest.file("fp32", "onnx")
    row.onnx = bundle_dir / entry.path
    row.scored_by = f"ONNX Runtime CPU, {entry.path}"
    row.fp32_bytes = file_bytes(manifest, bundle_dir, "fp32")
    row.packed_bytes = onnx_parameter_bytes(row.onnx)
    row.parity = dict(manifest.metrics.get("parity", {}).get("fp32", {}))
    return row, manifest


def float_command(run_dir: Path, cfg) -> str:
    """`nerveseg train` with the flags that differ from the recipe, then tune, evaluate, export."""
    from training.config import build_config

    try:
        recipe = build_config(cfg.recipe)
    except InputError:
        recipe = None
    flags = [f"--recipe {cfg.recipe}"]
    for key in ("data", "mask_label", "arch", "input_size", "pretrained", "epochs", "batch_size", "lr", "seed",
                "synth_count"):
        value = getattr(cfg, key)
        if recipe is not None and getattr(recipe, key) == value:
            continue
        if value in (None, ""):
            continue
        text = " ".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
        flags.append(f"--{key.replace('_', '-')} {text}")
    flags.append(f"--run-dir {run_dir}")
    steps = [f"nerveseg train {' '.join(flags)}"] + [f"nerveseg {s} --run-dir {run_dir}" for s in ("tune", "evaluate", "export")]
    return " && ".join(steps)


def ptq_row(run_dir: Path) -> Row | None:
    """ONNX Runtime's own quantize_static of the float graph, its best calibration, as RUN/ptq/ptq.json records it
    (export.report.ptq.cached_ptq_of_run: {"key", "best", "graphs": {method: {"path", "validation", "test"}}, "failed"})."""
    ptq_dir = run_dir / PTQ_DIR
    record = ptq_dir / "ptq.json"
    result = read_json(record)
    if result is None:
        return None
    try:
        best = result["best"]
        graphs = result["graphs"]
        graph = Path(graphs[best]["path"])
        validation = graphs[best]["validation"]
    except (KeyError, TypeError) as err:
        raise InputError(f"{record}: not a PTQ record of export.report.ptq (missing {err}); delete {ptq_dir} to redo it") from None
    if not graph.is_file():  # the run folder was moved: the graph sits beside ptq.json
        graph = ptq_dir / graph.name
    if not graph.is_file():
        raise InputError(f"{record}: names {graph.name}, which is missing; delete {ptq_dir} to redo it")
    frames = (result.get("key") or {}).get("frames", "")
    calibrations = ", ".join(f"{m} {g['validation']['dice']:.4f}" for m, g in graphs.items())
    failed = "; failed: " + ", ".join(result["failed"]) if result.get("failed") else ""
    return Row(name=f"ORT PTQ ({best})", kind="ptq", run_dir=ptq_dir, onnx=graph, mean_weight_bits=8.0,
               mean_activation_bits=8.0, threshold=validation.get("threshold"), morphology=validation.get("morphology"),
               scored_by=f"ONNX Runtime CPU, {PTQ_DIR}/{graph.name}", int8_bytes=graph.stat().st_size,
               packed_bytes=onnx_parameter_bytes(graph),
               command=f"python -m export.report.ptq --run-dir {run_dir} --out {ptq_dir} --frames {frames} (quantize_static "
                       "QDQ, per channel, u8 activations, s8 weights; best calibration by validation Dice)",
               note=f"validation Dice by calibration: {calibrations}{failed}")


def qat_rows(run_dir: Path, names: list[str] | None) -> list[Row]:
    qat_root = run_dir / "qat"
    if not qat_root.is_dir():
        return []
    state = read_json(run_dir / SWEEP_STATE) or {}
    folders = [p for p in sorted(qat_root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return [qat_row(run_dir, p, names, state) for p in folders]


def uniform_curve(rows: list[Row], x_of) -> list[Row]:
    """The uniform runs the uniform curve goes through, in x order: one per bitwidth, the plainly named one
    (w8a8 rather than w8a8-x86 or w8a8-p99.99, variants of the same bitwidth) where there is one."""
    chosen: dict[float, Row] = {}
    for row in sorted((r for r in rows if r.kind == "uniform" and r.status == "complete" and "dice" in r.metrics
                       and r.mean_weight_bits is not None and x_of(r) is not None), key=lambda r: r.name):
        plain = UNIFORM_NAME.match(row.name) is not None
        key = round(row.mean_weight_bits, 6)
        if key not in chosen or (plain and not UNIFORM_NAME.match(chosen[key].name)):
            chosen[key] = row
    return sorted(chosen.values(), key=x_of)


def sort_rows(rows: list[Row]) -> list[Row]:
    """float, PTQ, uniform by falling bits, mixed, learned by falling bits; incomplete rows last in their kind."""
    def key(row: Row):
        bits = row.mean_weight_bits if row.mean_weight_bits is not None else -1.0
        return (KINDS.index(row.kind), row.status != "complete", -bits, row.name)

    return sorted(rows, key=key)
