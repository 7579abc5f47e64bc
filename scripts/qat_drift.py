"""Where does a QAT run's test Dice leave float's? Quantization, fine-tuning, or the re-tuned threshold.

Issue 32: on the phantom demo the QAT rows sit 0.02-0.05 from float on some seeds and not on others. A QAT run
changes three things at once: the grid (the model at its start, steps initialised, before any training), the
fine-tuning (its best.pt), and T* with the morphology (re-tuned on the validation split). This prints each
model's mean per-frame Dice (PyTorch, as deployed: flip averaging where the float run has it) at the float run's
T* and morphology and at the model's own, on the validation split, the test split and, with `--frames DIR`, a
larger independent set (e.g. `nerveseg synth --out DIR --count 400 --seed 1000`: phantom subjects no split has).

The start row is the run's checkpoints/start.pt where it kept one (every fixed-bit run since qat.checkpoint.choose);
for an older run it is rebuilt for uniform bits without an allocation or held tensors (the grid alone); a learned
run shows its trained row only. The model's own T* for the start row is tuned here on validation, as `nerveseg
qat` would; the trained row (checkpoints/trained.pt where kept, else best.pt) has its run's own: test_metrics.json's
"selection" where the run chose between the two, else threshold.json.

    PYTHONPATH=. python scripts/qat_drift.py --run-dir runs/demo-s2 --qat w8a8 w4a8 [--frames data/screen]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.core.errors import exit_code_of  # noqa: E402
from device_runtime.core.postprocess import Morphology  # noqa: E402
from qat.checkpoint import START_NAME, build_qat_model, load_qat_model, trained_checkpoint  # noqa: E402
from qat.config import load_qat_config  # noqa: E402
from qat.run import observation_batches  # noqa: E402
from qat.schedule import initialise  # noqa: E402
from training.checkpoint import load_model  # noqa: E402
from training.data.dataset import discover, load_pairs  # noqa: E402
from training.evaluation.evaluate import evaluate_arrays  # noqa: E402
from training.evaluation.predict import predict_probabilities  # noqa: E402
from training.evaluation.tune import tune  # noqa: E402
from training.model import as_deployed  # noqa: E402
from training.stages import flip_tta_of, split_arrays  # noqa: E402


def start_model(float_model, cfg, qcfg, train_images: np.ndarray):
    """The QAT model as `nerveseg qat` builds it before epoch 1: the grid alone, steps from observed frames."""
    model = build_qat_model(cfg.arch, qcfg, copy.deepcopy(float_model))
    batch_size = qcfg.batch_size or cfg.batch_size
    initialise(model, qcfg, lambda: observation_batches(train_images, qcfg.observe_frames, batch_size,
                                                        torch.device("cpu")))
    return model


def can_rebuild_start(qcfg) -> bool:
    """Whether the start of a run that kept no start.pt can be rebuilt here: uniform bits from the first step,
    nothing allocated or held (those depend on the run's own measurements)."""
    return (not qcfg.bit_setting.learned and not qcfg.hold_fragile and not qcfg.bit_schedule
            and not qcfg.activation_allocation and not qcfg.weight_allocation)


def drift_table(run_dir: Path, names: list[str], frames_dir: Path | None):
    """The table's lines, each as soon as its model is scored."""
    float_model, float_checkpoint, cfg = load_model(run_dir / "checkpoints" / "best.pt")
    flip = flip_tta_of(float_checkpoint)
    sets = {"val": split_arrays(run_dir, "val", cfg)[:2], "test": split_arrays(run_dir, "test", cfg)[:2]}
    if frames_dir is not None:
        sets[frames_dir.name] = load_pairs(discover(frames_dir), cfg.input_size, cfg.mask_label)
    train_images = split_arrays(run_dir, "train", cfg)[0]
    device = torch.device("cpu")
    float_rule = (float_checkpoint["threshold"], float_checkpoint["morphology"])

    columns = [f"{name} @ {rule}" for name in sets for rule in ("float T*", "own T*")]
    yield f"| model | own T* | {' | '.join(columns)} |"
    yield "|---" * (len(columns) + 2) + "|"

    def row(label: str, model, own: tuple[float, dict] | None) -> str:
        deployed = as_deployed(model.eval(), flip)
        probs = {name: predict_probabilities(deployed, images, device, cfg.val_batch_size)
                 for name, (images, _) in sets.items()}
        if own is None:  # tuned on validation, as `nerveseg qat` tunes its model
            tuned = tune(probs["val"], sets["val"][1], cfg.objective_weights)
            own = (tuned["threshold"], tuned["morphology"])
        cells = []
        for name, (_, masks) in sets.items():
            for threshold, morphology in (float_rule, own):
                summary = evaluate_arrays(probs[name], masks, threshold, Morphology.from_dict(morphology))[0]
                cells.append(f"{summary['dice']:.4f}")
        return f"| {label} | {own[0]:.2f} | {' | '.join(cells)} |"

    yield row("float", float_model, float_rule)
    for name in names:
        qat_dir = run_dir / "qat" / name
        qcfg = load_qat_config(qat_dir / "config.toml")
        kept = qat_dir / "checkpoints" / START_NAME
        if kept.is_file():
            yield row(f"{name}: start (grid only)", load_qat_model(kept)[0], None)
        elif can_rebuild_start(qcfg):
            yield row(f"{name}: start (grid only)", start_model(float_model, cfg, qcfg, train_images), None)
        metrics = json.loads((qat_dir / "test_metrics.json").read_text())
        tuned = metrics["selection"]["test_trained"] if "selection" in metrics else json.loads(
            (qat_dir / "threshold.json").read_text())
        trained = load_qat_model(trained_checkpoint(qat_dir / "checkpoints"))[0]
        yield row(f"{name}: trained", trained, (tuned["threshold"], tuned["morphology"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a tuned float run with finished QAT runs")
    parser.add_argument("--qat", nargs="+", required=True, metavar="NAME", help="QAT runs under RUN/qat/")
    parser.add_argument("--frames", type=Path, help="a further dataset folder scored the same way")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def run() -> None:
        for line in drift_table(args.run_dir, args.qat, args.frames):
            print(line, flush=True)

    return exit_code_of(run, "qat_drift")


if __name__ == "__main__":
    sys.exit(main())
