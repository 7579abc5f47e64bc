"""The CUDA paths: mixed-precision training, the float32 parity reference, weight averages, QAT and both exports on
a GPU. The GPU tests skip without one (CI has none); they ran on an H100 (docs/accuracy.md names the dates)."""

import numpy as np
import pytest
import torch

from export.cli import main
from training import loop, train
from training.checkpoint import read_checkpoint
from training.config import build_config
from training.evaluation.predict import predict_probabilities, strict_float32
from training.model import build_model_of

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_strict_float32_turns_tf32_off_and_restores_it():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError), strict_float32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError  # restored on the way out of an error too
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@needs_cuda
@pytest.mark.gpu
def test_float32_prediction_on_cuda_matches_the_cpu():
    """Export parity compares ONNX Runtime's float32 with this reference at 1e-4: TF32 would miss it."""
    torch.manual_seed(0)
    model = build_model_of(build_config("small", input_size=(64, 64)), pretrained="none").eval()
    images = np.random.default_rng(0).random((4, 64, 64), dtype=np.float32)
    cpu = predict_probabilities(model, images, torch.device("cpu"))
    gpu = predict_probabilities(model.cuda(), images, torch.device("cuda"))
    assert np.abs(cpu - gpu).max() < 1e-4


@needs_cuda
@pytest.mark.gpu
@pytest.mark.slow
def test_pipeline_on_cuda(tmp_path, capsys):
    """Float training under bf16 autocast, tuning, the FP32 export's parity, QAT and the INT8 export, on the GPU."""
    run_dir = tmp_path / "run"
    code = main(["pipeline", "--input-size", "64", "64", "--epochs", "2", "--synth-count", "30", "--batch-size", "4",
                 "--device", "cuda", "--run-dir", str(run_dir), "--qat-epochs", "2"])
    out = capsys.readouterr().out
    assert code == (3 if "INT8 bundle refused" in out else 0), out  # 3: a requested INT8 export was refused
    assert "test (ONNX, as deployed)" in out and "bundle:" in out
    assert (run_dir / "bundle" / "model.fp32.onnx").is_file()
    assert "INT8 bundle written:" in out and "INT8 bundles:" in out


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("averaging", [{"swa_start": 0.5}, {"weight_ema": 0.9}])
def test_weight_averages_on_cuda(tmp_path, averaging, monkeypatch):
    """SWA's equal average and the EMA on the GPU, where torch's foreach kernels refuse BatchNorm's int64 counter
    (found on an H100: `Integer division with addcdiv is no longer supported`)."""
    monkeypatch.setattr(loop, "finished_checkpoint", lambda checkpoint, keep_weights=True: checkpoint)  # keep last.pt's average to read
    cfg = build_config("small", run_dir=str(tmp_path / "avg"), input_size=(64, 64), steps=7, batch_size=8,
                       warmup_steps=2, val_every=100, synth_count=30, device="cuda", val_batch_size=8,
                       pretrained="none", **averaging)
    run_dir = train.main(cfg)
    last = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert int(last["averaged"]["n_averaged"]) == (4 if "swa_start" in averaging else 7)
    best = read_checkpoint(run_dir / "checkpoints" / "best.pt")["model"]
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())
