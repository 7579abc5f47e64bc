"""arm64 against x86: the helper that scripts/arm64_check.sh runs on both sides, and the comparison.

    python arm64_agreement.py files BUNDLE       # "precision path run|probe-only" of each ONNX file of the bundle
    python arm64_agreement.py probe --bundle B --model FILE --source FRAMES --out probe.npz
    python arm64_agreement.py compare --work WORK [--json OUT]

`probe` runs one ONNX file of a bundle over the frames through the runtime's own Segmenter (preprocess,
ONNX Runtime CPU, sigmoid, T*, morphology, resize) and keeps what `nerveseg-device run` does not write: the
probability map at the model's resolution, beside the model-resolution and frame-size masks. It imports only
numpy and device_runtime, so it runs inside the arm64 chroot with the single-file runtime on PYTHONPATH; it
takes any file of the bundle, also the INT8 graph made for TensorRT that `run --backend ort-cpu` never picks.
`compare` (host side) reads WORK/out/{arm64,x86}/BUNDLE/FILE/SET/: the probes and the masks `run` wrote, and
prints per file and frame set the mask Dice of arm64 against x86 (the runtime's masks at the frame's size,
each frame's Dice, both-empty = 1 as in the metrics), and max / mean |p_arm64 - p_x86| over all pixels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

DICE_GATE = 0.995  # the INT8 export's parity gate on mask Dice against its reference
SIDES = ("arm64", "x86")


def bundle_files(bundle: Path) -> list[tuple[str, str, bool]]:
    """(precision, relative path, whether `run --backend ort-cpu --precision P` runs it) of each ONNX file."""
    from device_runtime.backends.selection import select_model
    from device_runtime.core.manifest import load_manifest

    manifest = load_manifest(bundle)  # checks every file's sha256
    chosen = {p: select_model(manifest, "ort-cpu", p)[0].path for p in ("fp32", "int8") if manifest.file(p)}
    return [(f.precision, f.path, chosen.get(f.precision) == f.path) for f in manifest.files if f.format == "onnx"]


def probe(bundle: Path, model: str, source: str, out: Path, threads: int = 1) -> int:
    """Segment every frame of `source` with the bundle's file `model`; save names, probabilities and masks.

    The Segmenter is `run`'s, settings from the manifest: where a bundle turns temporal stabilisation on, the
    probe carries it over the frames in the same order, and its probabilities are the filtered ones."""
    from device_runtime.core.ort_session import OnnxRuntimeBackend
    from device_runtime.core.errors import InputError
    from device_runtime.core.fileio import atomic_path
    from device_runtime.core.manifest import load_manifest
    from device_runtime.pipeline import Segmenter
    from device_runtime.sources.dispatch import open_source
    from device_runtime.timing import Timings

    manifest = load_manifest(bundle)
    if model not in {f.path for f in manifest.files}:
        raise InputError(f"{bundle}: the manifest lists no file {model}")
    net = OnnxRuntimeBackend(bundle / model, manifest, "ort-cpu", [("CPUExecutionProvider", {})], threads)
    segment, timings = Segmenter(manifest, net), Timings(0)
    names, probs, model_masks, arrays = [], [], [], {}
    with open_source(source) as frames:
        while (frame := frames.capture()) is not None:
            result = segment(frame.image, timings)  # buffers are reused: copy before the next frame
            names.append(frame.name)
            probs.append(result.prob.copy())
            model_masks.append(result.model_mask.copy())
            arrays[f"mask/{frame.name}"] = result.mask.copy()
    net.close()
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append .npz to the temporary name
            np.savez_compressed(handle, names=np.array(names), prob=np.stack(probs),
                                model_mask=np.stack(model_masks), **arrays)
    return len(names)


def mask_dice(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """Per-frame Dice of two lists of binary masks (each pair of one shape); both empty = 1."""
    from device_runtime.core.metrics import confusion_counts, dice

    return np.array([float(dice(confusion_counts(x, y), reduction="none")) for x, y in zip(a, b)])


def agreement(arm: dict, x86: dict) -> dict:
    """Figures of one probe pair: {names, prob (N,h,w), masks (list at frame size)} for arm64 and for x86."""
    if list(arm["names"]) != list(x86["names"]):
        raise ValueError(f"the two sides segmented different frames: {arm['names']} vs {x86['names']}")
    dice = mask_dice(arm["masks"], x86["masks"])
    dp = np.abs(arm["prob"].astype(np.float64) - x86["prob"].astype(np.float64))
    flipped = int(sum(np.count_nonzero(a != b) for a, b in zip(arm["masks"], x86["masks"])))
    return {
        "frames": len(dice),
        "dice_min": float(dice.min()),
        "dice_mean": float(dice.mean()),
        "frames_below_gate": int(np.sum(dice < DICE_GATE)),
        "mask_pixels_differing": flipped,
        "mask_pixels": int(sum(m.size for m in arm["masks"])),
        "foreground_pixels_x86": int(sum(np.count_nonzero(m) for m in x86["masks"])),
        "dp_max": float(dp.max()),
        "dp_mean": float(dp.mean()),
        "dp_p99": float(np.quantile(dp, 0.99)),
    }


def load_probe(path: Path) -> dict:
    with np.load(path) as data:
        names = [str(n) for n in data["names"]]
        return {"names": names, "prob": data["prob"], "masks": [data[f"mask/{n}"] != 0 for n in names]}


def load_run_masks(folder: Path, names: list[str]) -> list[np.ndarray]:
    import cv2

    masks = []
    for name in names:
        mask = cv2.imread(str(folder / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        if mask is None:
            raise ValueError(f"{folder / name}.png: missing or unreadable")
        masks.append(mask != 0)
    return masks


def compare(work: Path) -> list[dict]:
    """One row per (bundle, file, frame set): probe agreement, and the CLI run's where `run` ran that file."""
    rows = []
    for probe_x86 in sorted((work / "out" / "x86").glob("*/*/*/probe.npz")):
        rel = probe_x86.parent.relative_to(work / "out" / "x86")
        bundle, file_label, frame_set = rel.parts
        sides = {"x86": load_probe(probe_x86), "arm64": load_probe(work / "out" / "arm64" / rel / "probe.npz")}
        row = {"bundle": (work / "bundles" / f"{bundle}.source").read_text().strip(), "file": file_label,
               "frame_set": frame_set, **agreement(sides["arm64"], sides["x86"])}
        run_dirs = {side: work / "out" / side / rel / "run" for side in SIDES}
        if all((d / "masks").is_dir() for d in run_dirs.values()):
            run_masks = {s: load_run_masks(run_dirs[s] / "masks", sides[s]["names"]) for s in SIDES}
            run_dice = mask_dice(run_masks["arm64"], run_masks["x86"])
            row["run_dice_min"] = float(run_dice.min())
            # the probe is the runtime's own pipeline: its masks must be the very masks `run` wrote, on each side
            row["run_equals_probe"] = all(np.array_equal(r, p) for s in SIDES
                                          for r, p in zip(run_masks[s], sides[s]["masks"]))
        rows.append(row)
    return rows


def verdict(rows: list[dict]) -> int:
    """Print the worst per-frame Dice; 0 when the files `run` picks on ONNX Runtime CPU all pass, else 2.

    A probe-only file (the INT8 graph with signed activations, made for TensorRT) is reported but does not
    decide: no CPU deployment runs it. Where no row was run by `run`, every row decides.
    """
    deciding = [r for r in rows if "run_dice_min" in r] or rows
    worst = min(r["dice_min"] for r in deciding)
    print(f"worst per-frame mask Dice arm64 vs x86 of the files the CPU runtime runs: {worst:.4f} "
          f"(gate {DICE_GATE}): {'PASS' if worst >= DICE_GATE else 'FAIL'}")
    others = [r for r in rows if r not in deciding]
    if others:
        print(f"(probe-only files, not deciding: worst {min(r['dice_min'] for r in others):.4f})")
    return 0 if worst >= DICE_GATE else 2


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'bundle':<34} {'file':<22} {'set':<7} {'n':>3} {'Dice min':>9} {'mean':>7} {'<gate':>5} "
             f"{'px diff':>8} {'max|dp|':>9} {'mean|dp|':>9} {'p99|dp|':>9}  run(Dice min, = probe)"]
    for r in rows:
        run = (f"{r['run_dice_min']:.4f}, {r['run_equals_probe']}" if "run_dice_min" in r
               else "not run (probe only)")
        lines.append(f"{r['bundle'][-34:]:<34} {r['file']:<22} {r['frame_set']:<7} {r['frames']:>3} "
                     f"{r['dice_min']:>9.4f} {r['dice_mean']:>7.4f} {r['frames_below_gate']:>5} "
                     f"{r['mask_pixels_differing']:>8} {r['dp_max']:>9.2e} {r['dp_mean']:>9.2e} "
                     f"{r['dp_p99']:>9.2e}  {run}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    files = sub.add_parser("files")
    files.add_argument("bundle", type=Path)
    p = sub.add_parser("probe")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--model", required=True, help="a file of the bundle, as its manifest names it")
    p.add_argument("--source", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("compare")
    c.add_argument("--work", type=Path, required=True)
    c.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from device_runtime.core.errors import InputError

    try:
        if args.command == "files":
            for precision, path, by_run in bundle_files(args.bundle):
                print(precision, path, "run" if by_run else "probe-only")
        elif args.command == "probe":
            print(f"probe: {probe(args.bundle, args.model, args.source, args.out, args.threads)} frames")
        else:
            rows = compare(args.work)
            if not rows:
                raise InputError(f"{args.work}/out/x86: no probe results to compare")
            print(format_rows(rows))
            if args.json:
                from device_runtime.core.fileio import write_json

                write_json(args.json, rows)
            return verdict(rows)
    except (InputError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
