"""How much does the demo move between seeds? Rows and verdicts of several `nerveseg pipeline --seed N` runs.

Issue 32 asks that the phantom demo give the same verdicts over three fresh runs and print the spread. This reads
each run's report/results.json and prints one line per model (ORT PTQ matched by kind, its calibration may differ):
test Dice per seed, largest minus smallest; the paired difference of each quantized row from float per seed and its
spread; how each row was scored (ONNX Runtime where its INT8 bundle was written, else the fake-quant model); and the
report's verdict lines compared with their figures masked (the same words on every seed, or the lines that differ).
No model is run.

    PYTHONPATH=. python scripts/seed_spread.py runs/demo-s0 runs/demo-s1 runs/demo-s2 [--out spread.md]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.core.errors import InputError, exit_code_of  # noqa: E402
from device_runtime.core.fileio import write_text  # noqa: E402
from export.workflows.cv_quant import PTQ_KEY, model_key, read_fold_results  # noqa: E402

NUMBER = re.compile(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?")


def verdict_words(line: str) -> str:
    """A verdict line with its figures masked: what must read the same on every seed."""
    return NUMBER.sub("#", line)


def spread_table(runs: list[Path]) -> str:
    results = [read_fold_results(run) for run in runs]  # RUN/report/results.json, checked
    by_model: dict[str, list[dict | None]] = {}
    for index, result in enumerate(results):
        for row in result["rows"]:
            by_model.setdefault(model_key(row), [None] * len(runs))[index] = row
    if "float" not in by_model or any(row is None for row in by_model["float"]):
        raise InputError(f"{', '.join(map(str, runs))}: every run needs a scored float row")
    floats = by_model["float"]
    names = " / ".join(run.name for run in runs)
    lines = [f"| model | Dice: {names} | spread | - float: {names} | spread | scored by |",
             "|---" * 6 + "|"]
    for key, rows in by_model.items():
        dice = [row["dice"] if row else None for row in rows]
        delta = [row["dice"] - base["dice"] if row and key != "float" else None for row, base in zip(rows, floats)]
        label = "ORT PTQ (best calibration per run)" if key == PTQ_KEY else key
        lines.append(f"| {label} | {_figures(dice)} | {_spread(dice)} | {_figures(delta, signed=True)} | "
                     f"{_spread(delta)} | {'; '.join(sorted({row.get('scored_by') or '' for row in rows if row}))} |")
    masked = [[verdict_words(line) for line in result.get("checks", [])] for result in results]
    if all(words == masked[0] for words in masked):
        lines += ["", f"Verdicts: the same words on all {len(runs)} runs ({len(masked[0])} lines)."]
    else:
        lines += ["", "Verdicts that differ between runs:"]
        for index, result in enumerate(results):
            for line in result.get("checks", []):
                if any(verdict_words(line) not in other for other in masked):
                    lines.append(f"- {runs[index].name}: {line}")
    return "\n".join(lines) + "\n"


def _figures(values: list[float | None], signed: bool = False) -> str:
    return " / ".join("–" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}") for v in values)


def _spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{max(known) - min(known):.3f}" if len(known) > 1 else "–"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="pipeline run folders")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: run(args), "seed_spread")


def run(args) -> None:
    text = spread_table(args.runs)
    print(text)
    if args.out:
        write_text(args.out, text)


if __name__ == "__main__":
    sys.exit(main())
