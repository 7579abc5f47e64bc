"""QAT checkpoints: plain dicts of tensors, numbers, strings, lists and dicts, so that they load with
`torch.load(..., weights_only=True)` (no pickled objects; the RNG state as training.checkpoint writes it).

Besides the model state (folded weights, log2 steps, bit ranges, frozen integer bits) they carry the float
run's config, the QAT config, the per-layer bits and, after tuning, threshold, morphology and validation,
like a tuned float checkpoint, so that the exporter needs nothing else.

Which model a fixed-bit run deploys, its start (the grid alone) or its trained best, is chosen here on
validation (`choose`). At 8 bits the grid alone costs 0.000-0.004 Dice, while a few epochs of fine-tuning move
the model by as much as the float model's seed spread, in either direction, and 20 to 100 validation frames do
not tell which way (docs/accuracy.md, "Where does a QAT row leave float"). So a run whose bits at its first epoch
are the bits it deploys (fixed bits, no schedule: `has_start`) keeps its start as a second candidate,
RUN/qat/NAME/checkpoints/start.pt, written before epoch 1. The start is deployed as the float model is, at the
float run's T* and morphology: it computes what the float model computes, on the integer grid. The trained
best.pt, at its own re-tuned T*, replaces it only when the paired bootstrap 95 % interval of per-frame validation
Dice (trained minus start) lies above zero (`QatConfig.keep_start`). By default that rule holds for 8-bit weights
only (`qat.config.default_keep_start`, each by a pre-registered five-fold screen): below 8 bits the grid alone costs
too much and validation's noise still picks the start now and then. `--keep-start` / `--no-keep-start` choose;
both candidates are scored on test either way.

best.pt is what tuning, export and the report read; when the start wins, best.pt becomes the start and the loop's
best is kept as checkpoints/trained.pt, so that choosing again gives the same answer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from torch import nn

from device_runtime.core.errors import InputError
from training.checkpoint import NORMALIZATION, save_checkpoint
from training.config import TrainConfig, config_from_dict
from training.evaluation.bootstrap import paired_bootstrap_ci
from training.model import build_model, build_model_of
from training.trust import safe_load

from .config import QatConfig, qat_config_from_dict
from .prepare import prepare_qat

# 2: one quantizer per tensor (Hardswish, gates and residual sums quantized, shared input quantizers); the
# modules of a format-1 checkpoint (quantizers on conv inputs and outputs only) are not those of today
FORMAT = "nerveseg-qat-checkpoint-2"
OLDER_FORMATS = {"nerveseg-qat-checkpoint-1": "the quantizer placement before one-quantizer-per-tensor"}


def make_qat_checkpoint(float_cfg: TrainConfig, qcfg: QatConfig, model: nn.Module, **extra) -> dict:
    return {
        "format": FORMAT,
        "arch": float_cfg.arch,
        "num_classes": 1,
        "input_size": list(float_cfg.input_size),
        "normalization": NORMALIZATION,
        "config": float_cfg.to_dict(),
        "qat_config": qcfg.to_dict(),
        "model": model.state_dict(),
        "threshold": None,
        "morphology": None,
        **extra,
    }


def save_qat_checkpoint(checkpoint: dict, path: str | Path) -> None:
    save_checkpoint(checkpoint, path)  # atomic: a temporary name, then a rename


def read_qat_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: QAT checkpoint not found")
    checkpoint = safe_load(path, "QAT checkpoint")  # weights_only=True: it cannot run code (training/trust.py)
    if isinstance(checkpoint, dict) and checkpoint.get("format") in OLDER_FORMATS:
        raise InputError(f"{path}: a QAT checkpoint of {OLDER_FORMATS[checkpoint['format']]} "
                         f"({checkpoint['format']}); this nerveseg cannot load it: rerun `nerveseg qat`")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise InputError(f"{path}: not a nerveseg QAT checkpoint (expected format {FORMAT})")
    return checkpoint


def build_qat_model(arch: str, qcfg: QatConfig, float_model: nn.Module | None = None,
                    init_steps: bool = True) -> nn.Module:
    """The QAT form of `float_model` (or of a fresh torchvision-default model of `arch`) for qcfg's bits."""
    setting = qcfg.bit_setting
    model = float_model if float_model is not None else build_model(arch)
    weight_bits = qcfg.initial_bits if setting.learned and qcfg.initial_bits else setting.weight_bits
    learned_activations = setting.learned and setting.learned_activations
    activation_bits = qcfg.initial_activation_bits if learned_activations and qcfg.initial_activation_bits \
        else setting.activation_bits
    return prepare_qat(model, arch, weight_bits=weight_bits, activation_bits=activation_bits,
                       learn_weight_bits=setting.learned,
                       learn_activation_bits=setting.learned and setting.learned_activations,
                       b_min=qcfg.b_min, b_max=qcfg.b_max, init_steps=init_steps, grid=qcfg.grid,
                       activation_range=qcfg.activation_range)


def load_qat_model(path: str | Path) -> tuple[nn.Module, dict, TrainConfig, QatConfig]:
    """A trained QAT model in eval mode on the CPU, with its checkpoint, float config and QAT config."""
    checkpoint = read_qat_checkpoint(path)
    cfg = config_from_dict(checkpoint["config"], f"{path} (config)")
    qcfg = qat_config_from_dict(checkpoint["qat_config"], f"{path} (qat_config)")
    model = build_qat_model(checkpoint["arch"], qcfg, build_model_of(cfg), init_steps=False)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint, cfg, qcfg


# -- which model a run deploys (the module docstring) --

START_NAME = "start.pt"
TRAINED_NAME = "trained.pt"


def has_start(qcfg: QatConfig) -> bool:
    """Whether the model before epoch 1 is at the bits the run deploys: fixed bits without a schedule (learned bits
    freeze later, a schedule lowers them later). Allocated and held bits are set before epoch 1 and count."""
    return not qcfg.bit_setting.learned and not qcfg.bit_schedule_steps


def trained_checkpoint(checkpoint_dir: Path) -> Path:
    """The trained model of a finished run: trained.pt where the run kept one, else best.pt."""
    trained = Path(checkpoint_dir) / TRAINED_NAME
    return trained if trained.is_file() else Path(checkpoint_dir) / "best.pt"


def loop_best(checkpoint_dir: Path) -> Path:
    """The training loop's best checkpoint as trained.pt, refreshed from best.pt unless best.pt holds the start
    (chosen by an earlier finish: then trained.pt is the loop's best). A temporary name, then a rename."""
    best, trained = Path(checkpoint_dir) / "best.pt", Path(checkpoint_dir) / TRAINED_NAME
    if read_qat_checkpoint(best).get("selected") != "start":
        partial = trained.with_name(trained.name + ".partial")
        shutil.copyfile(best, partial)
        os.replace(partial, trained)
    return trained


def save_start(checkpoint_dir: Path, checkpoint: dict) -> None:
    """checkpoints/start.pt: the model before epoch 1 (no optimiser or RNG state: it is never resumed)."""
    save_qat_checkpoint(checkpoint, Path(checkpoint_dir) / START_NAME)


def choose(trained_val: np.ndarray, start_val: np.ndarray, keep_start: bool) -> dict:
    """The decision between the two candidates from their per-frame validation Dice (same frames, same order).

    Returns {"chosen": "trained" | "start", "val_trained", "val_start", "val_difference", "val_difference_ci95",
    "rule"}."""
    trained_val, start_val = np.asarray(trained_val, dtype=float), np.asarray(start_val, dtype=float)
    low, high = paired_bootstrap_ci(trained_val, start_val)
    beyond_noise = low > 0.0
    chosen = "trained" if beyond_noise or not keep_start else "start"
    rule = ("the start, unless the paired 95 % interval of validation Dice (trained - start) lies above zero"
            if keep_start else "the trained model (keep_start off)")
    return {"chosen": chosen, "val_trained": float(trained_val.mean()), "val_start": float(start_val.mean()),
            "val_difference": float((trained_val - start_val).mean()), "val_difference_ci95": [low, high],
            "rule": rule}
