"""The command line end to end on a tiny synthetic set, and its one-line errors."""

import subprocess
import sys

import pytest

from export.cli import main

from conftest import REPO


@pytest.mark.slow
def test_pipeline_on_a_tiny_synthetic_set(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["pipeline", "--input-size", "64", "64", "--epochs", "1", "--synth-count", "30",
                 "--batch-size", "4", "--device", "cpu", "--run-dir", str(run_dir), "--qat-epochs", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "test (ONNX, as deployed)" in out and "bundle:" in out and "QAT learned-a8-i4-t4 (mean bits W" in out
    assert f"report: {run_dir / 'report' / 'report.html'}" in out
    # the INT8 stage: the bundle written, its files, the gate's figures against the model's own floor, and size
    learned = run_dir / "qat" / "learned-a8-i4-t4" / "bundle"
    assert f"INT8 bundle written: {learned} holds model.int8.onnx, model.int8.cpu.onnx" in out, out
    assert "the fake-quant model against itself" in out and "x smaller" in out
    # the closing summary: one line per QAT run saying plainly whether its INT8 bundle was written, where, and what
    # it holds (a faithful graph passes with no flag)
    summary = out[out.rindex("INT8 bundles:"):]
    for name in ("learned-a8-i4-t4", "w4a8", "w8a8"):
        assert f"{name} " in summary and f"INT8 bundle written: {run_dir / 'qat' / name / 'bundle'} (" in summary, summary
    for name in ("threshold.json", "threshold_curve.png", "test_metrics.json", "examples.png",
                 "bundle/manifest.json", "bundle/model.fp32.onnx", "qat/learned-a8-i4-t4/bits.json",
                 "qat/learned-a8-i4-t4/test_metrics.json", "qat/w8a8/test_metrics.json", "qat/w4a8/test_metrics.json", "report/report.html",
                 "report/results.json"):
        assert (run_dir / name).is_file(), name


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/nonexistent/data", "--run-dir", "{tmp}/r"], "/nonexistent/data"),
    (["train", "--recipe", "fast"], "unknown recipe"),
    (["tune", "--run-dir", "{tmp}/missing"], "best.pt"),
    (["export", "--checkpoint", "{tmp}/nope.pt"], "nope.pt"),
])
def test_bad_input_is_one_line_without_traceback(argv, message, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run([sys.executable, "-m", "export.cli", *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
