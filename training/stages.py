"""`nerveseg tune` and `nerveseg evaluate` on a run folder.

Each loads the run's best checkpoint and one split of its split.json, predicts in eval mode (as
deployed) and hands the arrays to the array-level code in `tune` and `evaluate`.
"""

from __future__ import annotations

from pathlib import Path

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import write_json
from device_runtime.core.postprocess import Morphology

from .checkpoint import load_model, save_checkpoint
from .config import TrainConfig
from .data.dataset import load_pairs, load_split
from .evaluation.evaluate import evaluate_arrays, plot_examples
from .evaluation.predict import predict_probabilities, resolve_device
from .evaluation.tune import plot_threshold_curve, tune
from .model import as_deployed


def best_checkpoint(run_dir: Path) -> Path:
    path = Path(run_dir) / "checkpoints" / "best.pt"
    if not path.is_file():
        raise InputError(f"{path}: not found; train the run first ('nerveseg train --run-dir {run_dir}')")
    return path


def split_arrays(run_dir: Path, split: str, cfg: TrainConfig):
    """Decoded frames, masks and names of one split of the run."""
    samples = load_split(Path(run_dir) / "split.json")[split]
    if not samples:
        raise InputError(f"{Path(run_dir) / 'split.json'}: the {split} split is empty")
    images, masks = load_pairs(samples, cfg.input_size, cfg.mask_label, f"decode {split}")
    return images, masks, [s.name for s in samples]


def flip_tta_of(checkpoint: dict) -> bool:
    """Whether the tuned checkpoint's T* was chosen on flip-averaged probabilities: then evaluation and export
    average too (training.model.FlipAveraged). Checkpoints tuned before the option existed were plain."""
    return bool(checkpoint.get("flip_tta", False))


def tune_run(run_dir: str | Path, device: str = "auto", flip_tta: bool | None = None) -> dict:
    """T* by equation 4 on the validation split, then morphology; saved to threshold.json, the plot and
    the best checkpoint (so export finds them there). `flip_tta`: tune for test-time flip averaging (None: the
    run's config decides); recorded beside T*, so evaluation and export deploy what was tuned."""
    run_dir = Path(run_dir)
    path = best_checkpoint(run_dir)
    model, checkpoint, cfg = load_model(path)
    flip_tta = cfg.flip_tta if flip_tta is None else flip_tta
    torch_device = resolve_device(device)
    images, masks, _ = split_arrays(run_dir, "val", cfg)
    deployed = as_deployed(model, flip_tta).to(torch_device)
    prob = predict_probabilities(deployed, images, torch_device, cfg.val_batch_size, cfg.amp)
    result = {**tune(prob, masks, cfg.objective_weights), "flip_tta": flip_tta}
    write_json(run_dir / "threshold.json", result)
    plot_threshold_curve(result["sweep"], run_dir / "threshold_curve.png", title=f"{run_dir.name}: validation")
    # the checkpoint as read: its weights are those saved, untouched by the model that loaded them
    checkpoint.update(threshold=result["threshold"], morphology=result["morphology"], validation=result["validation"],
                      flip_tta=flip_tta)
    save_checkpoint(checkpoint, path)
    return result


def evaluate_run(run_dir: str | Path, device: str = "auto") -> dict:
    """Test split at T* with morphology (PyTorch, eval mode): test_metrics.json and examples.png."""
    run_dir = Path(run_dir)
    path = best_checkpoint(run_dir)
    model, checkpoint, cfg = load_model(path)
    if checkpoint.get("threshold") is None:
        raise InputError(f"{path}: has no tuned threshold; run 'nerveseg tune --run-dir {run_dir}' first")
    torch_device = resolve_device(device)
    images, masks, names = split_arrays(run_dir, "test", cfg)
    deployed = as_deployed(model, flip_tta_of(checkpoint)).to(torch_device)
    prob = predict_probabilities(deployed, images, torch_device, cfg.val_batch_size, cfg.amp)
    morphology = Morphology.from_dict(checkpoint["morphology"])
    summary, per_image_dice, preds = evaluate_arrays(prob, masks, checkpoint["threshold"], morphology)
    summary["per_image"] = {name: float(d) for name, d in zip(names, per_image_dice)}
    write_json(run_dir / "test_metrics.json", summary)
    plot_examples(images, masks, preds, per_image_dice, run_dir / "examples.png", names)
    return summary
