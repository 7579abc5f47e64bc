"""scripts/qat_drift.py: where a QAT run's Dice leaves float's (the grid alone, the fine-tuning, the re-tuned T*)."""

from __future__ import annotations

import json

from conftest import load_script
from qat.checkpoint import load_qat_model
from qat.config import load_qat_config
from qat.sensitivity import step_log
from training.checkpoint import load_model
from training.stages import split_arrays


def test_the_start_row_is_the_model_the_run_trained_from(tiny_qat_run):
    """The grid-only model is rebuilt (for a run that kept no start.pt) as `nerveseg qat` built it before epoch 1:
    every quantizer's bits and step equal those the run recorded then (metrics.jsonl's steps_start) and those of the
    start.pt it kept."""
    drift = load_script("qat_drift")
    run_dir = tiny_qat_run.parents[1]
    float_model, _, cfg = load_model(run_dir / "checkpoints" / "best.pt")
    qcfg = load_qat_config(tiny_qat_run / "config.toml")
    assert drift.can_rebuild_start(qcfg)
    start = drift.start_model(float_model, cfg, qcfg, split_arrays(run_dir, "train", cfg)[0])
    recorded = json.loads((tiny_qat_run / "metrics.jsonl").read_text().splitlines()[0])["steps_start"]
    assert step_log(start) == recorded
    assert step_log(load_qat_model(tiny_qat_run / "checkpoints" / "start.pt")[0]) == recorded


def test_the_table_scores_each_model_at_floats_rule_and_its_own(tiny_qat_run, capsys):
    """Float's row is the same at both rules; the trained row's own T* is the one its run tuned; --frames adds a
    set's two columns; a run folder that is not there is one line and exit status 2."""
    drift = load_script("qat_drift")
    run_dir, name = tiny_qat_run.parents[1], tiny_qat_run.name
    assert drift.main(["--run-dir", str(run_dir), "--qat", name, "--frames", str(run_dir / "synthetic")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == ("| model | own T* | val @ float T* | val @ own T* | test @ float T* | test @ own T* | "
                        "synthetic @ float T* | synthetic @ own T* |")
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    assert list(rows) == ["float", f"{name}: start (grid only)", f"{name}: trained"]
    cells = [float(c) for c in rows["float"][1:]]
    assert cells[0::2] == cells[1::2] and all(0.0 <= c <= 1.0 for c in cells)
    tuned = json.loads((tiny_qat_run / "test_metrics.json").read_text())["selection"]["test_trained"]["threshold"]
    assert rows[f"{name}: trained"][0] == f"{tuned:.2f}"

    assert drift.main(["--run-dir", str(run_dir.parent / "not-a-run"), "--qat", name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not-a-run" in err[0]
