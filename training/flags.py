"""The flags of `nerveseg train` (also `pipeline` and `cv`) and the config they make. Torch-free, so that
`nerveseg --help` and a bad flag answer at once instead of after importing PyTorch.

None means "the recipe's value": the help says so, and the epilog lists what the recipes hold.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from device_runtime.core.errors import InputError

from .config import TrainConfig, build_config, load_run_config

RECIPES = ("paper", "edge", "small", "quick")


def recipes_table() -> str:
    """The shipped recipes' main settings, read from their TOML files (training/configs/)."""
    lines = ["recipes (--recipe; every flag left out takes the recipe's value):",
             f"  {'recipe':<8}{'network':<20}{'input':<10}{'budget':<16}{'batch':>6}{'lr':>8}  start"]
    for name in RECIPES:
        cfg = build_config(name)
        budget = f"{cfg.steps} steps" if cfg.steps else f"{cfg.epochs} epochs"
        size = "x".join(map(str, cfg.input_size))
        lines.append(f"  {name:<8}{cfg.arch:<20}{size:<10}{budget:<16}{cfg.batch_size:>6}{cfg.lr:>8g}  "
                     f"{cfg.pretrained}")
    return "\n".join(lines)


def get_args_parser(parser=None, resumable: bool = True):
    """Flags of `nerveseg train` (also used by `nerveseg pipeline` and, without --resume, `nerveseg cv`).
    None means "the recipe's value"."""
    parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    recipe = "(default: the recipe's)"
    parser.add_argument("--recipe", default="quick", help="paper, edge, small, quick (table below), or a .toml file")
    parser.add_argument("--data", metavar="FOLDER",
                        help="dataset root (paired images/ + masks/, or the Kaggle 2016 layout) (default: the synthetic "
                             "phantom, generated)")
    parser.add_argument("--mask-label", type=int, metavar="N",
                        help="label value of the nerve in multi-label masks (default: any non-zero pixel)")
    parser.add_argument("--run-dir", metavar="FOLDER", help="run folder (default: runs/RECIPE-DATE-TIME)")
    if resumable:
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in --run-dir from checkpoints/last.pt")
    parser.add_argument("--arch", choices=["resnet50", "mobilenet_v3_large"], help=f"backbone of DeepLabV3 {recipe}")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help=f"the network's input size; every frame is resized to it {recipe}")
    parser.add_argument("--pretrained", metavar="START",
                        help="none, imagenet, phantom (train on the phantom first: training/pretrain.py), or a nerveseg "
                             f"checkpoint or backbone state dict to start the backbone from {recipe}")
    parser.add_argument("--phantom-frames", type=int, metavar="N",
                        help="--pretrained phantom: frames of the pre-training phantom")
    parser.add_argument("--phantom-dir", metavar="FOLDER",
                        help="--pretrained phantom: the pre-training's run folder, trained there once "
                             "and reused by every run naming it (default RUN/phantom)")
    parser.add_argument("--phantom-input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="--pretrained phantom: the stage's input size (default: the recipe's; small: 256 256; else "
                             "--input-size)")
    parser.add_argument("--phantom-batch-size", type=int, metavar="N",
                        help="--pretrained phantom: the stage's batch size (default: the recipe's; 0 = --batch-size)")
    parser.add_argument("--phantom-steps", type=int, metavar="N",
                        help="--pretrained phantom: the stage's optimiser steps (default: the recipe's; 0 = the run's "
                             "own budget)")
    parser.add_argument("--phantom-head", action="store_const", const=True,
                        help="--pretrained phantom: start the ASPP head and classifier from the stage too, not only "
                             "the backbone")
    parser.add_argument("--aspp-rates", type=int, nargs="+", metavar="RATE",
                        help="dilation rates of the ASPP's 3x3 branches (torchvision's 12 24 36; 3 6 9 fit a 256x256 frame)")
    parser.add_argument("--decoder", choices=["none", "skip"],
                        help="skip: a light DeepLabV3+ decoder, logits from a map twice as fine (default: the recipe's)")
    parser.add_argument("--relu-backbone", action=argparse.BooleanOptionalAction,
                        help="mobilenet_v3_large: ReLU in place of its hardswish layers, for activations below 8 bits "
                             "(every ReLU'd tensor unsigned on the x86 grid) (default: the recipe's; none uses it)")
    parser.add_argument("--weight-ema", type=float, metavar="DECAY",
                        help="validate, keep and deploy a moving average of the weights, this decay per step (0.99; "
                             f"0 = off) {recipe}")
    parser.add_argument("--swa-start", type=float, metavar="FRACTION",
                        help="stochastic weight averaging from this fraction of the step budget on, at a constant lr "
                             f"of --swa-lr-ratio x lr (0.75; 0 = off; warmup_cosine recipes) {recipe}")
    parser.add_argument("--swa-lr-ratio", type=float, metavar="RATIO",
                        help=f"SWA's constant lr over the recipe's lr {recipe}")
    parser.add_argument("--flip-tta", action=argparse.BooleanOptionalAction,
                        help="deploy with test-time flip averaging: T*, evaluation and the exported graph average each "
                             "frame's probabilities with its left-right mirror's, at twice the inference (default: the "
                             "recipe's)")
    parser.add_argument("--epochs", type=int, metavar="N", help=f"training epochs {recipe}")
    parser.add_argument("--steps", type=int, metavar="N",
                        help=f"budget in optimiser steps instead of epochs (0 = use --epochs) {recipe}")
    parser.add_argument("--val-every", type=int, metavar="N",
                        help=f"validate every N epochs (and after the last) {recipe}")
    parser.add_argument("--group-by", choices=["auto", "prefix"],
                        help="prefix: '<subject>_<frame>' names in paired folders keep a subject on one side of the "
                             "split (default: auto, by subject only in the Kaggle layout)")
    parser.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                        help=f"shares of the frames for training, validation and test, by subject where there are "
                             f"subjects {recipe}")
    parser.add_argument("--batch-size", type=int, metavar="N", help=f"frames per optimiser step {recipe}")
    parser.add_argument("--lr", type=float, help=f"peak learning rate {recipe}")
    parser.add_argument("--seed", type=int, help=f"seed of the split, the phantom and the training {recipe}")
    parser.add_argument("--synth-count", type=int, metavar="N",
                        help=f"frames of the synthetic phantom (without --data) {recipe}")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: auto, a GPU when there is one)")
    parser.add_argument("--workers", type=int, metavar="N", help="data loader worker processes (default: automatic)")
    parser.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="no mixed precision on CUDA")
    parser.add_argument("--compile", dest="torch_compile", action="store_const", const=True,
                        help="train under torch.compile: faster steps after a compile of a minute or two (on a CPU: a "
                             "C++ compiler)")
    return parser


CONFIG_FLAGS = frozenset(TrainConfig.__dataclass_fields__) - {"recipe"}  # the flags are named after the fields


def config_from_args(args) -> TrainConfig:
    """The recipe plus the flags; with --resume, the run's own config.toml (only --epochs, --steps, --device
    and --workers may change, and --compile may be added, so the continued run is the same run)."""
    if args.resume:
        if not args.run_dir:
            raise InputError("--resume needs --run-dir, the run folder to continue")
        cfg = load_run_config(args.run_dir)
        changes = {k: getattr(args, k) for k in ("epochs", "steps", "device", "workers", "torch_compile")
                   if getattr(args, k, None) is not None}
        if args.epochs is not None and args.steps is None:
            changes["steps"] = 0  # as in build_config: an explicit --epochs replaces a step budget
        return cfg.replace(run_dir=args.run_dir, **changes)
    # every flag whose name is a config field overrides it (None: the recipe's); --recipe picks the recipe
    overrides = {name: value for name, value in vars(args).items() if name in CONFIG_FLAGS}
    cfg = build_config(args.recipe, **overrides)  # lists from nargs flags become tuples there (config._coerce)
    if not cfg.run_dir:
        cfg = cfg.replace(run_dir=str(Path("runs") / f"{Path(args.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"))
    return cfg


