"""Pool a fixed-bit QAT run's two candidates over the folds of a cross-validation: start, trained, deployed.

A fixed-bit run deploys its start (the grid alone, at the float run's T*) unless validation prefers its trained
model beyond noise (qat.checkpoint.choose), and scores both on its test split (test_metrics.json, "selection").
This prints, pooled over the folds' test frames (each frame held out once), each candidate's mean Dice and its
paired difference against the float model (the fold's test_metrics.json, PyTorch) and the deployed row against
the trained one, with paired bootstrap 95 % intervals, and which candidate each fold deployed. Everything here is
the fake-quant model in PyTorch; the INT8 files are scored by `nerveseg sweep` / `cv-quant`. A run with no start
(learned bits) pools the deployed model against float alone, with each fold's mean weight and activation bits.
Where every fold recorded them (qat.run.postprocessing_record), a second table pools the deployed model under the
three post-processing rules: its own re-tuned T* and morphology, its T* with float's morphology, float's rule.
`--versus OTHER...` adds the deployed model against each other run's deployed model, paired on the test frames of
the folds that ran both (a protocol's comparison of two QAT runs on the same fold models).

    PYTHONPATH=. python scripts/pool_selection.py CV --qat w8a8-x86
    PYTHONPATH=. python scripts/pool_selection.py CV --qat learned-44-b3-from-alloc-x86 --versus w4a4-low-walloc-x86
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.core.errors import InputError, exit_code_of  # noqa: E402
from device_runtime.core.fileio import read_json_object  # noqa: E402
from training.evaluation.bootstrap import paired_bootstrap_ci  # noqa: E402


def fold_rows(fold_dir: Path, name: str) -> dict:
    """{"float", "deployed"} and, where the run kept a start, {"start", "trained"}: per-frame test Dice keyed by
    frame; "chosen" (the deployed candidate, or "trained" for a run without a start) and "bits" (weight,
    activation means)."""
    metrics = read_json_object(fold_dir / "qat" / name / "test_metrics.json", "QAT test metrics")
    rows = {"float": read_json_object(fold_dir / "test_metrics.json", "the float run's test metrics")["per_image"],
            "deployed": metrics["per_image"], "chosen": "trained",
            "bits": (metrics.get("mean_weight_bits"), metrics.get("mean_activation_bits"))}
    if "postprocessing" in metrics:  # the deployed model under three post-processing rules (qat.run)
        rows["postprocessing"] = metrics["postprocessing"]
    if "selection" in metrics:
        selection = metrics["selection"]
        rows.update(start=selection["test_start"]["per_image"], trained=selection["test_trained"]["per_image"],
                    chosen=selection["chosen"])
    return rows


def pooled_table(cv_dir: Path, name: str) -> str:
    folds = _folds_with(cv_dir, name)
    if not folds:
        raise InputError(f"{cv_dir}: no fold-*/qat/{name}/test_metrics.json")
    rows = [fold_rows(f, name) for f in folds]
    with_start = [f.name for f, r in zip(folds, rows) if "start" in r]
    if with_start and len(with_start) < len(rows):
        raise InputError(f"{cv_dir}: {name} kept a start on {', '.join(with_start)} only; pool runs made alike")
    keys = ("float", "start", "trained", "deployed") if with_start else ("float", "deployed")
    pooled = {key: np.concatenate([[r[key][n] for n in sorted(r["float"])] for r in rows]) for key in keys}

    plural = "s" if len(folds) > 1 else ""
    lines = [f"{name}, {len(folds)} fold{plural} ({', '.join(f.name for f in folds)}), {pooled['float'].size} "
             "test frames (fake-quant, PyTorch)", "",
             "| model | pooled Dice | vs float [95 % CI] | vs trained [95 % CI] |", "|---|---|---|---|"]
    for key in keys:
        against_float = paired(pooled[key], pooled["float"]) if key != "float" else ""
        against_trained = paired(pooled[key], pooled["trained"]) if with_start and key in ("start", "deployed") else ""
        lines.append(f"| {key} | {pooled[key].mean():.4f} | {against_float} | {against_trained} |")
    lines.append("")
    lines.append("deployed per fold: " + ", ".join(f"{f.name} {r['chosen']}" for f, r in zip(folds, rows)))
    lines.append("mean bits per fold (weights / activations): " + ", ".join(
        f"{f.name} {_bits(r['bits'])}" for f, r in zip(folds, rows)))
    recorded = [f.name for f, r in zip(folds, rows) if "postprocessing" in r]
    if recorded and len(recorded) < len(rows):
        lines += ["", f"post-processing rules recorded on {', '.join(recorded)} only: not pooled"]
    elif recorded:
        lines += ["", *postprocessing_table(rows, pooled["float"])]
    return "\n".join(lines)


def postprocessing_table(rows: list[dict], floats: np.ndarray) -> list[str]:
    """The deployed model under each recorded post-processing rule: its validation Dice (mean of the folds'),
    pooled test Dice, against float and against the rule deployed (paired bootstrap 95 %)."""
    rules = list(rows[0]["postprocessing"])
    pooled = {rule: np.concatenate([[r["postprocessing"][rule]["per_image"][n] for n in sorted(r["float"])]
                                    for r in rows]) for rule in rules}
    lines = ["| post-processing of the deployed model | validation Dice (mean of folds) | pooled test Dice | vs float "
             "[95 % CI] | vs as deployed [95 % CI] |", "|---|---|---|---|---|"]
    for rule in rules:
        validation = np.mean([r["postprocessing"][rule]["validation_dice"] for r in rows])
        against_deployed = paired(pooled[rule], pooled["deployed"]) if rule != "deployed" else ""
        lines.append(f"| {rule} | {validation:.4f} | {pooled[rule].mean():.4f} | {paired(pooled[rule], floats)} | "
                     f"{against_deployed} |")
    return lines


def versus_lines(cv_dir: Path, name: str, others: list[str]) -> list[str]:
    """Run NAME's deployed model minus each OTHER's, per-frame test Dice paired on the folds that ran both (no
    OTHER: no table). NAME's files are read once for all OTHERs."""
    if not others:
        return []
    mine_by_fold = {fold: _deployed_frames(fold, name) for fold in _folds_with(cv_dir, name)}
    lines = ["", "| pair, deployed models | folds | pooled test Dice, A / B | A - B [95 % CI] |", "|---|---|---|---|"]
    for other in others:
        folds = [fold for fold in _folds_with(cv_dir, other) if fold in mine_by_fold]
        if not folds:
            raise InputError(f"{cv_dir}: no fold has both qat/{name} and qat/{other}")
        a, b = [], []
        for fold in folds:
            mine, theirs = mine_by_fold[fold], _deployed_frames(fold, other)
            if set(mine) != set(theirs):
                raise InputError(f"{fold}: qat/{name} and qat/{other} were scored on different test frames")
            a += [mine[frame] for frame in sorted(mine)]
            b += [theirs[frame] for frame in sorted(mine)]
        a, b = np.array(a), np.array(b)
        lines.append(f"| {name} - {other} | {', '.join(f.name for f in folds)} ({a.size} frames) | "
                     f"{a.mean():.4f} / {b.mean():.4f} | {paired(a, b)} |")
    return lines


def _folds_with(cv_dir: Path, name: str) -> list[Path]:
    """The fold folders of CV that hold a finished run NAME, in order."""
    return sorted(p for p in cv_dir.glob("fold-*") if (p / "qat" / name / "test_metrics.json").is_file())


def _deployed_frames(fold: Path, name: str) -> dict:
    return read_json_object(fold / "qat" / name / "test_metrics.json", "QAT test metrics")["per_image"]


def paired(a: np.ndarray, b: np.ndarray) -> str:
    """Mean per-frame difference a - b with its paired bootstrap 95 % interval."""
    low, high = paired_bootstrap_ci(a, b)
    return f"{(a - b).mean():+.4f} [{low:+.3f}, {high:+.3f}]"


def _bits(pair: tuple) -> str:
    return " / ".join("?" if b is None else f"{b:.2f}" for b in pair)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cv_dir", type=Path, metavar="CV", help="a cross-validation folder (fold-1, fold-2, ...)")
    parser.add_argument("--qat", required=True, metavar="NAME", help="the QAT run under each fold's qat/")
    parser.add_argument("--versus", nargs="+", default=[], metavar="OTHER",
                        help="also NAME's deployed model minus each OTHER run's, paired on the folds that ran both")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: print("\n".join([pooled_table(args.cv_dir, args.qat),
                                                  *versus_lines(args.cv_dir, args.qat, args.versus)])),
                        "pool_selection")


if __name__ == "__main__":
    sys.exit(main())
