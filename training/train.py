"""`nerveseg train`: DeepLabV3 on grey ultrasound frames with Adam(W) and BCE + Dice.

Reads top to bottom: prepare the data, build the loaders, train one epoch, validate as deployed (eval
mode; every `val_every` epochs and after the last), save checkpoints, repeat. The budget is `epochs`, or
`steps` optimiser steps when given (the last epoch then stops at the budget; training.schedule). Several GPUs:
`torchrun --nproc_per_node=N -m training.train ...` (training.data.loader).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from device_runtime.core import metrics
from device_runtime.core.errors import InputError
from device_runtime.core.fileio import dumps_strict, write_text

from . import pretrain
from .batchnorm import recalibrate_batchnorm
from .checkpoint import (finished_on_resume, make_checkpoint, read_checkpoint, rng_state, set_rng_state,
                         without_resume_state)
from .config import TrainConfig, to_toml
from .data.dataset import (
    SegmentationDataset, discover, group_by_prefix, load_pairs, load_split, save_split, split_samples)
from .data.loader import Dist, build_loader, loader_workers, setup_distributed
from .data.synth import write_phantom
from .data.transforms import AugmentConfig, build_train_transform
from .evaluation.predict import autocast, predict_probabilities, resolve_device
from .flags import config_from_args, get_args_parser  # noqa: F401 (the command line's flags; torch-free there)
from .loop import LOG_NAME, exclusive_run, resume_from_last, rewrite_log, run_epochs, train_one_epoch
from .losses import BCEDiceLoss
from .model import build_model_of
from .schedule import Budget, build_optimizer, build_scheduler, plan_budget, swa_first_step


def prepare_split(cfg: TrainConfig, run_dir: Path, resume: bool, splits: dict | None = None) -> dict:
    """The run's split: read back on resume, else `splits` when given (cross-validation folds), else made
    from the dataset (or the phantom); saved to split.json."""
    split_path = run_dir / "split.json"
    if resume:
        return load_split(split_path)
    root = Path(cfg.data) if cfg.data else write_phantom(run_dir / "synthetic", cfg.synth_count, cfg.seed)
    if splits is None:
        samples = discover(root)
        splits = split_samples(group_by_prefix(samples) if cfg.group_by == "prefix" else samples, cfg.seed,
                               cfg.split)
    save_split(split_path, splits, root, seed=cfg.seed)
    return splits


def memory_format(cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """Channels-last where the convolution kernels prefer it: always on CUDA, on the CPU when asked."""
    return torch.channels_last if device.type == "cuda" or cfg.channels_last else torch.contiguous_format


def float_step(net: torch.nn.Module, criterion: BCEDiceLoss, device: torch.device, amp: bool):
    """The float loss of one batch, for `loop.train_one_epoch`: the forward under autocast (CUDA), the loss in float32
    (it casts its inputs)."""
    def step_loss(image, mask):
        with autocast(device, amp):
            logits = net(image)["out"]
        return criterion(logits, mask), {}

    return step_loss


def validate(model, images: np.ndarray, masks: np.ndarray, device, cfg: TrainConfig) -> dict:
    """Eval-mode (as deployed) Dice at 0.5 and at the best threshold of the grid.

    Judging in eval mode matters: a network trained from scratch can look good with batch statistics and
    predict nothing with its running statistics.
    """
    prob = predict_probabilities(model, images, device, cfg.val_batch_size, cfg.amp)
    sweep = metrics.dice(metrics.confusion_counts_over_thresholds(prob, masks, metrics.THRESHOLD_GRID))
    best = int(np.argmax(sweep))
    at_half = metrics.summary(metrics.confusion_counts(prob > 0.5, masks))
    return {"val_dice": at_half["dice"], "val_iou": at_half["iou"], "val_best_dice": float(sweep[best]),
            "val_best_threshold": float(metrics.THRESHOLD_GRID[best])}


def check_run_dir(run_dir: Path, resume: bool) -> bool:
    """Whether to continue from last.pt (`loop.resume_from_last`); a trained run is not started over by mistake."""
    if not resume and (run_dir / "checkpoints" / "last.pt").is_file():
        raise InputError(f"{run_dir}: already holds a trained run; pass --resume to continue it or pick another --run-dir")
    return resume_from_last(run_dir, resume)


@dataclass
class Trainer:
    """What one training run holds: the model and everything that steps it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: BCEDiceLoss
    averaged: AveragedModel | None = None  # weight_ema or swa_start > 0: the average that is validated and kept
    start_epoch: int = 0
    best_dice: float = -1.0

    @property
    def judged(self) -> torch.nn.Module:
        """The network validation scores and best.pt keeps: the weight average once it averages something."""
        if self.averaged is not None and int(self.averaged.n_averaged) > 0:
            return self.averaged.module
        return self.model


def augmented_train_set(cfg: TrainConfig, images: np.ndarray, masks: np.ndarray) -> SegmentationDataset:
    """The training frames under the recipe's augmentation; QAT fine-tunes on exactly this set too."""
    return SegmentationDataset(images, masks, build_train_transform(AugmentConfig.from_config(cfg)))


@torch.no_grad()
def equal_average(averaged: torch.Tensor, current: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """SWA's running mean after `count` earlier tensors, one tensor at a time; an integer (BatchNorm's batch
    counter) takes the newest value. Torch's default, a CUDA foreach kernel, refuses integer buffers (an H100 run
    stopped on "Integer division with addcdiv is no longer supported", torch 2.11)."""
    if not averaged.is_floating_point():
        return current
    return averaged + (current - averaged) / (count + 1)


def build_trainer(cfg: TrainConfig, device: torch.device, budget: Budget | None = None,
                  pretrained: str | None = None) -> Trainer:
    """`budget` sets the schedule's length; without one, `cfg.epochs` epochs of one step each are assumed
    (enough for callers that only need the model and optimiser). `pretrained` replaces cfg.pretrained ("none" when
    a checkpoint will be restored over the weights anyway); "phantom" means its stage's best checkpoint."""
    if pretrained is None:
        pretrained = str(pretrain.backbone_path(cfg)) if pretrain.uses_phantom(cfg) else cfg.pretrained
    # the config refuses phantom_head without pretrained = "phantom"; "none" here means a resume
    model = build_model_of(cfg, pretrained=pretrained, with_head=cfg.phantom_head and pretrained != "none")
    model = model.to(device).to(memory_format=memory_format(cfg, device))
    optimizer = build_optimizer(model, cfg)
    # bf16 autocast needs no loss scaling; fp16 (older GPUs) does
    use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    budget = budget or plan_budget(cfg, 1)
    # torch.optim.swa_utils: the average's BatchNorm statistics follow too, and are re-estimated before validation
    averaged = None
    if cfg.weight_ema > 0:
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.weight_ema), use_buffers=True)
    elif cfg.swa_start > 0:  # the equal average of every step from swa_first_step on
        averaged = AveragedModel(model, avg_fn=equal_average, use_buffers=True)
    return Trainer(model, optimizer, build_scheduler(optimizer, cfg, budget),
                   torch.amp.GradScaler("cuda", enabled=use_scaler), BCEDiceLoss(cfg.bce_weight, cfg.dice_weight),
                   averaged)


def restore(trainer: Trainer, path: Path) -> None:
    """Continue exactly where last.pt stopped: weights, optimiser, schedule, scaler, epoch and RNG."""
    state = read_checkpoint(path)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    if trainer.averaged is not None:
        trainer.averaged.load_state_dict(state["averaged"])
    trainer.start_epoch, trainer.best_dice = state["epoch"], state["best_val_dice"]
    set_rng_state(state["rng"])


@dataclass
class FloatEpochs:
    """What an epoch of float training does, for `loop.run_epochs`: steps under the recipe's schedule and weight
    average, validation every `val_every` epochs and after the last, checkpoints with the scheduler, scaler and
    average (best.pt holds the average, which was validated)."""

    trainer: Trainer
    cfg: TrainConfig
    budget: Budget
    make_loader: Callable[[int], DataLoader]
    net: torch.nn.Module  # what steps: the model, or its DDP / torch.compile wrapper
    device: torch.device
    train_images: np.ndarray
    val_images: np.ndarray
    val_masks: np.ndarray
    show: bool = True
    average_step: Callable[[], None] | None = None
    final_weights = True  # a finished run's last.pt keeps its last weights (best.pt holds the average, if any)

    @property
    def per_step(self) -> bool:
        return self.cfg.scheduler == "warmup_cosine"

    def train(self, epoch: int) -> dict:
        trainer, cfg = self.trainer, self.cfg
        scheduler = trainer.scheduler if self.per_step else None

        def after_step():
            if scheduler is not None:
                scheduler.step()
            if self.average_step is not None:
                self.average_step()

        step_loss = float_step(self.net, trainer.criterion, self.device, cfg.amp)
        stats = train_one_epoch(self.net, self.make_loader(epoch), step_loss, trainer.optimizer, trainer.scaler,
                                self.device, epoch=epoch, label=f"epoch {epoch + 1}/{self.budget.epochs}",
                                show=self.show, max_steps=self.budget.steps_in(epoch),
                                layout=memory_format(cfg, self.device), after_step=after_step)
        if not self.per_step:
            trainer.scheduler.step()
        return stats

    def judge(self, epoch: int, stats: dict) -> bool:
        last = epoch + 1 == self.budget.epochs
        if not (last or (epoch + 1) % self.cfg.val_every == 0):  # validation costs a pass over train + val frames
            return False
        if self.cfg.recalibrate_bn:  # rank 0's statistics reach the other ranks: DDP broadcasts buffers
            recalibrate_batchnorm(self.trainer.judged, self.train_images, self.device, self.cfg.batch_size)
        stats.update(validate(self.trainer.judged, self.val_images, self.val_masks, self.device, self.cfg))
        return True

    def checkpoints(self, epoch: int, stats: dict, best_dice: float) -> tuple[dict, dict]:
        trainer = self.trainer
        last = make_checkpoint(self.cfg, trainer.model, epoch=epoch + 1, best_val_dice=best_dice,
                               optimizer=trainer.optimizer.state_dict(), scheduler=trainer.scheduler.state_dict(),
                               scaler=trainer.scaler.state_dict(), rng=rng_state(), val=stats)
        if trainer.averaged is not None:  # last.pt resumes both; best.pt holds the average, which was validated
            last["averaged"] = trainer.averaged.state_dict()
        return last, {**without_resume_state(last), "model": trainer.judged.state_dict()}

    def record(self, epoch: int) -> dict:
        return {}

    def learning_rate(self) -> float:
        return self.trainer.optimizer.param_groups[0]["lr"]

    def line(self, epoch: int, stats: dict, judged: bool) -> str:
        shown = (f"val Dice@0.5 {stats['val_dice']:.4f}  best-T Dice {stats['val_best_dice']:.4f}" if judged
                 else "(not validated)")
        return (f"epoch {epoch + 1:>3}/{self.budget.epochs}  loss {stats['train_loss']:.4f}  {shown}  "
                f"{stats['train_images_per_s']:.1f} img/s")


def main(cfg: TrainConfig, resume: bool = False, splits: dict | None = None) -> Path:
    """Train; return the run folder. Writes config.toml, split.json, metrics.jsonl, checkpoints/{last,best}.pt.

    `splits` ({"train", "val", "test"} lists of Samples) replaces the seeded split (cross-validation). With
    `pretrained = "phantom"` the phantom stage (training.pretrain) is trained first, unless it has finished.
    """
    ddp, device = setup_distributed(cfg.device)
    try:
        if ddp.main:  # before a phantom stage that may take a while: a refused run folder is refused at once
            resume = check_run_dir(Path(cfg.run_dir), resume)
        resuming = resume and (Path(cfg.run_dir) / "checkpoints" / "last.pt").is_file()
        if pretrain.uses_phantom(cfg) and not resuming:  # a resumed run does not need the stage any more (_train)
            if ddp.main:  # the run's config first, so that --resume after a kill in the stage knows the run
                pretrain.check_stage(pretrain.phantom_config(cfg))  # a stage of other settings: refused, nothing written
                with exclusive_run(Path(cfg.run_dir)):
                    write_text(Path(cfg.run_dir) / "config.toml", to_toml(cfg))
            pretrain_on_phantom(cfg, ddp, device)
        with exclusive_run(Path(cfg.run_dir)) if ddp.main else contextlib.nullcontext():
            return _train(cfg, ddp, device, resume, splits)
    finally:
        if ddp.world > 1:
            dist.destroy_process_group()


def pretrain_on_phantom(cfg: TrainConfig, ddp: Dist | None = None, device: torch.device | None = None) -> Path:
    """Train (or resume, or read back) the phantom stage of `cfg`; return the checkpoint to take the backbone from."""
    ddp = ddp or Dist()
    device = device or resolve_device(cfg.device)
    stage = pretrain.phantom_config(cfg)
    folder = Path(stage.run_dir)
    finished = pretrain.check_stage(stage)  # every rank reads the same files (a shared file system, as for resume)
    if not finished:
        if ddp.main:
            print(f"phantom pre-training: {stage.phantom_frames} phantom frames -> {folder}", flush=True)
        with exclusive_run(folder) if ddp.main else contextlib.nullcontext():
            _train(stage, ddp, device, resume=(folder / "checkpoints" / "last.pt").is_file(), splits=None)
        if ddp.main:
            best = read_checkpoint(folder / "checkpoints" / "best.pt")["best_val_dice"]
            write_text(folder / pretrain.DONE, dumps_strict({"best_val_dice": best}) + "\n")
        ddp.barrier()
    elif ddp.main:  # say which model the run starts from: a shared stage may be days old
        print(f"phantom stage reused: {folder} (finished; its backbone starts this run)", flush=True)
    return pretrain.backbone_path(cfg)


def _train(cfg: TrainConfig, ddp: Dist, device: torch.device, resume: bool, splits: dict | None) -> Path:
    run_dir = Path(cfg.run_dir)
    if ddp.main:
        resume = check_run_dir(run_dir, resume)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.toml", to_toml(cfg))
        prepare_split(cfg, run_dir, resume, splits)
    else:  # the same answer as rank 0's, without its message
        resume = resume and (run_dir / "checkpoints" / "last.pt").is_file()
    ddp.barrier()
    splits = load_split(run_dir / "split.json")
    progress = ddp.main  # one progress bar, not one per process
    train_images, train_masks = load_pairs(splits["train"], cfg.input_size, cfg.mask_label,
                                           "decode train" if progress else "")
    val_images, val_masks = load_pairs(splits["val"], cfg.input_size, cfg.mask_label, "decode val" if progress else "")
    train_set = augmented_train_set(cfg, train_images, train_masks)
    if len(train_set) < 2:
        raise InputError(f"{run_dir / 'split.json'}: the training split holds {len(train_set)} frame(s); need at least 2")

    torch.manual_seed(cfg.seed)
    workers = loader_workers(cfg, device, ddp)
    budget = plan_budget(cfg, len(build_loader(train_set, cfg, ddp, 0, 0)))
    last = run_dir / "checkpoints" / "last.pt"
    if resume and finished_on_resume(read_checkpoint(last), budget.epochs, last):
        if ddp.main:
            print(f"{run_dir}: training finished earlier ({budget.epochs} epochs); nothing to train", flush=True)
        return run_dir
    # a resumed run restores its own weights over the starting backbone: none is loaded (nor needs to exist)
    trainer = build_trainer(cfg, device, budget, pretrained="none" if resume else None)
    if resume:
        restore(trainer, last)
    if ddp.main:  # lines of epochs after the checkpoint (or of a start killed before it) are trained again
        rewrite_log(run_dir / LOG_NAME, trainer.start_epoch)
    model = trainer.model
    net = model if ddp.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.torch_compile:  # only the training step: `model` (eager, the same parameters) validates and is saved
        net = torch.compile(net)
    # the average follows the eager module's parameters (the same tensors DDP and torch.compile step)
    average_step = None
    if trainer.averaged is not None:
        first = swa_first_step(cfg, budget) or 0  # EMA: from the first step; SWA: once the lr is constant

        def average_step():  # after the scheduler's step: last_epoch counts the optimiser steps taken
            if trainer.scheduler.last_epoch >= first:
                trainer.averaged.update_parameters(model)

    epochs = FloatEpochs(trainer, cfg, budget, lambda epoch: build_loader(train_set, cfg, ddp, epoch, workers), net,
                         device, train_images, val_images, val_masks, show=ddp.main, average_step=average_step)
    trainer.best_dice = run_epochs(epochs, run_dir, trainer.start_epoch, budget.epochs, trainer.best_dice,
                                   writes=ddp.main, barrier=ddp.barrier)
    return run_dir


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m training.train --recipe paper --data DIR
    import sys

    from device_runtime.core.errors import exit_code_of

    arguments = get_args_parser().parse_args()
    sys.exit(exit_code_of(lambda: main(config_from_args(arguments), arguments.resume), "training.train"))
