"""Pool folds' per-frame test Dice from kept report files, when the fold folders themselves are gone.

`nerveseg cv-quant` pools every finished fold of one CV folder. A five-fold protocol on a 2-core machine takes
several sessions, and a machine restart loses the run folders; each fold's `report/results.json` (a few KB: every
row's per-frame test Dice, scored as deployed) is what must last. This script pools such files exactly as
cv-quant does (export.workflows.cv_quant.pool: models matched by name, ORT PTQ by kind, paired bootstrap
intervals) and prints cv-quant's table, with one line saying which file is which fold column.

    PYTHONPATH=. python scripts/pool_folds.py docs/results/cv5-small/fold-*.json [--out pooled.md]

Each argument is a results.json or a fold folder holding report/results.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.core.errors import exit_code_of  # noqa: E402
from device_runtime.core.fileio import write_text  # noqa: E402
from export.workflows.cv_quant import format_markdown, pool, read_fold_results, read_results_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", metavar="RESULTS", help="results.json files or fold folders")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: run(args), "pool_folds")


def run(args) -> None:
    paths = [Path(a) for a in args.results]
    records = pool([read_fold_results(p) if p.is_dir() else read_results_file(p) for p in paths])
    markdown = format_markdown(Path("pooled"), records, len(paths), threads=None)
    markdown += "\nFold columns, in order: " + ", ".join(str(p) for p in paths) + "\n"
    print(markdown)
    if args.out:
        write_text(args.out, markdown)


if __name__ == "__main__":
    sys.exit(main())
