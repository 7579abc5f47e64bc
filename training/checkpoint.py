"""Checkpoints are plain dicts that describe themselves, written atomically.

Besides the weights they carry the architecture, the input size and normalisation, the resolved config,
and (after `nerveseg tune`) the threshold and morphology, so that export needs nothing but the checkpoint.
last.pt also carries what resuming needs (optimiser, schedule, scaler, RNG) while the run trains; best.pt, which
is what tune, QAT and export read and what a user copies around, does not: the Adam moments alone are twice the
weights. Once the last epoch is written that state has no use left, so the finished last.pt drops it too (a third
of the size; a QAT run's also its weights): it keeps where the run stopped, which is what `--resume` of a finished
run reads to say so (`finished_on_resume`).
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


def finished_checkpoint(checkpoint: dict, keep_weights: bool = True) -> dict:
    """last.pt of a run that has trained its last epoch: where it stopped and (`keep_weights`) its last weights,
    no resume state. A QAT run keeps none: everything after it (tuning, export) reads best.pt."""
    slim = {**without_resume_state(checkpoint), "finished": True}
    if not keep_weights:
        del slim["model"]
    return slim


def finished_on_resume(last: dict, epochs: int, path: str | Path) -> bool:
    """Whether the run whose last checkpoint is `last` has nothing left to train for a budget of `epochs` (then
    --resume says so and goes on to the next stage); False: it continues from `last`'s resume state.

    Raises:
        InputError: `last` is a finished run's (its optimiser state dropped) and more epochs are asked for: a
            fresh optimiser would not continue the same run.
    """
    if last["epoch"] >= epochs:
        return True
    if last.get("finished"):
        raise InputError(f"{path}: the run finished after {last['epoch']} epochs and its last checkpoint no longer "
                         f"holds the optimiser state, so it cannot be continued to {epochs} epochs as the same run; "
                         f"ask for its own {last['epoch']} epochs, or start a new run for a longer schedule")
    return False


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Write atomically; never a checkpoint with NaN/Inf weights; a full disk ends in one line, old file kept."""
    check_finite_state(checkpoint.get("model", {}), path)  # a finished QAT run's last.pt holds no weights
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
    checkpoint = safe_load(path)  # weights_only=True: a checkpoint cannot run code (training/trust.py)
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
