"""The one training config: built once from a recipe (TOML) plus command-line overrides, then passed down.

The resolved config is saved as config.toml in the run folder, inside every checkpoint and in the bundle,
so a run can always say exactly how it was made.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from device_runtime.core.errors import InputError

RECIPE_DIR = Path(__file__).parent / "configs"
ARCHITECTURES = ("resnet50", "mobilenet_v3_large")
SCHEDULERS = ("cosine", "warmup_cosine", "none")  # cosine: per epoch (the paper's); warmup_cosine: per step
OPTIMIZERS = ("adam", "adamw")
# torchvision's DeepLabV3 head: the paper's rates for output stride 8 on 513x513 crops (see training.model.build_model)
TORCHVISION_ASPP_RATES = (12, 24, 36)
DECODERS = ("none", "skip")  # skip: logits from a map twice as fine (training.model.SkipDecoder)
# settings that change how fast a run goes, not what it learns: a resumed run or a running cv may change them
MACHINERY = ("device", "workers", "torch_compile")
GROUPINGS = ("auto", "prefix")  # subjects: from the layout (Kaggle names), or from "<subject>_<frame>" names too


@dataclass(frozen=True)
class TrainConfig:
    # what and where
    recipe: str = "quick"
    run_dir: str = ""
    data: str = ""  # dataset root; "" = the synthetic phantom
    mask_label: int | None = None  # None: any non-zero mask pixel is nerve
    synth_count: int = 240
    seed: int = 0
    group_by: str = "auto"  # "prefix": paired-folder names "<subject>_<frame>" keep a subject on one side
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / val / test shares of the frames (by subject
    # where there are subjects); `nerveseg cv` makes its own folds
    # model
    arch: str = "mobilenet_v3_large"
    input_size: tuple[int, int] = (256, 256)
    pretrained: str = "none"  # "none", "imagenet" (torchvision's weights), "phantom" (training.pretrain) or a path
    # to a backbone state dict (any nerveseg checkpoint)
    phantom_frames: int = 960  # pretrained = "phantom": the phantom's size for the pre-training stage
    phantom_dir: str = ""  # pretrained = "phantom": the stage's run folder; "" = RUN/phantom (cv: one for all folds)
    phantom_head: bool = False  # pretrained = "phantom": start the ASPP head and classifier from the stage too
    phantom_input_size: tuple[int, ...] = ()  # pretrained = "phantom": the stage's input size; () = input_size.
    # A backbone is fully convolutional, so a stage trained at 256x256 starts a 320x320 run (ablation (n))
    phantom_batch_size: int = 0  # pretrained = "phantom": the stage's batch size; 0 = batch_size
    phantom_steps: int = 0  # pretrained = "phantom": the stage's optimiser steps; 0 = the run's own budget
    aspp_rates: tuple[int, ...] = TORCHVISION_ASPP_RATES  # see training.model.build_model for 3/6/9
    decoder: str = "none"  # "skip": DeepLabV3+'s decoder, narrowed (training.model.SkipDecoder)
    relu_backbone: bool = False  # mobilenet_v3_large: ReLU in place of its hardswish layers, for activations
    # below 8 bits (training.model.relu_hardswish_); a phantom stage is made and reused with the same choice
    # optimisation
    epochs: int = 20
    steps: int = 0  # optimiser steps; when > 0 it sets the budget instead of epochs (the last epoch may stop early)
    batch_size: int = 16
    optimizer: str = "adam"  # "adamw": decoupled weight decay (Loshchilov & Hutter 2019), not on norms and biases
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_steps: int = 0  # warmup_cosine: linear warm-up from lr/100, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    val_every: int = 1  # validate (and maybe save best.pt) every N epochs and after the last; last.pt every epoch
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics before validation (see training/batchnorm.py)
    weight_ema: float = 0.0  # > 0: validate, keep (best.pt) and deploy an exponential moving average of the weights,
    # this decay per optimiser step (0.99: about the last 100 steps); 0 = the weights as trained
    swa_start: float = 0.0  # in (0, 1): stochastic weight averaging (warmup_cosine only): the schedule decays to
    # swa_lr_ratio x lr by this fraction of the step budget, holds it there, and the equal average of every later
    # step's weights is validated, kept and deployed; 0 = off
    swa_lr_ratio: float = 0.1
    # augmentation (training split only)
    rotation: float = 15.0
    hflip: bool = True
    vflip: bool = True
    intensity_shift: float = 0.1
    contrast: float = 0.2
    scale: tuple[float, float] = (1.0, 1.0)  # random zoom factor range (probe depth / zoom settings); (1, 1) = off
    translate: float = 0.0  # random shift, fraction of the frame
    elastic_alpha: float = 0.0  # elastic warp (tissue under the probe): displacement sd in pixels; 0 = off
    elastic_grid: int = 5  # its smoothness: random displacements at grid x grid points, interpolated
    gamma: float = 0.0  # gamma drawn log-uniformly in [1/(1+g), 1+g] (scanner gain curves); 0 = off
    blur_sigma: float = 0.0  # Gaussian blur up to this sigma, in half the frames (focus, resolution); 0 = off
    speckle: float = 0.0  # multiplicative noise, std drawn in [0, s] (ultrasound speckle); 0 = off
    # threshold objective, equation 4: weights of Dice, IoU, pixel accuracy
    objective_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    # deployment: average each frame's probabilities with its left-right mirror's (training.model.FlipAveraged) in
    # tuning T*, evaluation and the exported graph, at twice the inference; training and its validation stay plain
    flip_tta: bool = False
    # machinery
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    workers: int = -1  # data loader processes; -1 = automatic (several on CUDA, none on a CPU-only run)
    amp: bool = True  # used on CUDA only
    channels_last: bool = False  # channels-last memory on the CPU too (always on CUDA): about 35 % less CPU
    # per image on this project's x86 machine (scripts/bench_train.py --variants)
    torch_compile: bool = False  # the training step under torch.compile (inductor): faster steps after a one-off
    # compile (scripts/bench_train.py --compile); validation, checkpoints and export use the eager module
    val_batch_size: int = 32

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise InputError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.decoder not in DECODERS:
            raise InputError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.relu_backbone and self.arch != "mobilenet_v3_large":
            raise InputError(f"relu_backbone replaces MobileNetV3's hardswish; {self.arch} has none")
        if self.group_by not in GROUPINGS:
            raise InputError(f"group_by must be one of {GROUPINGS}, got {self.group_by!r}")
        for name in ("steps", "warmup_steps", "phantom_batch_size", "phantom_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InputError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("input_size", "phantom_input_size"):
            size = getattr(self, name)
            if name == "phantom_input_size" and not size:
                continue  # the stage trains at input_size
            if len(size) != 2 or min(size) < 32 or any(s % 8 for s in size):
                raise InputError(f"{name} must be two multiples of 8 of at least 32, got {list(size)}")
        for name in ("epochs", "batch_size", "synth_count", "val_batch_size", "val_every", "phantom_frames"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.phantom_head and self.pretrained != "phantom":
            raise InputError(f"phantom_head starts the head from the phantom pre-training; it needs pretrained = "
                             f"'phantom', got {self.pretrained!r}")
        if (len(self.split) != 3 or not all(isinstance(v, (int, float)) for v in self.split)
                or min(self.split) <= 0 or abs(sum(self.split) - 1.0) > 1e-6):
            raise InputError(f"split must be three positive shares (train, val, test) summing to 1, got "
                             f"{list(self.split)}")
        if self.mask_label is not None and self.mask_label < 1:
            raise InputError(f"mask_label {self.mask_label} would train the background as the nerve (0 is the "
                             "background label); give the nerve's label, e.g. 1, or none for any non-zero pixel")
        if not self.aspp_rates or min(self.aspp_rates) < 1:
            raise InputError(f"aspp_rates must be one or more dilation rates >= 1, got {list(self.aspp_rates)}")
        if not 0 <= self.weight_ema < 1:
            raise InputError(f"weight_ema must be in [0, 1) (a decay per step; 0 = off), got {self.weight_ema}")
        if not 0 <= self.swa_start < 1 or not 0 < self.swa_lr_ratio <= 1:
            raise InputError(f"swa_start must be in [0, 1) (0 = off) and swa_lr_ratio in (0, 1], got "
                             f"{self.swa_start} and {self.swa_lr_ratio}")
        if self.swa_start > 0 and (self.weight_ema > 0 or self.scheduler != "warmup_cosine"):
            raise InputError("swa_start needs scheduler = \"warmup_cosine\" and weight_ema = 0 (one weight average "
                             f"at a time), got scheduler {self.scheduler!r} and weight_ema {self.weight_ema}")
        if self.lr <= 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if self.workers < -1:
            raise InputError(f"workers must be >= 0, or -1 for automatic, got {self.workers}")
        if len(self.objective_weights) != 3 or min(self.objective_weights) < 0 or sum(self.objective_weights) <= 0:
            raise InputError(f"objective_weights must be three non-negative numbers, got {self.objective_weights}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _coerce(data: dict, where: str) -> dict:
    """TOML/JSON values -> dataclass field values (lists to tuples), rejecting unknown keys."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise InputError(f"{where}: unknown config keys {unknown}; known keys: {sorted(fields)}")
    out = dict(data)
    for key in ("input_size", "phantom_input_size", "objective_weights", "scale", "aspp_rates", "split"):
        if key in out:
            out[key] = tuple(out[key])
    if out.get("mask_label", None) == "":
        out["mask_label"] = None
    return out


def recipe_path(recipe: str) -> Path:
    """A recipe name ("paper", "edge", "small", "quick") or a path to a TOML file."""
    candidate = Path(recipe)
    if candidate.suffix == ".toml":
        return candidate
    path = RECIPE_DIR / f"{recipe}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))
        raise InputError(f"unknown recipe {recipe!r}; choose one of {known} or give a .toml file")
    return path


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})") from None


def build_config(recipe: str, **overrides) -> TrainConfig:
    """The recipe's values, then every override that is not None."""
    path = recipe_path(recipe)
    # the [qat] table belongs to qat/ (qat.config reads and checks it); training ignores it
    values = _coerce({k: v for k, v in load_toml(path).items() if k != "qat"}, str(path))
    values.update(_coerce({k: v for k, v in overrides.items() if v is not None}, "command line"))
    if overrides.get("epochs") is not None and overrides.get("steps") is None:
        values["steps"] = 0  # an epoch budget given explicitly replaces the recipe's step budget
    values["recipe"] = recipe
    try:
        return TrainConfig(**values)
    except TypeError as err:
        raise InputError(f"{path}: {err}") from None


def config_from_dict(data: dict, where: str) -> TrainConfig:
    try:
        return TrainConfig(**_coerce(data, where))
    except TypeError as err:
        raise InputError(f"{where}: {err}") from None


def changed_settings(now: TrainConfig, saved: TrainConfig, also_ignore: tuple[str, ...] = ()) -> list[str]:
    """The settings in which two configs differ, sorted, leaving out MACHINERY (and `also_ignore`)."""
    a, b = now.to_dict(), saved.to_dict()
    return sorted(k for k in a if k not in (*MACHINERY, *also_ignore) and a[k] != b[k])


def to_toml(cfg: TrainConfig) -> str:
    # TOML has no null: an unset mask label is written as "" and read back as None
    data = {k: ("" if v is None else list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items()}
    return tomli_w.dumps(data)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise InputError(f"{path}: not found; is {run_dir} a run folder made by 'nerveseg train'?")
    return config_from_dict(load_toml(path), str(path))
