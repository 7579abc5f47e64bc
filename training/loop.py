"""The epoch loop that float training (`training.train`) and QAT (`qat.train`) both run, and the run folder it
writes: metrics.jsonl, checkpoints/best.pt, checkpoints/last.pt.

What differs between the two (the loss, the schedule, what is validated, what a checkpoint holds) is an `Epochs`
object; the rest happens here, once:

- every optimiser step checks that the loss is finite before stepping (training/finite.py);
- each epoch writes, in this order, the log line (strict JSON), best.pt (when the epoch improved), last.pt. Under
  kill -9 whatever came before last.pt is redone by a resume from the previous last.pt: `rewrite_log` drops the
  lines of epochs after it, and best.pt is written again with the same content. The other way round, a resumed run
  would miss the line, or keep an older best.pt while believing this epoch's score saved. Checkpoints are atomic
  (a temporary name, then a rename: `training.checkpoint.save_checkpoint`), so a kill mid-write keeps the old file;
- `resume_from_last` and `rewrite_log` make `--resume` after a kill at any moment finish the run as if it had
  never stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import dumps_strict, write_text

from .checkpoint import finished_checkpoint, save_checkpoint
from .finite import check_finite_loss

LOG_NAME = "metrics.jsonl"
LOCK_NAME = ".training.lock"

# (image, mask) -> (loss, figures to average over the epoch beside the loss)
StepLoss = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, float]]"]


def train_one_epoch(net: torch.nn.Module, loader, step_loss: StepLoss, optimizer, scaler, device: torch.device, *,
                    epoch: int, label: str, show: bool = True, max_steps: int | None = None,
                    layout: torch.memory_format = torch.contiguous_format, after_step=None) -> dict:
    """One pass over `loader` (at most `max_steps` batches). `after_step()` runs after every optimiser step (a
    per-step schedule, the weight average, QAT's bit projection). `scaler` is a torch.amp.GradScaler (disabled:
    plain steps).

    Returns:
        {"train_loss", <step_loss' figures>, "train_images_per_s", "train_seconds"}: per-frame means.
    """
    net.train()
    totals, seen, start = {"train_loss": 0.0}, 0, time.perf_counter()
    steps = len(loader) if max_steps is None else min(max_steps, len(loader))
    batches = tqdm(itertools.islice(loader, steps), desc=label, total=steps, leave=False, disable=None if show else True)
    for batch, (image, mask) in enumerate(batches):
        image = image.to(device, non_blocking=True).to(memory_format=layout)
        mask = mask.to(device, non_blocking=True)
        loss, figures = step_loss(image, mask)
        value = check_finite_loss(loss, epoch, batch)  # stops on NaN/Inf before the step
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if after_step is not None:
            after_step()
        n = len(image)
        totals["train_loss"] += value * n  # the loss was read once above: one CPU-GPU sync per batch
        for key, figure in figures.items():
            totals[key] = totals.get(key, 0.0) + figure * n
        seen += n
    elapsed = time.perf_counter() - start
    return {**{key: total / max(seen, 1) for key, total in totals.items()},
            "train_images_per_s": seen / max(elapsed, 1e-9), "train_seconds": elapsed}


class Epochs(Protocol):
    """What one kind of training does in an epoch; `run_epochs` calls these in this order."""

    def train(self, epoch: int) -> dict:
        """The epoch's optimiser steps (and its schedule); its training figures."""

    def judge(self, epoch: int, stats: dict) -> bool:
        """Validation and whatever else the log line holds, added to `stats`; whether this epoch's model may become
        best.pt (it has "val_best_dice" then)."""

    final_weights: bool
    """Whether a finished run's last.pt keeps its weights (no resume state either way: nothing is resumed after the
    last epoch)."""

    def checkpoints(self, epoch: int, stats: dict, best_dice: float) -> tuple[dict, dict]:
        """(last.pt, best.pt) as they would be written after this epoch."""

    def record(self, epoch: int) -> dict:
        """What the log line holds besides the epoch, the learning rate and `stats` (not in the checkpoints)."""

    def learning_rate(self):
        """The log line's "lr"."""

    def line(self, epoch: int, stats: dict, judged: bool) -> str:
        """What the epoch prints."""


def run_epochs(epochs: Epochs, run_dir: Path, start: int, stop: int, best_dice: float, writes: bool = True,
               barrier=None) -> float:
    """Epochs start..stop-1 of a run of `stop` epochs: train, judge, write (see the module docstring; the last.pt of
    epoch `stop` is the finished one, `training.checkpoint.finished_checkpoint`); returns the best validation Dice.
    `writes` is False on the processes of a distributed run other than the first; `barrier()` ends each epoch."""
    for epoch in range(start, stop):
        stats = epochs.train(epoch)
        if writes:
            judged = epochs.judge(epoch, stats)
            is_best = judged and stats["val_best_dice"] > best_dice
            if is_best:
                best_dice = stats["val_best_dice"]
            last, best = epochs.checkpoints(epoch, stats, best_dice)
            if epoch + 1 == stop:  # nothing is resumed after the last epoch: no optimiser state kept
                last = finished_checkpoint(last, keep_weights=epochs.final_weights)
            record = {"epoch": epoch + 1, "lr": epochs.learning_rate(), **stats, **epochs.record(epoch)}
            write_epoch(Path(run_dir), record, last, best if is_best else None)
            print(epochs.line(epoch, stats, judged), flush=True)
        if barrier is not None:
            barrier()
    return best_dice


def write_epoch(run_dir: Path, record: dict, last: dict, best: dict | None = None) -> None:
    """One epoch into the run folder: log line, then best.pt, then last.pt (the order is the kill -9 safety)."""
    with open(run_dir / LOG_NAME, "a", encoding="utf-8") as log:
        log.write(dumps_strict(record) + "\n")  # strict JSON: a NaN metric becomes null
    if best is not None:
        save_checkpoint(best, run_dir / "checkpoints" / "best.pt")
    save_checkpoint(last, run_dir / "checkpoints" / "last.pt")


def resume_from_last(run_dir: Path, resume: bool) -> bool:
    """Whether to continue from last.pt. A run killed before its first checkpoint (config.toml, no last.pt) resumes
    by starting again, so `--resume` after any kill finishes the run."""
    last = run_dir / "checkpoints" / "last.pt"
    if resume and not last.is_file():
        if (run_dir / "config.toml").is_file():
            print(f"note: {last} does not exist yet (stopped before the first epoch ended); starting the run again",
                  flush=True)
            return False
        raise InputError(f"{last}: nothing to resume (no last checkpoint in {run_dir})")
    return resume


def rewrite_log(log_path: Path, upto_epoch: int) -> None:
    """On resume, drop log lines of epochs after the checkpoint (they will be trained again)."""
    if log_path.is_file():
        lines = [line for line in log_path.read_text().splitlines() if _epoch_of(line) <= upto_epoch]
        write_text(log_path, "".join(line + "\n" for line in lines))


def _epoch_of(line: str) -> float:
    """The epoch of a metrics.jsonl line; a torn line (a kill or full disk mid-write) sorts last: dropped."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


@contextlib.contextmanager
def exclusive_run(run_dir: Path):
    """Hold RUN/.training.lock while training: a second process training into the same folder (a cv run twice, a
    resume started beside the run) is refused instead of interleaving checkpoints and log lines. An advisory lock
    (flock) that the kernel drops when the process ends, so a killed run leaves no stale lock behind."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; training there runs unguarded
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{run_dir}: another process is training in this run folder; wait for it to end, or "
                             "stop it first") from None
        yield
