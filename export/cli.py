"""The desktop command line, `nerveseg`: synth, train, tune, evaluate, export, qat, pipeline, sweep, cv-quant, report.

Every subcommand turns its flags into one config and calls one function. Bad input is reported on one
line with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from device_runtime.core.errors import exit_code_of


def _synth(args) -> None:
    from training.data.synth import write_phantom

    out = write_phantom(args.out, args.count, args.seed, tuple(args.size))
    print(f"wrote {args.count} phantom frames with masks to {out} (Kaggle layout: <subject>_<frame>[_mask].tif)")


def _train(args) -> None:
    from training import train

    train.main(train.config_from_args(args), args.resume)


def _tune(args) -> None:
    from training.stages import tune_run

    result = tune_run(args.run_dir, args.device, args.flip_tta)
    v = result["validation"]
    averaged = " (flip-averaged)" if result["flip_tta"] else ""
    print(f"T* = {result['threshold']:.2f}{averaged}  morphology {result['morphology']}  validation Dice {v['dice']:.4f} "
          f"IoU {v['iou']:.4f} PA {v['pixel_accuracy']:.4f}  -> {Path(args.run_dir) / 'threshold.json'}")


def _evaluate(args) -> None:
    from training.stages import evaluate_run

    m = evaluate_run(args.run_dir, args.device)
    print(f"test: Dice {m['dice']:.4f}  IoU {m['iou']:.4f}  PA {m['pixel_accuracy']:.4f}  pooled Dice "
          f"{m['pooled_dice']:.4f}  ({m['images']} frames) -> {Path(args.run_dir) / 'test_metrics.json'}")


def _export(args) -> None:
    from .bundle.writer import export_bundle

    if args.qat:
        return _export_int8(args)
    if not args.checkpoint and not args.run_dir:
        raise SystemExit("nerveseg export: give --checkpoint PATH or --run-dir RUN")
    checkpoint = Path(args.checkpoint) if args.checkpoint else Path(args.run_dir) / "checkpoints" / "best.pt"
    bundle, manifest = export_bundle(checkpoint, args.out, args.device, replace=args.replace)
    parity, test = manifest.metrics["parity"]["fp32"], manifest.metrics["test_onnx"]
    print(f"bundle {bundle}: ONNX parity max |dp| {parity['max_prob_diff']:.1e}, mask Dice {parity['mask_dice']:.4f}; "
          f"test through ONNX: Dice {test['dice']:.4f} IoU {test['iou']:.4f} PA {test['pixel_accuracy']:.4f}")
    for problem in manifest.metrics["tensorrt_problems"]:
        print(f"warning: TensorRT would refuse: {problem}", file=sys.stderr)


def _report(args) -> None:
    from .report.write import write_report

    out = write_report(args.run_dir, args.threads, args.latency_runs)
    print(f"report: {out / 'report.html'}")


def _sweep(args) -> None:
    from .workflows.sweep import run_sweep, split_list

    out = run_sweep(args.run_dir, split_list(args.bits), split_list(args.learned), split_list(args.target_bits),
                    args.epochs, args.device, args.threads, args.latency_runs,
                    bound_from_model=args.parity_bound_from_model, grid=args.grid)
    print(f"report: {out / 'report.html'}")


def _cv_quant(args) -> None:
    from .workflows.cv_quant import run_cv_quant
    from .workflows.sweep import split_list

    command = "nerveseg " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_cv_quant(args.cv_dir, split_list(args.bits), split_list(args.learned), split_list(args.target_bits),
                 args.grid, args.epochs, args.device, args.threads, args.latency_runs, args.parity_bound_from_model,
                 command)


def _export_int8(args) -> None:
    from .bundle.int8 import export_int8_bundle, format_summary, print_problems

    if not args.run_dir or args.checkpoint:
        raise SystemExit("nerveseg export --qat NAME: give --run-dir RUN (the float run), not --checkpoint")
    bundle, manifest = export_int8_bundle(args.run_dir, args.qat, args.out, args.device, replace=args.replace,
                                          bound_from_model=args.parity_bound_from_model)
    print(format_summary(bundle, manifest))
    print_problems(manifest)


def qat_config_from_args(args):
    """The float run's recipe [qat] table plus the flags (with --resume, the QAT run's own config). Every flag whose
    name is a QatConfig field overrides it (None: the recipe's)."""
    from qat.config import QatConfig, build_qat_config
    from training.config import load_run_config

    if args.resume:  # the run's own config; only --epochs and --device may change
        from qat.config import default_run_name, load_qat_config

        name = args.name or default_run_name(args.bits or "learned", args.grid or "tensorrt")
        saved = load_qat_config(Path(args.run_dir) / "qat" / name / "config.toml")
        return saved.replace(run_dir=args.run_dir, epochs=args.epochs or saved.epochs, device=args.device)
    recipe = load_run_config(args.run_dir).recipe
    fields = QatConfig.__dataclass_fields__
    return build_qat_config(recipe, **{name: value for name, value in vars(args).items() if name in fields})


def _qat(args) -> None:
    from qat.run import format_summary, run_qat

    qat_dir = run_qat(qat_config_from_args(args), args.resume)
    print(format_summary(qat_dir))


def _pipeline(args) -> None:
    from training import train

    from .workflows.pipeline import run_pipeline

    run_pipeline(train.config_from_args(args), args.resume, args.qat_epochs)


def _cv(args) -> None:
    from training import train

    from .workflows.cv import run_cv

    if not args.run_dir:
        raise SystemExit("nerveseg cv: give --run-dir RUN (the folds go to RUN/fold-N/)")
    run_cv(train.config_from_args(args), args.folds, args.max_new_folds)


def _add_sweep_settings(parser: argparse.ArgumentParser, bits: str, learned: str) -> None:
    """The flags `nerveseg sweep` and `nerveseg cv-quant` share: which QAT runs, and how each is exported and timed."""
    parser.add_argument("--bits", default=bits, help=f"uniform bitwidths (W = A), or WxAy entries (default {bits})")
    parser.add_argument("--learned", default=learned,
                        help=f"bit-cost weights lambda of learned-bits runs (default {learned or 'none'})")
    parser.add_argument("--target-bits", default="", help="target mean bits of learned runs that pay only the excess")
    parser.add_argument("--epochs", type=int, help="QAT epochs of every run (default: the recipe's [qat] table)")
    parser.add_argument("--grid", default="tensorrt",
                        help="activation grid of every run, as `nerveseg qat --grid` (x86 runs are named NAME-x86)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads of the report")
    parser.add_argument("--parity-bound-from-model", action="store_true",
                        help="export each run as `nerveseg export --parity-bound-from-model` does")
    parser.add_argument("--latency-runs", type=int, default=50, help="timed batch-1 runs per model in the report")


def get_args_parser() -> argparse.ArgumentParser:
    from training.train import get_args_parser as train_flags

    parser = argparse.ArgumentParser(prog="nerveseg", description="Ultrasound nerve segmentation, desktop side.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write the synthetic ultrasound phantom (frames + masks)")
    synth.add_argument("--out", required=True, help="folder to write")
    synth.add_argument("--count", type=int, default=240)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    synth.set_defaults(func=_synth)

    train_flags(commands.add_parser("train", help="train DeepLabV3 (recipes: paper, edge, small, quick)")).set_defaults(func=_train)
    pipeline = commands.add_parser("pipeline", help="train, tune, evaluate and export in one go")
    train_flags(pipeline).set_defaults(func=_pipeline)
    pipeline.add_argument("--qat-epochs", type=int, help="epochs of the QAT stage (default: the recipe's [qat] table)")

    cv = commands.add_parser("cv", help="K-fold cross-validation of a recipe, each held-out fold scored through ONNX "
                                         "(resumable: run the same command again)")
    cv.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    cv.add_argument("--max-new-folds", type=int, help="train at most N unfinished folds in this call (a long CV in "
                                                       "sessions; finished folds always count)")
    train_flags(cv, resumable=False).set_defaults(func=_cv, resume=False)

    for name, func, text in (("tune", _tune, "choose T* and morphology on the validation split"),
                             ("evaluate", _evaluate, "score the test split at T* with morphology")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--run-dir", required=True)
        sub.add_argument("--device", default="auto")
        sub.set_defaults(func=func)
        if name == "tune":
            sub.add_argument("--flip-tta", action=argparse.BooleanOptionalAction,
                             help="tune (and so evaluate and export) with test-time flip averaging: each frame's "
                                  "probabilities averaged with its left-right mirror's (default: the run's config)")

    qat = commands.add_parser("qat", help="fine-tune a tuned run with fake quantization (learned or fixed bits)")
    qat.add_argument("--run-dir", required=True, help="a trained and tuned float run")
    qat.add_argument("--bits", help="learned (default), learned-aN (learned weight bits, activations fixed at N), N (2..8) or WxAy, e.g. W4A8")
    qat.add_argument("--bit-weight", type=float, help="lambda of the bit cost (default 0.25, QuantU-Net's)")
    qat.add_argument("--target-bits", type=float,
                     help="penalise only mean bits above B; when the bits freeze, the mean weight bits are capped at B")
    qat.add_argument("--initial-bits", type=int, metavar="B",
                     help="learned runs: every layer's weight bits start at B and learn up or down (default 8)")
    qat.add_argument("--epochs", type=int, help="QAT epochs (default: the recipe's [qat] table)")
    qat.add_argument("--bit-epochs", type=int, metavar="N",
                     help="learned runs: epochs that learn the bits before they freeze (default: the recipe's share)")
    qat.add_argument("--activation-percentile", type=float,
                     help="initialise activation steps at this percentile of |x| (default 99.99; 0: the maximum)")
    qat.add_argument("--grid", choices=("tensorrt", "x86"),
                     help="tensorrt (default): signed activations, one set of integers for TensorRT and x86; x86: "
                          "tensors read only through ReLU unsigned (uint8), faster on x86 ONNX Runtime, no TensorRT file")
    qat.add_argument("--lr-weights", type=float,
                     help="learning rate of the folded weights and biases (default: the recipe's [qat] table, 1e-4)")
    qat.add_argument("--distill", type=float, metavar="D",
                     help="weight of the float model as teacher: + D x BCE(QAT logits, float probabilities) (default 0)")
    qat.add_argument("--name", help="RUN/qat/NAME (default from --bits: learned, w8a8, w4a4, w4a8; -x86 for --grid x86)")
    qat.add_argument("--resume", action="store_true", help="continue RUN/qat/NAME from its last checkpoint")
    qat.add_argument("--device", default="auto")
    qat.set_defaults(func=_qat)

    export = commands.add_parser("export", help="write the bundle: FP32 ONNX (+ INT8 with --qat) and manifest, "
                                 "checked against PyTorch")
    export.add_argument("--checkpoint", help="a tuned checkpoint (default RUN/checkpoints/best.pt)")
    export.add_argument("--run-dir", help="the run whose best checkpoint to export")
    export.add_argument("--qat", metavar="NAME", help="export the QAT run RUN/qat/NAME as an INT8 bundle "
                        "(default folder RUN/qat/NAME/bundle): FP32 + INT8 QDQ graphs, parity-checked")
    export.add_argument("--out", help="bundle folder (default RUN/bundle, or RUN/qat/NAME/bundle with --qat)")
    export.add_argument("--device", default="auto")
    export.add_argument("--replace", action="store_true",
                        help="replace an existing bundle at --out (atomically); without it an existing bundle is kept")
    export.add_argument("--parity-bound-from-model", action="store_true",
                        help="with --qat: where the fake-quant model agrees with itself (float32 vs float64) below the "
                             "0.995 mask-Dice bound, hold each INT8 file to that agreement (recorded in the manifest)")
    export.set_defaults(func=_export)

    sweep = commands.add_parser("sweep", help="QAT fine-tunes at several bitwidths from one float run, exported, "
                                              "then the report (resumable: run it again to continue)")
    sweep.add_argument("--run-dir", required=True, help="a tuned float run; runs go to RUN/qat/NAME/")
    _add_sweep_settings(sweep, bits="8,6,5,4,3,2", learned="0.05,0.25,1.0")
    sweep.set_defaults(func=_sweep)

    cv_quant = commands.add_parser("cv-quant", help="quantization on every held-out fold of a `nerveseg cv`: a sweep per "
                                                    "fold, per-frame Dice pooled over the folds (resumable)")
    cv_quant.add_argument("--cv-dir", required=True, help="the --run-dir of a `nerveseg cv`; its finished folds are used")
    _add_sweep_settings(cv_quant, bits="8", learned="")
    cv_quant.set_defaults(func=_cv_quant)

    report = commands.add_parser("report", help="accuracy vs bitwidth: float, ORT PTQ and every QAT run of RUN")
    report.add_argument("--run-dir", required=True, help="the float run whose qat/ runs to report")
    report.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads for scoring and timing")
    report.add_argument("--latency-runs", type=int, default=50, help="timed batch-1 runs per model (0: no timing)")
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return exit_code_of(lambda: args.func(args), "nerveseg")


if __name__ == "__main__":
    sys.exit(main())
