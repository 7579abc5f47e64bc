"""`nerveseg qat`: fine-tune a tuned float run with fake quantization, then re-tune and score it.

RUN/qat/NAME/ gets config.toml, metrics.jsonl, checkpoints/{last,best}.pt, bits.json, threshold.json,
threshold_curve.png, test_metrics.json and examples.png. T* and morphology are re-tuned on the validation
split and the test split is scored with the quantized model (integer bits), by the same code as the float
run (training.evaluation.tune.tune, training.evaluation.evaluate.evaluate_arrays).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import write_json, write_text
from device_runtime.core.postprocess import Morphology
from training.checkpoint import finished_on_resume, load_model, read_checkpoint
from training.data.loader import Dist, build_loader
from training.evaluation.bootstrap import paired_bootstrap_ci
from training.evaluation.evaluate import evaluate_arrays, plot_examples
from training.evaluation.predict import predict_probabilities, resolve_device
from training.evaluation.tune import plot_threshold_curve, tune
from training.loop import LOCK_NAME, LOG_NAME, exclusive_run, resume_from_last, rewrite_log, run_epochs
from training.model import as_deployed
from training.stages import flip_tta_of, split_arrays
from training.train import augmented_train_set, validate

from .bits import activation_elements, bits_table, live_weights
from .checkpoint import build_qat_model, read_qat_checkpoint, save_qat_checkpoint
from .config import QatConfig, load_qat_config, to_toml
from .loss import QatLoss
from .schedule import initialise, make_plan
from .train import QatEpochs, QatState, build_optimizer, restore


def tuned_float_checkpoint(run_dir: Path) -> Path:
    """RUN/checkpoints/best.pt, which must carry a tuned threshold."""
    path = Path(run_dir) / "checkpoints" / "best.pt"
    if not path.is_file():
        raise InputError(f"{path}: not found; QAT starts from a trained and tuned float run "
                         f"('nerveseg train' then 'nerveseg tune --run-dir {run_dir}')")
    if read_checkpoint(path).get("threshold") is None:
        raise InputError(f"{path}: the float checkpoint is not tuned; run 'nerveseg tune --run-dir {run_dir}' first")
    return path


def check_qat_dir(qat_dir: Path, resume: bool) -> bool:
    """Whether to continue from last.pt (`training.loop.resume_from_last`); a new run needs an empty folder."""
    if not resume and qat_dir.exists() and any(p.name != LOCK_NAME for p in qat_dir.iterdir()):
        raise InputError(f"{qat_dir}: already exists; pass --resume to continue it or choose another --name")
    return resume_from_last(qat_dir, resume)


def resolve_config(qcfg: QatConfig, resume: bool) -> QatConfig:
    """On resume the run's own config.toml, with only epochs and device taken from qcfg."""
    if not resume:
        return qcfg
    saved = load_qat_config(qcfg.qat_dir / "config.toml")
    return saved.replace(run_dir=qcfg.run_dir, epochs=qcfg.epochs, device=qcfg.device)


def observation_batches(images: np.ndarray, count: int, batch_size: int, device: torch.device):
    """The first `count` training frames in batches: what the steps are initialised from (also scripts/qat_drift.py)."""
    frames = images[:count]
    for start in range(0, len(frames), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(frames[start:start + batch_size]))[:, None].to(device)


def run_qat(qcfg: QatConfig, resume: bool = False) -> Path:
    """Fine-tune RUN's best checkpoint with fake quantization; returns RUN/qat/NAME."""
    float_path = tuned_float_checkpoint(Path(qcfg.run_dir))
    from_last = check_qat_dir(qcfg.qat_dir, resume)  # False after a kill before the first checkpoint: start again
    qcfg = resolve_config(qcfg, resume)
    with exclusive_run(qcfg.qat_dir):
        return _run_qat(qcfg, float_path, from_last)


def _run_qat(qcfg: QatConfig, float_path: Path, from_last: bool) -> Path:
    run_dir, qat_dir = Path(qcfg.run_dir), qcfg.qat_dir
    device = resolve_device(qcfg.device)
    float_model, float_checkpoint, cfg = load_model(float_path)
    last_path = qat_dir / "checkpoints" / "last.pt"
    last = read_qat_checkpoint(last_path) if from_last else None
    if from_last and finished_on_resume(last, qcfg.epochs, last_path):
        print(f"qat {qat_dir.name}: training finished earlier ({qcfg.epochs} epochs); tuning and scoring its best "
              "checkpoint again", flush=True)
        return finish(qat_dir, cfg, device, flip_tta_of(float_checkpoint))
    batch_size = qcfg.batch_size or cfg.batch_size
    loader_cfg = cfg.replace(batch_size=batch_size, seed=cfg.seed + qcfg.seed)

    train_images, train_masks, _ = split_arrays(run_dir, "train", cfg)
    val_images, val_masks, _ = split_arrays(run_dir, "val", cfg)
    # the float run's own augmentation: fine-tuning on lighter augmentation overfits a few hundred frames
    train_set = augmented_train_set(cfg, train_images, train_masks)

    torch.manual_seed(cfg.seed + qcfg.seed)
    # preparing folds BatchNorm into float_model's own convolutions: the teacher is a copy taken before
    teacher = copy.deepcopy(float_model).to(device).eval().requires_grad_(False) if qcfg.distill > 0 else None
    model = build_qat_model(cfg.arch, qcfg, float_model.to(device), init_steps=not from_last).to(device)
    observe = lambda: observation_batches(train_images, qcfg.observe_frames, batch_size, device)  # noqa: E731
    elements, live = activation_elements(model, cfg.input_size), live_weights(model, cfg.input_size)
    plan = make_plan(model, qcfg, from_last, observe, lambda m: validate(
        m, train_images[:qcfg.fragile_frames], train_masks[:qcfg.fragile_frames], device, cfg.replace(amp=False))[
        "val_best_dice"], lambda text: print(f"qat {qat_dir.name}: {text}", flush=True), elements, live)
    criterion = QatLoss(elements, cfg.bce_weight, cfg.dice_weight, qcfg.bit_weight, qcfg.activation_bit_weight,
                        qcfg.target_bits, live, qcfg.distill)
    state = QatState(model, build_optimizer(model, qcfg), criterion, teacher=teacher, plan=plan, observe=observe)
    if from_last:
        restore(state, last)
    else:
        write_text(qat_dir / "config.toml", to_toml(qcfg))
        seen = initialise(model, qcfg, observe)
        print(f"qat {qat_dir.name}: {cfg.arch}, bits {qcfg.bits}, steps initialised on {seen} training frames",
              flush=True)
    rewrite_log(qat_dir / LOG_NAME, state.start_epoch)  # lines of epochs after the checkpoint are trained again

    epochs = QatEpochs(state, cfg, qcfg, qat_dir.name,
                       lambda epoch: build_loader(train_set, loader_cfg, Dist(), epoch, 0), val_images, val_masks,
                       device, lambda m: bits_table(m, cfg.input_size))
    state.best_dice = run_epochs(epochs, qat_dir, state.start_epoch, qcfg.epochs, state.best_dice)
    return finish(qat_dir, cfg, device, flip_tta_of(float_checkpoint))


def finish(qat_dir: Path, cfg, device: torch.device, flip_tta: bool) -> Path:
    """Best checkpoint -> bits.json, T* + morphology on validation, test metrics; all at integer bits, and with
    test-time flip averaging where the float run was tuned with it, `flip_tta` (so the INT8 bundle deploys as the
    float one)."""
    from .checkpoint import load_qat_model

    best_path = qat_dir / "checkpoints" / "best.pt"
    model, checkpoint, cfg, _ = load_qat_model(best_path)
    model.to(device)
    table = bits_table(model, cfg.input_size)
    write_json(qat_dir / "bits.json", table)

    deployed = as_deployed(model, flip_tta)
    val_images, val_masks, _ = split_arrays(qat_dir.parents[1], "val", cfg)
    prob = predict_probabilities(deployed, val_images, device, cfg.val_batch_size)
    result = {**tune(prob, val_masks, cfg.objective_weights), "flip_tta": flip_tta}
    write_json(qat_dir / "threshold.json", result)
    plot_threshold_curve(result["sweep"], qat_dir / "threshold_curve.png", title=f"QAT {qat_dir.name}: validation")
    checkpoint.update(threshold=result["threshold"], morphology=result["morphology"],
                      validation=result["validation"], bits=table, flip_tta=flip_tta)
    save_qat_checkpoint(checkpoint, best_path)

    images, masks, names = split_arrays(qat_dir.parents[1], "test", cfg)
    prob = predict_probabilities(deployed, images, device, cfg.val_batch_size)
    summary, per_image, preds = evaluate_arrays(prob, masks, result["threshold"], Morphology.from_dict(result["morphology"]))
    summary["per_image"] = {name: float(d) for name, d in zip(names, per_image)}
    summary.update(mean_weight_bits=table["mean_weight_bits"], mean_activation_bits=table["mean_activation_bits"])
    summary.update(compare_with_float(qat_dir.parents[1], summary["per_image"]))
    write_json(qat_dir / "test_metrics.json", summary)
    plot_examples(images, masks, preds, per_image, qat_dir / "examples.png", names)
    return qat_dir


def compare_with_float(run_dir: Path, per_image: dict[str, float]) -> dict:
    """Test Dice of the float run, the difference (QAT - float) and its paired bootstrap 95 % interval."""
    import json

    path = Path(run_dir) / "test_metrics.json"
    if not path.is_file():
        return {}
    float_metrics = json.loads(path.read_text())
    reference = float_metrics.get("per_image", {})
    common = [n for n in per_image if n in reference]
    if not common:
        return {}
    a = np.array([per_image[n] for n in common])
    b = np.array([reference[n] for n in common])
    low, high = paired_bootstrap_ci(a, b)
    return {"float_dice": float_metrics["dice"], "dice_minus_float": float(a.mean() - b.mean()),
            "dice_minus_float_ci95": [low, high]}


def format_summary(qat_dir: Path) -> str:
    """What `nerveseg qat` and `nerveseg pipeline` print about a finished run (its test_metrics.json)."""
    import json

    m = json.loads((qat_dir / "test_metrics.json").read_text())
    line = (f"QAT {qat_dir.name} (mean bits W {m['mean_weight_bits']:.2f}, A {m['mean_activation_bits']:.2f}), test "
            f"at re-tuned T* {m['threshold']:.2f}: Dice {m['dice']:.4f} IoU {m['iou']:.4f} "
            f"PA {m['pixel_accuracy']:.4f} pooled {m['pooled_dice']:.4f}")
    if "dice_minus_float" in m:
        low, high = m["dice_minus_float_ci95"]
        line += (f"\n  float test Dice {m['float_dice']:.4f}; QAT - float {m['dice_minus_float']:+.4f} "
                 f"(paired bootstrap 95 % CI {low:+.4f} .. {high:+.4f})")
    return line + f"\n  qat:    {qat_dir}"
