"""`nerveseg cv-quant`: per-frame Dice pooled over the folds of a cross-validation, models matched by name (the PTQ
row by kind), differences paired on the same frames; a tiny end-to-end run over two folds; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from device_runtime.core.errors import InputError
from export.cli import main as cli_main
from export.workflows.cv_quant import PTQ_KEY, format_markdown, pool, read_results_file


def _row(name, kind, per_image, bits=None, latency=None, fake_quant=None, scored_by="ONNX Runtime CPU"):
    return {"name": name, "kind": kind, "dice": float(np.mean(per_image)), "per_image_dice": list(per_image),
            "mean_weight_bits": bits, "latency_ms": latency, "scored_by": scored_by,
            "fake_quant_per_image_dice": fake_quant}


def test_pool_concatenates_folds_pairs_frames_and_matches_ptq_by_kind():
    fold1 = {"test_names": ["a", "b"], "rows": [
        _row("float", "float", [0.5, 0.7], 32.0, 10.0), _row("ORT PTQ (MinMax)", "ptq", [0.4, 0.7], 8.0, 8.0),
        _row("w8a8-x86", "uniform", [0.6, 0.7], 8.0, 7.0), _row("learned-0.25", "learned", [0.1, 0.2], 4.0, 7.0)]}
    fold2 = {"test_names": ["c", "d", "e"], "rows": [
        _row("float", "float", [0.2, 0.4, 0.9], 32.0, 12.0), _row("ORT PTQ (Entropy)", "ptq", [0.2, 0.4, 0.6], 8.0, 9.0),
        _row("w8a8-x86", "uniform", [0.2, 0.5, 0.9], 8.0, 8.0)]}
    records = {r["model"]: r for r in pool([fold1, fold2])}
    assert list(records) == ["float", PTQ_KEY, "w8a8-x86", "learned-0.25"]  # float, PTQ, uniform, learned
    quant = records["w8a8-x86"]
    assert quant["frames"] == 5 and quant["folds"] == 2
    assert quant["dice"] == pytest.approx(np.mean([0.6, 0.7, 0.2, 0.5, 0.9]))
    assert quant["vs_float"]["delta"] == pytest.approx((0.1 + 0.0 + 0.0 + 0.1 + 0.0) / 5)
    assert quant["vs_float"]["ci"][0] <= quant["vs_float"]["delta"] <= quant["vs_float"]["ci"][1]
    assert quant["vs_ptq"]["delta"] == pytest.approx((0.2 + 0.0 + 0.0 + 0.1 + 0.3) / 5)
    assert quant["latency_ms"] == pytest.approx(7.5) and quant["per_fold_dice"] == pytest.approx({"1": 0.65, "2": 0.5333333})
    ptq = records[PTQ_KEY]
    assert ptq["per_fold_names"] == {"1": "ORT PTQ (MinMax)", "2": "ORT PTQ (Entropy)"} and ptq["vs_ptq"] is None
    learned = records["learned-0.25"]  # only in fold 1: pooled there, paired with fold 1's float frames only
    assert learned["folds"] == 1 and learned["vs_float"]["frames"] == 2
    assert learned["vs_float"]["delta"] == pytest.approx(-0.45)
    assert records["float"]["vs_float"] is None


def test_pool_pairs_each_int8_file_with_its_fake_quant_model_where_it_was_scored_through_onnx():
    """Issue 32: the INT8 file's Dice against its own fake-quant model, frame by frame, pooled over the folds where
    the file was deployed; a fold whose export was refused (scored as the model itself) or whose report predates the
    kept figures is left out of that pairing, not counted as a zero difference."""
    fold1 = {"test_names": ["a", "b"], "rows": [
        _row("float", "float", [0.5, 0.7]), _row("w8a8-x86", "uniform", [0.6, 0.6], fake_quant=[0.6, 0.8])]}
    fold2 = {"test_names": ["c"], "rows": [
        _row("float", "float", [0.9]),
        _row("w8a8-x86", "uniform", [0.3], fake_quant=[0.3], scored_by="fake-quant (PyTorch)")]}
    fold3 = {"test_names": ["d"], "rows": [_row("float", "float", [0.4]), _row("w8a8-x86", "uniform", [0.5])]}
    records = {r["model"]: r for r in pool([fold1, fold2, fold3])}
    quant = records["w8a8-x86"]
    assert quant["frames"] == 4 and quant["vs_fake_quant"]["frames"] == 2  # fold 1 only
    assert quant["vs_fake_quant"]["delta"] == pytest.approx(-0.1)
    assert quant["vs_fake_quant"]["ci"][0] <= -0.1 <= quant["vs_fake_quant"]["ci"][1]
    assert records["float"]["vs_fake_quant"] is None
    table = format_markdown(Path("cv"), list(records.values()), 3, threads=None)
    assert "INT8 file vs its fake-quant model" in table and "| -0.1000 [" in table and "(2) |" in table


def test_a_kept_file_whose_fake_quant_figures_miss_frames_is_refused(tmp_path):
    path = tmp_path / "fold-1.results.json"
    path.write_text(json.dumps({"test_names": ["a", "b"], "rows": [
        _row("float", "float", [0.5, 0.7]), _row("w8a8-x86", "uniform", [0.6, 0.6], fake_quant=[0.6])]}))
    with pytest.raises(InputError, match="do not match its 2 test frames"):
        read_results_file(path)


def test_pool_without_a_float_row_is_refused():
    with pytest.raises(InputError, match="float"):
        pool([{"test_names": ["a"], "rows": [_row("w8a8", "uniform", [0.5])]}])


def test_bad_cv_dirs_are_one_line(tmp_path, capsys):
    assert cli_main(["cv-quant", "--cv-dir", str(tmp_path / "missing")]) == 2
    assert cli_main(["cv-quant", "--cv-dir", str(tmp_path)]) == 2  # a folder with no finished fold
    with pytest.raises(SystemExit) as refused:  # --grid offers choices: argparse refuses, with the usage exit code
        cli_main(["cv-quant", "--cv-dir", str(tmp_path), "--grid", "arm"])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "not found" in err[0] and "no finished fold" in err[1]
    assert "--grid: invalid choice: 'arm'" in err[2]
    assert not list(tmp_path.iterdir())  # nothing written by a refused call


@pytest.mark.slow
def test_tiny_cv_quant_sweeps_every_fold_and_pools(tmp_path, capsys):
    pytest.importorskip("qat.run")
    from test_cv import _paired_dataset

    data = _paired_dataset(tmp_path / "data", subjects=4)
    cv = tmp_path / "cv"
    assert cli_main(["cv", "--data", str(data), "--folds", "2", "--recipe", "quick", "--group-by", "prefix",
                     "--run-dir", str(cv), "--input-size", "64", "64", "--steps", "1", "--batch-size", "2",
                     "--device", "cpu"]) == 0
    args = ["cv-quant", "--cv-dir", str(cv), "--bits", "8", "--grid", "x86", "--epochs", "1", "--device", "cpu",
            "--threads", "1", "--latency-runs", "2"]
    assert cli_main(args) == 0
    out = json.loads((cv / "cv_quant.json").read_text())
    records = {r["model"]: r for r in out["models"]}
    held_out = sum(len(json.loads((cv / f"fold-{i}" / "split.json").read_text())["test"]) for i in (1, 2))
    assert set(records) >= {"float", PTQ_KEY, "w8a8-x86"}
    for record in records.values():
        assert record["folds"] == 2 and record["frames"] == held_out and 0 <= record["dice"] <= 1
    for fold in (1, 2):
        report = json.loads((cv / f"fold-{fold}" / "report" / "results.json").read_text())
        row = next(r for r in report["rows"] if r["name"] == "w8a8-x86")
        assert len(row["per_image_dice"]) == len(report["test_names"])
        assert np.mean(row["per_image_dice"]) == pytest.approx(row["dice"])
        assert "--grid x86" in row["command"]
    assert "| w8a8-x86 | 2 |" in (cv / "cv_quant.md").read_text()
    # a second call trains nothing again: every fold's run is finished and skipped by its sweep
    capsys.readouterr()
    assert cli_main(args) == 0
    assert capsys.readouterr().out.count("w8a8-x86 finished earlier; skipped") == 2


def _kept_files(tmp_path, folds: list[dict]) -> list:
    """Each fold's results written as fold-N.json, as docs/results keeps them."""
    paths = [tmp_path / f"fold-{index}.json" for index in range(1, len(folds) + 1)]
    for path, results in zip(paths, folds):
        path.write_text(json.dumps(results))
    return paths


def test_pool_folds_script_pools_kept_results_files_as_cv_quant_does(tmp_path, capsys):
    """scripts/pool_folds.py: folds' results.json kept after their folders are gone pool to cv-quant's records."""
    pool_folds = load_script("pool_folds")
    folds = [{"test_names": ["a", "b"], "rows": [_row("float", "float", [0.5, 0.7], 32.0),
                                                  _row("w4a4-low-x86", "uniform", [0.4, 0.7], 4.0),
                                                  {**_row("w3a3-low-x86", "uniform", [0.0, 0.0], 3.0),
                                                   "per_image_dice": None}]},  # not scored: left out
             {"test_names": ["c"], "rows": [_row("float", "float", [0.9], 32.0),
                                            _row("w4a4-low-x86", "uniform", [0.6], 4.0)]}]
    paths = _kept_files(tmp_path, folds)
    out = tmp_path / "pooled.md"
    assert pool_folds.main([*map(str, paths), "--out", str(out)]) == 0
    table = out.read_text()
    assert table == capsys.readouterr().out.rstrip("\n") + "\n"
    expected = pool(folds)
    low = next(r for r in expected if r["model"] == "w4a4-low-x86")
    assert low["vs_float"]["delta"] == pytest.approx(-0.4 / 3)
    assert f"| w4a4-low-x86 | 2 | 3 | 4.00 | {low['dice']:.4f} |" in table and "w3a3-low-x86" not in table
    assert "Latency" not in table and f"Fold columns, in order: {paths[0]}, {paths[1]}" in table

    paths[1].write_text(json.dumps({"test_names": ["c"], "rows": [_row("float", "float", [0.9, 0.1])]}))
    assert pool_folds.main(list(map(str, paths))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(paths[1]) in err[0] and "do not match its 1 test frames" in err[0]


def test_pool_folds_versus_pairs_two_rows_on_the_folds_both_were_scored_in(tmp_path, capsys):
    """--versus A:B: A - B pooled over the folds holding both, paired frame by frame; a fold where one of them is
    missing is left out of the pair; a malformed pair or an unknown row is one line, exit 2."""
    pool_folds = load_script("pool_folds")
    folds = [{"test_names": ["a", "b"], "rows": [_row("float", "float", [0.5, 0.7], 32.0),
                                                  _row("w4a4-low-x86", "uniform", [0.4, 0.7], 4.0),
                                                  _row("w4a4-x86", "uniform", [0.1, 0.3], 4.0)]},
             {"test_names": ["c"], "rows": [_row("float", "float", [0.9], 32.0),
                                            _row("w4a4-low-x86", "uniform", [0.6], 4.0)]}]
    paths = _kept_files(tmp_path, folds)
    assert pool_folds.main([*map(str, paths), "--versus", "w4a4-low-x86:w4a4-x86", "w4a4-x86:float"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("| w4a4-low-x86 | w4a4-x86 |"))
    assert "+0.3500 [+0.300, +0.400] (2)" in row  # fold 1 only: (0.3 + 0.4) / 2, its two frames
    assert any(line.startswith("| w4a4-x86 | float | -0.4000") for line in lines)
    for bad, problem in (("w4a4-x86", "each is A:B"), ("w4a4-x86:w2a2", "no fold has a scored row 'w2a2'")):
        assert pool_folds.main([*map(str, paths), "--versus", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and problem in err[0]


def test_gate_table_lists_every_int8_file_of_every_fold_beside_its_models_floor(tmp_path, capsys):
    """scripts/gate_table.py: one row per INT8 file (kept or left out) with the model's own floor, and a finished
    QAT run without a bundle with sweep.json's reason; a manifest without parity figures is refused in one line."""
    gate_table = load_script("gate_table")
    figures = {"frames": 163, "flipped_fraction": 2.8e-5, "prob_diff_p99.9": 4.6e-2}
    floor = {**figures, "flipped_fraction": 2.3e-3, "prob_diff_p99.9": 1.0e-1}
    parity = {"model_float32_vs_float64": floor, "gate": {"rule": "..."},
              "model.int8.onnx": {**figures, "gate": {"passed": True, "worst_ratio": 0.14},
                                  "layers": {"worst": {"name": "backbone.1.output_quant"}, "worst_ratio": 0.22}},
              "model.int8.cpu.onnx": {**figures, "gate": {"passed": False, "worst_ratio": 3.5},
                                      "layers": {"worst": None, "failure": "stem out differs"}}}
    fold = tmp_path / "cv" / "fold-1"
    (fold / "qat" / "w8a8" / "bundle").mkdir(parents=True)
    (fold / "fold.json").write_text("{}")
    (fold / "qat" / "w8a8" / "bundle" / "manifest.json").write_text(json.dumps({"metrics": {"parity": parity}}))
    (fold / "qat" / "learned").mkdir()
    (fold / "qat" / "learned" / "test_metrics.json").write_text("{}")
    (fold / "sweep.json").write_text(json.dumps({"runs": {"learned": {"export_error": "not exported: refused"}}}))
    out = tmp_path / "gate.md"
    assert gate_table.main([str(tmp_path / "cv"), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert "| fold-1 | w8a8 | model.int8.onnx | kept | 163 | 2.8e-05 / 2.3e-03 | 4.6e-02 / 1.0e-01 | 0.14 | " \
           "backbone.1.output_quant, 0.22 |" in lines
    assert "| fold-1 | w8a8 | model.int8.cpu.onnx | LEFT OUT | 163 | 2.8e-05 / 2.3e-03 | 4.6e-02 / 1.0e-01 | 3.50 | " \
           "stem out differs |" in lines
    assert "| fold-1 | learned | – | NO BUNDLE | | | | | not exported: refused |" in lines
    capsys.readouterr()
    (fold / "qat" / "w8a8" / "bundle" / "manifest.json").write_text(json.dumps({"metrics": {}}))
    assert gate_table.main([str(tmp_path / "cv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.json: not an INT8 bundle's manifest with parity figures" in err[0]


def test_seed_spread_prints_each_rows_spread_and_the_verdicts_that_differ(tmp_path, capsys):
    """scripts/seed_spread.py: Dice per seed and its spread, each row's difference from float per seed; verdict
    lines compared with their figures masked."""
    seed_spread = load_script("seed_spread")
    runs = []
    for seed, (base, learned, verdict) in enumerate([(0.80, 0.81, "YES"), (0.83, 0.80, "YES"), (0.47, 0.60, "NO")]):
        run = tmp_path / f"demo-s{seed}"
        (run / "report").mkdir(parents=True)
        rows = [_row("float", "float", [base]), _row(f"ORT PTQ (cal{seed})", "ptq", [base - 0.1]),
                _row("learned", "learned", [learned], 3.96)]
        checks = [f"learned: Dice {learned:.4f} at 3.9{seed} weight bits", f"within 0.01 Dice of float: {verdict}"]
        (run / "report" / "results.json").write_text(json.dumps({"test_names": ["a"], "rows": rows, "checks": checks}))
        runs.append(run)
    out = tmp_path / "spread.md"
    assert seed_spread.main([*map(str, runs), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| float | 0.800 / 0.830 / 0.470 | 0.360 | – / – / – | – |" in text
    assert "| model | Dice: demo-s0 / demo-s1 / demo-s2 | spread | - float: demo-s0 / demo-s1 / demo-s2 | spread | " \
           "scored by |\n|---|---|---|---|---|---|" in text
    assert "| ORT PTQ (best calibration per run) | 0.700 / 0.730 / 0.370 | 0.360 | -0.100 / -0.100 / -0.100 | 0.000 |" in text
    assert "| learned | 0.810 / 0.800 / 0.600 | 0.210 | +0.010 / -0.030 / +0.130 | 0.160 |" in text
    assert "Verdicts that differ between runs:" in text and "learned: Dice" not in text  # figures alone differ there
    assert [line for line in text.splitlines() if line.startswith("- ")] == [
        "- demo-s0: within 0.01 Dice of float: YES", "- demo-s1: within 0.01 Dice of float: YES",
        "- demo-s2: within 0.01 Dice of float: NO"]
    (runs[2] / "report" / "results.json").write_text(json.dumps({"test_names": ["a"], "rows": [], "checks": []}))
    capsys.readouterr()
    assert seed_spread.main(list(map(str, runs))) == 2
    assert "every run needs a scored float row" in capsys.readouterr().err


def test_pool_folds_pairs_a_row_with_another_fold_sets_row_on_the_same_frames(tmp_path, capsys):
    """--other-set: a second fold set (the same splits, other fold models) whose rows are NAME@other in --versus,
    paired frame by frame; its PTQ row stays apart from this set's; other frames or fold counts are one line, exit 2."""
    pool_folds = load_script("pool_folds")
    rebuilt = _kept_files(tmp_path, [
        {"test_names": ["a", "b"], "rows": [_row("float", "float", [0.5, 0.7], 32.0),
                                            _row("w5a5", "uniform", [0.5, 0.6], 5.0),
                                            _row("ORT PTQ (MinMax)", "ptq", [0.5, 0.7], 8.0)]},
        {"test_names": ["c"], "rows": [_row("float", "float", [0.9], 32.0), _row("w5a5", "uniform", [0.8], 5.0)]}])
    first = tmp_path / "first"
    first.mkdir()
    first_paths = _kept_files(first, [
        {"test_names": ["a", "b"], "rows": [_row("float", "float", [0.6, 0.6], 32.0),
                                            _row("w4a4", "uniform", [0.3, 0.5], 4.0),
                                            _row("ORT PTQ (Percentile)", "ptq", [0.1, 0.1], 8.0)]},
        {"test_names": ["c"], "rows": [_row("float", "float", [0.8], 32.0), _row("w4a4", "uniform", [0.9], 4.0)]}])
    assert pool_folds.main([*map(str, rebuilt), "--other-set", *map(str, first_paths),
                            "--versus", "w5a5:w4a4@other", "float:float@other"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    pair = next(line for line in lines if line.startswith("| w5a5 | w4a4@other |"))
    assert pair.startswith(f"| w5a5 | w4a4@other | {0.2 / 3:+.4f} [") and pair.endswith(" (3) |")  # a, b, c paired
    assert "| float | float@other | +0.0333 [" in out
    assert "w4a4" not in out.split("Fold columns")[0]  # the pooled table is this set's alone
    assert f"Rows NAME@other: {first_paths[0]}, {first_paths[1]}" in out
    first_paths[1].write_text(json.dumps({"test_names": ["d"], "rows": [_row("float", "float", [0.8], 32.0)]}))
    for other, problem in (([first_paths[0]], "1 fold files for 2 folds"),
                           (first_paths, f"{first_paths[1]}: its test frames are not those of {rebuilt[1]}")):
        assert pool_folds.main([*map(str, rebuilt), "--other-set", *map(str, other), "--versus", "w5a5:float"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and problem in err[0]
