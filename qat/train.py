"""The QAT fine-tuning loop: one epoch of weights + steps (+ bits), the learning-rate schedule, checkpoints.

Schedule (QatConfig): the steps are initialised from training frames (qat.prepare.initialise_steps) before
epoch 1; epochs 1..bit_epochs learn weights, steps and bits; from then on the integer bits are frozen (with
`--target-bits B`, the weight mean capped at B: qat.bits.cap_weight_bits_) and weights and steps fine-tune.
Uniform runs (`--bits 8`, `4`, `W4A8`) have their bits frozen from the start (`bit_schedule`: lowered in stages).
Only epochs at the deployed bits can become best.pt (qat.schedule.at_final_bits). What changes at an epoch's
start, and which quantizers are held at 8 bits, is qat/schedule.py's.

The epoch loop, its write order and resume, the data loading, augmentation and validation are the float
training's (training/loop.py, training/train.py); `QatEpochs` is what differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training import loop
from training.checkpoint import rng_state, set_rng_state, without_resume_state
from training.config import TrainConfig
from training.train import validate

from .checkpoint import make_qat_checkpoint
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


LOGGED_PARTS = ("task", "bit_cost", "distill")  # the mean bits are logged once per epoch, from the bits table
PLAIN_STEPS = torch.amp.GradScaler("cpu", enabled=False)  # disabled: scale() and step() are the plain ones


def qat_step(model: nn.Module, criterion: QatLoss, teacher: nn.Module | None = None):
    """The QAT loss of one batch, for `training.loop.train_one_epoch`; its figures: the task loss, the bit cost and,
    with a `teacher` (the float model, eval mode, whose probabilities the loss distils), the distillation term."""
    def step_loss(image, mask):
        logits = model(image)["out"]
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(image)["out"]
        loss, parts = criterion(model, logits, mask, teacher_logits)
        return loss, {key: parts[key] for key in LOGGED_PARTS if key in parts}

    return step_loss


def train_one_epoch(model: nn.Module, loader, criterion: QatLoss, optimizer, device: torch.device, label: str,
                    show: bool = True, teacher: nn.Module | None = None, epoch: int = 0) -> dict:
    """One QAT epoch through the shared loop: plain float32 steps, the bits projected onto their range after each."""
    return loop.train_one_epoch(model, loader, qat_step(model, criterion, teacher), optimizer, PLAIN_STEPS, device,
                                epoch=epoch, label=label, show=show, after_step=lambda: project_bits_(model))


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


@dataclass
class QatEpochs:
    """What a QAT epoch does, for `training.loop.run_epochs`: first what the run's `BitPlan` changes at the epoch's
    start (the freeze and the budgets' caps, or a schedule's next stage, which restarts Adam's moments), then the
    cosine learning rates, steps, validation in eval mode every epoch with the bits table; only epochs at the deployed
    bits may become best.pt (`qat.schedule.at_final_bits`). The log line also holds every quantizer's step.

    make_loader(epoch) gives the epoch's training loader; table_of(model) the bits table.
    """

    state: QatState
    cfg: TrainConfig
    qcfg: QatConfig
    label: str  # the run's name, in messages
    make_loader: Callable[[int], object]
    val_images: np.ndarray
    val_masks: np.ndarray
    device: torch.device
    table_of: Callable[[nn.Module], dict]
    table: dict | None = None  # the bits table of the epoch just judged
    steps_start: dict | None = None  # the steps as initialised from data, before epoch 1 (scripts/diag_lowbit.py)
    final_weights = False  # a finished run's last.pt keeps no weights: tuning and export read best.pt

    def __post_init__(self):
        self.plan = self.state.plan or BitPlan(self.state.model, self.qcfg)

    def say(self, text: str) -> None:
        print(f"qat {self.label}: {text}", flush=True)

    def train(self, epoch: int) -> dict:
        state, qcfg = self.state, self.qcfg
        if epoch == 0:
            self.steps_start = step_log(state.model)
        if self.plan.begin_epoch(epoch, state.criterion.weights, state.criterion.elements, state.observe, self.say):
            state.optimizer.state.clear()  # a new stage of the bit schedule: Adam starts afresh
        set_learning_rates(state.optimizer, qcfg, epoch)
        return train_one_epoch(state.model, self.make_loader(epoch), state.criterion, state.optimizer, self.device,
                               f"qat {self.label} epoch {epoch + 1}/{qcfg.epochs}", teacher=state.teacher, epoch=epoch)

    def judge(self, epoch: int, stats: dict) -> bool:
        stats.update(validate(self.state.model, self.val_images, self.val_masks, self.device,
                              self.cfg.replace(amp=False)))
        self.table = self.table_of(self.state.model)
        stats.update(mean_weight_bits=self.table["mean_weight_bits"],
                     mean_activation_bits=self.table["mean_activation_bits"], bits_frozen=bits_frozen_at(self.qcfg, epoch))
        return at_final_bits(self.qcfg, epoch)

    def checkpoints(self, epoch: int, stats: dict, best_dice: float) -> tuple[dict, dict]:
        state = self.state
        last = make_qat_checkpoint(self.cfg, self.qcfg, state.model, epoch=epoch + 1, best_val_dice=best_dice,
                                   optimizer=state.optimizer.state_dict(), rng=rng_state(), val=stats, bits=self.table)
        return last, without_resume_state(last)

    def record(self, epoch: int) -> dict:
        # the steps of every quantizer, per epoch, for scripts/diag_lowbit.py
        return {"steps": step_log(self.state.model), **({"steps_start": self.steps_start} if epoch == 0 else {})}

    def learning_rate(self) -> dict:
        return {group["name"]: group["lr"] for group in self.state.optimizer.param_groups}

    def line(self, epoch: int, stats: dict, judged: bool) -> str:
        return (f"qat epoch {epoch + 1:>2}/{self.qcfg.epochs}  loss {stats['train_loss']:.4f} (task {stats['task']:.4f})  "
                f"val Dice@0.5 {stats['val_dice']:.4f}  best-T Dice {stats['val_best_dice']:.4f}  bits W "
                f"{stats['mean_weight_bits']:.2f} A {stats['mean_activation_bits']:.2f}"
                f"{'' if judged else self._not_judged}  {stats['train_images_per_s']:.1f} img/s")

    @property
    def _not_judged(self) -> str:
        """Why an epoch cannot become best.pt: its bits still learn, or a bit schedule has not reached its last stage."""
        return " (learning)" if self.qcfg.bit_setting.learned else " (schedule stage)"
