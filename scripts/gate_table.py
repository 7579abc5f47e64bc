"""The INT8 parity gate over a cross-validation: every QAT export of every fold, each file against its model's floor.

Issue 32 asks that the learned, W8A8 and W4A8 exports of every fold pass the gate, shown as a table of each file's
statistics beside the model's own float32-vs-float64 noise floor. This reads the INT8 bundles `nerveseg cv-quant`
(or `nerveseg export --qat`) wrote in CV/fold-*/qat/*/bundle/manifest.json and prints one row per INT8 file: kept
or left out, the frames measured, flipped pixels and the 99.9th percentile of |dp| for the file (as ONNX Runtime
CPU runs it) and for the model against itself, the worst statistic's share of the gate's allowance, and the
teacher-forced layer check's worst quantizer. A QAT run without a bundle is listed with sweep.json's reason. No
model is run: a second or two.

    PYTHONPATH=. python scripts/gate_table.py runs/cv5-small [--out gate.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.core.errors import InputError, exit_code_of  # noqa: E402
from device_runtime.core.fileio import write_text  # noqa: E402
from export.bundle.int8_parity import FLOOR_KEY  # noqa: E402
from export.workflows.cv_quant import finished_folds  # noqa: E402
from export.workflows.sweep import refused_exports  # noqa: E402

HEADER = ("| fold | QAT run | file | gate | frames | flipped (file / model's own) | p99.9 \\|dp\\| (file / model's own) "
          "| worst statistic / allowance | layer check: worst quantizer, ratio |")


def bundle_rows(fold: str, run: str, manifest_path: Path) -> list[str]:
    try:
        parity = json.loads(manifest_path.read_text())["metrics"]["parity"]
        floor = parity[FLOOR_KEY]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{manifest_path}: not an INT8 bundle's manifest with parity figures ({err})") from None
    rows = []
    for name, entry in parity.items():
        if name in (FLOOR_KEY, "gate") or not isinstance(entry, dict) or "gate" not in entry:
            continue
        layers = entry.get("layers") or {}
        worst = layers.get("worst")
        layer_text = f"{worst['name']}, {layers['worst_ratio']:.2f}" if worst else (layers.get("failure") or "–")
        rows.append(f"| {fold} | {run} | {name} | {'kept' if entry['gate']['passed'] else 'LEFT OUT'} | "
                    f"{entry['frames']} | {entry['flipped_fraction']:.1e} / {floor['flipped_fraction']:.1e} | "
                    f"{entry['prob_diff_p99.9']:.1e} / {floor['prob_diff_p99.9']:.1e} | "
                    f"{entry['gate']['worst_ratio']:.2f} | {layer_text} |")
    return rows


def table(cv_dir: Path) -> str:
    lines = [f"# The INT8 parity gate over the folds of {cv_dir.name}", "", HEADER, "|---" * 9 + "|"]
    for fold_dir in finished_folds(cv_dir):
        runs = sorted(p for p in (fold_dir / "qat").glob("*") if p.is_dir() and not p.name.startswith("."))
        for run in runs:
            manifest = run / "bundle" / "manifest.json"
            if manifest.is_file():
                lines += bundle_rows(fold_dir.name, run.name, manifest)
        for run, why in refused_exports(fold_dir, [p.name for p in runs]).items():
            lines.append(f"| {fold_dir.name} | {run} | – | NO BUNDLE | | | | | {why} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cv_dir", type=Path, help="a folder made by `nerveseg cv` (and `nerveseg cv-quant`)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: run(args), "gate_table")


def run(args) -> None:
    text = table(args.cv_dir)
    print(text)
    if args.out:
        write_text(args.out, text)


if __name__ == "__main__":
    sys.exit(main())
