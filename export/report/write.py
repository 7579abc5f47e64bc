"""`nerveseg report`: the accuracy-vs-bitwidth report of one float run and everything quantized from it.

Reads what exists under RUN (the float run and its bundle, RUN/ptq/, RUN/qat/*/ and their INT8 bundles),
scores every exported graph on the test split through ONNX Runtime CPU as the device runs it, times them all
in one interleaved run, and writes RUN/report/:

    report.html   one self-contained page (figures embedded as base64 PNG), opens offline
    report.md     the same tables, figures beside it in figures/
    results.csv   one row per model
    results.json  the same rows (strict JSON: no NaN) with each row's per-frame test Dice (in `test_names`'
                  order, so runs of several float models, e.g. the folds of `nerveseg cv-quant`, can be pooled),
                  plus the machine, libraries and dataset

The folder is built aside and swapped in by renames (device_runtime.core.fileio.atomic_dir), so an existing report
is replaced whole or not at all.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import atomic_dir, write_text
from training.config import load_run_config
from training.data.dataset import load_split
from training.stages import split_arrays

from . import figures
from .page import numbered, render_html, render_markdown
from .rows import Row, float_row, ptq_row, qat_rows, sort_rows, uniform_curve
from .ptq_row import ensure_ptq
from ..bundle.latency import interleaved_latency
from .measure import onnx_test_scores
from .stats import LEVEL, mean_ci, paired_diff_ci

REPORT_DIR = "report"
LIBRARIES = ("torch", "torchvision", "onnx", "onnxruntime", "numpy", "opencv-python-headless", "matplotlib")

CSV_KEYS = ["name", "kind", "status", "scored_by", "mean_weight_bits", "mean_activation_bits", "dice", "dice_ci_low",
            "dice_ci_high", "delta_dice_vs_float", "delta_ci_low", "delta_ci_high", "iou", "pixel_accuracy",
            "pooled_dice", "test_frames", "threshold", "fp32_bytes", "int8_bytes", "packed_bytes", "latency_ms",
            "latency_threads", "parity_mask_dice", "parity_max_prob_diff", "parity_flip_fraction", "epochs",
            "export_status", "command", "note"]
FLIP_KEYS = ("flipped_fraction",)  # export.bundle.parity.compare: share of pixels whose final label differs


# ------------------------------------------------------------------------------------------------ rows


def collect(run_dir: Path, threads: int = 2, latency_runs: int = 50, make_ptq: bool = True) -> tuple[list[Row], dict]:
    """Every row, scored and timed; and the context (config, dataset, notes) the page prints around them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder not found")
    cfg = load_run_config(run_dir)
    images, masks, names = split_arrays(run_dir, "test", cfg)
    float_model, manifest = float_row(run_dir, cfg, names)
    rows = [float_model]
    notes = []
    if make_ptq:
        try:
            ensure_ptq(run_dir)
        except ImportError:  # export.report.ptq comes with the INT8 export (branch int8)
            notes.append("export.report.ptq is not available in this checkout: no PTQ baseline was made.")
    ptq = ptq_row(run_dir)
    if ptq is not None:
        if ptq.threshold is None:  # PTQ of the float graph keeps the float model's T* and clean-up
            ptq.threshold, ptq.morphology = float_model.threshold, float_model.morphology
        rows.append(ptq)
    quantized = qat_rows(run_dir, names)
    rows += quantized
    if not quantized:
        notes.append(f"No QAT runs under {run_dir / 'qat'}: this report holds the float model and ONNX Runtime's PTQ "
                     f"only. Run 'nerveseg sweep --run-dir {run_dir}' for the quantized rows.")
    if ptq is None:
        notes.append(f"No ONNX Runtime PTQ baseline ({run_dir / 'ptq' / 'ptq.json'} missing): "
                     "it needs the float bundle (nerveseg export).")
    incomplete = [r.name for r in rows if r.status != "complete"]
    if incomplete:
        notes.append(f"Incomplete (listed, not scored): {', '.join(incomplete)}.")

    if manifest is not None:
        for row in rows:
            if row.onnx is None or row.status != "complete" or row.threshold is None:
                continue
            try:
                metrics, per_image = onnx_test_scores(row.onnx, manifest, images, masks, row.threshold,
                                                      row.morphology or {}, threads)
            except InputError as err:
                row.note = f"ONNX Runtime could not run it ({err}); scored as fake-quant"
                row.onnx, row.scored_by = None, "fake-quant (PyTorch)"
                continue
            row.metrics = {k: metrics[k] for k in ("dice", "iou", "pixel_accuracy", "pooled_dice", "images")}
            row.per_image = np.asarray(per_image, dtype=np.float64)
        timed = {r.name: r.onnx for r in rows if r.onnx is not None and r.status == "complete"}
        if timed and latency_runs > 0:
            # all models in one interleaved run: on a shared, noisy machine a slow minute hurts every model alike
            timing = interleaved_latency(timed, tuple(cfg.input_size), threads, rounds=latency_runs)
            for name, measured in timing.items():
                next(r for r in rows if r.name == name).latency_ms = measured["median_ms"]
    add_intervals(rows)
    rows = sort_rows(rows)
    context = {"cfg": cfg, "notes": notes, "threads": threads, "latency_runs": latency_runs,
               "test_frames": len(names), "test_names": list(names), "run_dir": run_dir}
    return rows, context


def add_intervals(rows: list[Row]) -> None:
    """Bootstrap 95 % interval of each row's mean Dice, and of its paired difference from the float model."""
    reference = next((r for r in rows if r.kind == "float"), None)
    for row in rows:
        if row.per_image is None or not len(row.per_image):
            continue
        row.dice_ci = mean_ci(row.per_image)
        if reference is None or row is reference or reference.per_image is None:
            continue
        if reference.per_image.shape == row.per_image.shape:
            row.delta_vs_float = float(row.per_image.mean() - reference.per_image.mean())
            row.delta_ci = paired_diff_ci(row.per_image, reference.per_image)


def row_record(row: Row, threads: int) -> dict:
    """The flat record of results.csv/json (None where a value does not exist)."""
    m = row.metrics
    flip = next((row.parity[k] for k in FLIP_KEYS if k in row.parity), None)
    record = {
        "name": row.name, "kind": row.kind, "status": row.status, "scored_by": row.scored_by,
        "mean_weight_bits": row.mean_weight_bits, "mean_activation_bits": row.mean_activation_bits,
        "dice": m.get("dice"), "dice_ci_low": row.dice_ci[0] if row.dice_ci else None,
        "dice_ci_high": row.dice_ci[1] if row.dice_ci else None, "delta_dice_vs_float": row.delta_vs_float,
        "delta_ci_low": row.delta_ci[0] if row.delta_ci else None,
        "delta_ci_high": row.delta_ci[1] if row.delta_ci else None,
        "iou": m.get("iou"), "pixel_accuracy": m.get("pixel_accuracy"), "pooled_dice": m.get("pooled_dice"),
        "test_frames": m.get("images"), "threshold": row.threshold, "fp32_bytes": row.fp32_bytes,
        "int8_bytes": row.int8_bytes, "packed_bytes": row.packed_bytes, "latency_ms": row.latency_ms,
        "latency_threads": threads if row.latency_ms is not None else None,
        "parity_mask_dice": row.parity.get("mask_dice"), "parity_max_prob_diff": row.parity.get("max_prob_diff"),
        "parity_flip_fraction": flip, "epochs": row.epochs, "export_status": row.export_status,
        "command": row.command, "note": row.note,
    }
    return {k: _plain(v) for k, v in record.items()}


def _plain(value):
    """JSON-safe: numpy scalars to Python, NaN/inf to None (results.json is strict JSON)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------------ checks


def uniform_curve_at(rows: list[Row], bits: float) -> float | None:
    """Dice of the uniform (W = A) curve at `bits` by linear interpolation; None outside its range."""
    points = [(r.mean_weight_bits, r.metrics["dice"]) for r in uniform_curve(rows, lambda r: r.mean_weight_bits)]
    if len(points) < 1 or not points[0][0] - 1e-9 <= bits <= points[-1][0] + 1e-9:
        return None
    xs, ys = zip(*points)
    return float(np.interp(bits, xs, ys))


# what makes a run learned or fixed, or names it: not a difference of schedule or grid between two runs
BITS_SETTINGS = {"name", "run_dir", "bits", "bit_weight", "activation_bit_weight", "target_bits", "initial_bits",
                 "lr_bits", "bit_epochs", "b_min", "b_max"}


def settings_apart(a: Row, b: Row) -> int:
    """How many QAT settings besides the bits differ (grid, epochs, learning rates, ...): among fixed-bits runs
    equally near a learned run's bits, the like-for-like one (the same schedule and grid) is its comparison."""
    keys = (set(a.settings) | set(b.settings)) - BITS_SETTINGS
    return sum(a.settings.get(key) != b.settings.get(key) for key in keys)


def paired_interval(row: Row, other: Row) -> tuple[float, float] | None:
    """The 95 % interval of row's Dice minus other's, paired by frame; None where either has no per-frame Dice."""
    if row.per_image is None or other.per_image is None or row.per_image.shape != other.per_image.shape:
        return None
    return paired_diff_ci(row.per_image, other.per_image)


def within_margin(delta: float, interval: tuple[float, float] | None, margin: float) -> str:
    """Is a row within `margin` Dice of float? The paired interval's answer, in three states, as the learned run's
    line against its neighbour reads it: a point estimate near the margin would say yes on one seed and no on the
    next (the demo's W8A8 at -0.0048 and -0.0051) where the frames cannot tell either. Point estimates decide only
    where the frames do not pair, and the words say so."""
    edge = -margin - 1e-9  # a difference of means that is the margin to the last printed digit counts as within
    if interval is None:
        return f"{'within' if delta >= edge else 'NOT within'} {margin:g} by its point estimate (no paired frames)"
    low, high = interval
    if low >= edge:
        return f"WITHIN {margin:g}: the whole interval is above -{margin:g}"
    if high < edge:
        return f"NOT WITHIN {margin:g}: the whole interval is below -{margin:g}"
    return f"UNDECIDED at {margin:g}: the interval reaches both sides of -{margin:g}"


def checks(rows: list[Row]) -> list[str]:
    """The issue's claims, tested on these rows; each line says yes or no with its numbers."""
    lines = []
    complete = [r for r in rows if r.status == "complete" and "dice" in r.metrics]
    reference = next((r for r in complete if r.kind == "float"), None)
    # fixed-bits runs (W = A, or WxAy such as W4A8), the comparison for a learned run with the same activations
    fixed = [r for r in complete if r.kind in ("uniform", "mixed") and r.mean_weight_bits is not None]
    for row in (r for r in complete if r.kind == "learned" and r.mean_weight_bits is not None):
        same_activations = [r for r in fixed if r.mean_activation_bits == row.mean_activation_bits]
        if not same_activations:
            lines.append(f"{row.name}: no fixed-bits run with its activation bits to compare with.")
            continue
        curve = uniform_curve_at(rows, row.mean_weight_bits)
        if curve is None:  # e.g. 3.9 bits beside W4A8 and W8A8: no curve there, the nearest run still compares
            text = (f"{row.name}: Dice {row.metrics['dice']:.4f} at {row.mean_weight_bits:.2f} weight bits, outside "
                    "the uniform runs' range (no curve value there)")
        else:
            verdict = "ON OR ABOVE" if row.metrics["dice"] >= curve else "BELOW"
            text = (f"{row.name}: Dice {row.metrics['dice']:.4f} at {row.mean_weight_bits:.2f} weight bits is {verdict} "
                    f"the uniform curve there ({curve:.4f}, {row.metrics['dice'] - curve:+.4f})")
        nearest = min(same_activations, key=lambda r: (abs(r.mean_weight_bits - row.mean_weight_bits),
                                                       settings_apart(r, row)))
        paired, interval = "", paired_interval(row, nearest)
        if interval is not None:
            # the verdict is the paired interval's: a point estimate inside it would flip with the test frames drawn
            low, high = interval
            verdict = "ABOVE" if low > 0 else "BELOW" if high < 0 else "LEVEL WITH"
            paired = (f", paired difference {row.per_image.mean() - nearest.per_image.mean():+.4f} "
                      f"(95 % CI [{low:+.4f}, {high:+.4f}])")
        else:  # no frames to pair: the point estimates alone
            verdict = "AT LEAST AS GOOD AS" if row.metrics["dice"] >= nearest.metrics["dice"] else "BELOW"
        text += (f"; {verdict} the fixed-bits run with the nearest mean weight bits, {nearest.name} "
                 f"({nearest.mean_weight_bits:.2f} bits, Dice {nearest.metrics['dice']:.4f}){paired}")
        lines.append(text + ".")
    if reference is not None and any(r.kind == "learned" for r in rows):
        small = [r for r in complete if r.kind == "learned" and r.mean_weight_bits is not None
                 and r.mean_weight_bits <= 4.0]
        if not small:
            lines.append("Learned run(s) with mean weight bits <= 4.0 within 0.01 Dice of float: NO, no complete learned "
                         "run reached <= 4.0 mean weight bits.")
        for row in small:
            delta = row.metrics["dice"] - reference.metrics["dice"]
            lines.append(f"Learned run {row.name} ({row.mean_weight_bits:.2f} mean weight bits), Dice "
                         f"{row.metrics['dice']:.4f} against float {reference.metrics['dice']:.4f}: {delta:+.4f}"
                         f"{_interval_text(row.delta_ci)}; {within_margin(delta, row.delta_ci, 0.01)}.")
    if reference is not None:
        eight_bit = (r for r in complete if r.kind == "uniform" and r.mean_weight_bits == 8.0
                     and r.mean_activation_bits == 8.0)  # w8a8 and its variants (e.g. another initialisation)
        for row in eight_bit:
            delta = row.metrics["dice"] - reference.metrics["dice"]
            # the paired interval against float that add_intervals put on the row (None where frames do not pair)
            lines.append(f"{row.name}: {delta:+.4f} Dice vs float{_interval_text(row.delta_ci)}; "
                         f"{within_margin(delta, row.delta_ci, 0.005)}.")
    return lines


def _interval_text(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f", paired 95 % CI [{interval[0]:+.4f}, {interval[1]:+.4f}]"


# ------------------------------------------------------------------------------------------------ context


def environment(threads: int) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "os": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "libraries": versions,
            "onnxruntime_threads": threads}


def dataset(run_dir: Path, cfg) -> dict:
    splits = load_split(run_dir / "split.json")
    return {"source": cfg.data or "synthetic phantom (nerveseg synth)", "mask_label": cfg.mask_label,
            "input_size": list(cfg.input_size), "architecture": cfg.arch, "recipe": cfg.recipe, "seed": cfg.seed,
            "frames": {side: len(samples) for side, samples in splits.items()}}


# ------------------------------------------------------------------------------------------------ writers


def results_csv(records: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_KEYS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if record[k] is None else record[k] for k in CSV_KEYS})
    return buffer.getvalue()


def make_figures(rows: list[Row], threads: int) -> list[tuple[str, str, bytes]]:
    """(file name, caption, PNG bytes) of every figure that has something to show; points numbered as the rows."""
    numbers = numbered(rows)
    made = [
        ("dice_vs_bits.png", "Test Dice against mean weight bits (uniform curve through one run per bitwidth, learned "
                             "points, ORT PTQ, float line; bootstrap 95 % intervals)",
         figures.dice_vs_bits(rows, numbers)),
        ("dice_vs_size.png", "Test Dice against packed model size", figures.dice_vs_size(rows, numbers)),
        ("dice_vs_latency.png", f"Test Dice against ONNX Runtime CPU latency ({threads} threads)",
         figures.dice_vs_latency(rows, threads, numbers)),
        ("threshold_curves.png", "Validation Dice against threshold: float, W8A8 and learned runs",
         figures.threshold_curves(rows)),
    ]
    for row in rows:
        if row.kind == "learned":
            made.append((f"bits_{row.name}.png", f"Bits per layer of {row.name} (#{numbers[row.name]})",
                         figures.layer_bits(row)))
    return [(name, caption, png) for name, caption, png in made if png is not None]


def _listed(per_image: np.ndarray | None) -> list[float] | None:
    return None if per_image is None else per_image.tolist()


def write_report(run_dir: str | Path, threads: int = 2, latency_runs: int = 50, make_ptq: bool = True) -> Path:
    """Collect, score, time, and write RUN/report/ (replacing an old one whole); returns the folder."""
    run_dir = Path(run_dir)
    rows, context = collect(run_dir, threads, latency_runs, make_ptq)
    cfg = context["cfg"]
    env, data = environment(threads), dataset(run_dir, cfg)
    numbers = numbered(rows)
    records = [row_record(r, threads) for r in rows]
    shown = [{**record, "number": numbers[row.name]} for row, record in zip(rows, records)]
    figs = make_figures(rows, threads)
    check_lines = checks(rows)
    notes = list(context["notes"])
    notes.append(f"Dice, IoU, PA: mean over {context['test_frames']} test frames at each model's own T* and morphology; "
                 f"95 % intervals by bootstrap over frames ({int(LEVEL * 100)} %, paired for differences). Latency: "
                 f"median of {latency_runs} batch-1 runs on ONNX Runtime CPU with {threads} intra-op threads, all "
                 "models interleaved in one run. Rows scored through ONNX Runtime ran the graph the device runs; "
                 "'fake-quant' rows (no INT8 bundle) were scored as the PyTorch fake-quant model.")
    commands = [(r.name, r.command) for r in rows if r.command]
    title = f"nerveseg accuracy vs bitwidth: {run_dir.name} ({cfg.recipe} recipe, {cfg.arch})"
    page = render_html(title, shown, figs, check_lines, notes, commands, env, data)
    markdown = render_markdown(title, shown, figs, check_lines, notes, commands, env, data)
    results = {"run_dir": str(run_dir), "machine": env, "dataset": data, "notes": notes, "checks": check_lines,
               "test_names": context["test_names"],
               "rows": [dict(record, per_image_dice=_listed(row.per_image),
                             fake_quant_per_image_dice=_listed(row.fake_quant_per_image))
                        for row, record in zip(rows, records)]}
    out = run_dir / REPORT_DIR
    with atomic_dir(out, replace=True) as staging:
        (staging / "figures").mkdir()
        for name, _, png in figs:
            (staging / "figures" / name).write_bytes(png)
        write_text(staging / "report.html", page)
        write_text(staging / "report.md", markdown)
        write_text(staging / "results.csv", results_csv(records))
        write_text(staging / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    print_table(rows, threads)
    for line in check_lines:
        print(line)
    return out


def print_table(rows: list[Row], threads: int) -> None:
    """The short console table: the columns a reader compares first."""
    width = max([22] + [len(row.name) + 1 for row in rows])  # a long run name keeps the columns aligned
    print(f"{'model':<{width}}{'W bits':>7}{'A bits':>7}{'Dice':>8}{'95% CI':>17}{'dDice':>9}{'T*':>6}{'INT8 MB':>9}"
          f"{'packed MB':>10}{f'ms ({threads}t)':>9}  scored by")
    for row in rows:
        r = row_record(row, threads)

        def f(key, fmt):
            return fmt.format(r[key]) if r[key] is not None else "–"

        ci = f"[{row.dice_ci[0]:.3f},{row.dice_ci[1]:.3f}]" if row.dice_ci else "–"
        int8 = f"{r['int8_bytes'] / 1e6:.2f}" if r["int8_bytes"] else "–"
        packed = f"{r['packed_bytes'] / 1e6:.2f}" if r["packed_bytes"] else "–"
        print(f"{row.name:<{width}}{f('mean_weight_bits', '{:.2f}'):>7}{f('mean_activation_bits', '{:.2f}'):>7}"
              f"{f('dice', '{:.4f}'):>8}{ci:>17}{f('delta_dice_vs_float', '{:+.4f}'):>9}{f('threshold', '{:.2f}'):>6}"
              f"{int8:>9}{packed:>10}"
              f"{f('latency_ms', '{:.1f}'):>9}  {row.scored_by or row.status + ': ' + row.note}")
