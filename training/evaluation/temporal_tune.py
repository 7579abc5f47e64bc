"""Temporal stabilisation on videos with a known truth: run a bundle over them, score the masks with and without
the filter, and choose its settings (`nerveseg tune-temporal`, scripts/temporal_eval.py).

The bundle runs through the device runtime's own backend, preprocessing, sigmoid, post-processing and filter,
at the model's resolution (where T* was tuned and the project's Dice is measured), so what is chosen here is
exactly what the device computes. The optical flow does not depend on the settings: it is computed once per
frame and shared by every candidate.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from device_runtime.backends.selection import open_backend
from device_runtime.core.errors import InputError
from device_runtime.core.fileio import write_json
from device_runtime.core.manifest import Manifest, load_manifest, write_manifest
from device_runtime.core.metrics import confusion_counts, dice
from device_runtime.core.postprocess import postprocess_batch, sigmoid
from device_runtime.core.preprocess import preprocess, resize_mask
from device_runtime.core.sequence_metrics import flicker
from device_runtime.core.temporal import MotionEstimator, TemporalFilter, TemporalParams

from ..data.sequences import Sequence, phantom_sequences, pseudo_videos, rescale_motions

EVENT_MIN_SHARE = 0.002  # a nerve counts as present when its mask covers 0.2 % of the frame (a sliver does not)


@dataclass
class Predicted:
    """A sequence as the network saw it. Shape: images, prob (T, h, w) float32; truth (T, h, w) uint8;
    motions (T, 2, 3) between the model-resolution frames."""

    name: str
    images: np.ndarray
    prob: np.ndarray
    truth: np.ndarray
    motions: np.ndarray


def predict_sequence(net, manifest: Manifest, sequence: Sequence) -> Predicted:
    """Run every frame through the backend as `device_runtime.pipeline.Segmenter` does."""
    size = tuple(manifest.input_size)
    count = len(sequence.frames)
    images, prob = np.empty((count, *size), np.float32), np.empty((count, *size), np.float32)
    for t, frame in enumerate(sequence.frames):
        batch = preprocess(frame, size, out=net.input_buffer)
        images[t] = batch[0, 0]
        output = net.infer(batch)[0, 0]
        prob[t] = sigmoid(output) if manifest.output_kind == "logits" else output
    truth = np.stack([resize_mask(mask, size) for mask in sequence.masks])
    return Predicted(sequence.name, images, prob, truth,
                     rescale_motions(sequence.motions, sequence.frames.shape[1:], size))


def flows_of(images: np.ndarray) -> list[np.ndarray | None]:
    """The filter's flow map of every frame to its predecessor (None for the first)."""
    estimate = MotionEstimator()
    return [None if flow is None else flow.copy() for flow in map(estimate, images)]


def plain_masks(prob: np.ndarray, manifest: Manifest) -> np.ndarray:
    return postprocess_batch(prob, manifest.threshold, manifest.morphology)


def filtered_masks(images: np.ndarray, prob: np.ndarray, flows: list, params: TemporalParams, manifest: Manifest
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(T, h, w) masks of the filter and (T,) bool resets, for precomputed flows (`flows_of`)."""
    run = TemporalFilter(params, manifest.threshold, manifest.morphology)
    masks, resets = np.empty(prob.shape, np.uint8), np.empty(len(prob), bool)
    for t, (image, p, flow) in enumerate(zip(images, prob, flows)):
        step = run.apply(image, p, flow)
        masks[t], resets[t] = step.mask, step.reset
    return masks, resets


def event_min_area(size: tuple[int, int]) -> int:
    return max(1, int(round(EVENT_MIN_SHARE * size[0] * size[1])))


def quick_scores(masks: np.ndarray, predicted: Predicted) -> tuple[float, float]:
    """(mean Dice, flicker) of one sequence's masks: what the search compares."""
    return float(dice(confusion_counts(masks, predicted.truth))), flicker(masks, predicted.motions)


def candidate_grid(threshold: float, reset_below: float = TemporalParams.reset_below) -> list[TemporalParams]:
    """105 settings: alpha {1, 0.7, 0.5, 0.35, 0.25, 0.15, 0.1} x t_high {T*, +15 %, +30 % of the way to 1} x
    t_low {T*, 70 %, 40 %, 20 %, 10 % of T*}. The first (alpha 1, both at T*) is the plain segmentation, so it is
    always a candidate."""
    # rounded for people, but never across T*: a setting must enclose it (TemporalParams.thresholds)
    highs = [max(round(threshold + f * (1 - threshold), 3), threshold) for f in (0.0, 0.15, 0.3)]
    lows = [min(round(f * threshold, 3), threshold) for f in (1.0, 0.7, 0.4, 0.2, 0.1)]
    return [TemporalParams(enabled=True, alpha=a, t_high=h, t_low=lo, reset_below=reset_below)
            for a in (1.0, 0.7, 0.5, 0.35, 0.25, 0.15, 0.1) for h in highs for lo in lows]


FLICKER_SLACK = 0.1  # settings within 10 % of the least flicker count as equally steady; the best Dice wins


def choose(plain: dict, scored: list[tuple[TemporalParams, dict]], dice_tolerance: float,
           min_flicker_cut: float) -> tuple[TemporalParams, dict]:
    """Among the settings whose mean Dice is at most `dice_tolerance` below the plain one, those within
    FLICKER_SLACK of the least flicker, and of these the best mean Dice (the flicker has a wide floor on which
    Dice still differs). Enabled when it cuts the flicker by at least `min_flicker_cut`."""
    eligible = [(p, s) for p, s in scored if s["dice"] >= plain["dice"] - dice_tolerance]
    steadiest = min(s["flicker"] for _, s in eligible)
    steady = [(p, s) for p, s in eligible if s["flicker"] <= steadiest * (1 + FLICKER_SLACK)]
    params, score = max(steady, key=lambda item: (item[1]["dice"], -item[1]["flicker"]))
    cut = 1 - score["flicker"] / plain["flicker"] if plain["flicker"] > 0 else 0.0
    return TemporalParams(**{**params.to_dict(), "enabled": bool(cut >= min_flicker_cut)}), {**score, "cut": cut}


def search(bundle: Path, sequences: Iterable[Sequence], backend: str = "auto", threads: int = 0,
           candidates: list[TemporalParams] | None = None) -> tuple[dict, list[tuple[TemporalParams, dict]], int]:
    """Mean Dice and flicker over the sequences, plain and for every candidate; and the number of sequences."""
    manifest = load_manifest(bundle)
    candidates = candidate_grid(manifest.threshold, manifest.temporal.reset_below) if candidates is None else candidates
    plain, per_candidate, count = [], [[] for _ in candidates], 0
    net = open_backend(Path(bundle), manifest, backend, "auto", threads)
    try:
        for sequence in sequences:
            predicted = predict_sequence(net, manifest, sequence)
            flows = flows_of(predicted.images)
            plain.append(quick_scores(plain_masks(predicted.prob, manifest), predicted))
            for params, scores in zip(candidates, per_candidate):
                masks = filtered_masks(predicted.images, predicted.prob, flows, params, manifest)[0]
                scores.append(quick_scores(masks, predicted))
            count += 1
    finally:
        net.close()
    mean = lambda rows: {"dice": float(np.mean([r[0] for r in rows])),  # noqa: E731
                         "flicker": float(np.mean([r[1] for r in rows]))}
    return mean(plain), [(p, mean(rows)) for p, rows in zip(candidates, per_candidate)], count


def tune_temporal(bundle: str | Path, sequences: Iterable[Sequence], description: str, backend: str = "auto",
                  threads: int = 0, dice_tolerance: float = 0.005, min_flicker_cut: float = 0.5) -> dict:
    """Choose the settings on `sequences` and write them (and the scores) into the bundle's manifest."""
    bundle = Path(bundle)
    plain, scored, count = search(bundle, sequences, backend, threads)
    params, chosen = choose(plain, scored, dice_tolerance, min_flicker_cut)
    manifest = load_manifest(bundle)  # read again: verified as it is now, just before it is replaced
    manifest.temporal = params
    result = {"sequences": description, "count": count, "plain": plain, "chosen": chosen,
              "rule": f"mean Dice >= plain - {dice_tolerance}, flicker within {FLICKER_SLACK:.0%} of the least, then "
                      f"the best Dice; enabled when it cuts flicker by >= {min_flicker_cut:.0%}"}
    manifest.metrics = {**manifest.metrics, "temporal": result}
    write_manifest(bundle, manifest)
    ranked = sorted(scored, key=lambda item: (item[1]["dice"] < plain["dice"] - dice_tolerance, item[1]["flicker"]))
    return {**result, "params": params.to_dict(), "ranked": [(p.to_dict(), s) for p, s in ranked]}


def format_result(result: dict, bundle: Path, show: int = 5) -> str:
    """The `show` best settings as a table, then one line: plain and chosen scores, and what was written."""
    plain, chosen, params = result["plain"], result["chosen"], result["params"]
    lines = []
    if show:
        lines.append(f"{'alpha':>6}{'t_high':>8}{'t_low':>8}{'Dice':>8}{'flicker':>9}   (Dice within the tolerance "
                     "first, then the least flicker first)")
        lines += [f"{c['alpha']:>6}{c['t_high']:>8}{c['t_low']:>8}{s['dice']:>8.4f}{s['flicker']:>9.4f}"
                  for c, s in result["ranked"][:show]]
    lines.append(f"{result['sequences']}: plain Dice {plain['dice']:.4f} flicker {plain['flicker']:.4f}; chosen alpha "
                 f"{params['alpha']} t_high {params['t_high']} t_low {params['t_low']}: Dice {chosen['dice']:.4f} "
                 f"flicker {chosen['flicker']:.4f} ({chosen['cut']:.0%} less) -> "
                 f"{'enabled' if params['enabled'] else 'disabled'} in {Path(bundle) / 'manifest.json'}")
    return "\n".join(lines)


def validation_sequences(run_dir: str | Path | None, phantom: bool, count: int, frames: int, seed: int,
                         split: str = "val", data: str | Path | None = None,
                         mask_label: int | None = None) -> tuple[Iterator[Sequence], str]:
    """The sequences to tune or measure on, and a description of them.

    phantom: phantom sequences (`count` of them, 256x256). Otherwise pseudo-videos of labelled frames: those of
    the run's `split` (split.json; the run's mask_label) or, with `data`, every pair under that folder; at most
    `count` frames, one video each.
    """
    if count < 1 or frames < 2:
        raise InputError(f"need at least 1 sequence of at least 2 frames, got {count} of {frames}")
    if phantom:
        return phantom_sequences(count, seed, frames), f"{count} phantom sequences of {frames} frames, seed {seed}"
    from ..config import load_run_config
    from ..data.dataset import discover, load_split

    if data is not None:
        samples, where = discover(data), f"labelled frames under {data}"
    elif run_dir is not None:
        samples = load_split(Path(run_dir) / "split.json")[split]
        mask_label = load_run_config(run_dir).mask_label if mask_label is None else mask_label
        where = f"the {split} split of {run_dir}"
    else:
        raise InputError("give a run folder (its split's frames become pseudo-videos), a data folder, or --phantom")
    if not samples:
        raise InputError(f"no labelled frames in {where}")
    samples = samples[:count]
    return (pseudo_videos(samples, seed, frames, mask_label),
            f"{len(samples)} pseudo-videos of {frames} frames from {where}, seed {seed}")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `nerveseg tune-temporal`."""
    parser.add_argument("--run-dir", metavar="RUN",
                        help="the run: its validation frames become pseudo-videos; its bundle RUN/bundle")
    parser.add_argument("--bundle", metavar="FOLDER", help="the bundle to tune (default RUN/bundle)")
    parser.add_argument("--phantom", action="store_true", help="phantom sequences instead of pseudo-videos")
    parser.add_argument("--data", metavar="FOLDER",
                        help="pseudo-videos of every labelled frame under this folder instead")
    parser.add_argument("--mask-label", type=int, metavar="L",
                        help="nerve = mask == L (default: the run's; with --data mask > 0)")
    parser.add_argument("--sequences", type=int, default=20, metavar="N",
                        help="at most this many sequences (default 20)")
    parser.add_argument("--frames", type=int, default=100, metavar="N", help="frames per sequence (default 100)")
    parser.add_argument("--seed", type=int, default=1, metavar="SEED",
                        help="of the trajectories and speckle (default 1; scripts/temporal_eval.py measures on "
                             "seed 0)")
    parser.add_argument("--dice-tolerance", type=float, default=0.005, metavar="D",
                        help="mean Dice may fall at most this far below the plain one (default 0.005)")
    parser.add_argument("--min-flicker-cut", type=float, default=0.5, metavar="SHARE",
                        help="enable the filter only when it cuts the flicker by at least this share (default 0.5)")
    parser.add_argument("--show", type=int, default=5, metavar="N",
                        help="print this many of the best settings (default 5)")
    parser.add_argument("--table", metavar="FILE", help="write every setting's scores to this JSON file")
    parser.add_argument("--backend", default="auto", metavar="BACKEND",
                        help="as nerveseg-device --backend (default auto)")
    parser.add_argument("--threads", type=int, default=0, metavar="N", help="ONNX Runtime threads (0 = one per core)")
    return parser


def main(args: argparse.Namespace) -> dict:
    """`nerveseg tune-temporal`: choose, write into the manifest, print the table and the line."""
    if not args.bundle and not args.run_dir:
        raise InputError("tune-temporal: give --run-dir RUN (tunes RUN/bundle) or --bundle BUNDLE")
    if args.phantom and args.data:
        raise InputError("tune-temporal: give --phantom or --data, not both")
    if args.dice_tolerance < 0 or not 0 <= args.min_flicker_cut <= 1 or args.threads < 0:
        raise InputError(f"tune-temporal: --dice-tolerance must be >= 0 (got {args.dice_tolerance}), --min-flicker-cut "
                         f"in [0, 1] (got {args.min_flicker_cut}), --threads >= 0 (got {args.threads})")
    bundle = Path(args.bundle) if args.bundle else Path(args.run_dir) / "bundle"
    sequences, description = validation_sequences(args.run_dir, args.phantom, args.sequences, args.frames, args.seed,
                                                  data=args.data, mask_label=args.mask_label)
    result = tune_temporal(bundle, sequences, description, args.backend, args.threads, args.dice_tolerance,
                           args.min_flicker_cut)
    print(format_result(result, bundle, args.show))
    if args.table:
        write_json(args.table, result)
    return result
