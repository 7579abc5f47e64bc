"""The QAT fine-tuning loop: one epoch of weights + steps (+ bits), the learning-rate schedule, checkpoints.

Schedule (QatConfig): the steps are initialised from training frames (qat.prepare.initialise_steps) before
epoch 1; epochs 1..bit_epochs learn weights, steps and bits; from then on the integer bits are frozen (with
`--target-bits B`, the weight mean capped at B: qat.bits.cap_weight_bits_) and weights and steps fine-tune.
Uniform runs (`--bits 8`, `4`, `W4A8`) have their bits frozen from the start (`bit_schedule`: lowered in stages).
Only epochs at the deployed bits can become best.pt (qat.schedule.at_final_bits). What changes at an epoch's
start, and which quantizers are held at 8 bits, is qat/schedule.py's.

Data loading, augmentation, validation and the metrics log are the float training's (training/train.py).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.checkpoint import finished_checkpoint, rng_state, set_rng_state, without_resume_state
from training.config import TrainConfig
from training.train import validate

from .checkpoint import make_qat_checkpoint, save_qat_checkpoint
from .config import QatConfig
from .loss import QatLoss
from .prepare import fake_quants, project_bits_, quant_convs
from .schedule import BitPlan, at_final_bits, cosine_phase
from .sensitivity import step_log


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Weights (folded weights and biases), steps (log2 step of every quantizer) and bits (the range
    parameter of every quantizer that learns its bitwidth), each its own optimiser group."""
    groups = {"weights": [], "steps": [], "bits": []}
    for _, conv in quant_convs(model):
        groups["weights"] += [conv.weight, conv.bias]
    for q in fake_quants(model):
        groups["steps"].append(q.log2_step)
        if q.learns_bits:
            groups["bits"].append(q.log2_range)
    claimed = {id(p) for ps in groups.values() for p in ps}
    stray = [n for n, p in model.named_parameters() if id(p) not in claimed and p.requires_grad]
    if stray:
        raise ValueError(f"parameters outside the weight/step/bit groups: {stray[:5]}")
    return groups


def build_optimizer(model: nn.Module, qcfg: QatConfig) -> torch.optim.Adam:
    rates = {"weights": qcfg.lr_weights, "steps": qcfg.lr_steps, "bits": qcfg.lr_bits}
    groups = [{"params": params, "lr": rates[name], "name": name, "base_lr": rates[name]}
              for name, params in parameter_groups(model).items() if params]
    return torch.optim.Adam(groups)


def set_learning_rates(optimizer: torch.optim.Optimizer, qcfg: QatConfig, epoch: int) -> None:
    """Cosine decay over the run (a bit schedule: over each stage) for weights and steps; bits keep their rate while
    they learn. Computed from the epoch alone, so a resumed run gets the same rates without any scheduler state."""
    position, length = cosine_phase(qcfg, epoch)
    cosine = 0.5 * (1.0 + math.cos(math.pi * position / length))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * (1.0 if group["name"] == "bits" else cosine)


def bits_frozen_at(qcfg: QatConfig, epoch: int) -> bool:
    """Whether epoch (0-based) trains with frozen bits."""
    return not qcfg.bit_setting.learned or epoch >= qcfg.bit_epochs


def train_one_epoch(model: nn.Module, loader, criterion: QatLoss, optimizer, device: torch.device, label: str,
                    show: bool = True, teacher: nn.Module | None = None) -> dict:
    """`teacher`: the float model (eval mode) whose probabilities the loss distils, or None."""
    model.train()
    totals = {"train_loss": 0.0, "task": 0.0, "bit_cost": 0.0}
    if teacher is not None:
        totals["distill"] = 0.0
    seen, start = 0, time.perf_counter()
    for image, mask in tqdm(loader, desc=label, leave=False, disable=None if show else True):
        image, mask = image.to(device), mask.to(device)
        logits = model(image)["out"]
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(image)["out"]
        loss, parts = criterion(model, logits, mask, teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        project_bits_(model)
        n = len(image)
        totals["train_loss"] += float(loss.detach()) * n
        totals["task"] += parts["task"] * n
        totals["bit_cost"] += parts["bit_cost"] * n
        if teacher is not None:
            totals["distill"] += parts["distill"] * n
        seen += n
    elapsed = time.perf_counter() - start
    stats = {k: v / max(seen, 1) for k, v in totals.items()}
    return {**stats, "train_images_per_s": seen / max(elapsed, 1e-9), "train_seconds": elapsed}


@dataclass
class QatState:
    """What a QAT run holds between epochs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: QatLoss
    start_epoch: int = 0
    best_dice: float = -1.0
    teacher: nn.Module | None = None  # the float model, when the loss distils it
    plan: BitPlan | None = None  # the bits per epoch (None: built from the model, no held tensors)
    observe: Callable[[], Iterable[torch.Tensor]] | None = None  # training frames for re-initialising steps


def restore(state: QatState, checkpoint: dict) -> None:
    """Continue exactly where last.pt stopped: model (bits included), optimiser, epoch, best, RNG."""
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.start_epoch, state.best_dice = checkpoint["epoch"], checkpoint["best_val_dice"]
    set_rng_state(checkpoint["rng"])


def run_epochs(state: QatState, cfg: TrainConfig, qcfg: QatConfig, qat_dir: Path, make_loader, train_images,
               val_images: np.ndarray, val_masks: np.ndarray, device: torch.device, table_of) -> None:
    """Epochs start_epoch..epochs-1: train, validate (eval mode, as deployed), checkpoint, log.

    make_loader(epoch) gives the epoch's training loader; table_of(model) the bits table.
    """
    plan = state.plan or BitPlan(state.model, qcfg)
    start = {"steps_start": step_log(state.model)} if state.start_epoch == 0 else {}  # as initialised from data
    for epoch in range(state.start_epoch, qcfg.epochs):
        if plan.begin_epoch(epoch, state.criterion.weights, state.criterion.elements, state.observe,
                            lambda text: print(f"qat {qat_dir.name}: {text}", flush=True)):
            state.optimizer.state.clear()  # a new stage of the bit schedule: Adam starts afresh
        set_learning_rates(state.optimizer, qcfg, epoch)
        label = f"qat {qat_dir.name} epoch {epoch + 1}/{qcfg.epochs}"
        stats = train_one_epoch(state.model, make_loader(epoch), state.criterion, state.optimizer, device, label,
                                teacher=state.teacher)
        stats.update(validate(state.model, val_images, val_masks, device, cfg.replace(amp=False)))
        table = table_of(state.model)
        stats.update(mean_weight_bits=table["mean_weight_bits"], mean_activation_bits=table["mean_activation_bits"],
                     bits_frozen=bits_frozen_at(qcfg, epoch))
        eligible = at_final_bits(qcfg, epoch)
        is_best = eligible and stats["val_best_dice"] > state.best_dice
        if is_best:
            state.best_dice = stats["val_best_dice"]
        checkpoint = make_qat_checkpoint(cfg, qcfg, state.model, epoch=epoch + 1, best_val_dice=state.best_dice,
                                         optimizer=state.optimizer.state_dict(), rng=rng_state(), val=stats,
                                         bits=table)
        # as in training.train.finish_epoch: last.pt is written last, so a kill -9 before it redoes this epoch (a
        # resume drops its log line); the finished last.pt (no weights, no optimiser) must never precede its best.pt
        record = {"epoch": epoch + 1, "lr": {g["name"]: g["lr"] for g in state.optimizer.param_groups}, **stats,
                  "steps": step_log(state.model), **(start if epoch == 0 else {})}  # scripts/diag_lowbit.py
        with open(qat_dir / "metrics.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
        if is_best:
            save_qat_checkpoint(without_resume_state(checkpoint), qat_dir / "checkpoints" / "best.pt")
        final = epoch + 1 == qcfg.epochs  # nothing is resumed after the last epoch: no optimiser state kept
        last = finished_checkpoint(checkpoint, keep_weights=False) if final else checkpoint  # best.pt is what is used
        save_qat_checkpoint(last, qat_dir / "checkpoints" / "last.pt")
        print(f"qat epoch {epoch + 1:>2}/{qcfg.epochs}  loss {stats['train_loss']:.4f} (task {stats['task']:.4f})  "
              f"val Dice@0.5 {stats['val_dice']:.4f}  best-T Dice {stats['val_best_dice']:.4f}  bits W "
              f"{stats['mean_weight_bits']:.2f} A {stats['mean_activation_bits']:.2f}"
              f"{'' if eligible else ' (learning)'}  {stats['train_images_per_s']:.1f} img/s", flush=True)
