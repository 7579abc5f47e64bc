"""Temporal stabilisation measured: flicker, Dice against the moving truth, appear/vanish events, and its cost.

    python scripts/temporal_eval.py quality --bundle runs/phantom-quick/bundle --phantom
    python scripts/temporal_eval.py quality --run-dir runs/small-real --split test      # pseudo-videos of the
                                                                                         # run's test frames
    python scripts/temporal_eval.py quality --bundle B --data /path/to/labelled --mask-label 1
    python scripts/temporal_eval.py timing --size 320                # the filter's added ms per frame, and the
                                                                     # share of a device run outside inference
    python scripts/temporal_eval.py gif --bundle runs/phantom-quick/bundle --out docs/figures/temporal_phantom.gif
    python scripts/temporal_eval.py flow --size 320                  # the flow's error against the true motion

quality: the bundle runs over each sequence once (the device's backend, preprocessing and sigmoid); the same
probabilities are then segmented frame by frame (plain) and through the temporal filter with the bundle's
settings (or --alpha/--t-high/--t-low), at the model's resolution. Per sequence: mean Dice against the moving
truth, flicker (share of mask pixels changed between consecutive frames beyond the true motion;
device_runtime/core/sequence_metrics.py), appear/vanish events; the paired bootstrap interval (over sequences) of the
difference filtered - plain. Phantom sequences default to seed 0; `nerveseg tune-temporal --phantom` tunes on
seed 1, so the two never share a sequence.

timing: phantom frames at --size, interleaved frame by frame: plain post-processing (threshold + morphology)
against the filter (flow + warp + average + hysteresis + morphology); then whole device runs (an untrained
DeepLabV3-MobileNetV3 bundle at --size, ONNX Runtime CPU) with the filter off and on, alternated.
A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from device_runtime.backends.selection import open_backend  # noqa: E402
from device_runtime.core.fileio import atomic_path, write_json  # noqa: E402
from device_runtime.core.manifest import load_manifest  # noqa: E402
from device_runtime.core.postprocess import Morphology, postprocess  # noqa: E402
from device_runtime.core.sequence_metrics import sequence_scores  # noqa: E402
from device_runtime.core.temporal import TemporalFilter, TemporalParams  # noqa: E402
from training.evaluation.bootstrap import paired_bootstrap_ci  # noqa: E402
from training.evaluation.temporal_tune import (event_min_area, filtered_masks, flows_of, plain_masks, predict_sequence,
                                               validation_sequences)


def settings_of(manifest, args) -> TemporalParams:
    params = manifest.temporal.with_overrides(enabled=True, alpha=args.alpha, t_high=args.t_high, t_low=args.t_low)
    if "temporal" not in manifest.metrics and (args.alpha, args.t_high, args.t_low) == (None, None, None):
        print("note: this bundle's temporal settings were never tuned (nerveseg tune-temporal); measuring "
              f"the defaults {params.to_dict()}")
    return params


def score_sequence(predicted, params: TemporalParams, manifest, no_warp: bool = False) -> dict:
    """Plain and stabilised scores of one predicted sequence, and the resets inside it."""
    min_area = event_min_area(manifest.input_size)
    plain = sequence_scores(plain_masks(predicted.prob, manifest), predicted.truth, predicted.motions, min_area)
    flows = flows_of(predicted.images)
    if no_warp:  # ablation: the same filter with a flow of zero everywhere
        height, width = predicted.prob.shape[1:]
        grid = np.dstack(np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)))
        flows = [None if flow is None else grid for flow in flows]
    masks, resets = filtered_masks(predicted.images, predicted.prob, flows, params, manifest)
    stable = sequence_scores(masks, predicted.truth, predicted.motions, min_area)
    return {"name": predicted.name, "plain": plain, "stable": stable, "resets": int(resets[1:].sum())}


def quality(args) -> dict:
    manifest = load_manifest(args.bundle)
    params = settings_of(manifest, args)
    sequences, description = validation_sequences(args.run_dir, args.phantom, args.sequences, args.frames,
                                                  args.seed, args.split, args.data, args.mask_label)
    print(f"bundle {args.bundle} (T* {manifest.threshold}, {manifest.morphology}), {description}")
    print(f"filter: {params.describe(manifest.threshold)}{' (no warp)' if args.no_warp else ''}")
    rows, cuts, last = [], [], None
    net = open_backend(Path(args.bundle), manifest, args.backend, "auto", args.threads)
    try:
        for sequence in sequences:
            started = time.perf_counter()
            predicted = predict_sequence(net, manifest, sequence)
            if last is not None:  # a cut: the previous sequence's last frame, then this one's first
                cut = TemporalFilter(params, manifest.threshold, manifest.morphology)
                cut(*last)
                cuts.append(cut(predicted.images[0], predicted.prob[0]).reset)
            last = (predicted.images[-1], predicted.prob[-1])
            rows.append(score_sequence(predicted, params, manifest, args.no_warp))
            plain, stable = rows[-1]["plain"], rows[-1]["stable"]
            print(f"  {sequence.name:<22} Dice {plain['dice']:.3f} -> {stable['dice']:.3f}  flicker "
                  f"{plain['flicker']:.4f} -> {stable['flicker']:.4f} (truth {plain['truth_flicker']:.4f})  events "
                  f"{plain['appear'] + plain['vanish']} -> {stable['appear'] + stable['vanish']} (truth "
                  f"{plain['truth_appear'] + plain['truth_vanish']})  resets {rows[-1]['resets']}  "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
    finally:
        net.close()
    summary = {**summarise(rows), "cuts": len(cuts), "cuts_detected": int(sum(cuts))}
    print_summary(summary)
    if args.json:
        write_json(args.json, {"description": description, "params": params.to_dict(), "summary": summary,
                               "sequences": rows})
    return summary


def summarise(rows: list[dict]) -> dict:
    column = lambda side, key: np.array([r[side][key] for r in rows], np.float64)  # noqa: E731
    events = lambda side: column(side, "appear") + column(side, "vanish")  # noqa: E731
    truth_events = column("plain", "truth_appear") + column("plain", "truth_vanish")
    out = {"sequences": len(rows), "resets": int(sum(r["resets"] for r in rows)),
           "truth_flicker": float(column("plain", "truth_flicker").mean()), "truth_events": int(truth_events.sum())}
    for side in ("plain", "stable"):
        out[side] = {"dice": float(column(side, "dice").mean()), "flicker": float(column(side, "flicker").mean()),
                     "events": int(events(side).sum()),
                     "event_error": float(np.abs(events(side) - truth_events).mean())}
    out["dice_diff"] = out["stable"]["dice"] - out["plain"]["dice"]
    out["dice_diff_ci"] = paired_bootstrap_ci(column("stable", "dice"), column("plain", "dice"))
    out["flicker_diff_ci"] = paired_bootstrap_ci(column("stable", "flicker"), column("plain", "flicker"))
    plain_flicker = out["plain"]["flicker"]
    out["flicker_ratio"] = out["stable"]["flicker"] / plain_flicker if plain_flicker else float("nan")
    out["halved_share"] = float(np.mean(column("stable", "flicker") <= 0.5 * column("plain", "flicker")))
    return out


def print_summary(s: dict) -> None:
    print(f"\n{s['sequences']} sequences; resets inside them: {s['resets']}; cuts from one sequence to the next "
          f"detected: {s['cuts_detected']} of {s['cuts']}")
    print(f"{'':<12}{'mean Dice':>10}{'flicker':>10}{'events':>8}{'|events - truth|':>18}")
    for side, label in (("plain", "plain"), ("stable", "stabilised")):
        row = s[side]
        print(f"{label:<12}{row['dice']:>10.4f}{row['flicker']:>10.4f}{row['events']:>8}{row['event_error']:>18.2f}")
    print(f"{'truth':<12}{'':>10}{s['truth_flicker']:>10.4f}{s['truth_events']:>8}")
    low, high = s["dice_diff_ci"]
    print(f"Dice stabilised - plain: {s['dice_diff']:+.4f} [{low:+.4f}, {high:+.4f}] (paired bootstrap over "
          "sequences, 95 %)")
    low, high = s["flicker_diff_ci"]
    difference = s["stable"]["flicker"] - s["plain"]["flicker"]
    print(f"flicker stabilised / plain: {s['flicker_ratio']:.3f} (difference {difference:+.4f} [{low:+.4f}, "
          f"{high:+.4f}]); halved in {100 * s['halved_share']:.0f} % of the sequences")
    earns = s["flicker_ratio"] <= 0.5 and s["dice_diff_ci"][1] >= 0
    print("earns the default (flicker at least halved, Dice not lower beyond its interval): "
          f"{'yes' if earns else 'no'}")


# ----------------------------------------------------------------------------------------------- timing


def timing(args) -> None:
    from training.data.sequences import phantom_sequence

    size = (args.size, args.size)
    sequence = phantom_sequence(args.seed, 0, args.frames, size)
    rng = np.random.default_rng(0)
    morphology = Morphology(open_radius=1, close_radius=2, min_area=64, fill_holes=True)
    params = TemporalParams(enabled=True, alpha=0.5, t_high=0.6, t_low=0.3)
    stable = TemporalFilter(params, 0.5, morphology)
    plain_ms, stable_ms = [], []
    for t, (frame, truth) in enumerate(zip(sequence.frames, sequence.masks)):
        image = frame.astype(np.float32) / 255
        prob = np.clip(cv2.GaussianBlur(truth.astype(np.float32), (0, 0), 3) + 0.2 * rng.standard_normal(size), 0, 1
                       ).astype(np.float32)
        order = (0, 1) if t % 2 == 0 else (1, 0)  # alternate which runs first: caches and frequency treat both alike
        for which in order:
            started = time.perf_counter()
            if which == 0:
                postprocess(prob, 0.5, morphology)
            else:
                stable(image, prob)
            (plain_ms if which == 0 else stable_ms).append(1e3 * (time.perf_counter() - started))
    plain_ms, stable_ms = np.array(plain_ms[5:]), np.array(stable_ms[5:])  # the first frames allocate
    print(f"{args.size}x{args.size}, {len(plain_ms)} frames, interleaved; OpenCV threads {cv2.getNumThreads()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a loaded machine preempts the process "
          "mid-call: the minimum and the lower quartile are the cost, the median and p90 include waiting)")
    print(f"{'':<28}{'min ms':>8}{'q25 ms':>8}{'p50 ms':>8}{'p90 ms':>8}")
    for label, values in (("plain (threshold + morph.)", plain_ms), ("stabilised (all of it)", stable_ms)):
        print(f"{label:<28}" + "".join(f"{np.percentile(values, q):>8.3f}" for q in (0, 25, 50, 90)))
    added = [np.percentile(stable_ms, q) - np.percentile(plain_ms, q) for q in (0, 25, 50, 90)]
    print(f"{'added per frame':<28}" + "".join(f"{v:>8.3f}" for v in added))
    if not args.no_runs:
        device_runs(args, sequence)


def device_runs(args, sequence) -> None:
    """Whole `nerveseg-device` runs (in process, as the command does) with the filter off and on, alternated."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_device

    from device_runtime.config import RunConfig
    from device_runtime.runner import run

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bundle = args.bundle or bench_device.make_bundle(folder / "bundle", args.size)
        frames = folder / "frames"
        frames.mkdir()
        for t, frame in enumerate(sequence.frames):
            cv2.imwrite(str(frames / f"{t:04d}.png"), frame)
        rows = []
        for attempt in range(args.repeat):
            for enabled in (False, True):
                cfg = RunConfig(bundle=Path(bundle), source=str(frames), backend="ort-cpu", threads=args.threads,
                                warmup=5, quiet=True, temporal={"enabled": enabled})
                summary = run(cfg)["timing"]
                stages = summary["stages_ms"]
                rows.append((enabled, attempt, summary["fps"], stages["inference"]["p50"],
                             stages["postprocess"]["p50"], stages["frame"]["p50"], 100 * summary["outside_inference"]))
    made = bundle if args.bundle else "untrained, made here"
    print(f"\ndevice runs ({len(sequence.frames)} frames each, bundle {made}):")
    print(f"{'filter':<8}{'run':>4}{'fps':>8}{'infer p50':>11}{'post p50':>10}{'frame p50':>11}{'outside %':>11}")
    for enabled, attempt, fps, inference, post, frame, outside in rows:
        print(f"{'on' if enabled else 'off':<8}{attempt:>4}{fps:>8.2f}{inference:>11.2f}{post:>10.2f}{frame:>11.2f}"
              f"{outside:>11.1f}")


# ----------------------------------------------------------------------------------------------- flow


def flow(args) -> None:
    """The filter's flow against the phantom's true motion, at the model size --size, and its time per call."""
    from device_runtime.core.preprocess import preprocess
    from device_runtime.core.temporal import MotionEstimator
    from training.data.sequences import phantom_sequence, rescale_motions

    size = (args.size, args.size)
    grid = np.dstack(np.meshgrid(np.arange(args.size, dtype=np.float32), np.arange(args.size, dtype=np.float32)))
    inner = slice(args.size // 8, args.size - args.size // 8)  # the edges hold pixels that entered the field
    errors, times = [], []
    for index in range(args.sequences):
        sequence = phantom_sequence(args.seed, index, args.frames)
        motions = rescale_motions(sequence.motions, sequence.frames.shape[1:], size)
        estimate = MotionEstimator()
        for t, frame in enumerate(sequence.frames):
            image = preprocess(frame, size)[0, 0]
            started = time.perf_counter()
            flow_map = estimate(image)
            times.append(1e3 * (time.perf_counter() - started))
            if flow_map is None:
                continue
            back = cv2.invertAffineTransform(motions[t]).astype(np.float32)  # where each pixel truly came from
            truth = grid @ back[:, :2].T + back[:, 2]
            errors.append(float(np.median(np.linalg.norm((flow_map - truth)[inner, inner], axis=2))))
    errors, times = np.array(errors), np.array(times[1:])
    print(f"flow at {args.size}x{args.size} over {len(errors)} frame pairs of {args.sequences} phantom sequences: "
          f"median end-point error per frame (pixels of the model input): median {np.median(errors):.2f}, "
          f"p90 {np.percentile(errors, 90):.2f}, max {errors.max():.2f}; time per call min {times.min():.3f} ms, "
          f"q25 {np.percentile(times, 25):.3f} ms")


# ----------------------------------------------------------------------------------------------- gif


def overlay_palette(greys: int):
    """One fixed palette for every frame (small file, no flicker of its own): `greys` grey levels, the overlay's
    amber tint over four of them, the amber outline, the truth's green and white for the labels."""
    from PIL import Image

    from device_runtime.outputs.overlay import COLOUR

    amber = np.array(COLOUR[::-1], float)  # the overlay's BGR as RGB
    colours = [np.full(3, v) for v in np.linspace(0, 255, greys)]
    colours += [0.65 * np.full(3, v) + 0.35 * amber for v in np.linspace(40, 220, 4)]
    colours += [amber, np.array([80.0, 200, 80]), np.full(3, 255.0)]
    palette = Image.new("P", (1, 1))
    palette.putpalette([int(round(c)) for colour in colours for c in colour])
    return palette


def gif(args) -> None:
    from PIL import Image

    from device_runtime.outputs.overlay import OverlayRenderer
    from training.data.sequences import phantom_sequence

    manifest = load_manifest(args.bundle)
    params = settings_of(manifest, args)
    sequence = phantom_sequence(args.seed, args.index, args.frames)
    net = open_backend(Path(args.bundle), manifest, args.backend, "auto", args.threads)
    try:
        predicted = predict_sequence(net, manifest, sequence)
    finally:
        net.close()
    plain = plain_masks(predicted.prob, manifest)
    stable, _ = filtered_masks(predicted.images, predicted.prob, flows_of(predicted.images), params, manifest)
    renderer, side = OverlayRenderer(), args.panel
    pictures = []
    for t in range(0, len(predicted.images), args.step):
        frame = cv2.resize(sequence.frames[t], (side, side), interpolation=cv2.INTER_AREA)
        truth = cv2.resize(predicted.truth[t], (side, side), interpolation=cv2.INTER_NEAREST)
        panels = []
        for label, masks in (("plain", plain), ("stabilised", stable)):
            mask = cv2.resize(masks[t], (side, side), interpolation=cv2.INTER_NEAREST)
            panel = renderer.render(frame, mask).copy()
            contours, _ = cv2.findContours(truth, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(panel, contours, -1, (80, 200, 80), 1)  # the truth, thin green
            cv2.putText(panel, label, (4, side - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
            panels.append(panel)
        pictures.append(Image.fromarray(cv2.cvtColor(np.hstack(panels), cv2.COLOR_BGR2RGB)))
    frames = [p.quantize(palette=overlay_palette(args.greys), dither=Image.Dither.NONE) for p in pictures]
    out = Path(args.out)
    with atomic_path(out) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / args.fps),
                       loop=0, optimize=True)
    print(f"{out}: {len(frames)} frames of {2 * side}x{side} (every {args.step}. of sequence {args.index}, seed "
          f"{args.seed}), {out.stat().st_size / 1024:.0f} KiB (amber: the mask; green: the truth)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = parser.add_subparsers(dest="part", required=True)
    for name in ("quality", "gif"):
        sub = parts.add_parser(name)
        sub.add_argument("--bundle", type=Path, help="default RUN/bundle")
        sub.add_argument("--run-dir", type=Path, help="pseudo-videos of this run's --split frames")
        sub.add_argument("--alpha", type=float)
        sub.add_argument("--t-high", type=float)
        sub.add_argument("--t-low", type=float)
        sub.add_argument("--backend", default="auto")
        sub.add_argument("--threads", type=int, default=0)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--frames", type=int, default=100)
    quality_parser, gif_parser = parts.choices["quality"], parts.choices["gif"]
    quality_parser.add_argument("--phantom", action="store_true", help="phantom sequences")
    quality_parser.add_argument("--data", type=Path, help="pseudo-videos of every labelled frame under this folder")
    quality_parser.add_argument("--mask-label", type=int, help="with --data: nerve = mask == L (usgra-seg: 1)")
    quality_parser.add_argument("--split", default="test", help="with --run-dir: which split's frames (default test)")
    quality_parser.add_argument("--sequences", type=int, default=20)
    quality_parser.add_argument("--json", type=Path, help="also write every sequence's scores here")
    quality_parser.add_argument("--no-warp", action="store_true",
                                help="ablation: the filter without the optical flow (history not moved)")
    gif_parser.add_argument("--out", type=Path, default=REPO / "docs" / "figures" / "temporal_phantom.gif")
    gif_parser.add_argument("--index", type=int, default=0, help="which phantom sequence of --seed")
    gif_parser.add_argument("--panel", type=int, default=144, help="side of each panel in pixels")
    gif_parser.add_argument("--greys", type=int, default=12, help="grey levels of the palette (default 12)")
    gif_parser.add_argument("--step", type=int, default=2, help="every this many frames (default 2)")
    gif_parser.add_argument("--fps", type=float, default=10)
    flow_parser = parts.add_parser("flow")
    flow_parser.add_argument("--size", type=int, default=320)
    flow_parser.add_argument("--sequences", type=int, default=6)
    flow_parser.add_argument("--frames", type=int, default=100)
    flow_parser.add_argument("--seed", type=int, default=0)
    time_parser = parts.add_parser("timing")
    time_parser.add_argument("--size", type=int, default=320)
    time_parser.add_argument("--frames", type=int, default=200)
    time_parser.add_argument("--seed", type=int, default=0)
    time_parser.add_argument("--repeat", type=int, default=2, help="device runs per setting")
    time_parser.add_argument("--threads", type=int, default=0)
    time_parser.add_argument("--bundle", type=Path, help="a bundle of input --size (default: an untrained one)")
    time_parser.add_argument("--no-runs", action="store_true", help="only the filter's own cost")
    args = parser.parse_args()
    if args.part in ("quality", "gif") and args.bundle is None:
        if args.run_dir is None:
            parser.error("give --bundle or --run-dir")
        args.bundle = args.run_dir / "bundle"
    {"quality": quality, "timing": timing, "flow": flow, "gif": gif}[args.part](args)


if __name__ == "__main__":
    main()
