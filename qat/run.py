"""`nerveseg qat`: fine-tune a tuned float run with fake quantization, then re-tune and score it.

RUN/qat/NAME/ gets config.toml, metrics.jsonl, checkpoints/{last,best}.pt, bits.json, threshold.json,
threshold_curve.png, test_metrics.json and examples.png. T* and morphology are re-tuned on the validation
split and the test split is scored with the quantized model (integer bits), by the same code as the float
run (training.evaluation.tune.tune, training.evaluation.evaluate.evaluate_arrays). A fixed-bit run also keeps
checkpoints/start.pt (and trained.pt) and deploys its start unless validation prefers the trained model beyond
noise (qat/checkpoint.py, `choose`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
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
from .checkpoint import (START_NAME, build_qat_model, choose, has_start, loop_best, make_qat_checkpoint,
                         read_qat_checkpoint, save_qat_checkpoint, save_start)
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


def resolve_config(qcfg: QatConfig, resume: bool, keep_start: bool | None = None) -> QatConfig:
    """On resume the run's own config.toml, with only epochs and device taken from qcfg, and keep_start where one
    is given (`--keep-start` / `--no-keep-start`): written back to config.toml, so that the run's choice is made
    again under it (a finished run is re-scored from its checkpoints, not trained again)."""
    if not resume:
        return qcfg
    path = qcfg.qat_dir / "config.toml"
    saved = load_qat_config(path)
    if keep_start is not None and keep_start != saved.keep_start:
        saved = saved.replace(keep_start=keep_start)
        write_text(path, to_toml(saved))
    return saved.replace(run_dir=qcfg.run_dir, epochs=qcfg.epochs, device=qcfg.device)


def observation_batches(images: np.ndarray, count: int, batch_size: int, device: torch.device):
    """The first `count` training frames in batches: what the steps are initialised from (also scripts/qat_drift.py)."""
    frames = images[:count]
    for start in range(0, len(frames), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(frames[start:start + batch_size]))[:, None].to(device)


def run_qat(qcfg: QatConfig, resume: bool = False, keep_start: bool | None = None) -> Path:
    """Fine-tune RUN's best checkpoint with fake quantization; returns RUN/qat/NAME. On resume, `keep_start` (when
    not None) replaces the run's own (resolve_config)."""
    float_path = tuned_float_checkpoint(Path(qcfg.run_dir))
    from_last = check_qat_dir(qcfg.qat_dir, resume)  # False after a kill before the first checkpoint: start again
    with exclusive_run(qcfg.qat_dir):  # resolve_config may rewrite config.toml: not while another process runs it
        return _run_qat(resolve_config(qcfg, resume, keep_start), float_path, from_last)


def _run_qat(qcfg: QatConfig, float_path: Path, from_last: bool) -> Path:
    run_dir, qat_dir = Path(qcfg.run_dir), qcfg.qat_dir
    device = resolve_device(qcfg.device)
    float_model, float_checkpoint, cfg = load_model(float_path)
    last_path = qat_dir / "checkpoints" / "last.pt"
    last = read_qat_checkpoint(last_path) if from_last else None
    if from_last and finished_on_resume(last, qcfg.epochs, last_path):
        print(f"qat {qat_dir.name}: training finished earlier ({qcfg.epochs} epochs); tuning and scoring its best "
              "checkpoint again", flush=True)
        return finish(qat_dir, cfg, device, float_checkpoint)
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
        if has_start(qcfg):  # a candidate for deployment (qat.checkpoint.choose), at the bits the run deploys
            save_start(qat_dir / "checkpoints", make_qat_checkpoint(cfg, qcfg, model, epoch=0))
    rewrite_log(qat_dir / LOG_NAME, state.start_epoch)  # lines of epochs after the checkpoint are trained again

    epochs = QatEpochs(state, cfg, qcfg, qat_dir.name,
                       lambda epoch: build_loader(train_set, loader_cfg, Dist(), epoch, 0), val_images, val_masks,
                       device, lambda m: bits_table(m, cfg.input_size))
    state.best_dice = run_epochs(epochs, qat_dir, state.start_epoch, qcfg.epochs, state.best_dice)
    return finish(qat_dir, cfg, device, float_checkpoint)


@dataclass
class Candidate:
    """A model finish() may deploy: its checkpoint, its probabilities on validation and test (each predicted once,
    as the bundle runs it: flip averaging where the float run has it), and its rule (threshold.json's content)."""

    name: str  # "trained" or "start"
    model: torch.nn.Module
    checkpoint: dict
    val_prob: np.ndarray
    test_prob: np.ndarray
    rule: dict | None = None


def load_candidate(name: str, path: Path, device: torch.device, flip_tta: bool, val_images: np.ndarray,
                   test_images: np.ndarray, batch_size: int) -> Candidate:
    from .checkpoint import load_qat_model

    model, checkpoint, _, _ = load_qat_model(path)
    deployed = as_deployed(model.to(device), flip_tta)
    return Candidate(name, model, checkpoint, *(predict_probabilities(deployed, images, device, batch_size)
                                                for images in (val_images, test_images)))


def finish(qat_dir: Path, cfg, device: torch.device, float_checkpoint: dict) -> Path:
    """Best checkpoint -> bits.json, T* + morphology on validation, test metrics; all at integer bits, and with
    test-time flip averaging where the float run was tuned with it (so the INT8 bundle deploys as the float one).
    A run with a start (qat.checkpoint.has_start) deploys it, at the float run's T* and morphology, unless
    validation prefers the trained model beyond noise; both are scored on test, under test_metrics.json's
    "selection"."""
    run_dir, checkpoints = qat_dir.parents[1], qat_dir / "checkpoints"
    best_path, start_path = checkpoints / "best.pt", checkpoints / START_NAME
    flip_tta = flip_tta_of(float_checkpoint)
    val_images, val_masks, _ = split_arrays(run_dir, "val", cfg)
    images, masks, names = split_arrays(run_dir, "test", cfg)
    load = lambda name, path: load_candidate(name, path, device, flip_tta, val_images, images,  # noqa: E731
                                             cfg.val_batch_size)

    trained = load("trained", loop_best(checkpoints) if start_path.is_file() else best_path)
    trained.rule = {**tune(trained.val_prob, val_masks, cfg.objective_weights), "flip_tta": flip_tta}
    plot_threshold_curve(trained.rule["sweep"], qat_dir / "threshold_curve.png",
                         title=f"QAT {qat_dir.name}: validation (the trained model)")
    chosen, selection = trained, None
    if start_path.is_file():
        start = load("start", start_path)
        start.rule = float_rule(float_checkpoint, start.val_prob, val_masks, flip_tta)
        selection = choose(*(score(c.val_prob, val_masks, c.rule)[1] for c in (trained, start)),
                           load_qat_config(qat_dir / "config.toml").keep_start)
        for candidate in (trained, start):  # both on test, for the record: the row before and after the choice
            summary, per_image, _ = score(candidate.test_prob, masks, candidate.rule)
            selection[f"test_{candidate.name}"] = {
                "dice": summary["dice"], "threshold": candidate.rule["threshold"],
                "morphology": candidate.rule["morphology"], "per_image": dict(zip(names, map(float, per_image)))}
        chosen = start if selection["chosen"] == "start" else trained
        low, high = selection["val_difference_ci95"]
        print(f"qat {qat_dir.name}: deploys its {chosen.name} model (validation Dice trained "
              f"{selection['val_trained']:.4f}, start {selection['val_start']:.4f}, paired 95 % interval "
              f"{low:+.4f} .. {high:+.4f})", flush=True)

    table = bits_table(chosen.model, cfg.input_size)
    write_json(qat_dir / "bits.json", table)
    write_json(qat_dir / "threshold.json", chosen.rule)
    checkpoint = {**chosen.checkpoint, "threshold": chosen.rule["threshold"], "morphology": chosen.rule["morphology"],
                  "validation": chosen.rule["validation"], "bits": table, "flip_tta": flip_tta, "selected": chosen.name}
    save_qat_checkpoint(checkpoint, best_path)

    summary, per_image, preds = score(chosen.test_prob, masks, chosen.rule)
    summary["per_image"] = {name: float(d) for name, d in zip(names, per_image)}
    summary.update(mean_weight_bits=table["mean_weight_bits"], mean_activation_bits=table["mean_activation_bits"])
    summary.update(compare_with_float(run_dir, summary["per_image"]))
    if selection is not None:
        summary["selection"] = selection
    summary["postprocessing"] = postprocessing_record(chosen, float_checkpoint, val_masks, masks, names)
    write_json(qat_dir / "test_metrics.json", summary)
    plot_examples(images, masks, preds, per_image, qat_dir / "examples.png", names)
    return qat_dir


def float_rule(float_checkpoint: dict, prob: np.ndarray, masks: np.ndarray, flip_tta: bool) -> dict:
    """threshold.json's content for a model deployed at the float run's T* and morphology (not re-tuned)."""
    threshold, morphology = float_checkpoint["threshold"], float_checkpoint["morphology"]
    validation = evaluate_arrays(prob, masks, threshold, Morphology.from_dict(morphology))[0]
    return {"threshold": threshold, "morphology": morphology, "validation": validation, "flip_tta": flip_tta,
            "source": "the float run's (the start is deployed as the float model is)"}


def postprocessing_record(chosen: Candidate, float_checkpoint: dict, val_masks: np.ndarray, masks: np.ndarray,
                          names: list[str]) -> dict:
    """The deployed model under three post-processing rules, for the record (nothing here changes what is deployed):
    "deployed" (its own rule: T* and morphology re-tuned on validation, or float's for a kept start), "float
    morphology" (its T* with the float run's morphology: the clean-up is about anatomy, and 96 candidates on a fold's
    20 validation frames can fit noise) and "float rule" (the float run's T* and morphology). Each with its
    validation and test mean Dice and per-frame test Dice, so a cross-validation pools the three
    (scripts/pool_selection.py); the question and its rule: docs/QUANTIZATION.md, "Does re-tuning the morphology
    cost the low-bit runs?"."""
    rules = {"deployed": chosen.rule,
             "float morphology": {"threshold": chosen.rule["threshold"], "morphology": float_checkpoint["morphology"]},
             "float rule": {"threshold": float_checkpoint["threshold"], "morphology": float_checkpoint["morphology"]}}
    record = {}
    for name, rule in rules.items():
        validation = score(chosen.val_prob, val_masks, rule)[0]
        test, per_image, _ = score(chosen.test_prob, masks, rule)
        record[name] = {"threshold": rule["threshold"], "morphology": rule["morphology"],
                        "validation_dice": validation["dice"], "dice": test["dice"],
                        "per_image": dict(zip(names, map(float, per_image)))}
    return record


def score(prob: np.ndarray, masks: np.ndarray, rule: dict):
    """evaluate_arrays at a threshold.json's T* and morphology."""
    return evaluate_arrays(prob, masks, rule["threshold"], Morphology.from_dict(rule["morphology"]))


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
    rule = "the float run's T*" if m.get("selection", {}).get("chosen") == "start" else "re-tuned T*"
    line = (f"QAT {qat_dir.name} (mean bits W {m['mean_weight_bits']:.2f}, A {m['mean_activation_bits']:.2f}), test "
            f"at {rule} {m['threshold']:.2f}: Dice {m['dice']:.4f} IoU {m['iou']:.4f} "
            f"PA {m['pixel_accuracy']:.4f} pooled {m['pooled_dice']:.4f}")
    if "dice_minus_float" in m:
        low, high = m["dice_minus_float_ci95"]
        line += (f"\n  float test Dice {m['float_dice']:.4f}; QAT - float {m['dice_minus_float']:+.4f} "
                 f"(paired bootstrap 95 % CI {low:+.4f} .. {high:+.4f})")
    if "selection" in m:
        s = m["selection"]
        line += (f"\n  deployed: the {s['chosen']} model (validation Dice trained {s['val_trained']:.4f}, start "
                 f"{s['val_start']:.4f}; test trained {s['test_trained']['dice']:.4f}, start "
                 f"{s['test_start']['dice']:.4f})")
    return line + f"\n  qat:    {qat_dir}"
