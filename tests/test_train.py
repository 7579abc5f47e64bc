"""The training loop: the loss goes down, resume continues exactly, two-process DDP on CPU works."""

import json
import os
import subprocess
import sys

import pytest
import torch

from device_runtime.errors import InputError
from training import train
from training.checkpoint import RESUME_ONLY, read_checkpoint

from conftest import REPO


def test_training_lowers_the_loss_and_writes_the_run(tiny_run):
    log = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    for name in ("config.toml", "split.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tiny_run / name).is_file(), name
    checkpoint = read_checkpoint(tiny_run / "checkpoints" / "last.pt")
    assert checkpoint["arch"] == "mobilenet_v3_large" and checkpoint["input_size"] == [64, 64]
    assert checkpoint["epoch"] == 2 and "rng" in checkpoint and "optimizer" in checkpoint
    best = read_checkpoint(tiny_run / "checkpoints" / "best.pt")  # what export and QAT read: no resume state
    assert not set(RESUME_ONLY) & set(best) and best["model"].keys() == checkpoint["model"].keys()


def test_a_finished_run_is_not_overwritten(tiny_config, tiny_run):
    before = (tiny_run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(InputError, match="--resume"):
        train.main(tiny_config)
    assert (tiny_run / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_continues_exactly(tiny_config, tmp_path, monkeypatch):
    """Epochs 1+2 in one go equal epoch 1, a crash in epoch 2, then --resume."""
    straight = train.main(tiny_config.replace(run_dir=str(tmp_path / "straight")))

    interrupted_cfg = tiny_config.replace(run_dir=str(tmp_path / "interrupted"))
    real_epoch = train.train_one_epoch

    def crash_in_second_epoch(*args, **kwargs):
        if args[7] == 1:  # the epoch argument
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(interrupted_cfg)
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    resumed = train.main(interrupted_cfg, resume=True)

    a = read_checkpoint(straight / "checkpoints" / "last.pt")
    b = read_checkpoint(resumed / "checkpoints" / "last.pt")
    assert b["epoch"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    log = [json.loads(line)["epoch"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert log == [1, 2]


def test_resume_without_a_checkpoint_is_refused(tiny_config, tmp_path):
    with pytest.raises(InputError, match="nothing to resume"):
        train.main(tiny_config.replace(run_dir=str(tmp_path / "fresh")), resume=True)


@pytest.mark.slow
def test_two_process_gloo_ddp_on_cpu(tmp_path):
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.train", "--recipe", "quick", "--input-size", "64", "64", "--epochs", "1",
               "--synth-count", "24", "--batch-size", "4", "--device", "cpu", "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # written by rank 0 only
