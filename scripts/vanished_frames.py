"""Where a QAT run's loss to float sits: frames whose nerve vanishes (the run's mask empty, Dice 0, where float
scored above 0.3), pooled over the folds of a cross-validation, from the committed per-frame test Dice alone.

Reads FOLD/test_metrics.json (float) and FOLD/qat/NAME/test_metrics.json (the deployed fake-quant model) and prints,
per run: the folds found, the mean per-frame Dice minus float, the part of it from vanished frames, and on how many
folds the run's re-tuned morphology is float's. No model is run. The table of docs/QUANTIZATION.md, "Does re-tuning
the morphology cost the low-bit runs?":

    PYTHONPATH=. python scripts/vanished_frames.py docs/results/cv5-small-rebuilt/fold-{1,2,3,4,5} \\
        --qat w8a8-x86 w4a8-x86 w4a4-low-walloc-x86
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.core.errors import InputError, exit_code_of  # noqa: E402
from device_runtime.core.fileio import read_json_object  # noqa: E402

VANISHED_FLOAT_DICE = 0.3  # float found this nerve (above this Dice); the run's mask is empty


def run_row(folds: list[Path], name: str) -> str:
    """One table row of run NAME over the folds that have it."""
    differences, vanished, same_morphology, found = [], [], 0, 0
    for fold in folds:
        path = fold / "qat" / name / "test_metrics.json"
        if not path.is_file():
            continue
        found += 1
        reference = read_json_object(fold / "test_metrics.json", "the float run's test metrics")
        metrics = read_json_object(path, "QAT test metrics")
        same_morphology += metrics["morphology"] == reference["morphology"]
        for frame, float_dice in reference["per_image"].items():
            difference = metrics["per_image"][frame] - float_dice
            differences.append(difference)
            vanished.append(difference if metrics["per_image"][frame] == 0 and float_dice > VANISHED_FLOAT_DICE else 0.0)
    if not found:
        raise InputError(f"no {name}/test_metrics.json under the folds' qat/")
    frames = len(differences)
    return (f"| {name} | {found} | {frames} | {sum(differences) / frames:+.4f} | {sum(vanished) / frames:+.4f} | "
            f"{same_morphology} / {found} |")


def table(folds: list[Path], names: list[str]) -> str:
    lines = ["| run | folds | frames | mean Dice - float | of it, from vanished frames | runs whose re-tuned "
             "morphology is float's |", "|---|---|---|---|---|---|"]
    return "\n".join(lines + [run_row(folds, name) for name in names])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folds", type=Path, nargs="+", metavar="FOLD", help="fold folders (FOLD/test_metrics.json)")
    parser.add_argument("--qat", nargs="+", required=True, metavar="NAME", help="QAT runs under each FOLD/qat/")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: print(table(args.folds, args.qat)), "vanished_frames")


if __name__ == "__main__":
    sys.exit(main())
