"""The training loop: the loss goes down, resume continues exactly, two-process DDP on CPU works."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from device_runtime.core.errors import InputError
from training import train
from training.data import loader
from training.checkpoint import RESUME_ONLY, read_checkpoint
from training.config import build_config

from conftest import REPO


def test_training_lowers_the_loss_and_writes_the_run(tiny_run):
    log = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    for name in ("config.toml", "split.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tiny_run / name).is_file(), name
    checkpoint = read_checkpoint(tiny_run / "checkpoints" / "last.pt")
    assert checkpoint["arch"] == "mobilenet_v3_large" and checkpoint["input_size"] == [64, 64]
    best = read_checkpoint(tiny_run / "checkpoints" / "best.pt")  # what export and QAT read: no resume state
    assert not set(RESUME_ONLY) & set(best) and best["model"].keys() == checkpoint["model"].keys()
    # the finished run's last.pt: the last weights and where it stopped, its optimiser state dropped (a third)
    assert checkpoint["epoch"] == 2 and checkpoint["finished"] and not set(RESUME_ONLY) & set(checkpoint)
    size = (tiny_run / "checkpoints" / "last.pt").stat().st_size
    assert size < 1.05 * (tiny_run / "checkpoints" / "best.pt").stat().st_size


def test_resume_of_a_finished_run_says_so_and_a_longer_one_is_refused(tiny_config, tiny_run, capsys):
    last = tiny_run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    assert train.main(tiny_config, resume=True) == tiny_run
    assert "training finished earlier (2 epochs); nothing to train" in capsys.readouterr().out
    assert last.read_bytes() == before
    with pytest.raises(InputError, match=r"finished after 2 epochs .* cannot be continued to 3 epochs"):
        train.main(tiny_config.replace(epochs=3), resume=True)
    assert last.read_bytes() == before


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
        if kwargs["epoch"] == 1:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(interrupted_cfg)
    midway = read_checkpoint(tmp_path / "interrupted" / "checkpoints" / "last.pt")
    assert midway["epoch"] == 1 and set(RESUME_ONLY) - {"averaged"} <= set(midway) and "finished" not in midway
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    resumed = train.main(interrupted_cfg, resume=True)

    a = read_checkpoint(straight / "checkpoints" / "last.pt")
    b = read_checkpoint(resumed / "checkpoints" / "last.pt")
    assert b["epoch"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    log = [json.loads(line)["epoch"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert log == [1, 2]


def test_compile_wraps_the_training_step_only(tiny_config, tmp_path, monkeypatch):
    """--compile hands the training forward to torch.compile (spied here: compiling takes minutes on 2 cores,
    scripts/bench_train.py --compile measures the real one); validation and the checkpoint use the eager module."""
    compiled_calls = []

    class Spy(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.inner = module

        def forward(self, x):
            compiled_calls.append(len(x))
            return self.inner(x)

    monkeypatch.setattr(torch, "compile", lambda module: Spy(module))
    run_dir = train.main(tiny_config.replace(run_dir=str(tmp_path / "compiled"), epochs=1, torch_compile=True))
    assert compiled_calls and sum(compiled_calls) == len(compiled_calls) * tiny_config.batch_size
    last = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert not [k for k in last["model"] if not k.startswith(("backbone.", "classifier."))]  # no wrapper prefix
    assert "val_best_dice" in json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_compile_flag_reaches_the_config_and_may_be_added_on_resume(tiny_run):
    parser = train.get_args_parser()
    assert train.config_from_args(parser.parse_args(["--recipe", "small", "--compile"])).torch_compile
    assert not train.config_from_args(parser.parse_args(["--recipe", "small"])).torch_compile
    resumed = parser.parse_args(["--run-dir", str(tiny_run), "--resume", "--compile"])
    assert train.config_from_args(resumed).torch_compile


def test_resume_without_a_checkpoint_is_refused(tiny_config, tmp_path):
    with pytest.raises(InputError, match="nothing to resume"):
        train.main(tiny_config.replace(run_dir=str(tmp_path / "fresh")), resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [["--recipe", "quick", "--epochs", "1"],
                                    # steps budget, channels_last, the ultrasound augmentation and the phantom
                                    # pre-training stage, under DDP too (issue 11's recipe)
                                    ["--recipe", "small", "--steps", "12", "--val-every", "1", "--phantom-frames", "30",
                                     "--phantom-steps", "0", "--phantom-batch-size", "0"]])
def test_two_process_gloo_ddp_on_cpu(tmp_path, budget):
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.train", *budget, "--input-size", "64", "64",
               "--synth-count", "48", "--batch-size", "4", "--device", "cpu", "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    last = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == last["epoch"]  # written by rank 0 only
    if "--steps" in budget:  # the schedule steps per batch: the budget counts optimiser steps, not epochs
        # after exactly 12 steps the warm-up cosine ends at its floor (lr x min_lr_ratio); 11 would sit above it
        # (a finished run's last.pt keeps no scheduler to count them: the logged lr does)
        recipe = build_config("small")
        for folder in (run_dir, run_dir / "phantom"):  # the stage ran under DDP first, on the same budget
            logged = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["lr"]
            assert logged == pytest.approx(recipe.lr * recipe.min_lr_ratio), folder
        assert 1 < last["epoch"] < 12  # several steps per epoch on each rank, the last epoch cut at the budget
        assert (run_dir / "phantom" / "done.json").is_file()
    else:
        assert last["epoch"] == 1


@pytest.mark.parametrize("batch_size, world", [(1, 1), (16, 16), (6, 4)])
def test_a_batch_of_one_frame_per_process_is_refused(tiny_config, batch_size, world):
    dataset = train.augmented_train_set(tiny_config, *np.zeros((2, 4 * world, 64, 64), np.float32))
    with pytest.raises(InputError, match=f"--batch-size {batch_size}.*at least 2 frames per step"):
        loader.build_loader(dataset, tiny_config.replace(batch_size=batch_size), loader.Dist(0, world, 0), 0, 0)
    assert len(loader.build_loader(dataset, tiny_config.replace(batch_size=2 * world), loader.Dist(0, world, 0), 0, 0))


def test_every_train_flag_is_a_config_field():
    """`config_from_args` takes the flags whose names are TrainConfig fields: a flag that is none would be ignored."""
    from training.config import TrainConfig

    flags = {action.dest for action in train.get_args_parser()._actions} - {"help", "recipe", "resume"}
    assert "flip_tta" in flags and flags <= set(TrainConfig.__dataclass_fields__)
