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

from device_runtime.errors import InputError

RECIPE_DIR = Path(__file__).parent / "configs"
ARCHITECTURES = ("resnet50", "mobilenet_v3_large")
SCHEDULERS = ("cosine", "none")


@dataclass(frozen=True)
class TrainConfig:
    # what and where
    recipe: str = "quick"
    run_dir: str = ""
    data: str = ""  # dataset root; "" = the synthetic phantom
    mask_label: int | None = None  # None: any non-zero mask pixel is nerve
    synth_count: int = 240
    seed: int = 0
    # model
    arch: str = "mobilenet_v3_large"
    input_size: tuple[int, int] = (256, 256)
    pretrained: str = "none"  # "none", "imagenet" (torchvision's weights) or a path to a backbone state dict
    # optimisation
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics before validation (see training/batchnorm.py)
    # augmentation (training split only)
    rotation: float = 15.0
    hflip: bool = True
    vflip: bool = True
    intensity_shift: float = 0.1
    contrast: float = 0.2
    # threshold objective, equation 4: weights of Dice, IoU, pixel accuracy
    objective_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    # machinery
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    workers: int = -1  # data loader processes; -1 = automatic (several on CUDA, none on a CPU-only run)
    amp: bool = True  # used on CUDA only
    val_batch_size: int = 32

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise InputError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if len(self.input_size) != 2 or min(self.input_size) < 32 or any(s % 8 for s in self.input_size):
            raise InputError(f"input_size must be two multiples of 8 of at least 32, got {list(self.input_size)}")
        for name in ("epochs", "batch_size", "synth_count", "val_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
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
    for key in ("input_size", "objective_weights"):
        if key in out:
            out[key] = tuple(out[key])
    if out.get("mask_label", None) == "":
        out["mask_label"] = None
    return out


def recipe_path(recipe: str) -> Path:
    """A recipe name ("paper", "edge", "quick") or a path to a TOML file."""
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


def to_toml(cfg: TrainConfig) -> str:
    # TOML has no null: an unset mask label is written as "" and read back as None
    data = {k: ("" if v is None else list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items()}
    return tomli_w.dumps(data)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise InputError(f"{path}: not found; is {run_dir} a run folder made by 'nerveseg train'?")
    return config_from_dict(load_toml(path), str(path))
