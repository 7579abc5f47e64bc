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
the folds that ran both (a protocol's comparison of two QAT runs on the same fold models); with `--other-set SET`, an
OTHER ending in @other is read from SET's fold of the same name (other fold models of the same splits: the ReLU
backbone's set against the hardswish one), and the table starts with the two sets' float runs.

    PYTHONPATH=. python scripts/pool_selection.py CV --qat w8a8-x86
    PYTHONPATH=. python scripts/pool_selection.py CV --qat learned-44-b3-from-alloc-x86 --versus w4a4-low-walloc-x86
    PYTHONPATH=. python scripts/pool_selection.py CV-relu --qat w4a4-low-walloc-x86 --other-set CV \
        --versus float@other w4a4-low-walloc-x86@other
"""

from __future__ import annotations

import argparse
import functools
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


def versus_lines(cv_dir: Path, name: str, others: list[str], other_set: Path | None = None) -> list[str]:
    """Run NAME's deployed model minus each OTHER's, per-frame test Dice paired on the folds that ran both (no
    OTHER: no table). An OTHER ending in @other is a run of OTHER_SET's fold of the same name (`float@other`: that
    fold's float run); with OTHER_SET the table starts with this set's float run minus OTHER_SET's, on NAME's folds."""
    if not others:
        return []
    pairs = [("float", f"float{OTHER}")] if other_set is not None else []
    pairs += [(name, other) for other in others]
    folds_of_name = [fold.name for fold in _folds_with(cv_dir, name)]
    per_image = functools.cache(_per_image)  # NAME's files are read once for every OTHER
    lines = ["", "| pair, deployed models | folds | pooled test Dice, A / B | A - B [95 % CI] |", "|---|---|---|---|"]
    for first, second in pairs:
        paths = {fold: (_metrics_path(cv_dir, other_set, fold, first), _metrics_path(cv_dir, other_set, fold, second))
                 for fold in folds_of_name}
        folds = [fold for fold, (_, path) in paths.items() if path.is_file()]
        if not folds:
            raise InputError(f"{cv_dir}: no fold has both qat/{name} and {_describe(second, other_set)}")
        a, b = [], []
        for fold in folds:
            mine, theirs = (per_image(path) for path in paths[fold])
            if set(mine) != set(theirs):
                raise InputError(f"{cv_dir / fold}: {_describe(first, None)} and {_describe(second, other_set)} were "
                                 "scored on different test frames")
            a += [mine[frame] for frame in sorted(mine)]
            b += [theirs[frame] for frame in sorted(mine)]
        a, b = np.array(a), np.array(b)
        lines.append(f"| {first} - {second} | {', '.join(folds)} ({a.size} frames) | "
                     f"{a.mean():.4f} / {b.mean():.4f} | {paired(a, b)} |")
    return lines


OTHER = "@other"  # the suffix of a --versus run read from --other-set


def _metrics_path(cv_dir: Path, other_set: Path | None, fold: str, spec: str) -> Path:
    """test_metrics.json of SPEC in the fold named FOLD: a QAT run, or "float" (the fold's float run); of OTHER_SET
    where SPEC ends in @other."""
    if spec.endswith(OTHER):
        if other_set is None:
            raise InputError(f"--versus {spec}: a run of another set needs --other-set, that set's folder")
        cv_dir, spec = other_set, spec[:-len(OTHER)]
    folder = cv_dir / fold if spec == "float" else cv_dir / fold / "qat" / spec
    return folder / "test_metrics.json"


def _describe(spec: str, other_set: Path | None) -> str:
    run = spec.removesuffix(OTHER)
    what = "the float run" if run == "float" else f"qat/{run}"
    return f"{what} of {other_set}" if spec.endswith(OTHER) else what


def _folds_with(cv_dir: Path, name: str) -> list[Path]:
    """The fold folders of CV that hold a finished run NAME, in order."""
    return sorted(p for p in cv_dir.glob("fold-*") if (p / "qat" / name / "test_metrics.json").is_file())


def _per_image(path: Path) -> dict:
    """A test_metrics.json's per-frame Dice."""
    return read_json_object(path, "test metrics")["per_image"]


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
                        help="also NAME's deployed model minus each OTHER run's, paired on the folds that ran both; "
                             "OTHER@other: a run of --other-set (float@other: its float run)")
    parser.add_argument("--other-set", type=Path, metavar="SET",
                        help="another cross-validation of the same folds (other fold models, the same test frames): "
                             "the set of the @other runs, and a first pair, this set's float run minus SET's")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: print("\n".join([pooled_table(args.cv_dir, args.qat),
                                                  *versus_lines(args.cv_dir, args.qat, args.versus, args.other_set)])),
                        "pool_selection")


if __name__ == "__main__":
    sys.exit(main())
