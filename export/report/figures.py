"""The report's figures (matplotlib, bare Figure objects on Agg: no pyplot state, safe headless).

Each function takes report rows and returns PNG bytes, which the report both embeds (base64, in the HTML)
and writes beside report.md. A figure with nothing to show (no learned run, no latency) is not made.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from .rows import Row, uniform_curve

STYLE = {  # kind -> (colour, marker, legend label)
    "float": ("black", "s", "float FP32"),
    "ptq": ("tab:orange", "D", "ORT PTQ (quantize_static, 8 bits)"),
    "uniform": ("tab:blue", "o", "uniform QAT (W = A bits)"),
    "mixed": ("tab:purple", "v", "uniform QAT (W != A)"),
    "learned": ("tab:red", "*", "learned bits"),
}


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _yerr(rows: list[Row]) -> np.ndarray | None:
    """Asymmetric error bars from the bootstrap intervals (zero where a row has none)."""
    low = [r.metrics["dice"] - r.dice_ci[0] if r.dice_ci else 0.0 for r in rows]
    high = [r.dice_ci[1] - r.metrics["dice"] if r.dice_ci else 0.0 for r in rows]
    return np.array([low, high])


def _scored(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.status == "complete" and "dice" in r.metrics]


def _float_line(ax, rows: list[Row]) -> None:
    float_row = next((r for r in rows if r.kind == "float" and "dice" in r.metrics), None)
    if float_row is None:
        return
    ax.axhline(float_row.metrics["dice"], color="black", linestyle="--", linewidth=1,
               label=f"float FP32 (Dice {float_row.metrics['dice']:.3f})")
    if float_row.dice_ci:
        ax.axhspan(*float_row.dice_ci, color="0.85", alpha=0.5, zorder=0, label="float 95 % interval")


def _points(ax, rows: list[Row], x_of, kinds, connect: bool = False) -> None:
    """One error-bar series per kind; `connect` draws the uniform curve (one run per bitwidth: report_data.
    uniform_curve) through its points in x order."""
    for kind in kinds:
        group = [r for r in rows if r.kind == kind and x_of(r) is not None]
        if not group:
            continue
        group.sort(key=x_of)
        colour, marker, label = STYLE[kind]
        ax.errorbar([x_of(r) for r in group], [r.metrics["dice"] for r in group], yerr=_yerr(group),
                    color=colour, marker=marker, markersize=10 if marker == "*" else 6, capsize=3,
                    linestyle="none", label=label)
        if connect and kind == "uniform":
            curve = uniform_curve(group, x_of)
            ax.plot([x_of(r) for r in curve], [r.metrics["dice"] for r in curve], color=colour, linewidth=1.5)
        for r in group:
            ax.annotate(r.name, (x_of(r), r.metrics["dice"]), textcoords="offset points", xytext=(5, 5), fontsize=7,
                        color=colour)


def dice_vs_bits(rows: list[Row]) -> bytes | None:
    """Dice against mean weight bits: the uniform curve, learned points, PTQ point, float line, 95 % bars."""
    rows = _scored(rows)
    quantized = [r for r in rows if r.kind != "float" and r.mean_weight_bits is not None]
    if not rows:
        return None
    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.add_subplot()
    _float_line(ax, rows)
    # PTQ sits at 8 bits like W8A8: drawn 0.12 bit to the right so the two error bars stay readable
    dodge = {"ptq": 0.12}
    _points(ax, quantized, lambda r: r.mean_weight_bits + dodge.get(r.kind, 0.0), ("uniform", "mixed", "ptq", "learned"),
            connect=True)
    ax.set(xlabel="mean weight bits (parameter-weighted)", ylabel="test Dice (as deployed)",
           title="Test Dice against weight bits (error bars: bootstrap 95 % interval over test frames)")
    bits = [r.mean_weight_bits for r in quantized] + [2.0, 8.0]  # always show the 2..8-bit range
    ax.set_xlim(min(bits) - 0.5, max(bits) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _size_of(row: Row) -> float | None:
    size = row.packed_bytes or row.int8_bytes or row.fp32_bytes
    return size / 1e6 if size else None


def dice_vs_size(rows: list[Row]) -> bytes | None:
    """Dice against the packed model size (weights at their bits), log scale."""
    rows = [r for r in _scored(rows) if _size_of(r) is not None]
    if not rows:
        return None
    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.add_subplot()
    _points(ax, rows, _size_of, ("float", "uniform", "mixed", "ptq", "learned"), connect=True)
    ax.set_xscale("log")
    ax.set(xlabel="packed model size, MB (weights at their bits; log scale)", ylabel="test Dice (as deployed)",
           title="Test Dice against model size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def dice_vs_latency(rows: list[Row], threads: int) -> bytes | None:
    """Dice against ONNX Runtime CPU latency (median, batch 1)."""
    rows = [r for r in _scored(rows) if r.latency_ms is not None]
    if not rows:
        return None
    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.add_subplot()
    _points(ax, rows, lambda r: r.latency_ms, ("float", "uniform", "mixed", "ptq", "learned"))
    ax.set(xlabel=f"ONNX Runtime CPU latency, ms (median, batch 1, {threads} threads)",
           ylabel="test Dice (as deployed)", title="Test Dice against latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def layer_bits(row: Row) -> bytes | None:
    """Per-layer weight and activation bits of one run, a bar pair per convolution, named as in the model."""
    if not row.layers:
        return None
    names = [layer["name"] for layer in row.layers]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(8.0, 0.22 * len(names) + 2), 5.2), dpi=110)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [layer["weight_bits"] for layer in row.layers], width=0.4, color="tab:blue", label="weights")
    ax.bar(x + 0.2, [layer["activation_bits"] for layer in row.layers], width=0.4, color="tab:green",
           label="input activations")
    ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax.set_yticks(range(0, 9))
    ax.set_ylim(0, 8.9)
    mean = f"mean W {row.mean_weight_bits:.2f} / A {row.mean_activation_bits:.2f} bits" \
        if row.mean_weight_bits is not None and row.mean_activation_bits is not None else ""
    ax.set(ylabel="bits", title=f"{row.name}: bits per layer ({mean})")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def threshold_curves(rows: list[Row]) -> bytes | None:
    """Validation Dice against threshold T of float, W8A8 and the learned runs, T* marked on each."""
    chosen = [r for r in rows if r.sweep and (r.kind in ("float", "learned") or r.name.lower() == "w8a8")]
    if not chosen:
        return None
    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.add_subplot()
    for i, row in enumerate(chosen):
        t, dice = np.asarray(row.sweep["thresholds"]), np.asarray(row.sweep["dice"])
        colour = "black" if row.kind == "float" else "tab:blue" if row.kind == "uniform" else f"C{3 + i}"
        ax.plot(t, dice, color=colour, label=f"{row.name} (T* = {row.sweep['best_threshold']:.2f})")
        k = int(row.sweep["best_index"])
        ax.plot([t[k]], [dice[k]], marker="o", color=colour)
    ax.set(xlabel="threshold T", ylabel="validation Dice (before morphology)", xlim=(0, 1), ylim=(0, 1.02),
           title="Threshold curves (equation-4 sweep, validation split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    fig.tight_layout()
    return _png(fig)
