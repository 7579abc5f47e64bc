"""The command line end to end on a tiny synthetic set, and its one-line errors."""

import subprocess
import sys

import pytest

from export.cli import main

from conftest import REPO


@pytest.mark.slow
def test_pipeline_on_a_tiny_synthetic_set(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # --split 0.8 0.1 0.1: the frames this test has always used; with quick's own shares the one-epoch model's FP32
    # graph differed from PyTorch by 1.04e-4 on the other validation subject, over the export's 1e-4 bound
    code = main(["pipeline", "--input-size", "64", "64", "--epochs", "1", "--synth-count", "30", "--split", "0.8", "0.1",
                 "0.1", "--batch-size", "4", "--device", "cpu", "--run-dir", str(run_dir), "--qat-epochs", "2"])
    captured = capsys.readouterr()
    out = captured.out
    assert "Collecting tensor data" not in out  # ONNX Runtime's PTQ output went to RUN/ptq/, not here
    assert (run_dir / "ptq" / "onnxruntime_quantization.log").is_file()
    refused = [n for n in ("learned-a8-i4-t4", "w8a8", "w4a8") if not (run_dir / "qat" / n / "bundle").is_dir()]
    if refused:  # an INT8 export the parity check refused: exit 3, and the last line names it
        assert code == 3 and f"INT8 exports refused ({', '.join(refused)})" in captured.err.strip().splitlines()[-1]
    else:
        assert code == 0
    # finished runs keep no optimiser state: the float last.pt weighs as its best.pt, a QAT run's keeps no weights
    last, best = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    assert last.stat().st_size < 1.05 * best.stat().st_size
    assert all((folder / "checkpoints" / "last.pt").stat().st_size < 1e5 for folder in (run_dir / "qat").iterdir())
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


def test_a_resumed_pipeline_keeps_its_qat_runs_own_schedule(tmp_path, monkeypatch):
    """`nerveseg pipeline --qat-epochs 2`, then `--resume` without it: the finished 2-epoch QAT run is scored again,
    not asked for the recipe's 3 epochs (which a finished run's slimmed last.pt refuses)."""
    import export.workflows.pipeline as pipeline
    from qat.config import to_toml
    from training.config import build_config

    cfg = build_config("quick", run_dir=str(tmp_path), device="cpu")
    made = pipeline.build_qat_config(cfg.recipe, run_dir=str(tmp_path), device="cpu", epochs=2,
                                     **pipeline.PIPELINE_LEARNED)
    (made.qat_dir / "checkpoints").mkdir(parents=True)
    (made.qat_dir / "checkpoints" / "last.pt").write_bytes(b"finished")
    (made.qat_dir / "config.toml").write_text(to_toml(made))
    asked = []
    monkeypatch.setattr(pipeline, "run_qat", lambda qcfg, resume: asked.append((qcfg.epochs, resume)))
    pipeline.run_qat_stage(cfg, tmp_path, resume=True)
    pipeline.run_qat_stage(cfg, tmp_path, resume=True, epochs=4)  # asked for explicitly: as asked
    assert asked == [(2, True), (4, True)]
