"""The desktop command line, `nerveseg`: synth, train, tune, tune-temporal, evaluate, export, qat, pipeline, sweep,
cv-quant, report.

Every subcommand turns its flags into one config and calls one function. Bad input is reported on one
line with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from device_runtime.core.errors import EXIT_INCOMPLETE, EXIT_OK, exit_code_of


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


def _tune_temporal(args) -> None:
    from training.evaluation.temporal_tune import main as tune_temporal_main

    tune_temporal_main(args)


def _evaluate(args) -> None:
    from training.stages import evaluate_run

    m = evaluate_run(args.run_dir, args.device)
    print(f"test: Dice {m['dice']:.4f}  IoU {m['iou']:.4f}  PA {m['pixel_accuracy']:.4f}  pooled Dice "
          f"{m['pooled_dice']:.4f}  ({m['images']} frames) -> {Path(args.run_dir) / 'test_metrics.json'}")


def _export(args) -> None:
    from .bundle.writer import export_bundle

    _retired_parity_flag(args)
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


def _sweep(args) -> int:
    from .workflows.sweep import plan, run_sweep, split_list

    _retired_parity_flag(args)
    out = run_sweep(args.run_dir, split_list(args.bits), split_list(args.learned), split_list(args.target_bits),
                    args.epochs, args.device, args.threads, args.latency_runs, grid=args.grid)
    print(f"report: {out / 'report.html'}")
    jobs = plan(split_list(args.bits), split_list(args.learned), split_list(args.target_bits), args.grid)
    return _exports_written("nerveseg sweep", args.run_dir, [job.name for job in jobs])


def _exports_written(prog: str, run_dir, names: list[str]) -> int:
    """EXIT_OK when every finished run among `names` has its INT8 bundle; else one last line on stderr naming the
    refused ones, and EXIT_INCOMPLETE (the rest of what the command wrote stands)."""
    from .workflows.sweep import refused_exports, refusal_line

    refused = refused_exports(Path(run_dir), names)
    if not refused:
        return EXIT_OK
    print(f"{prog}: {refusal_line(refused, len(names))}", file=sys.stderr)
    return EXIT_INCOMPLETE


def _cv_quant(args) -> None:
    from .workflows.cv_quant import run_cv_quant
    from .workflows.sweep import split_list

    _retired_parity_flag(args)
    command = "nerveseg " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_cv_quant(args.cv_dir, split_list(args.bits), split_list(args.learned), split_list(args.target_bits),
                 args.grid, args.epochs, args.device, args.threads, args.latency_runs, command)


def _export_int8(args) -> None:
    from .bundle.int8 import export_int8_bundle, format_summary, print_problems

    if not args.run_dir or args.checkpoint:
        raise SystemExit("nerveseg export --qat NAME: give --run-dir RUN (the float run), not --checkpoint")
    bundle, manifest = export_int8_bundle(args.run_dir, args.qat, args.out, args.device, replace=args.replace)
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

    qat_dir = run_qat(qat_config_from_args(args), args.resume, keep_start=args.keep_start)
    print(format_summary(qat_dir))


def _pipeline(args) -> int:
    from training import train

    from .workflows.pipeline import pipeline_runs, run_pipeline

    cfg = train.config_from_args(args)
    run_pipeline(cfg, args.resume, args.qat_epochs)
    return _exports_written("nerveseg pipeline", cfg.run_dir, pipeline_runs())


def _cv(args) -> None:
    from training import train

    from .workflows.cv import run_cv

    if not args.run_dir:
        raise SystemExit("nerveseg cv: give --run-dir RUN (the folds go to RUN/fold-N/)")
    run_cv(train.config_from_args(args), args.folds, args.max_new_folds, args.only_folds)


def _retired_parity_flag(args) -> None:
    """`--parity-bound-from-model` (retired): the INT8 gate now always holds each file to the model's own
    float32-vs-float64 disagreement, which is what the flag asked for; accepted so that old commands still run."""
    if getattr(args, "parity_bound_from_model", False):
        print("note: --parity-bound-from-model is no longer needed (every INT8 file is held to the fake-quant model's "
              "own float32-vs-float64 noise floor, docs/QUANTIZATION.md); ignored", file=sys.stderr)


def _add_retired_parity_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parity-bound-from-model", action="store_true", help=argparse.SUPPRESS)


def _add_sweep_settings(parser: argparse.ArgumentParser, bits: str, learned: str) -> None:
    """The flags `nerveseg sweep` and `nerveseg cv-quant` share: which QAT runs, and how each is exported and timed."""
    parser.add_argument("--bits", default=bits, help="uniform bitwidths (W = A), or WxAy entries, comma-separated")
    parser.add_argument("--learned", default=learned, metavar="LAMBDAS",
                        help="bit-cost weights lambda of learned-bits runs, comma-separated (empty: none)")
    parser.add_argument("--target-bits", default="", metavar="BITS",
                        help="target mean bits of learned runs that pay only the excess, comma-separated (empty: none)")
    parser.add_argument("--epochs", type=int, metavar="N",
                        help="QAT epochs of every run (default: the recipe's [qat] table)")
    parser.add_argument("--grid", default="tensorrt", choices=GRIDS,
                        help="activation grid of every run, as `nerveseg qat --grid` (x86 runs are named NAME-x86)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--threads", type=int, default=2, metavar="N",
                        help="ONNX Runtime intra-op threads of the report")
    _add_retired_parity_flag(parser)
    parser.add_argument("--latency-runs", type=int, default=50, metavar="N",
                        help="timed batch-1 runs per model in the report (0: no timing)")


GRIDS = ("tensorrt", "x86")  # qat.config.GRIDS, written here so that --help needs no torch (a test keeps them equal)
ACTIVATION_RANGES = ("signed", "tight")  # qat.config.ACTIVATION_RANGES, likewise
ACTIVATION_INITS = ("percentile", "mse")  # qat.config.ACTIVATION_INITS, likewise
ALLOCATIONS = ("", "sensitivity")  # qat.config.ALLOCATIONS, likewise
SCHEDULE_SIDES = ("both", "activations")  # qat.config.SCHEDULE_SIDES, likewise
DEVICE_HELP = "where PyTorch runs: auto (a GPU when there is one), cpu, cuda, cuda:N"
PIPELINE = """Every stage on one run folder, in order:
  1. train the recipe (default quick, on the synthetic phantom without --data)   RUN/checkpoints/
  2. tune T* and the morphology on the validation split                         RUN/threshold.json
  3. evaluate the test split (PyTorch)                                          RUN/test_metrics.json, examples.png
  4. export the FP32 bundle, checked against PyTorch, test split through ONNX   RUN/bundle/
  5. QAT with learned weight bits (from 4, mean <= 4, 4 fragile tensors at 8)   RUN/qat/learned-a8-i4-t4/
  6. its INT8 bundle, where ONNX Runtime reproduces the fake-quant model        RUN/qat/learned-a8-i4-t4/bundle/
  7. W8A8 and W4A8 QAT beside it, each exported to INT8 the same way            RUN/qat/w8a8/, RUN/qat/w4a8/
  8. ONNX Runtime's own post-training quantization of the FP32 graph            RUN/ptq/
  9. the accuracy-vs-bitwidth report of all of them                             RUN/report/report.html
An INT8 file that the parity gate refuses is left out of its bundle with one line saying why; a bundle with no
INT8 file left is not written, the run goes on (the float bundle and the QAT scores stand), the last line names
it and the exit status is 3. --resume continues any stage."""


def get_args_parser() -> argparse.ArgumentParser:
    from device_runtime.core.cli_help import top_parser
    from training.flags import get_args_parser as train_flags, recipes_table
    from training.evaluation.temporal_tune import add_arguments as temporal_flags

    parser, add_command = top_parser(
        "nerveseg", "Ultrasound nerve segmentation, desktop side: train DeepLabV3, tune its threshold, quantize it "
        "(learned bitwidths), export checked ONNX bundles for `nerveseg-device`. Start with `nerveseg pipeline`.",
        refusals=True)

    synth = add_command("synth", "write the synthetic ultrasound phantom (frames + masks)")
    synth.add_argument("--out", required=True, metavar="FOLDER", help="folder to write")
    synth.add_argument("--count", type=int, default=240, metavar="N", help="frames to write (each with its mask)")
    synth.add_argument("--seed", type=int, default=0, help="the same seed writes the same frames")
    synth.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"), help="frame size in pixels")
    synth.set_defaults(func=_synth)

    recipes = recipes_table()
    train = add_command("train", "train DeepLabV3 (recipes: paper, edge, small, quick)")
    train.epilog = recipes + "\n\n" + train.epilog
    train_flags(train).set_defaults(func=_train)
    pipeline = add_command("pipeline", "train, tune, evaluate, export, then QAT (learned bits, W8A8, W4A8), the INT8 "
                                       "exports, ORT PTQ and the accuracy-vs-bitwidth report", PIPELINE)
    pipeline.epilog = recipes + "\n\n" + pipeline.epilog
    train_flags(pipeline).set_defaults(func=_pipeline)
    pipeline.add_argument("--qat-epochs", type=int, metavar="N",
                          help="epochs of each QAT run (default: the recipe's [qat] table)")

    cv = add_command("cv", "K-fold cross-validation of a recipe, each held-out fold scored through ONNX (resumable: "
                           "run the same command again)")
    cv.add_argument("--folds", type=int, default=5, metavar="K", help="number of folds")
    cv.add_argument("--max-new-folds", type=int, metavar="N", help="train at most N unfinished folds in this call (a "
                                                                   "long CV in sessions; finished folds always count)")
    cv.add_argument("--only-folds", type=int, nargs="+", metavar="F",
                    help="train only these folds (1..K) in this call, the others left for later (a CV spread over "
                         "machines or sessions; finished folds always count)")
    cv.epilog = recipes + "\n\n" + cv.epilog
    train_flags(cv, resumable=False).set_defaults(func=_cv, resume=False)

    for name, func, text in (("tune", _tune, "choose T* and morphology on the validation split"),
                             ("evaluate", _evaluate, "score the test split at T* with morphology")):
        sub = add_command(name, text)
        sub.add_argument("--run-dir", required=True, metavar="RUN", help="a trained run folder (nerveseg train)")
        sub.add_argument("--device", default="auto", help=DEVICE_HELP)
        sub.set_defaults(func=func)
        if name == "tune":
            sub.add_argument("--flip-tta", action=argparse.BooleanOptionalAction,
                             help="tune (and so evaluate and export) with test-time flip averaging: each frame's "
                                  "probabilities averaged with its left-right mirror's (default: the run's config)")

    tune_temporal = add_command("tune-temporal", "choose the device's temporal stabilisation on validation "
                                                 "sequences and write it into the bundle's manifest")
    temporal_flags(tune_temporal).set_defaults(func=_tune_temporal)

    qat = add_command("qat", "fine-tune a tuned run with fake quantization (learned or fixed bits)")
    qat.add_argument("--run-dir", required=True, metavar="RUN", help="a trained and tuned float run")
    qat.add_argument("--bits",
                     help="learned (default), learned-aN (learned weight bits, activations fixed at N), N (2..8) "
                          "or WxAy, e.g. W4A8")
    qat.add_argument("--bit-weight", type=float, metavar="LAMBDA",
                     help="lambda of the bit cost (default 0.25, QuantU-Net's)")
    qat.add_argument("--target-bits", type=float, metavar="B",
                     help="penalise only mean bits above B; when the bits freeze, the mean weight bits are capped at B "
                          "(default: no target)")
    qat.add_argument("--initial-bits", type=int, metavar="B",
                     help="learned runs: every layer's weight bits start at B and learn up or down (default 8)")
    qat.add_argument("--epochs", type=int, metavar="N", help="QAT epochs (default: the recipe's [qat] table)")
    qat.add_argument("--bit-epochs", type=int, metavar="N",
                     help="learned runs: epochs that learn the bits before they freeze (default: the recipe's share)")
    qat.add_argument("--activation-percentile", type=float, metavar="P",
                     help="initialise activation steps at this percentile of |x| (default 99.99; 0: the maximum)")
    qat.add_argument("--grid", choices=GRIDS,
                     help="tensorrt (default): signed activations, one set of integers for TensorRT and x86; x86: "
                          "tensors read only through ReLU unsigned (uint8), faster on x86 ONNX Runtime, no TensorRT file")
    qat.add_argument("--lr-weights", type=float, metavar="LR",
                     help="learning rate of the folded weights and biases (default: the recipe's [qat] table, 1e-4)")
    qat.add_argument("--distill", type=float, metavar="D",
                     help="weight of the float model as teacher: + D x BCE(QAT logits, float probabilities) (default 0)")
    qat.add_argument("--activation-range", choices=ACTIVATION_RANGES,
                     help="tight: activations below 8 bits split their levels between negative and positive values as "
                          "the data do (int8, zero point 0: both runtimes); default signed")
    qat.add_argument("--activation-init", choices=ACTIVATION_INITS,
                     help="mse: activation steps below 8 bits by squared error (default: the percentile)")
    qat.add_argument("--bit-schedule", metavar="B@E,...",
                     help="uniform runs: lower the bits in stages, e.g. 6@2,4@3,3@4 (8 bits before the first entry; "
                          "default: none)")
    qat.add_argument("--bit-schedule-side", choices=SCHEDULE_SIDES,
                     help="what --bit-schedule lowers: both (weights and activations, the default) or activations "
                          "(the weights train at their bits from the first epoch)")
    qat.add_argument("--hold-fragile", type=int, metavar="N",
                     help="hold the N tensors whose one-at-a-time Dice drop is largest at 8 bits (counted in the mean; "
                          "default 0)")
    qat.add_argument("--target-activation-bits", type=float, metavar="B",
                     help="learned runs: budget of mean activation bits, capped at the freeze (default: --target-bits, "
                          "as a penalty only)")
    qat.add_argument("--initial-activation-bits", type=int, metavar="B",
                     help="learned runs: every learned activation's bits start at B (default 8; 7 on a tight grid)")
    qat.add_argument("--b-min", type=int, metavar="B",
                     help="the fewest bits a learned bitwidth may take, and an allocation's floor when above 2 (2: "
                          "an allocation may give one bit where a one-bit grid exists) (default: the recipe's [qat] "
                          "table, 2)")
    qat.add_argument("--activation-allocation", choices=[a for a in ALLOCATIONS if a],
                     help="fixed activation bits B below 8 (--bits 4, learned-a4): sensitivity = each activation "
                          "B-1 to B+2 bits by its measured sensitivity, mean at most B; recommended below 8 bits "
                          "(default: all at B). Learned activation bits with --target-activation-bits B: where they "
                          "start")
    qat.add_argument("--weight-allocation", choices=[a for a in ALLOCATIONS if a],
                     help="fixed weight bits B below 8 (--bits 4, W4A8): sensitivity = each weight tensor B-1 to B+2 "
                          "bits by its measured sensitivity, mean over live weights at most B; needed at 3 bits; at "
                          "--bits 2 both allocations may give one bit (binary weights, [0, 1] ReLU'd activations) "
                          "(default: all at B). Learned weight bits with --target-bits B: where they start")
    qat.add_argument("--bias-correction", action="store_true", default=None,
                     help="after the steps are set, give each convolution the float model's channel means (bias) "
                          "(default: off)")
    qat.add_argument("--keep-start", action=argparse.BooleanOptionalAction, default=None,
                     help="fixed-bit runs: deploy the start (the grid alone, at the float run's T*) unless validation "
                          "prefers the trained model beyond noise (default: on with 8-bit weights, off below; "
                          "--no-keep-start deploys the trained model; both are scored on test either way; with --resume "
                          "a finished run chooses again, without training)")
    qat.add_argument("--name",
                     help="RUN/qat/NAME (default from --bits: learned, w8a8, w4a4, w4a8; -x86 for --grid x86)")
    qat.add_argument("--resume", action="store_true", help="continue RUN/qat/NAME from its last checkpoint")
    qat.add_argument("--device", default="auto", help=DEVICE_HELP)
    qat.set_defaults(func=_qat)

    export = add_command("export", "write the bundle: FP32 ONNX (+ INT8 with --qat) and manifest, checked against "
                                   "PyTorch")
    export.add_argument("--checkpoint", metavar="FILE", help="a tuned checkpoint (default RUN/checkpoints/best.pt)")
    export.add_argument("--run-dir", metavar="RUN", help="the run whose best checkpoint to export")
    export.add_argument("--qat", metavar="NAME", help="export the QAT run RUN/qat/NAME as an INT8 bundle "
                        "(default folder RUN/qat/NAME/bundle): FP32 + the INT8 QDQ graphs that pass the parity gate")
    export.add_argument("--out", metavar="FOLDER",
                        help="bundle folder (default RUN/bundle, or RUN/qat/NAME/bundle with --qat)")
    export.add_argument("--device", default="auto", help=DEVICE_HELP)
    export.add_argument("--replace", action="store_true",
                        help="replace an existing bundle at --out (atomically); without it an existing bundle is kept")
    _add_retired_parity_flag(export)
    export.set_defaults(func=_export)

    sweep = add_command("sweep", "QAT fine-tunes at several bitwidths from one float run, exported, then the report "
                                 "(resumable: run it again to continue)")
    sweep.add_argument("--run-dir", required=True, metavar="RUN", help="a tuned float run; runs go to RUN/qat/NAME/")
    _add_sweep_settings(sweep, bits="8,6,5,4,3,2", learned="0.05,0.25,1.0")
    sweep.set_defaults(func=_sweep)

    cv_quant = add_command("cv-quant", "quantization on every held-out fold of a `nerveseg cv`: a sweep per fold, "
                                       "per-frame Dice pooled over the folds (resumable)")
    cv_quant.add_argument("--cv-dir", required=True, metavar="FOLDER",
                          help="the --run-dir of a `nerveseg cv`; its finished folds are used")
    _add_sweep_settings(cv_quant, bits="8", learned="")
    cv_quant.set_defaults(func=_cv_quant)

    report = add_command("report", "accuracy vs bitwidth: float, ORT PTQ and every QAT run of RUN")
    report.add_argument("--run-dir", required=True, metavar="RUN", help="the float run whose qat/ runs to report")
    report.add_argument("--threads", type=int, default=2, metavar="N",
                        help="ONNX Runtime intra-op threads for scoring and timing")
    report.add_argument("--latency-runs", type=int, default=50, metavar="N",
                        help="timed batch-1 runs per model (0: no timing)")
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return exit_code_of(lambda: args.func(args), "nerveseg")


if __name__ == "__main__":
    sys.exit(main())
