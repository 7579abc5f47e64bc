"""`nerveseg cv`: K-fold cross-validation of a recipe, every fold a normal run scored as deployed.

A 20-frame test split cannot tell two recipes apart; K folds that together hold out every frame once can.
Each fold is an ordinary run folder `RUN/fold-N/`: trained on the other folds (less a validation part),
tuned on that validation part (T* and morphology), evaluated in PyTorch, exported, and its held-out fold
scored through the exported ONNX graph in ONNX Runtime, as the device runs it. Frames of one subject
stay in one fold (Kaggle names, or `--group-by prefix`).

Resumable: a fold with fold.json is done and skipped; an interrupted fold continues from its last
checkpoint. The resolved config is saved as RUN/cv_config.toml and a re-run with another config is refused,
so the folds of one RUN are always of one recipe. cv orchestrates training and export, so it lives on the
top floor (export), beside `pipeline`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import atomic_path, write_json, write_text
from device_runtime.core.manifest import load_manifest
from training import pretrain, stages, train
from training.config import TrainConfig, changed_settings, config_from_dict, load_toml, to_toml
from training.data.dataset import Sample, discover, group_by_prefix, natural_key

from ..bundle.writer import export_bundle

METRICS = ("dice", "iou", "pixel_accuracy", "pooled_dice")
LABELS = {"dice": "Dice", "iou": "IoU", "pixel_accuracy": "PA", "pooled_dice": "pooled Dice"}
VAL_FRACTION = 0.1  # of all frames, as in the 80:10:10 split, taken from the training folds


# ----------------------------------------------------------------------------------------------- folds


def _groups(samples: list[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: natural_key(s.name)):  # independent of listing order
        groups.setdefault(s.subject if s.subject is not None else f"/{s.name}", []).append(s)
    return groups


def make_folds(samples: list[Sample], k: int, seed: int, val_fraction: float = VAL_FRACTION) -> list[dict]:
    """K splits {"train", "val", "test"}: the test parts partition the samples; subjects never straddle.

    Subjects are shuffled (seeded) and dealt, each to the fold with the fewest frames so far, so folds
    differ by at most one subject's frames. Fold i's validation part is about `val_fraction` of all frames,
    whole subjects drawn (seeded by i) from the other folds; the rest trains.

    Raises:
        InputError: k < 2, or fewer subjects than k + 1 (every fold needs a test and a validation subject).
    """
    if k < 2:
        raise InputError(f"--folds must be at least 2, got {k}")
    groups = _groups(samples)
    if len(groups) < k + 1:
        raise InputError(f"{len(groups)} subject(s) cannot make {k} folds with a validation part; use fewer folds")
    keys = sorted(groups, key=natural_key)
    keys = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    folds: list[list[str]] = [[] for _ in range(k)]
    sizes = [0] * k
    for key in keys:
        i = min(range(k), key=lambda f: (sizes[f], f))
        folds[i].append(key)
        sizes[i] += len(groups[key])
    want_val = max(1, round(val_fraction * len(samples)))
    result = []
    for i in range(k):
        rest = [key for f in range(k) if f != i for key in folds[f]]
        order = [rest[j] for j in np.random.default_rng([seed, i]).permutation(len(rest))]
        val, taken = [], 0
        for key in order[:-1]:  # leave at least one subject to train on
            if taken >= want_val:
                break
            val.append(key)
            taken += len(groups[key])
        sides = {"train": [key for key in rest if key not in val], "val": val, "test": folds[i]}
        result.append({side: sorted((s for key in sides[side] for s in groups[key]), key=lambda s: natural_key(s.name))
                       for side in sides})
    return result


# ----------------------------------------------------------------------------------------------- one fold


def _timed(timing: dict, stage: str, func):
    """Run `func`, adding its CPU seconds (all threads of this process) and wall seconds to timing[stage]."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = func()
    entry = timing.setdefault(stage, {"cpu_s": 0.0, "wall_s": 0.0})
    entry["cpu_s"] += time.process_time() - cpu
    entry["wall_s"] += time.perf_counter() - wall
    return result


def _onnx_test_metrics(fold_dir: Path, timing: dict, device: str) -> dict:
    """The held-out fold scored through the exported graph; a bundle left by an interrupted attempt is reused
    (it was made from the same tuned checkpoint, so re-exporting would give the same numbers)."""
    bundle = fold_dir / "bundle"
    if (bundle / "manifest.json").is_file():
        try:
            return load_manifest(bundle).metrics["test_onnx"]
        except (InputError, KeyError):
            # never overwrite what we cannot read: the user decides
            raise InputError(f"{bundle}: holds a bundle that cannot be read; remove it and run cv again") from None
    _, manifest = _timed(timing, "export", lambda: export_bundle(fold_dir / "checkpoints" / "best.pt", device=device))
    return manifest.metrics["test_onnx"]


def run_fold(cfg: TrainConfig, fold_dir: Path, splits: dict, index: int) -> dict:
    """Train (or resume), tune, evaluate, export and score one fold; writes and returns fold.json's content."""
    timing_path = fold_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    resume = (fold_dir / "checkpoints" / "last.pt").is_file()
    fold_cfg = cfg.replace(run_dir=str(fold_dir))
    _timed(timing, "train", lambda: train.main(fold_cfg, resume=resume, splits=None if resume else splits))
    write_json(timing_path, timing)
    threshold = _timed(timing, "tune", lambda: stages.tune_run(fold_dir, cfg.device, cfg.flip_tta))
    test_torch = _timed(timing, "evaluate", lambda: stages.evaluate_run(fold_dir, cfg.device))
    write_json(timing_path, timing)
    test_onnx = _onnx_test_metrics(fold_dir, timing, cfg.device)
    write_json(timing_path, timing)
    log = [json.loads(line) for line in (fold_dir / "metrics.jsonl").read_text().splitlines() if line]
    result = {
        "fold": index,
        "frames": {side: len(splits[side]) for side in ("train", "val", "test")},
        "threshold": threshold["threshold"],
        "morphology": threshold["morphology"],
        "validation": {m: threshold["validation"][m] for m in METRICS},
        "test_onnx": {m: test_onnx[m] for m in (*METRICS, "images")},
        "test_pytorch": {m: test_torch[m] for m in METRICS},
        "epochs": log[-1]["epoch"] if log else 0,
        "cpu_s": sum(t["cpu_s"] for t in timing.values()),
        "wall_s": sum(t["wall_s"] for t in timing.values()),
        "timing": timing,
        "resumed": resume,
    }
    write_json(fold_dir / "fold.json", result)
    return result


# ----------------------------------------------------------------------------------------------- summary


def summarise(folds: list[dict]) -> dict:
    """Mean and sample standard deviation over folds of each test metric (as deployed), and of CPU time."""
    out = {}
    for metric in METRICS:
        values = np.array([f["test_onnx"][metric] for f in folds], dtype=np.float64)
        out[metric] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    cpu = np.array([f["cpu_s"] for f in folds])
    out["cpu_s"] = {"mean": float(cpu.mean()), "sd": float(cpu.std(ddof=1)) if len(cpu) > 1 else 0.0}
    out["folds"] = len(folds)
    return out


def format_markdown(cfg: TrainConfig, folds: list[dict], summary: dict, k: int, pretraining: dict | None = None) -> str:
    budget = f"{cfg.steps} steps" if cfg.steps else f"{cfg.epochs} epochs"
    lines = [f"# Cross-validation: recipe `{cfg.recipe}`, {k} folds",
             "",
             f"Data `{cfg.data or 'synthetic phantom'}`"
             f"{f', mask label {cfg.mask_label}' if cfg.mask_label is not None else ''}; {cfg.arch}, "
             f"{cfg.input_size[0]}x{cfg.input_size[1]}, {budget}, seed {cfg.seed}. Held-out fold scored as deployed "
             "(T* and morphology tuned on the fold's validation part, exported ONNX graph in ONNX Runtime"
             f"{', each frame averaged with its mirror (flip TTA)' if cfg.flip_tta else ''}). "
             f"{summary['folds']} of {k} folds finished.",
             "",
             "| fold | train/val/test | epochs | T* | Dice | IoU | PA | pooled Dice | val Dice | CPU min | wall min |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in folds:
        t, fr = f["test_onnx"], f["frames"]
        lines.append(f"| {f['fold']} | {fr['train']}/{fr['val']}/{fr['test']} | {f['epochs']} | {f['threshold']:.2f} | "
                     f"{t['dice']:.4f} | {t['iou']:.4f} | {t['pixel_accuracy']:.4f} | {t['pooled_dice']:.4f} | "
                     f"{f['validation']['dice']:.4f} | {f['cpu_s'] / 60:.1f} | {f['wall_s'] / 60:.1f} |")
    s = summary
    lines.append(f"| mean +- sd | | | | {s['dice']['mean']:.4f} +- {s['dice']['sd']:.4f} | "
                 f"{s['iou']['mean']:.4f} +- {s['iou']['sd']:.4f} | {s['pixel_accuracy']['mean']:.4f} +- "
                 f"{s['pixel_accuracy']['sd']:.4f} | {s['pooled_dice']['mean']:.4f} +- {s['pooled_dice']['sd']:.4f} | | "
                 f"{s['cpu_s']['mean'] / 60:.1f} +- {s['cpu_s']['sd'] / 60:.1f} | |")
    lines += ["", "CPU min: CPU time of the fold's process (all threads), train + tune + evaluate + export; "
              "wall min depends on what else ran on the machine."]
    if pretraining is not None:
        shared = "its whole network" if cfg.phantom_head else "its backbone"
        cost = (f"trained before this run, in {pretraining['reused']}; its cost is not counted here"
                if "reused" in pretraining else
                f"{pretraining['cpu_s'] / 60:.1f} CPU min, {pretraining['wall_s'] / 60:.1f} wall min, not in the fold "
                "columns")
        lines += ["", f"Phantom pre-training ({cfg.phantom_frames} phantom frames, once, {shared} the start of every "
                      f"fold): {cost}."]
    return "\n".join(lines) + "\n"


def plot_cv(folds: list[dict], summary: dict, path: Path, title: str) -> None:
    """cv.png: each fold's test metrics as points, the mean +- sd as a bar with an error line."""
    from matplotlib.figure import Figure  # a bare Figure: no pyplot state (see training/evaluation/tune.py)

    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.add_subplot()
    x = np.arange(len(METRICS))
    means = [summary[m]["mean"] for m in METRICS]
    ax.bar(x, means, yerr=[summary[m]["sd"] for m in METRICS], color="0.85", edgecolor="0.4", capsize=6,
           label="mean +- sd")
    for j, f in enumerate(folds):
        jitter = (j - (len(folds) - 1) / 2) * 0.08
        ax.plot(x + jitter, [f["test_onnx"][m] for m in METRICS], "o", color=f"C{j % 10}", label=f"fold {f['fold']}")
    for xi, mean in zip(x, means):
        ax.annotate(f"{mean:.3f}", (xi, mean), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(x, [LABELS[m] for m in METRICS])
    ax.set(ylim=(0, 1.05), ylabel="held-out fold, as deployed (ONNX)", title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# ----------------------------------------------------------------------------------------------- the command


def _check_same_config(run_dir: Path, cfg: TrainConfig) -> None:
    """A RUN holds folds of one config: write it on the first call, refuse a different one later."""
    path = run_dir / "cv_config.toml"
    if not path.is_file():
        write_text(path, to_toml(cfg))
        return
    changed = changed_settings(cfg, config_from_dict(load_toml(path), str(path)))
    if changed:
        raise InputError(f"{path}: this cross-validation was started with other settings ({', '.join(changed)}); "
                         "re-run it with the same flags, or use another --run-dir")


def run_cv(cfg: TrainConfig, folds: int, max_new: int | None = None, only: list[int] | None = None) -> dict:
    """Every fold (finished ones read back); cv.json, cv.md and cv.png in cfg.run_dir, rewritten after each
    fold; returns cv.json's content. `max_new` caps the folds trained in this call, `only` names them."""
    if not cfg.data:
        raise InputError("nerveseg cv needs --data DIR (cross-validation of the phantom says nothing)")
    outside = sorted(set(only or []) - set(range(1, folds + 1)))
    if outside:
        raise InputError(f"--only-folds {' '.join(map(str, outside))}: no such fold; there are {folds} (1..{folds})")
    samples = discover(cfg.data)
    if cfg.group_by == "prefix":
        samples = group_by_prefix(samples)
    plans = make_folds(samples, folds, cfg.seed)
    run_dir = Path(cfg.run_dir)
    if pretrain.uses_phantom(cfg) and not cfg.phantom_dir:
        cfg = cfg.replace(phantom_dir=str(run_dir / "phantom"))  # one phantom stage for all folds
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_same_config(run_dir, cfg)  # only now: a call refused above leaves nothing behind
    if pretrain.uses_phantom(cfg):
        pretrain_once(cfg)
    results = []
    for index, splits in enumerate(plans, start=1):
        fold_dir = run_dir / f"fold-{index}"
        done = fold_dir / "fold.json"
        if done.is_file():
            result = json.loads(done.read_text())
            print(f"fold {index}/{folds}: finished before, read back", flush=True)
        elif max_new is not None and max_new <= 0:
            print(f"fold {index}/{folds}: left for a later call (--max-new-folds)", flush=True)
            continue
        elif only and index not in only:
            print(f"fold {index}/{folds}: left for a later call (--only-folds)", flush=True)
            continue
        else:
            max_new = None if max_new is None else max_new - 1
            print(f"fold {index}/{folds}: train {len(splits['train'])}, val {len(splits['val'])}, "
                  f"test {len(splits['test'])} frames -> {fold_dir}", flush=True)
            result = run_fold(cfg, fold_dir, splits, index)
        t = result["test_onnx"]
        print(f"fold {index}/{folds}: test (ONNX) Dice {t['dice']:.4f} IoU {t['iou']:.4f} PA {t['pixel_accuracy']:.4f} "
              f"pooled {t['pooled_dice']:.4f}  T* {result['threshold']:.2f}  CPU {result['cpu_s'] / 60:.1f} min",
              flush=True)
        results.append(result)
        # after every fold, so that a long cross-validation stopped part-way still reports what it measured
        report, markdown = write_report(cfg, folds, results)
    if not results:
        print(f"no fold of {run_dir} is finished yet; nothing to report")
        return {"folds": folds, "finished": 0}
    print()
    print(markdown)
    print(f"-> {run_dir / 'cv.json'}, {run_dir / 'cv.md'}, {run_dir / 'cv.png'}")
    return report


def pretrain_once(cfg: TrainConfig) -> None:
    """The phantom stage, before the folds (which then find it finished); its cost in RUN/pretraining.json, or
    where it came from when an earlier run had trained it (`--phantom-dir`): then its cost is not this run's."""
    path = Path(cfg.run_dir) / "pretraining.json"
    timing = json.loads(path.read_text()) if path.is_file() else {}
    stage = pretrain.phantom_config(cfg)
    trained_here = "cpu_s" in timing.get("phantom", {})
    if not trained_here and pretrain.check_stage(stage):
        timing["phantom"] = {"reused": stage.run_dir}
    else:
        if not trained_here:
            timing.pop("phantom", None)  # a stage once reused, gone since: this run trains it and owns its cost
        _timed(timing, "phantom", lambda: train.pretrain_on_phantom(cfg))
    write_json(path, timing)


def _pretraining(cfg: TrainConfig) -> dict | None:
    path = Path(cfg.run_dir) / "pretraining.json"
    return json.loads(path.read_text())["phantom"] if path.is_file() else None


def write_report(cfg: TrainConfig, folds: int, results: list[dict]) -> tuple[dict, str]:
    """cv.json, cv.md and cv.png over the folds finished so far ("finished" says how many)."""
    run_dir = Path(cfg.run_dir)
    summary = summarise(results)
    pretraining = _pretraining(cfg)
    report = {"recipe": cfg.recipe, "folds": folds, "finished": len(results), "config": cfg.to_dict(),
              "per_fold": results, "summary": summary, "pretraining": pretraining}
    write_json(run_dir / "cv.json", report)
    markdown = format_markdown(cfg, results, summary, folds, pretraining)
    write_text(run_dir / "cv.md", markdown)
    plot_cv(results, summary, run_dir / "cv.png", f"{cfg.recipe}: {folds}-fold CV ({len(results)} done), {Path(cfg.data).name}")
    return report, markdown

