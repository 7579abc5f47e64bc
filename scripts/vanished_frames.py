"""Where a QAT run's loss to float sits: frames whose nerve vanishes (the run's mask empty, Dice 0, where float
scored above 0.3), pooled over the folds of a cross-validation, from the committed per-frame test Dice alone.

Reads FOLD/test_metrics.json (float) and FOLD/qat/NAME/test_metrics.json (the deployed fake-quant model) and prints,
per run: the folds found, the mean per-frame Dice minus float, the part of it from vanished frames, and on how many
folds the run's morphology is float's. No model is run. The table of docs/QUANTIZATION.md, "Does re-tuning the
morphology cost the low-bit runs?":

    PYTHONPATH=. python scripts/vanished_frames.py docs/results/cv5-small-rebuilt/fold-{1,2,3,4,5} \\
        --qat w8a8-x86 w4a8-x86 w4a4-low-walloc-x86

`--rules deployed "float morphology" "float rule"` adds a row per rule: the same run's frames under that
post-processing rule instead of the one it deployed, from the record qat/run.py `postprocessing_record` keeps in
test_metrics.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.core.errors import InputError, exit_code_of  # noqa: E402
from device_runtime.core.fileio import read_json_object  # noqa: E402

VANISHED_FLOAT_DICE = 0.3  # float found this nerve (above this Dice); the run's mask is empty

DEPLOYED = "deployed"
RULES = (DEPLOYED, "float morphology", "float rule")


def read_run(folds: list[Path], name: str) -> list[tuple[dict, dict, Path]]:
    """(float's test metrics, run NAME's test metrics, the latter's path) for each fold that has the run."""
    found = []
    for fold in folds:
        path = fold / "qat" / name / "test_metrics.json"
        if path.is_file():
            found.append((read_json_object(fold / "test_metrics.json", "the float run's test metrics"),
                          read_json_object(path, "QAT test metrics"), path))
    if not found:
        raise InputError(f"no {name}/test_metrics.json under the folds' qat/")
    return found


def run_row(runs: list[tuple[dict, dict, Path]], name: str, rule: str = DEPLOYED) -> str:
    """One table row of run NAME over the folds read by read_run, its frames post-processed by RULE."""
    differences, vanished, same_morphology = [], [], 0
    for reference, run_metrics, path in runs:
        metrics = scored_under(run_metrics, rule, path)
        same_morphology += metrics["morphology"] == reference["morphology"]
        for frame, float_dice in reference["per_image"].items():
            dice = metrics["per_image"][frame]
            differences.append(dice - float_dice)
            vanished.append(dice - float_dice if dice == 0 and float_dice > VANISHED_FLOAT_DICE else 0.0)
    frames = len(differences)
    return (f"| {name} | {rule} | {len(runs)} | {frames} | {sum(differences) / frames:+.4f} | "
            f"{sum(vanished) / frames:+.4f} | {same_morphology} / {len(runs)} |")


def scored_under(metrics: dict, rule: str, path: Path) -> dict:
    """The run's morphology and per-frame Dice under RULE: the deployed ones at the top level, the others in the
    post-processing record."""
    if rule == DEPLOYED:
        return metrics
    if rule not in metrics.get("postprocessing", {}):
        raise InputError(f"{path}: no post-processing record of the rule {rule!r} (re-score the run: nerveseg qat "
                         "--resume)")
    return metrics["postprocessing"][rule]


def table(folds: list[Path], names: list[str], rules: list[str] | tuple[str, ...] = (DEPLOYED,)) -> str:
    lines = ["| run | rule | folds | frames | mean Dice - float | of it, from vanished frames | runs whose morphology "
             "is float's |", "|---|---|---|---|---|---|---|"]
    for name in names:
        runs = read_run(folds, name)  # each file read once, every rule scored from it
        lines += [run_row(runs, name, rule) for rule in rules]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folds", type=Path, nargs="+", metavar="FOLD", help="fold folders (FOLD/test_metrics.json)")
    parser.add_argument("--qat", nargs="+", required=True, metavar="NAME", help="QAT runs under each FOLD/qat/")
    parser.add_argument("--rules", nargs="+", choices=RULES, default=[DEPLOYED], metavar="RULE",
                        help=f"the post-processing rules the frames are scored under, a row each: {', '.join(RULES)} "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: print(table(args.folds, args.qat, args.rules)), "vanished_frames")


if __name__ == "__main__":
    sys.exit(main())
