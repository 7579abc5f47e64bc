"""The one QAT config: the defaults below, then the float recipe's `[qat]` table, then command-line flags.

It is saved as RUN/qat/NAME/config.toml and inside every QAT checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from device_runtime.core.errors import InputError
from training.config import load_toml, recipe_path

GRIDS = ("tensorrt", "x86")  # what prepare_qat(grid=...) builds; see QatConfig.grid
ACTIVATION_RANGES = ("signed", "tight")  # prepare_qat(activation_range=...); see QatConfig.activation_range
ACTIVATION_INITS = ("percentile", "mse")  # FakeQuant.init_from_samples; see QatConfig.activation_init
ALLOCATIONS = ("", "sensitivity")  # qat/allocation.py; see QatConfig.activation_allocation, weight_allocation
SCHEDULE_SIDES = ("both", "activations")  # what a bit schedule lowers; see QatConfig.bit_schedule_side

# keys a recipe's [qat] table may set (the rest come from the command line: run, name, bits, device)
RECIPE_KEYS = ("grid", "epochs", "bit_epochs", "observe_frames", "activation_percentile", "batch_size", "lr_weights",
               "lr_steps", "lr_bits", "bit_weight", "activation_bit_weight", "target_bits", "b_min", "b_max", "distill",
               "initial_bits", "activation_range", "activation_init", "bit_schedule", "bit_schedule_side",
               "hold_fragile", "fragile_min_drop", "fragile_frames", "target_activation_bits", "bias_correction",
               "initial_activation_bits", "activation_allocation", "weight_allocation", "keep_start")


@dataclass(frozen=True)
class BitSetting:
    """What `--bits` asks for: learned bitwidths (of weights, and of activations unless they are fixed), or
    fixed weight / activation bits."""

    learned: bool  # the weight bits learn (and the activation bits, unless learned_activations is False)
    weight_bits: int = 8
    activation_bits: int = 8
    learned_activations: bool = True

    @property
    def default_name(self) -> str:
        if self.learned:
            return "learned" if self.learned_activations else f"learned-a{self.activation_bits}"
        return f"w{self.weight_bits}a{self.activation_bits}"


def lowest_fixed_bits(b_min: int) -> int:
    """The fewest bits an allocation may give a fixed bitwidth: 1 (where a one-bit grid exists: binary weights, [0, 1]
    for an activation read through ReLU; qat.allocation.bit_choices) unless b_min asks for more than 2; learned bits
    stop at b_min."""
    return 1 if b_min <= 2 else b_min


def default_keep_start(setting: BitSetting) -> bool:
    """Whether a fixed-bit run keeps its start unless validation prefers the trained model: with 8-bit weights, yes;
    below, no. Each by its pre-registered five-fold screen (docs/accuracy.md, "A QAT run keeps its start" and "Does
    the default hold at W4A8?"): at W8A8 the rule deployed the start on four folds and scored +0.006 over the trained
    model; at W4A8 the start alone is 0.031 below float, the rule still chose it on two folds and scored -0.005 under
    the trained model. (Learned bits have no start; the value is unused there.)"""
    return setting.weight_bits >= 8


def parse_bits(text: str) -> BitSetting:
    """"learned", "learned-aN" (learned weight bits, activations fixed at N), "N" (weights and activations at N
    bits) or "WxAy"; N, x, y in 2..8.

    Why learned weights with fixed activations: on int8 hardware the activation bits buy no speed (every tensor
    moves as int8 either way) and a b < 8 activation costs a clamp per tensor; the weight bits are what the
    packed model size pays for. "learned-a8" spends the bit budget where it shrinks the model."""
    value = str(text).strip().lower()
    if value == "learned":
        return BitSetting(True)
    match = (re.fullmatch(r"(\d+)", value) or re.fullmatch(r"w(\d+)a(\d+)", value)
             or re.fullmatch(r"learned-a(\d+)", value))
    if not match:
        raise InputError(f"--bits must be 'learned', 'learned-aN', a bitwidth N or WxAy (e.g. W4A8), got {text!r}")
    numbers = [int(g) for g in match.groups()]
    bad = [n for n in numbers if not 2 <= n <= 8]
    if bad:
        raise InputError(f"--bits {text}: bitwidths must lie in 2..8 (int8 hardware; 1 bit has no signed grid), "
                         f"got {bad[0]}")
    if value.startswith("learned"):
        return BitSetting(True, activation_bits=numbers[0], learned_activations=False)
    return BitSetting(False, numbers[0], numbers[-1])


def parse_bit_schedule(text: str, setting: BitSetting, epochs: int, side: str = "both") -> list[tuple[int, int]]:
    """"B@E,B@E,..." -> [(E, B)], checked: a uniform run, bits falling in 2..8, epochs rising in 2..epochs, the last
    entry at or below the run's bits (the activation bits where `side` is "activations"; so the run reaches them)
    and at least one epoch left at them."""
    where = f"--bit-schedule {text!r}"
    if setting.learned:
        raise InputError(f"{where}: a schedule lowers the bits of a uniform run (--bits N or WxAy); learned bits "
                         f"find their own")
    steps = []
    for item in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*@\s*(\d+)\s*", item)
        if not match:
            raise InputError(f"{where}: each entry is BITS@EPOCH (e.g. 6@2,4@3), got {item!r}")
        bits, epoch = int(match.group(1)), int(match.group(2))
        if not 2 <= bits <= 8 or not 2 <= epoch <= epochs:
            raise InputError(f"{where}: bits must lie in 2..8 and epochs in 2..{epochs} (epoch 1 trains at 8 bits), "
                             f"got {bits}@{epoch}")
        steps.append((epoch, bits))
    if any(b <= a for (a, _), (b, _) in zip(steps, steps[1:])) or any(b >= a for (_, a), (_, b) in zip(steps, steps[1:])):
        raise InputError(f"{where}: epochs must rise and bits fall from one entry to the next")
    lowered = [setting.activation_bits] if side == "activations" else [setting.weight_bits, setting.activation_bits]
    if steps[-1][1] > min(lowered) or steps[-1][0] > epochs:
        raise InputError(f"{where}: the last entry must reach the run's bits ({min(lowered)} for --bits "
                         f"W{setting.weight_bits}A{setting.activation_bits}"
                         f"{', the activations' if side == 'activations' else ''}), got {steps[-1][1]}")
    return steps


def default_run_name(bits: str, grid: str = "tensorrt") -> str:
    """RUN/qat/NAME without --name: learned, learned-a8, w8a8, w4a8 ...; "-x86" for the x86 grid."""
    return parse_bits(bits).default_name + ("-x86" if grid == "x86" else "")


@dataclass(frozen=True)
class QatConfig:
    run_dir: str = ""  # the tuned float run whose checkpoints/best.pt is fine-tuned
    name: str = ""  # RUN/qat/NAME; "" = from bits (learned, w8a8, w4a4, w4a8)
    bits: str = "learned"
    # "tensorrt": every activation on a signed grid with zero point 0, one set of integers for TensorRT and x86
    # ONNX Runtime. "x86": tensors read only through ReLU on an unsigned grid (uint8, zero point 0), which ONNX
    # Runtime folds into its integer convolutions; the bundle then has no TensorRT INT8 file (qat/prepare.py)
    grid: str = "tensorrt"
    # schedule: observe/initialise steps, learn weights + steps + bits for bit_epochs, then bits frozen
    epochs: int = 6
    bit_epochs: int = 4  # learned runs only; uniform runs have their bits frozen from the start
    observe_frames: int = 64  # training frames whose activations initialise the steps
    # activation grids initially reach the P-th percentile of |x| (0: the largest |x| observed). 99.99 chosen on
    # validation (usgra-seg edge, W8A8, 6 epochs: best-threshold Dice 0.597 against 0.576 from the maximum)
    activation_percentile: float = 99.99
    batch_size: int = 0  # 0 = the float recipe's
    # optimiser groups (Adam): folded weights and biases, log2 steps, bitwidth ranges (log2 units ~ bits)
    lr_weights: float = 1e-4
    lr_steps: float = 1e-2
    lr_bits: float = 0.1
    # bit cost: bit_weight x (mean weight bits / 8 + activation_bit_weight x mean activation bits / 8)
    bit_weight: float = 0.25  # lambda, QuantU-Net's value
    activation_bit_weight: float = 1.0
    target_bits: float = 0.0  # > 0: penalise only the mean bits above this; at the freeze the weight mean is capped at it
    # > 0: the float model teaches (qat/loss.py): + distill x BCE(QAT logits, the float model's probabilities)
    distill: float = 0.0
    b_min: int = 2
    b_max: int = 8
    # learned runs: the weight bitwidth every layer starts from (0: 8, as before it existed). The bits learn both
    # ways from there: the task loss raises a layer whose clipping costs more than its bits, the bit cost lowers others
    initial_bits: int = 0
    # -- low bits (docs/QUANTIZATION.md, "Low-bit activations"); the defaults are the behaviour before them --
    # "tight": activations below 8 bits split their 2^b levels between negative and positive values as the data
    # do ([-z, 2^b - 1 - z], inside int8 with zero point 0 below 8 bits: TensorRT and x86); "signed": [-2^(b-1), ...]
    activation_range: str = "signed"
    # "mse": activation steps below 8 bits by the squared-error search (8 bits keep the percentile)
    activation_init: str = "percentile"
    # uniform runs: "B@E,..." lowers the bits on the way to --bits: from epoch E (1-based) max(B, target) bits, 8
    # before the first entry, and from the last entry on each tensor's target (its allocated bits, which may lie
    # below B); the steps are re-initialised at each change; only epochs at the targets become best
    bit_schedule: str = ""
    # "both": the schedule lowers weights and activations; "activations": the weights train at their targets from
    # the first epoch and only the activations are lowered in stages (at 2 bits the weights alone hold, the
    # activations do not: docs/QUANTIZATION.md, the W2A2 diagnosis)
    bit_schedule_side: str = "both"
    # hold the N quantizers whose one-at-a-time Dice drop (on training frames, at the run's bits) is largest, and
    # above fragile_min_drop, at 8 bits; counted at 8 in the mean bits
    hold_fragile: int = 0
    fragile_min_drop: float = 0.0
    # training frames each candidate is scored on: the ranking costs (quantizers x frames) forward passes, about
    # 140 x 16 on the edge model, a few training epochs' worth; the fragile few drop by 0.1-0.5 Dice, plain on 16
    fragile_frames: int = 16
    # learned runs: the budget of mean activation bits (0: target_bits, and no cap); at the freeze the activation
    # mean is capped at it, as target_bits caps the weights
    target_activation_bits: float = 0.0
    # learned runs: the bitwidth every learned activation starts from (0: 8, or 7 on a tight grid); the activation
    # counterpart of initial_bits
    initial_activation_bits: int = 0
    # after the steps are (re)initialised: move each convolution's bias so that its channels' means on the observed
    # training frames are the float model's (qat/bias_correction.py)
    bias_correction: bool = False
    # fixed activation bits B below 8 (--bits 4, W4A4, learned-a4): "sensitivity" gives each activation B - 1 .. B + 2
    # bits by its measured sensitivity, the mean (weighted by elements) at most B (qat/allocation.py); "": all at B.
    # Learned activation bits with a budget B (target_activation_bits): the same allocation is where they start
    activation_allocation: str = ""
    # fixed weight bits B below 8 (--bits 3, W4A8): the same, each weight tensor B - 1 .. B + 2 bits, the mean
    # (weighted by live weights, as bits.json's) at most B. Learned weight bits with a target B: where they start.
    # At a fixed B = 2 both allocations may give one bit where a grid exists (binary weights, [0, 1] activations
    # read through ReLU: qat.allocation.bit_choices)
    weight_allocation: str = ""
    # fixed-bit runs: deploy the start (the grid alone, at the float run's T*) unless validation prefers the trained
    # model beyond noise (qat/checkpoint.py, `choose`); False: the trained model; None: `default_keep_start`. Both are
    # scored on test either way
    keep_start: bool | None = None
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        setting = parse_bits(self.bits)  # raises on a bad value
        if self.keep_start is None:  # resolved here, so that config.toml and checkpoints always say which
            object.__setattr__(self, "keep_start", default_keep_start(setting))
        if self.grid not in GRIDS:
            raise InputError(f"--grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if not 2 <= self.b_min <= self.b_max <= 8:
            raise InputError(f"b_min and b_max must satisfy 2 <= b_min <= b_max <= 8, got {self.b_min}, {self.b_max}")
        if self.epochs < 1 or self.observe_frames < 1 or self.batch_size < 0:
            raise InputError(f"epochs and observe_frames must be >= 1 and batch_size >= 0, got {self.epochs}, "
                             f"{self.observe_frames}, {self.batch_size}")
        if setting.learned and not 1 <= self.bit_epochs < self.epochs:
            raise InputError(f"a learned-bits run needs 1 <= bit_epochs < epochs (bits are frozen for the last "
                             f"epochs), got bit_epochs {self.bit_epochs}, epochs {self.epochs}")
        if self.activation_percentile and not 50.0 < self.activation_percentile < 100.0:
            raise InputError(f"activation_percentile must be 0 (the maximum) or in (50, 100), got "
                             f"{self.activation_percentile}")
        if min(self.lr_weights, self.lr_steps, self.lr_bits) <= 0:
            raise InputError("learning rates lr_weights, lr_steps, lr_bits must be positive")
        if self.bit_weight < 0 or self.activation_bit_weight < 0:
            raise InputError(f"bit_weight and activation_bit_weight must be >= 0, got {self.bit_weight}, "
                             f"{self.activation_bit_weight}")
        if self.distill < 0:
            raise InputError(f"--distill must be >= 0, got {self.distill}")
        if self.initial_bits and not self.b_min <= self.initial_bits <= self.b_max:
            raise InputError(f"--initial-bits must lie in [{self.b_min}, {self.b_max}], got {self.initial_bits}")
        if self.initial_bits and not setting.learned:
            raise InputError(f"--initial-bits is for learned bits; --bits {self.bits} fixes them")
        if self.target_bits and not self.b_min <= self.target_bits <= self.b_max:
            raise InputError(f"--target-bits must lie in [{self.b_min}, {self.b_max}], got {self.target_bits}")
        self._check_low_bits(setting)

    def _check_low_bits(self, setting: BitSetting) -> None:
        if self.activation_range not in ACTIVATION_RANGES:
            raise InputError(f"--activation-range must be one of {', '.join(ACTIVATION_RANGES)}, got "
                             f"{self.activation_range!r}")
        if self.activation_init not in ACTIVATION_INITS:
            raise InputError(f"--activation-init must be one of {', '.join(ACTIVATION_INITS)}, got "
                             f"{self.activation_init!r}")
        if self.hold_fragile < 0 or self.fragile_min_drop < 0 or self.fragile_frames < 1:
            raise InputError(f"--hold-fragile and fragile_min_drop must be >= 0 and fragile_frames >= 1, got "
                             f"{self.hold_fragile}, {self.fragile_min_drop}, {self.fragile_frames}")
        if self.initial_activation_bits and not (setting.learned and setting.learned_activations):
            raise InputError(f"--initial-activation-bits is for learned activation bits; --bits {self.bits} fixes them")
        if self.initial_activation_bits and not self.b_min <= self.initial_activation_bits <= self.b_max:
            raise InputError(f"--initial-activation-bits must lie in [{self.b_min}, {self.b_max}], got "
                             f"{self.initial_activation_bits}")
        if self.target_activation_bits and not setting.learned:
            raise InputError(f"--target-activation-bits is for learned bits; --bits {self.bits} fixes them")
        if self.target_activation_bits and not self.b_min <= self.target_activation_bits <= self.b_max:
            raise InputError(f"--target-activation-bits must lie in [{self.b_min}, {self.b_max}], got "
                             f"{self.target_activation_bits}")
        if self.activation_allocation not in ALLOCATIONS:
            raise InputError(f"--activation-allocation must be sensitivity (or unset), got "
                             f"{self.activation_allocation!r}")
        learned_activations = setting.learned and setting.learned_activations
        # learned bits take the allocation as their start, under their budget: one is needed, in whole bits
        for flag, on, learned, budget, budget_flag in (
                ("--activation-allocation", self.activation_allocation, learned_activations,
                 self.target_activation_bits, "--target-activation-bits"),
                ("--weight-allocation", self.weight_allocation, setting.learned, self.target_bits, "--target-bits")):
            if on and learned and not (budget > 0 and float(budget).is_integer()):
                raise InputError(f"{flag} with learned bits starts them from an allocation under their budget: give "
                                 f"{budget_flag} in whole bits (e.g. 4), got {budget:g}")
        if self.activation_allocation and not learned_activations and setting.activation_bits >= 8:
            raise InputError(f"--activation-allocation is for activation bits below 8 (e.g. --bits 4, learned-a4, or "
                             f"learned bits with --target-activation-bits); --bits {self.bits} keeps them at 8")
        if self.weight_allocation not in ALLOCATIONS:
            raise InputError(f"--weight-allocation must be sensitivity (or unset), got {self.weight_allocation!r}")
        if self.weight_allocation and not setting.learned and setting.weight_bits >= 8:
            raise InputError(f"--weight-allocation is for weight bits below 8 (e.g. --bits 4, W4A8, or learned bits "
                             f"with --target-bits); --bits {self.bits} keeps them at 8")
        # at the floor every tensor is already there: nothing to move (and the frame's 8 bits put the activation mean
        # above the budget). Learned bits stop at b_min; fixed ones go down to 1 where one bit has a grid
        # (qat.allocation.bit_choices), so a 2-bit budget can move them
        fixed_floor = lowest_fixed_bits(self.b_min)
        floor = [(flag, lowest) for flag, on, bits, lowest in (
                     ("--activation-allocation", self.activation_allocation, self.allocation_budget("activation"),
                      self.b_min if learned_activations else fixed_floor),
                     ("--weight-allocation", self.weight_allocation, self.allocation_budget("weight"),
                      self.b_min if setting.learned else fixed_floor))
                 if on and bits <= lowest]
        if floor:
            raise InputError(f"{floor[0][0]} needs bits above {floor[0][1]} to move any; --bits {self.bits} puts "
                             f"every tensor at the floor")
        if self.bit_schedule_side not in SCHEDULE_SIDES:
            raise InputError(f"--bit-schedule-side must be one of {', '.join(SCHEDULE_SIDES)}, got "
                             f"{self.bit_schedule_side!r}")
        if self.bit_schedule_side != "both" and not self.bit_schedule:
            raise InputError(f"--bit-schedule-side {self.bit_schedule_side} needs a --bit-schedule to apply to")
        if self.bit_schedule:
            parse_bit_schedule(self.bit_schedule, setting, self.epochs, self.bit_schedule_side)

    def allocation_budget(self, side: str) -> int:
        """The mean bits an allocation of `side` ("weight" or "activation") may spend: the fixed bits, or a learned
        side's budget (target_bits, target_activation_bits), where its learned bits then start."""
        setting = self.bit_setting
        if side == "weight":
            return round(self.target_bits) if setting.learned else setting.weight_bits
        learned = setting.learned and setting.learned_activations
        return round(self.target_activation_bits) if learned else setting.activation_bits

    @property
    def bit_schedule_steps(self) -> list[tuple[int, int]]:
        """[(epoch, bits)] of `bit_schedule` (1-based epochs), [] without one."""
        if not self.bit_schedule:
            return []
        return parse_bit_schedule(self.bit_schedule, self.bit_setting, self.epochs, self.bit_schedule_side)

    @property
    def bit_setting(self) -> BitSetting:
        return parse_bits(self.bits)

    @property
    def run_name(self) -> str:
        return self.name or default_run_name(self.bits, self.grid)

    @property
    def qat_dir(self) -> Path:
        return Path(self.run_dir) / "qat" / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "QatConfig":
        return dataclasses.replace(self, **changes)


def _check_keys(data: dict, allowed, where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(allowed))}")


def recipe_qat_table(recipe: str) -> dict:
    """The `[qat]` table of a recipe (name or .toml path), checked for unknown keys; {} when it has none."""
    path = recipe_path(recipe)
    table = load_toml(path).get("qat", {})
    if not isinstance(table, dict):
        raise InputError(f"{path}: 'qat' must be a table ([qat]), got {type(table).__name__}")
    _check_keys(table, RECIPE_KEYS, f"{path} [qat]")
    return dict(table)


def build_qat_config(recipe: str, **overrides) -> QatConfig:
    """Defaults, then the recipe's [qat] table, then every override that is not None."""
    values = recipe_qat_table(recipe)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "epochs" in overrides and "bit_epochs" not in overrides and overrides["epochs"] >= 2:
        # another length keeps the recipe's proportion of learning-bits epochs (at least one of each phase)
        default = QatConfig()
        epochs, bit_epochs = values.get("epochs", default.epochs), values.get("bit_epochs", default.bit_epochs)
        share = round(overrides["epochs"] * bit_epochs / epochs)
        overrides["bit_epochs"] = min(max(share, 1), overrides["epochs"] - 1)
    values.update(overrides)
    _check_keys(values, [f.name for f in dataclasses.fields(QatConfig)], "qat config")
    try:
        return QatConfig(**values)
    except TypeError as err:
        raise InputError(f"qat config: {err}") from None


def qat_config_from_dict(data: dict, where: str) -> QatConfig:
    _check_keys(data, [f.name for f in dataclasses.fields(QatConfig)], where)
    try:
        return QatConfig(**data)
    except TypeError as err:
        raise InputError(f"{where}: {err}") from None


def to_toml(cfg: QatConfig) -> str:
    return tomli_w.dumps(cfg.to_dict())


def load_qat_config(path: str | Path) -> QatConfig:
    return qat_config_from_dict(load_toml(path), str(path))
