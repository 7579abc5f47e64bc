"""QAT checkpoints: plain dicts of tensors, numbers, strings, lists and dicts, so that they load with
`torch.load(..., weights_only=True)` (no pickled objects; the RNG state as training.checkpoint writes it).

Besides the model state (folded weights, log2 steps, bit ranges, frozen integer bits) they carry the float
run's config, the QAT config, the per-layer bits and, after tuning, threshold, morphology and validation,
like a tuned float checkpoint, so that the exporter needs nothing else.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from device_runtime.core.errors import InputError
from training.checkpoint import NORMALIZATION, save_checkpoint
from training.config import TrainConfig, config_from_dict
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
