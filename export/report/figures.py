"""The report's figures (matplotlib, bare Figure objects on Agg: no pyplot state, safe headless).

Each function takes report rows and returns PNG bytes, which the report both embeds (base64, in the HTML)
and writes beside report.md. A figure with nothing to show (no learned run, no latency) is not made.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import Bbox, IdentityTransform

from .rows import Row, uniform_curve

STYLE = {  # kind -> (colour, marker, legend label)
    "float": ("black", "s", "float FP32"),
    "ptq": ("tab:orange", "D", "ORT PTQ (quantize_static, 8 bits)"),
    "uniform": ("tab:blue", "o", "uniform QAT (W = A bits)"),
    "mixed": ("tab:purple", "v", "uniform QAT (W != A)"),
    "learned": ("tab:red", "*", "learned bits"),
}
KINDS = ("float", "uniform", "mixed", "ptq", "learned")
KEY_LEFT = 0.64  # the legend and the table of points start here (a share of the figure's width), right of the axes
SCORED_LEGEND = ("filled: scored through ONNX Runtime (as deployed)", "hollow: the fake-quant PyTorch model (no INT8 "
                                                                      "bundle)")


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


def through_onnx(row: Row) -> bool:
    """Whether the row's Dice was measured through ONNX Runtime (as deployed), not on a PyTorch model."""
    return row.onnx is not None and row.scored_by.startswith("ONNX Runtime")


def _float_line(ax, rows: list[Row]) -> None:
    float_row = next((r for r in rows if r.kind == "float" and "dice" in r.metrics), None)
    if float_row is None:
        return
    ax.axhline(float_row.metrics["dice"], color="black", linestyle="--", linewidth=1,
               label=f"float FP32 (Dice {float_row.metrics['dice']:.3f})")
    if float_row.dice_ci:
        ax.axhspan(*float_row.dice_ci, color="0.85", alpha=0.5, zorder=0, label="float 95 % interval")


def _points(ax, rows: list[Row], x_of, kinds, connect: bool = False) -> list[tuple[float, float, Row]]:
    """One error-bar series per kind, filled where scored through ONNX Runtime and hollow where scored as the
    fake-quant model; `connect` draws the uniform curve (one run per bitwidth: report_data.uniform_curve) through
    its points in x order. Returns (x, y, row) of every point drawn."""
    drawn = []
    for kind in kinds:
        group = sorted((r for r in rows if r.kind == kind and x_of(r) is not None), key=x_of)
        if not group:
            continue
        colour, marker, label = STYLE[kind]
        for onnx, members in ((True, [r for r in group if through_onnx(r)]),
                              (False, [r for r in group if not through_onnx(r)])):
            if not members:
                continue
            ax.errorbar([x_of(r) for r in members], [r.metrics["dice"] for r in members], yerr=_yerr(members),
                        color=colour, marker=marker, markersize=11 if marker == "*" else 6, capsize=3,
                        linestyle="none", markerfacecolor=colour if onnx else "white", markeredgewidth=1.3,
                        label=label if onnx or not any(through_onnx(r) for r in group) else None)
        if connect and kind == "uniform":
            curve = uniform_curve(group, x_of)
            ax.plot([x_of(r) for r in curve], [r.metrics["dice"] for r in curve], color=colour, linewidth=1.5)
        drawn += [(x_of(r), r.metrics["dice"], r) for r in group]
    return drawn


def _key(fig: Figure, ax, drawn: list[tuple[float, float, Row]], numbers: dict[str, int],
         line: Row | None = None) -> None:
    """Beside the axes: the legend (kinds, and what filled and hollow markers mean), then the table of points
    (number, model, bits, Dice, how it was scored): the points carry only their numbers."""
    handles, labels = ax.get_legend_handles_labels()
    for text, face in zip(SCORED_LEGEND, ("0.3", "white")):
        handles.append(Line2D([], [], color="0.3", marker="o", markerfacecolor=face, linestyle="none"))
        labels.append(text)
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(KEY_LEFT - 0.005, 0.98), fontsize=7.5, frameon=False)
    listed = sorted([row for _, _, row in drawn] + ([line] if line else []), key=lambda r: numbers[r.name])
    width = max((len(row.name) for row in listed), default=5) + 1
    lines = [f"{'#':>2}  {'model':<{width}}{'W/A bits':>9}{'Dice':>7}  scored"]
    for row in listed:
        bits = (f"{row.mean_weight_bits:.2f}/{row.mean_activation_bits:.0f}"
                if row.kind != "float" and row.mean_weight_bits is not None else "32/32")
        scored = "ONNX" if through_onnx(row) else "fake-quant" if row.kind not in ("float", "ptq") else "PyTorch"
        scored += " (dashed line)" if row is line else ""
        lines.append(f"{numbers[row.name]:>2}  {row.name:<{width}}{bits:>9}{row.metrics['dice']:>7.3f}  {scored}")
    fig.text(KEY_LEFT, 0.50, "\n".join(lines), family="monospace", fontsize=7, va="top", ha="left")


def _candidates():
    """Label offsets in display pixels around a point: rings of 8 directions, nearest first."""
    for radius in (9, 16, 26, 40, 58, 80, 110):
        for angle in (45, 135, 315, 225, 90, 270, 0, 180):
            yield radius, radius * np.cos(np.radians(angle)), radius * np.sin(np.radians(angle))


def place_labels(fig: Figure, ax, drawn: list[tuple[float, float, Row]], numbers: dict[str, int]) -> list:
    """Each point's number beside it, where it overlaps no other label and no marker and stays inside the axes:
    the first free spot on rings around the point, joined to it by a thin line when not adjacent, else the
    nearest free spot anywhere in the axes. Returns the labels (matplotlib Text, placed in data coordinates)."""
    renderer = fig.canvas.get_renderer()
    to_pixels, to_data = ax.transData.transform, ax.transData.inverted().transform
    frame = ax.get_window_extent(renderer)
    taken = [Bbox.from_bounds(px - 6, py - 6, 12, 12) for px, py in (to_pixels((x, y)) for x, y, _ in drawn)]
    for x, _, row in drawn:  # the error bars too: a number on a bar reads as part of it
        if row.dice_ci:
            (left, low), (right, high) = to_pixels((x, row.dice_ci[0])), to_pixels((x, row.dice_ci[1]))
            taken.append(Bbox([[left - 5, low], [right + 5, high]]))
    grid = [(gx, gy) for gx in np.arange(frame.x0 + 8, frame.x1 - 8, 10)
            for gy in np.arange(frame.y0 + 8, frame.y1 - 8, 10)]
    texts = []
    for x, y, row in sorted(drawn, key=lambda d: numbers[d[2].name]):
        colour = STYLE[row.kind][0]
        px, py = to_pixels((x, y))
        spots = [(px + dx, py + dy, radius > 16) for radius, dx, dy in _candidates()]
        spots += [(gx, gy, True) for gx, gy in sorted(grid, key=lambda g: (g[0] - px) ** 2 + (g[1] - py) ** 2)]
        probe = ax.text(0, 0, str(numbers[row.name]), transform=IdentityTransform(), fontsize=8, fontweight="bold",
                        ha="center", va="center")
        for sx, sy, leader in spots:
            probe.set_position((sx, sy))
            box = probe.get_window_extent(renderer).expanded(1.15, 1.1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in taken):
                break
        else:
            probe.remove()
            continue  # an axes full of labels: the key beside the axes still lists the point
        probe.remove()
        taken.append(box)
        where = tuple(to_data((sx, sy)))
        texts.append(ax.text(*where, str(numbers[row.name]), fontsize=8, fontweight="bold", color=colour,
                             ha="center", va="center"))
        if leader:
            ax.annotate("", xy=(x, y), xytext=where, arrowprops=dict(arrowstyle="-", color=colour, linewidth=0.6,
                                                                     alpha=0.7, shrinkA=5, shrinkB=4))
    return texts


def _scatter(rows: list[Row], x_of, numbers: dict[str, int] | None, connect: bool, xlabel: str, title: str,
             float_line: bool = False, log_x: bool = False, xlim=None) -> tuple[Figure, list] | None:
    """Dice against x_of(row) with bootstrap error bars, points numbered as in the report's table, the legend and
    the table of points beside the axes; (figure, number labels), or None with nothing to show."""
    rows = [r for r in _scored(rows) if x_of(r) is not None]
    if not rows:
        return None
    numbers = numbers or {r.name: i + 1 for i, r in enumerate(rows)}
    fig = Figure(figsize=(12, max(5.0, 1.6 + 0.16 * len(rows))), dpi=110)
    FigureCanvasAgg(fig)  # a renderer to measure the labels with (still no pyplot state)
    ax = fig.add_axes((0.065, 0.11, KEY_LEFT - 0.1, 0.8))
    if float_line:
        _float_line(ax, rows)
    drawn = _points(ax, [r for r in rows if not float_line or r.kind != "float"], x_of,
                    [k for k in KINDS if not float_line or k != "float"], connect)
    if log_x:
        plain_log_axis(ax.xaxis)
        xlim = xlim or _log_limits([x for x, _, _ in drawn])
    if xlim:
        ax.set_xlim(*xlim)
    ax.set(xlabel=xlabel, ylabel="test Dice (mean over frames)", title=title)
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3, which="both")
    float_row = next((r for r in rows if r.kind == "float"), None) if float_line else None
    _key(fig, ax, drawn, numbers, float_row)
    fig.canvas.draw()  # fixes the layout: label places are measured on the final axes
    return fig, place_labels(fig, ax, drawn, numbers)


def plain_log_axis(axis) -> None:
    """A log axis labelled in plain numbers (0.5, 1, 2, 5, 10, not 5x10^-1 or 2x10^1)."""
    if axis.axis_name == "x":
        axis.axes.set_xscale("log")
    else:
        axis.axes.set_yscale("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _log_limits(values: list[float]) -> tuple[float, float]:
    """Limits of a log axis on the 1-2-5 values around `values`, so that labelled ticks sit at both ends."""
    steps = [m * 10.0 ** e for e in range(-3, 5) for m in (1, 2, 5)]
    low, high = min(values) / 1.15, max(values) * 1.15
    return max([s for s in steps if s <= low], default=low), min([s for s in steps if s >= high], default=high)


def dice_vs_bits(rows: list[Row], numbers: dict[str, int] | None = None) -> bytes | None:
    """Dice against mean weight bits: the uniform curve, learned points, PTQ point, float line, 95 % bars."""
    made = dice_vs_bits_figure(rows, numbers)
    return _png(made[0]) if made else None


def dice_vs_bits_figure(rows: list[Row], numbers: dict[str, int] | None = None):
    """dice_vs_bits as (Figure, number labels), or None: the float row is the dashed line (its x of 32 bits only
    keeps it among the rows the key lists)."""
    # PTQ sits at 8 bits like W8A8: drawn 0.12 bit to the right so the two error bars stay readable
    dodge = {"ptq": 0.12}
    quantized = [r for r in rows if r.kind != "float" and r.mean_weight_bits is not None]
    bits = [r.mean_weight_bits for r in quantized] + [2.0, 8.0]  # always show the 2..8-bit range
    return _scatter(rows, lambda r: 32.0 if r.kind == "float" else (r.mean_weight_bits + dodge.get(r.kind, 0.0)
                                                                     if r.mean_weight_bits is not None else None),
                    numbers, True, "mean weight bits (parameter-weighted)",
                    "Test Dice against weight bits (bars: bootstrap 95 % interval over test frames)", float_line=True,
                    xlim=(min(bits) - 0.5, max(bits) + 0.5))


def _size_of(row: Row) -> float | None:
    size = row.packed_bytes or row.int8_bytes or row.fp32_bytes
    return size / 1e6 if size else None


def dice_vs_size(rows: list[Row], numbers: dict[str, int] | None = None) -> bytes | None:
    """Dice against the packed model size (weights at their bits), log scale in plain numbers."""
    made = _scatter(rows, _size_of, numbers, True, "packed model size, MB (weights at their bits; log scale)",
                    "Test Dice against model size", log_x=True)
    return _png(made[0]) if made else None


def dice_vs_latency(rows: list[Row], threads: int, numbers: dict[str, int] | None = None) -> bytes | None:
    """Dice against ONNX Runtime CPU latency (median, batch 1)."""
    made = _scatter(rows, lambda r: r.latency_ms, numbers, False,
                    f"ONNX Runtime CPU latency, ms (median, batch 1, {threads} threads)", "Test Dice against latency")
    return _png(made[0]) if made else None


LAYERS_PER_STRIP = 36


def layer_bits(row: Row) -> bytes | None:
    """Per-layer weight and activation bits of one run as heat strips: a column per convolution in the model's
    order, named below it, its two cells (weights, input activations) coloured by bits and printed with them;
    the colour scale beside the strips, never over them."""
    if not row.layers:
        return None
    chunks = [row.layers[i:i + LAYERS_PER_STRIP] for i in range(0, len(row.layers), LAYERS_PER_STRIP)]
    longest = max(len(layer["name"]) for layer in row.layers)
    strip_height = 0.8 + 0.06 * longest  # the cells and the rotated names under them
    fig = Figure(figsize=(13.5, 0.7 + strip_height * len(chunks)), dpi=110)
    colours = colormaps["viridis"].resampled(7)  # one colour per bitwidth 2..8
    top = 1 - 0.45 / fig.get_figheight()
    height = (top - 0.02) / len(chunks)
    image = None
    for index, chunk in enumerate(chunks):
        cells = np.array([[layer["weight_bits"] for layer in chunk], [layer["activation_bits"] for layer in chunk]])
        ax = fig.add_axes((0.1, top - (index + 1) * height + height * (1 - 0.6 / strip_height), 0.8 * len(chunk) /
                           LAYERS_PER_STRIP, height * 0.6 / strip_height))
        image = ax.imshow(cells, cmap=colours, vmin=1.5, vmax=8.5, aspect="auto")
        for (r, c), bits in np.ndenumerate(cells):
            ax.text(c, r, str(int(bits)), ha="center", va="center", fontsize=8,
                    color="white" if bits < 6 else "black")
        ax.set_yticks([0, 1], ["weights", "activations"], fontsize=8)
        ax.set_xticks(range(len(chunk)), [layer["name"] for layer in chunk], rotation=90, fontsize=7)
        ax.tick_params(length=0)
    mean = (f"mean W {row.mean_weight_bits:.2f} / A {row.mean_activation_bits:.2f} bits"
            if row.mean_weight_bits is not None and row.mean_activation_bits is not None else "")
    fig.suptitle(f"{row.name}: bits per layer, in the model's order ({mean})", fontsize=10,
                 y=1 - 0.12 / fig.get_figheight())
    bar = fig.colorbar(image, cax=fig.add_axes((0.93, 0.25, 0.012, 0.5)), ticks=range(2, 9))
    bar.set_label("bits", fontsize=8)
    return _png(fig)


def threshold_curves(rows: list[Row]) -> bytes | None:
    """Validation Dice against threshold T of float, W8A8 and the learned runs, T* marked on each."""
    chosen = [r for r in rows if r.sweep and (r.kind in ("float", "learned") or r.name.lower() == "w8a8")]
    if not chosen:
        return None
    fig = Figure(figsize=(10, 5), dpi=110)
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
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # beside the curves, not on them
    fig.tight_layout()
    return _png(fig)
