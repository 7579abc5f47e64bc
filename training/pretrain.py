"""Phantom pre-training: `pretrained = "phantom"` starts the backbone from a model trained on the synthetic phantom.

No pretrained weights can be downloaded on offline machines (many hospitals' edge boxes, these build machines),
and a few hundred real frames are too few to train DeepLabV3 from scratch well. The embedded phantom is free and
unlimited: the same recipe trained first on `phantom_frames` phantom frames, then its backbone (not the ASPP head)
loaded into the real run, gained +0.054 [+0.038, +0.070] test Dice on usgra-seg, every one of 5 folds better
(docs/accuracy.md, ablation (f)). `phantom_head = true` (`--phantom-head`) starts the head from it too: +0.007
[-0.027, +0.042] on the same folds, not clear enough to be the default (ablation (g)).

The phantom stage is an ordinary run folder (RUN/phantom/, or `phantom_dir`; `nerveseg cv` shares one among its
folds), resumable like any run, marked finished by done.json. This module says what that stage is; training.train
runs it.
"""

from __future__ import annotations

from pathlib import Path

from device_runtime.core.errors import InputError

from .config import TrainConfig, changed_settings, load_run_config

PHANTOM = "phantom"
DONE = "done.json"


def uses_phantom(cfg: TrainConfig) -> bool:
    return cfg.pretrained == PHANTOM


def phantom_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.phantom_dir) if cfg.phantom_dir else Path(cfg.run_dir) / "phantom"


def phantom_config(cfg: TrainConfig) -> TrainConfig:
    """The stage's config: the same recipe on the phantom instead of the data, trained from scratch, at
    phantom_input_size where one is set (the real run may see its frames larger than the stage did), with
    phantom_batch_size and phantom_steps where set (a run may take more, smaller steps on its few real frames than
    the stage needs on its many phantom frames). Its decoder only when the run takes the whole network
    (phantom_head): a run that takes the backbone alone starts from the same stage with either decoder (ablation (j)
    measured the skip decoder on the plain stage's backbone). Never with flip_tta, which only deployment reads."""
    return cfg.replace(data="", mask_label=None, group_by="auto", synth_count=cfg.phantom_frames, pretrained="none",
                       split=TrainConfig.split,  # the stage's held-out frames only pick its checkpoint
                       phantom_dir="", phantom_head=False, run_dir=str(phantom_dir(cfg)),
                       input_size=cfg.phantom_input_size or cfg.input_size, phantom_input_size=(),
                       batch_size=cfg.phantom_batch_size or cfg.batch_size, phantom_batch_size=0,
                       steps=cfg.phantom_steps or cfg.steps, phantom_steps=0,
                       decoder=cfg.decoder if cfg.phantom_head else "none",
                       flip_tta=False)  # never tuned nor deployed: a stage serves runs with and without the mirror


def backbone_path(cfg: TrainConfig) -> Path:
    """The checkpoint whose backbone a phantom-pretrained run starts from."""
    return phantom_dir(cfg) / "checkpoints" / "best.pt"


def check_stage(stage: TrainConfig) -> bool:
    """Whether the stage in stage.run_dir has finished; refuses a folder made with other settings.

    Raises:
        InputError: the folder holds a run of another config (the real run would start from a model it did not
            ask for), or claims to be finished without its best checkpoint.
    """
    folder = Path(stage.run_dir)
    if not (folder / "config.toml").is_file():
        return False
    changed = changed_settings(stage, load_run_config(folder), also_ignore=("run_dir",))
    if changed:
        raise InputError(f"{folder}: holds a phantom pre-training made with other settings ({', '.join(changed)}); "
                         "remove it, or point phantom_dir elsewhere")
    if not (folder / DONE).is_file():
        return False
    if not (folder / "checkpoints" / "best.pt").is_file():
        raise InputError(f"{folder}: says it is finished but has no checkpoints/best.pt; remove {folder / DONE} "
                         "to train it again")
    return True
