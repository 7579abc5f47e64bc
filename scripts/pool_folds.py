"""Pool folds' per-frame test Dice from kept report files, when the fold folders themselves are gone.

`nerveseg cv-quant` pools every finished fold of one CV folder. A five-fold protocol on a 2-core machine takes
several sessions, and a machine restart loses the run folders; each fold's `report/results.json` (a few KB: every
row's per-frame test Dice, scored as deployed) is what must last. This script pools such files exactly as
cv-quant does (export.workflows.cv_quant.pool: models matched by name, ORT PTQ by kind, paired bootstrap
intervals) and prints cv-quant's table, with one line saying which file is which fold column.

    PYTHONPATH=. python scripts/pool_folds.py docs/results/cv5-small/fold-*.json [--out pooled.md]
        [--versus w4a4-low-x86:w4a4-x86 ...] [--other-set OTHER/fold-* --versus NAME:NAME@other]

Each argument is a results.json or a fold folder holding report/results.json. `--other-set` takes a second fold set
on the same test frames, fold for fold (the same splits, other fold models: the rebuilt folds and the first ones);
its rows are named NAME@other in --versus only. Such a pair compares two whole pipelines (float training included)
on the same frames, and the table says which set each row came from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.core.errors import InputError, exit_code_of  # noqa: E402
from device_runtime.core.fileio import write_text  # noqa: E402
from export.workflows.cv_quant import (format_markdown, paired_between, pool, read_fold_results,  # noqa: E402
                                       read_results_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", metavar="RESULTS", help="results.json files or fold folders")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the table here (Markdown)")
    parser.add_argument("--versus", nargs="+", default=[], metavar="A:B",
                        help="also two rows against each other, A - B paired on the frames both were scored on "
                             "(a protocol's comparisons other than against float and PTQ)")
    parser.add_argument("--other-set", nargs="+", default=[], metavar="RESULTS",
                        help="a second fold set on the same test frames, in the same fold order: its rows are "
                             "NAME@other in --versus")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: run(args), "pool_folds")


OTHER = "@other"


def with_other_set(folds: list[dict], paths: list[Path], others: list[dict], other_paths: list[Path]) -> list[dict]:
    """Each fold's rows plus the other set's fold's, renamed NAME@other (kind too: its PTQ row is not this set's);
    refused unless the sets hold the same folds on the same frames, since the pairs are frame by frame."""
    if len(others) != len(folds):
        raise InputError(f"--other-set: {len(others)} fold files for {len(folds)} folds; give them fold for fold")
    merged = []
    for fold, path, other, other_path in zip(folds, paths, others, other_paths):
        if other["test_names"] != fold["test_names"]:
            raise InputError(f"{other_path}: its test frames are not those of {path}; two fold sets pair only on "
                             "the same frames")
        renamed = [{**row, "name": row["name"] + OTHER, "kind": "other set"} for row in other["rows"]]
        merged.append({**fold, "rows": fold["rows"] + renamed})
    return merged


def _read(path: Path) -> dict:
    return read_fold_results(path) if path.is_dir() else read_results_file(path)


def _pair(text: str) -> tuple[str, str]:
    first, colon, second = text.partition(":")
    if not (colon and first and second):
        raise InputError(f"--versus: each is A:B, two row names, e.g. w4a4-low-x86:w4a4-x86; got {text!r}")
    return first, second


def run(args) -> None:
    paths = [Path(a) for a in args.results]
    pairs = [_pair(text) for text in args.versus]  # checked before any file is read
    folds = [_read(p) for p in paths]
    markdown = format_markdown(Path("pooled"), pool(folds), len(paths), threads=None)
    markdown += "\nFold columns, in order: " + ", ".join(str(p) for p in paths) + "\n"
    if args.other_set:
        other_paths = [Path(a) for a in args.other_set]
        folds = with_other_set(folds, paths, [_read(p) for p in other_paths], other_paths)
        markdown += "Rows NAME@other: " + ", ".join(str(p) for p in other_paths) + "\n"
    if pairs:
        markdown += "\n| A | B | A - B [95 % CI] (frames) |\n|---|---|---|\n"
        for first, second in pairs:
            found = paired_between(folds, first, second)
            cells = "no fold scored both" if found is None else (
                f"{found['delta']:+.4f} [{found['ci'][0]:+.3f}, {found['ci'][1]:+.3f}] ({found['frames']})")
            markdown += f"| {first} | {second} | {cells} |\n"
    print(markdown)
    if args.out:
        write_text(args.out, markdown)


if __name__ == "__main__":
    sys.exit(main())
