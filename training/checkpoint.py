"""Checkpoints are plain dicts that describe themselves, written atomically.

Besides the weights and the optimiser state they carry the architecture, the input size and
normalisation, the resolved config, and (after `nerveseg tune`) the threshold and morphology, so that
export needs nothing but the checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from device_runtime.errors import InputError
from device_runtime.fileio import atomic_path

from .config import TrainConfig, config_from_dict
from .model import build_model

FORMAT = "nerveseg-checkpoint-1"
NORMALIZATION = {"range": [0.0, 1.0], "mean": None, "std": None}  # frames are only scaled, see preprocess


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        # our checkpoints hold numpy RNG state and config dicts besides tensors, so not weights_only;
        # only load checkpoints you made yourself
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise InputError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise InputError(f"{path}: not a nerveseg checkpoint (expected format {FORMAT})")
    return checkpoint


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict, TrainConfig]:
    """The model of a checkpoint in eval mode on the CPU, with the checkpoint and its config."""
    checkpoint = read_checkpoint(path)
    cfg = config_from_dict(checkpoint["config"], f"{path} (config)")
    model = build_model(checkpoint["arch"], num_classes=checkpoint["num_classes"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint, cfg
