"""Checkpoints are plain dicts that describe themselves, written atomically.

Besides the weights they carry the architecture, the input size and normalisation, the resolved config,
and (after `nerveseg tune`) the threshold and morphology, so that export needs nothing but the checkpoint.
last.pt also carries what resuming needs (optimiser, schedule, scaler, RNG); best.pt, which is what tune, QAT
and export read and what a user copies around, does not: the Adam moments alone are twice the weights.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import atomic_path

from .config import TrainConfig, config_from_dict
from .finite import check_finite_state, non_finite_tensors
from .model import build_model_of
from .trust import numpy_state_from_plain, numpy_state_to_plain, safe_load

FORMAT = "nerveseg-checkpoint-1"
NORMALIZATION = {"range": [0.0, 1.0], "mean": None, "std": None}  # frames are only scaled, see preprocess


def rng_state() -> dict:
    # numpy's state as a tensor and plain values: loadable with weights_only=True (training/trust.py)
    state = {"python": random.getstate(), "numpy": numpy_state_to_plain(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved; also the list forms older QAT checkpoints wrote."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # random wants a tuple; a list from old QAT files too
    np.random.set_state(numpy_state_from_plain(state["numpy"]))  # the plain dict, or a tuple / list of the old
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_checkpoint(cfg: TrainConfig, model: torch.nn.Module, **extra) -> dict:
    return {
        "format": FORMAT,
        "arch": cfg.arch,
        "num_classes": 1,
        "input_size": list(cfg.input_size),
        "normalization": NORMALIZATION,
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "threshold": None,
        "morphology": None,
        **extra,
    }


RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng", "averaged")


def without_resume_state(checkpoint: dict) -> dict:
    """The checkpoint best.pt keeps: everything but the state only a resume from last.pt reads."""
    return {key: value for key, value in checkpoint.items() if key not in RESUME_ONLY}


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Write atomically; never a checkpoint with NaN/Inf weights; a full disk ends in one line, old file kept."""
    check_finite_state(checkpoint["model"], path)
    with atomic_path(path) as tmp:
        try:
            torch.save(checkpoint, tmp)
        except (OSError, RuntimeError) as err:  # torch's zip writer says only "unexpected pos ..." on a full disk
            reason = getattr(err, "strerror", None) or "the write stopped short: no space left or a file size limit"
            raise InputError(f"{path}: cannot write the checkpoint ({reason}); the previous file is kept") from None


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        checkpoint = safe_load(path)  # weights_only=True: a checkpoint cannot run code (training/trust.py)
    except Exception as err:
        raise InputError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise InputError(f"{path}: not a nerveseg checkpoint (expected format {FORMAT})")
    return checkpoint


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict, TrainConfig]:
    """The model of a checkpoint in eval mode on the CPU, with the checkpoint and its config."""
    checkpoint = read_checkpoint(path)
    cfg = config_from_dict(checkpoint["config"], f"{path} (config)")
    bad = non_finite_tensors(checkpoint["model"])
    if bad:
        raise InputError(f"{path}: the model holds NaN or Inf in {bad[0]}; it was written by a diverged run "
                         "(an older nerveseg); retrain from a finite checkpoint")
    model = build_model_of(cfg, num_classes=checkpoint["num_classes"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint, cfg
