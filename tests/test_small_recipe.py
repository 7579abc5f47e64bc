"""The small-data recipe: a step budget, warm-up + cosine per step, AdamW, validation every N epochs, and the
ultrasound augmentation steps (aligned image and mask, binary masks, values kept in [0, 1])."""

from __future__ import annotations

import json
import math

import pytest
import torch

from device_runtime.core.errors import InputError
from training import loop, schedule, train
from training.checkpoint import read_checkpoint
from training.config import build_config
from training.data.transforms import AugmentConfig, Blur, Gamma, Speckle, build_train_transform

OFF = dict(rotation=0.0, hflip=False, vflip=False, intensity_shift=0.0, contrast=0.0)


def test_warmup_cosine_shape():
    f = [schedule.warmup_cosine(s, 10, 110, 0.05) for s in range(111)]
    assert f[0] == pytest.approx(0.01) and f[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # rising during warm-up
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then never rising
    assert f[60] == pytest.approx(0.05 + 0.95 * 0.5) and f[110] == pytest.approx(0.05)


def test_budget_in_steps_cuts_the_last_epoch():
    b = schedule.Budget(steps_per_epoch=7, total_steps=30)
    assert b.epochs == 5 and [b.steps_in(e) for e in range(5)] == [7, 7, 7, 7, 2]
    cfg = build_config("quick", steps=0, epochs=3)
    assert schedule.plan_budget(cfg, 4).total_steps == 12


def test_adamw_decays_only_weights():
    cfg = build_config("small", input_size=(64, 64))
    trainer = train.build_trainer(cfg, torch.device("cpu"), pretrained="none")
    groups = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and groups[0]["weight_decay"] == cfg.weight_decay > 0
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim <= 1 for p in groups[1]["params"])
    assert groups[1]["weight_decay"] == 0.0


def test_bad_budget_settings_are_refused():
    with pytest.raises(InputError, match="steps"):
        build_config("small", steps=-1)
    with pytest.raises(InputError, match="val_every"):
        build_config("small", val_every=0)
    with pytest.raises(InputError, match="optimizer"):
        build_config("small", optimizer="sgd")


@pytest.fixture(scope="module")
def step_config(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "steps"
    # 30 phantom frames -> 24 train; batch 8 -> 3 steps an epoch; 7 steps -> epochs of 3, 3, 1
    return build_config("small", run_dir=str(run_dir), input_size=(64, 64), steps=7, batch_size=8, warmup_steps=2,
                        val_every=2, synth_count=30, device="cpu", val_batch_size=8,
                        pretrained="none")  # the phantom stage has its own tests (test_pretrain.py)


def test_step_budget_schedule_and_sparse_validation(step_config, monkeypatch):
    monkeypatch.setattr(loop, "finished_checkpoint", lambda checkpoint, keep_weights=True: checkpoint)  # keep its schedule to read
    run_dir = train.main(step_config)
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    split = json.loads((run_dir / "split.json").read_text())
    per_epoch = len(split["train"]) // 8
    epochs = math.ceil(7 / per_epoch)
    assert [r["epoch"] for r in log] == list(range(1, epochs + 1))
    validated = [r["epoch"] for r in log if "val_best_dice" in r]
    assert validated == sorted({e for e in range(1, epochs + 1) if e % 2 == 0} | {epochs})  # every 2nd and the last
    last = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["scheduler"]["last_epoch"] == 7  # stepped once per optimiser step
    lr = step_config.lr * schedule.warmup_cosine(7, 7 // 4, 7, step_config.min_lr_ratio)  # warm-up capped at a quarter
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr)
    assert (run_dir / "checkpoints" / "best.pt").is_file()


@pytest.mark.parametrize("averaging", [{}, {"weight_ema": 0.9}, {"swa_start": 0.5}])
def test_step_budget_resumes_exactly(step_config, tmp_path, monkeypatch, averaging):
    step_config = step_config.replace(**averaging)
    straight = train.main(step_config.replace(run_dir=str(tmp_path / "straight")))
    cfg = step_config.replace(run_dir=str(tmp_path / "interrupted"))
    real_epoch = train.train_one_epoch

    def crash_in_second_epoch(*args, **kwargs):
        if kwargs["epoch"] == 1:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(cfg)
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    resumed = train.main(cfg, resume=True)
    for name in ("last.pt", "best.pt"):  # best.pt: the weight average when there is one
        a = read_checkpoint(straight / "checkpoints" / name)["model"]
        b = read_checkpoint(resumed / "checkpoints" / name)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def averaged_weights(last: dict) -> dict:
    """The weight average's network in last.pt, keyed like a plain model's state dict."""
    return {k[len("module."):]: v for k, v in last["averaged"].items() if k.startswith("module.")}


def test_weight_average_is_what_is_validated_and_kept(step_config, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "finished_checkpoint", lambda checkpoint, keep_weights=True: checkpoint)  # keep last.pt's average to read
    cfg = step_config.replace(run_dir=str(tmp_path / "ema"), weight_ema=0.9, val_every=100)  # only the last epoch
    run_dir = train.main(cfg)
    last = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    best = read_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert int(last["averaged"]["n_averaged"]) == 7  # updated after each of the 7 optimiser steps
    averaged = averaged_weights(last)
    assert "averaged" not in best and set(best["model"]) == set(averaged)
    assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)
    weights = [k for k in averaged if k.endswith(".weight")]
    assert not all(torch.equal(averaged[k], last["model"][k]) for k in weights)  # not the weights as trained
    with pytest.raises(InputError, match="weight_ema"):
        cfg.replace(weight_ema=1.0)


def test_swa_holds_the_lr_and_averages_only_the_tail(step_config, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "finished_checkpoint", lambda checkpoint, keep_weights=True: checkpoint)  # keep its optimiser and average
    cfg = step_config.replace(run_dir=str(tmp_path / "swa"), swa_start=0.5, swa_lr_ratio=0.2, val_every=100)
    budget = schedule.Budget(steps_per_epoch=3, total_steps=7)
    assert schedule.swa_first_step(cfg, budget) == 4 and schedule.swa_first_step(step_config, budget) is None
    factors = schedule.build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), cfg,
                                    budget).lr_lambdas[0]
    assert [factors(s) for s in (4, 5, 6, 7)] == pytest.approx([0.2] * 4)  # constant once averaging starts
    assert factors(2) > 0.2  # still decaying before
    run_dir = train.main(cfg)
    last = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    best = read_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert int(last["averaged"]["n_averaged"]) == 4  # steps 4, 5, 6 and 7, not the 3 before
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.2 * cfg.lr)
    averaged = averaged_weights(last)
    assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)  # the average is what is kept
    for bad in ({"swa_start": 1.0}, {"swa_lr_ratio": 0.0}, {"weight_ema": 0.9}, {"scheduler": "cosine"}):
        with pytest.raises(InputError, match="swa"):
            cfg.replace(**bad)


def test_equal_average_is_the_running_mean_and_keeps_counters_integer():
    values = [torch.tensor([1.0, 4.0]), torch.tensor([3.0, 0.0]), torch.tensor([5.0, 2.0])]
    mean = values[0]
    for count, value in enumerate(values[1:], start=1):
        mean = train.equal_average(mean, value, torch.tensor(count))
    assert torch.allclose(mean, torch.tensor([3.0, 2.0]))
    counter = train.equal_average(torch.tensor(7), torch.tensor(9), torch.tensor(1))
    assert counter.dtype == torch.int64 and int(counter) == 9


def test_scale_shift_and_elastic_keep_image_and_mask_aligned():
    image = torch.zeros(1, 64, 64)
    image[:, 20:44, 14:40] = 1.0
    transform = build_train_transform(AugmentConfig(**{**OFF, "scale": (0.7, 1.4), "translate": 0.1,
                                                       "elastic_alpha": 3.0, "elastic_grid": 4}))
    torch.manual_seed(0)
    changed = 0
    for _ in range(12):
        out_image, out_mask = transform(image, image.clone())
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
        assert ((out_image > 0.5).float() != out_mask).float().sum() <= 0.1 * max(float(out_mask.sum()), 1.0)
        changed += not torch.equal(out_mask, image)
    assert changed >= 10


def test_photometric_steps_leave_the_mask_and_the_range():
    torch.manual_seed(0)
    image, mask = torch.rand(1, 32, 32), (torch.rand(1, 32, 32) > 0.5).float()
    for step in (Gamma(0.5), Blur(1.5, p=1.0), Speckle(0.3)):
        out, out_mask = step(image, mask)
        assert out_mask is mask and out.shape == image.shape
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0 and not torch.equal(out, image)
    ends = torch.tensor([[[0.0, 1.0]]])
    assert torch.equal(Gamma(0.5)(ends, ends)[0], ends)  # gamma keeps black and white


def test_new_settings_are_checked():
    with pytest.raises(InputError, match="scale"):
        AugmentConfig(scale=(1.2, 0.8))
    with pytest.raises(InputError, match="elastic_grid"):
        AugmentConfig(elastic_grid=1)


def test_channels_last_on_cpu_trains_the_same_network(tmp_path):
    """Memory format is a speed choice only: one step from the same start gives the same weights (to float
    rounding) in either layout (dropout off: its random mask follows the memory order)."""
    torch.manual_seed(0)
    image, mask = torch.rand(2, 1, 64, 64), (torch.rand(2, 1, 64, 64) > 0.7).float()
    results = []
    for channels_last in (False, True):
        cfg = build_config("quick", input_size=(64, 64), channels_last=channels_last)
        torch.manual_seed(1)
        trainer = train.build_trainer(cfg, torch.device("cpu"))
        layout = train.memory_format(cfg, torch.device("cpu"))
        for module in trainer.model.modules():  # dropout draws its mask in memory order: same draws, other pixels
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        assert trainer.model.backbone["0"][0].weight.is_contiguous(memory_format=layout)
        loss = trainer.criterion(trainer.model.train()(image.to(memory_format=layout))["out"], mask)
        loss.backward()
        trainer.optimizer.step()
        results.append({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()})
    for name, tensor in results[0].items():
        assert torch.allclose(tensor.float(), results[1][name].float(), atol=1e-4), name
