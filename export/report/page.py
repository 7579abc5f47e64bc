"""The report's page (report.html) and its markdown twin: what a reader compares first in a table that fits a
laptop's window (1400 pixels), the rest of each row in a second, folded table; figures; the machine as a table.

Each row carries a number (#) that the figures print beside its point, and says how it was scored: through ONNX
Runtime (INT8 or FP32, as deployed) or as the fake-quant PyTorch model (a QAT run without an INT8 bundle).
"""

from __future__ import annotations

import base64
import html

from .rows import Row

CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1340px}
table{border-collapse:collapse;font-size:13px;margin:.6em 0}
th,td{border:1px solid #bbb;padding:3px 7px;text-align:right}
th{background:#eee;position:sticky;top:0}td.l,th.l{text-align:left}td.note{text-align:left;max-width:520px}
tr.refused td{background:#fff4e5}details{margin:.6em 0}summary{cursor:pointer;font-weight:600}
.figs{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;flex:0 1 100%}
figcaption{font-size:13px;color:#444}img{max-width:100%;border:1px solid #ddd}
code{font-size:12px;background:#f4f4f4;padding:1px 3px}li{margin:.25em 0}"""

# (header, left-aligned, cell of a row's record) of the table a reader compares first
MAIN = [
    ("#", False, lambda r: str(r["number"])),
    ("model", True, lambda r: r["name"]),
    ("W / A bits", False, lambda r: _bits(r)),
    ("test Dice [95 % CI]", False, lambda r: _with_ci(r["dice"], r["dice_ci_low"], r["dice_ci_high"], "{:.3f}")),
    ("Δ vs float [95 % CI]", False, lambda r: _with_ci(r["delta_dice_vs_float"], r["delta_ci_low"], r["delta_ci_high"],
                                                      "{:+.3f}")),
    ("pooled Dice", False, lambda r: _number(r["pooled_dice"], "{:.3f}")),
    ("packed MB", False, lambda r: _number(r["packed_bytes"], "{:.2f}", 1e-6)),
    ("latency ms", False, lambda r: _number(r["latency_ms"], "{:.1f}")),
    ("scored through", True, lambda r: scored_through(r)),
    ("status", True, lambda r: status_text(r)),
]
# the rest of each row, folded under the main table
DETAILS = [
    ("#", False, lambda r: str(r["number"])),
    ("model", True, lambda r: r["name"]),
    ("kind", True, lambda r: r["kind"]),
    ("IoU", False, lambda r: _number(r["iou"], "{:.4f}")),
    ("PA", False, lambda r: _number(r["pixel_accuracy"], "{:.4f}")),
    ("frames", False, lambda r: _number(r["test_frames"], "{}")),
    ("T*", False, lambda r: _number(r["threshold"], "{:.2f}")),
    ("FP32 MB", False, lambda r: _number(r["fp32_bytes"], "{:.2f}", 1e-6)),
    ("INT8 MB", False, lambda r: _number(r["int8_bytes"], "{:.2f}", 1e-6)),
    ("parity mask Dice", False, lambda r: _number(r["parity_mask_dice"], "{:.4f}")),
    ("parity max |dp|", False, lambda r: _number(r["parity_max_prob_diff"], "{:.1e}")),
    ("pixels flipped", False, lambda r: _number(r["parity_flip_fraction"], "{:.1e}")),
    ("epochs", False, lambda r: r["epochs"] or "–"),
    ("graph scored", True, lambda r: r["scored_by"] or "–"),
    ("note", True, lambda r: r["note"] or ""),
]


def _number(value, fmt: str, scale: float = 1.0) -> str:
    return "–" if value is None or value == "" else fmt.format(value * scale if scale != 1.0 else value)


def _with_ci(value, low, high, fmt: str) -> str:
    if value is None:
        return "–"
    text = fmt.format(value)
    return text if low is None else f"{text} [{fmt.format(low)}, {fmt.format(high)}]"


def _bits(record: dict) -> str:
    w, a = record["mean_weight_bits"], record["mean_activation_bits"]
    if w is None:
        return "–"
    return f"{w:.0f} / {a:.0f}" if float(w).is_integer() and float(a).is_integer() else f"{w:.2f} / {a:.2f}"


def scored_through(record: dict) -> str:
    """How the row's Dice was measured, in words a reader can act on."""
    by = record["scored_by"] or ""
    if by.startswith("ONNX Runtime"):
        return "ONNX Runtime INT8" if record["kind"] != "float" else "ONNX Runtime FP32"
    if by.startswith("fake-quant"):
        return "fake-quant model (PyTorch)"
    return by or "–"


def status_text(record: dict) -> str:
    """complete or incomplete, and for a QAT run what became of its INT8 export (a refused one said here, beside
    the status it qualifies, not at the end of a wide table)."""
    if record["status"] != "complete":
        return "incomplete (see details)"
    return f"complete, {record['export_status']}" if record.get("export_status") else "complete"


def scoring_sentence(records: list[dict]) -> str:
    """One sentence naming the rows scored through ONNX Runtime INT8 and those scored as the fake-quant model."""
    onnx = [r["name"] for r in records if scored_through(r) == "ONNX Runtime INT8"]
    fake = [r["name"] for r in records if scored_through(r).startswith("fake-quant")]
    parts = []
    if onnx:
        parts.append(f"through ONNX Runtime's INT8 graph, as deployed: {', '.join(onnx)}")
    if fake:
        parts.append(f"as the fake-quant PyTorch model (no INT8 bundle, so not the graph a device runs): "
                     f"{', '.join(fake)}")
    return ("Quantized rows scored " + "; ".join(parts) + ".") if parts else ""


def _html_table(columns, records: list[dict], css: str = "") -> str:
    head = "".join(f"<th{' class=l' if left else ''}>{html.escape(h)}</th>" for h, left, _ in columns)
    rows = []
    for record in records:
        refused = " class=refused" if "refused" in status_text(record) else ""
        cells = "".join((f"<td class={'note' if h == 'note' else 'l'}>" if left else "<td>") + html.escape(cell(record))
                        + "</td>" for h, left, cell in columns)
        rows.append(f"<tr{refused}>{cells}</tr>")
    return f"<table{css}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def markdown_table(columns, records: list[dict]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line([h for h, _, _ in columns]), line(["---"] * len(columns))]
                     + [line([cell(r) for _, _, cell in columns]) for r in records])


def machine_rows(env: dict, data: dict) -> list[tuple[str, str]]:
    """The machine, its libraries and the data as (what, value) pairs: a small table, not a JSON dump."""
    frames = data.get("frames", {})
    libraries = ", ".join(f"{name} {version}" for name, version in env.get("libraries", {}).items())
    return [
        ("date", env.get("date", "")),
        ("CPU", f"{env.get('cpu', '')} ({env.get('cpu_count', '?')} logical cores)"),
        ("system", f"{env.get('os', '')}, Python {env.get('python', '')}"),
        ("libraries", libraries),
        ("ONNX Runtime threads", str(env.get("onnxruntime_threads", ""))),
        ("data", data.get("source", "") + (f", mask label {data['mask_label']}" if data.get("mask_label") else "")),
        ("frames", ", ".join(f"{side} {count}" for side, count in frames.items())),
        ("model", f"{data.get('architecture', '')}, input {'x'.join(map(str, data.get('input_size', [])))}, recipe "
                  f"{data.get('recipe', '')}, seed {data.get('seed', '')}"),
    ]


def render_html(title: str, records: list[dict], figs, check_lines, notes, commands, env, data) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Results (test split)</h2>")
    sentence = scoring_sentence(records)
    if sentence:
        parts.append(f"<p>{html.escape(sentence)}</p>")
    parts.append(_html_table(MAIN, records))
    parts.append("<details><summary>Details of every row: IoU, pixel accuracy, T*, file sizes, parity, epochs, "
                 "notes</summary>" + _html_table(DETAILS, records) + "</details>")
    if check_lines:
        parts.append("<h2>Checks</h2><ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in check_lines) + "</ul>")
    parts.append("<h2>Figures</h2><p>Points carry the row numbers (#) of the table; filled markers were scored "
                 "through ONNX Runtime, hollow ones as the fake-quant model.</p><div class='figs'>")
    for name, caption, png in figs:
        data64 = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data64}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</div>")
    parts.append("<h2>How each row was made</h2><ul>"
                 + "".join(f"<li><b>{html.escape(n)}</b>: <code>{html.escape(c)}</code></li>" for n, c in commands)
                 + "</ul>")
    parts.append("<h2>Machine, libraries, data</h2><table>" + "".join(
        f"<tr><th class=l>{html.escape(what)}</th><td class=l>{html.escape(value)}</td></tr>"
        for what, value in machine_rows(env, data)) + "</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(title: str, records: list[dict], figs, check_lines, notes, commands, env, data) -> str:
    lines = [f"# {title}", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Results (test split)", ""]
    sentence = scoring_sentence(records)
    lines += [sentence, ""] if sentence else []
    lines += [markdown_table(MAIN, records), "", "### Details of every row", "", markdown_table(DETAILS, records), ""]
    if check_lines:
        lines += ["## Checks", ""] + [f"- {c}" for c in check_lines] + [""]
    lines += ["## Figures", "", "Points carry the row numbers (#) of the table; filled markers were scored through "
              "ONNX Runtime, hollow ones as the fake-quant model.", ""]
    for name, caption, _ in figs:
        lines += [f"![{caption}](figures/{name})", "", f"*{caption}*", ""]
    lines += ["## How each row was made", ""] + [f"- **{n}**: `{c}`" for n, c in commands] + [""]
    lines += ["## Machine, libraries, data", "", "| | |", "| --- | --- |"]
    lines += [f"| {what} | {value.replace('|', '/')} |" for what, value in machine_rows(env, data)] + [""]
    return "\n".join(lines)


def numbered(rows: list[Row]) -> dict[str, int]:
    """Row name -> its number in the tables and beside its points in the figures (1 = the first row)."""
    return {row.name: index for index, row in enumerate(rows, 1)}
