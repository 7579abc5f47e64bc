"""Why low-bit activations collapse: tables of per-tensor sensitivity, activation ranges, whole-model drift and a QAT
run's trajectories (issue 33; docs/QUANTIZATION.md, "Low-bit activations").

    PYTHONPATH=. python scripts/diag_lowbit.py --run-dir RUN [--qat NAME] [--tables sensitivity ranges drift
        trajectory bias-reference cliff allocation start-kinds] [--variants 4:pct 3:pct 3:mse-tight] [--cliff-bits 3]
        [--val-frames N] [--observe-frames 32] [--top 25] [--json OUT]

RUN is a tuned float run (checkpoints/best.pt). Everything is measured on its validation split, best-threshold Dice
(the QAT log's val_best_dice), the model in eval mode with BatchNorm folded as QAT folds it.

- sensitivity: one quantizer at a time at b bits, every other tensor float; the drop against the float model. A
  variant is BITS:INIT[-tight]: INIT pct = the step QAT picks today (the activation_percentile of |x| at b bits,
  signed grid), mse = the squared-error search; -tight = the integer range split as the data are (FakeQuant
  .set_tight). Weights (per channel, the MSE clip QAT uses) are measured once per bitwidth.
- ranges: each activation's float distribution on the observed training frames, the step the percentile rule
  picks at 4 and 3 bits, the relative squared error (what readers see: through ReLU where they all apply it) of
  that grid and of the MSE-tight one, and the share of non-zero values that round to zero.
- drift: every quantizer at once at WbAb, no fine-tuning (pct signed, mse-tight, mse-tight with bias correction):
  the Dice, and per convolution the shift of its output channels' means in units of their float standard
  deviation (folded BatchNorm cannot re-normalise a shifted channel) and the ratio of standard deviations.
- trajectory: RUN/qat/NAME/metrics.jsonl per epoch: losses, Dice, mean bits, and how far the steps moved.
- bias-reference: RUN/qat/NAME's best checkpoint as trained, after a bias correction towards the float model's channel
  means (what a learned run's freeze did before 2026-12-06), and after one towards its own means (what it does now).
- allocation: where RUN/qat/NAME (a learned-bits run) spends its bits, by kind: each kind's share of the live weights
  and of the convolution inputs' elements (the weights of the run's means, qat.bits), its mean bits and their range;
  set beside the sensitivity or cliff table, whether the bits went where the damage is. Where the run's bits were
  allocated (allocation.json, weight_allocation.json), how many moved from there, by kind. No frame is scored.
- cliff: RUN/qat/NAME's best checkpoint (a fine-tuned low-bit run, e.g. W4A4) with its sub-8-bit quantizers lowered
  to --cliff-bits as a bit schedule's next stage lowers them (steps re-chosen, biases corrected towards the model's
  own means): all of them, each kind alone, all but each kind, then kinds kept at the run's bits one by one (the most
  harmful alone first) until within 0.05 of the run; validation Dice before any training at the new bits. Which
  kinds' last bit the model cannot lose (fold 2's W3A3 died in one epoch after the 4 -> 3 stage).
- start-kinds: RUN/qat/NAME's start (a fixed-bits run's model before epoch 1, e.g. an allocated W2A2) as started,
  and with the float model's biases (its bias correction undone): weights alone, activations alone, each activation
  kind below 8 bits alone and all but it. Which side and which kinds kill it before any training.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from device_runtime.core.errors import InputError
from qat.bits import bits_table
from qat.bias_correction import conv_output_moments, correct_biases, own_moments
from qat.checkpoint import load_qat_model
from qat.prepare import initialise_steps, observe_activations, prepare_qat, quant_convs
from qat.quantizers import integer_range
from device_runtime.core.fileio import write_json
from qat.sensitivity import describe, observe, only_quantizers, relu_read_ids, sensitivity, weight_of
from qat.step_init import mse_activation_grid
from training.checkpoint import load_model
from training.stages import split_arrays
from training.train import validate

TABLES = ("sensitivity", "ranges", "drift", "trajectory", "bias-reference", "cliff", "allocation", "start-kinds")
# the tables of one QAT run (--qat)
WITH_QAT = {"trajectory", "bias-reference", "cliff", "allocation", "start-kinds"}


def parse_variant(text: str) -> tuple[int, str, bool]:
    bits, _, rest = text.partition(":")
    init, _, tight = rest.partition("-")
    if not bits.isdigit() or not 2 <= int(bits) <= 8 or init not in ("pct", "mse") or tight not in ("", "tight"):
        raise InputError(f"--variants: each is BITS:pct|mse[-tight], e.g. 3:mse-tight, got {text!r}")
    return int(bits), "percentile" if init == "pct" else "mse", tight == "tight"


def _batches(images: np.ndarray, count: int, size: int = 8):
    frames = torch.from_numpy(np.ascontiguousarray(images[:count]))[:, None]
    return [frames[i:i + size] for i in range(0, len(frames), size)]


def _row(cells, widths) -> str:
    return "  ".join(str(c)[:w].ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def table_sensitivity(ctx, variants, top: int) -> dict:
    """Dice drop per quantizer and variant; the rows with the largest drop, then a summary per kind."""
    columns, weights_done = {}, {}
    for variant in variants:
        bits, init, tight = parse_variant(variant)
        acts = [i for i in ctx.infos if not i.is_weight]
        columns[variant] = sensitivity(ctx.model, acts, bits, ctx.score, ctx.seen, init, tight)
        if bits not in weights_done:
            weights_done[bits] = sensitivity(ctx.model, [i for i in ctx.infos if i.is_weight], bits, ctx.score, ctx.seen)
        columns[variant].update(weights_done[bits])
        print(f"  [{variant}: {time.perf_counter() - ctx.start:.0f} s]", file=sys.stderr, flush=True)
    drops = {v: {name: ctx.float_dice - d for name, d in col.items()} for v, col in columns.items()}
    worst = sorted(ctx.infos, key=lambda i: -max(drops[v][i.name] for v in variants))
    widths = [44, 18] + [12] * len(variants)
    print(f"\nSensitivity: Dice drop, one tensor at a time (float best-T Dice {ctx.float_dice:.4f}); top {top}")
    print(_row(["quantizer", "kind"] + list(variants), widths))
    for info in worst[:top]:
        print(_row([info.name, info.kind] + [f"{drops[v][info.name]:+.4f}" for v in variants], widths))
    print("\nBy kind: mean / max drop (n)")
    by_kind = defaultdict(list)
    for info in ctx.infos:
        by_kind[info.kind].append(info.name)
    for kind, names in sorted(by_kind.items(), key=lambda kv: -max(drops[variants[-1]][n] for n in kv[1])):
        cells = [f"{statistics.mean(drops[v][n] for n in names):+.3f}/{max(drops[v][n] for n in names):+.3f}"
                 for v in variants]
        print(_row([kind, f"n={len(names)}"] + cells, [44, 18] + [14] * len(variants)))
    return {"float_dice": ctx.float_dice, "drops": drops, "kinds": {i.name: i.kind for i in ctx.infos}}


def _errors(values: torch.Tensor, relu: bool, bits: int) -> dict:
    """Relative squared error of the percentile-signed grid and of the MSE-tight one at `bits`, and the share of
    non-zero values the percentile grid rounds to zero."""
    seen_by_readers = values.clamp_min(0) if relu else values
    energy = float((seen_by_readers ** 2).mean()) or 1e-12
    qmin, qmax = integer_range(bits, narrow=False)
    reach = float(torch.quantile(values.abs(), 0.9999))
    step = max(reach, 1e-8) / qmax
    q = torch.clamp(torch.round(values / step), qmin, qmax) * step
    q = q.clamp_min(0) if relu else q
    levels = 2 ** bits
    ranges = [(0, levels - 1)] if relu else [(-z, levels - 1 - z) for z in range(0, levels // 2 + 1)]
    t_min, t_max, t_step = mse_activation_grid(seen_by_readers, ranges)
    tight = torch.clamp(torch.round(seen_by_readers / t_step), t_min, t_max) * t_step
    nonzero = seen_by_readers != 0
    return {"step_pct": step, "err_pct": float(((q - seen_by_readers) ** 2).mean()) / energy,
            "zeroed_pct": float(((q == 0) & nonzero).sum()) / max(int(nonzero.sum()), 1),
            "err_tight": float(((tight - seen_by_readers) ** 2).mean()) / energy, "range_tight": [t_min, t_max]}


def table_ranges(ctx, top: int, order: list[str] | None) -> dict:
    relu = relu_read_ids(ctx.model)
    rows = {}
    for info in ctx.infos:
        if info.is_weight:
            continue
        v = ctx.seen[id(info.quantizer)].values()
        p = torch.quantile(v, torch.tensor([0.01, 0.5, 0.99, 0.9999])).tolist()
        rows[info.name] = {"kind": info.kind, "min": float(v.min()), "p1": p[0], "p50": p[1], "p99": p[2],
                           "p9999": p[3], "max": float(v.max()), "neg": float((v < 0).float().mean()),
                           "zero": float((v == 0).float().mean()), "relu_read": id(info.quantizer) in relu,
                           **{f"b{b}": _errors(v, id(info.quantizer) in relu, b) for b in (4, 3)}}
    names = [n for n in (order or rows) if n in rows][:top]
    widths = [44, 16, 8, 8, 8, 8, 6, 6, 9, 8, 8, 8, 8, 8]
    print(f"\nActivation ranges (float, training frames) and grids at 4 / 3 bits; top {top}")
    print(_row(["quantizer", "kind", "min", "p50", "p99.99", "max", "neg", "relu", "step3pct", "err4pct",
                "err4tgt", "err3pct", "err3tgt", "zero3pct"], widths))
    for n in names:
        r = rows[n]
        print(_row([n, r["kind"], f"{r['min']:.3g}", f"{r['p50']:.3g}", f"{r['p9999']:.3g}", f"{r['max']:.3g}",
                    f"{r['neg']:.2f}", "y" if r["relu_read"] else "", f"{r['b3']['step_pct']:.3g}",
                    f"{r['b4']['err_pct']:.3f}", f"{r['b4']['err_tight']:.3f}", f"{r['b3']['err_pct']:.3f}",
                    f"{r['b3']['err_tight']:.3f}", f"{r['b3']['zeroed_pct']:.2f}"], widths))
    print("\nBy kind: median relative error at 3 bits, percentile-signed -> MSE-tight; median share zeroed")
    by_kind = defaultdict(list)
    for r in rows.values():
        by_kind[r["kind"]].append(r)
    for kind, rs in sorted(by_kind.items()):
        print(f"  {kind:<20} n={len(rs):<3} err3 {statistics.median(r['b3']['err_pct'] for r in rs):.3f} -> "
              f"{statistics.median(r['b3']['err_tight'] for r in rs):.3f}   zeroed "
              f"{statistics.median(r['b3']['zeroed_pct'] for r in rs):.2f}   min {min(r['min'] for r in rs):.3g}")
    return rows


def table_drift(ctx, bits_list, frames) -> dict:
    with only_quantizers(ctx.model):
        reference = conv_output_moments(ctx.model, frames)
    found = {}
    print("\nWhole model at WbAb, no fine-tuning: best-T Dice; output drift |mean shift| / float std per conv")
    for bits in bits_list:
        for init, tight, corrected in (("percentile", False, False), ("mse", True, False), ("mse", True, True)):
            model = prepare_qat(copy.deepcopy(ctx.float_model), weight_bits=bits, activation_bits=bits,
                                learn_weight_bits=False, learn_activation_bits=False,
                                activation_range="tight" if tight else "signed").eval()
            initialise_steps(model, ctx.observe_batches, ctx.percentile, init)
            if corrected:  # on the training frames the steps came from; the drift below is on validation
                correct_biases(model, ctx.observe_batches)
            moments = conv_output_moments(model, frames)
            drift = {n: float(((moments[n][0] - m) .abs() / s.clamp_min(1e-6)).mean()) for n, (m, s) in reference.items()}
            ratio = {n: float((moments[n][1] / s.clamp_min(1e-6)).median()) for n, (m, s) in reference.items()}
            dice = ctx.score(model)
            label = f"W{bits}A{bits} {'mse-tight' if tight else 'pct-signed'}{'+bias-corr' if corrected else ''}"
            worst = sorted(drift, key=lambda n: -drift[n])[:5]
            print(f"  {label:<29} Dice {dice:.4f} ({dice - ctx.float_dice:+.4f})  drift median "
                  f"{statistics.median(drift.values()):.3f} max {max(drift.values()):.3f}  std ratio median "
                  f"{statistics.median(ratio.values()):.3f}\n    largest drift: "
                  + ", ".join(f"{n} {drift[n]:.2f}" for n in worst))
            found[label] = {"dice": dice, "drift": drift, "std_ratio": ratio}
    return found


def table_trajectory(qat_dir: Path) -> list:
    path = qat_dir / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: not found (give --qat NAME of a run under RUN/qat/)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(f"\nQAT trajectory: {path}")
    print(f"{'ep':>3} {'loss':>7} {'task':>7} {'bitcost':>7} {'Dice@.5':>7} {'best-T':>7} {'W':>5} {'A':>5}  steps moved "
          f"since the previous epoch (epoch 1: since initialised; median / max |d log2 step|, activations), bits changed")
    previous = records[0].get("steps_start") if records else None
    for r in records:
        steps = r.get("steps", {})
        moved = ""
        if previous and steps:
            acts = [n for n in steps if not n.endswith("weight_quant") and n in previous]
            deltas = {n: abs(steps[n][1] - previous[n][1]) for n in acts}
            changed = sum(steps[n][0] != previous[n][0] for n in steps if n in previous)
            top = max(deltas, key=deltas.get) if deltas else ""
            moved = (f"{statistics.median(deltas.values()):.3f} / {deltas[top]:.3f} ({top}); {changed} bits changed"
                     if deltas else "")
        elif not steps:
            moved = "(no step log: a run before scripts/diag_lowbit.py)"
        print(f"{r['epoch']:>3} {r['train_loss']:>7.4f} {r.get('task', float('nan')):>7.4f} "
              f"{r.get('bit_cost', float('nan')):>7.4f} {r['val_dice']:>7.4f} {r['val_best_dice']:>7.4f} "
              f"{r.get('mean_weight_bits', float('nan')):>5.2f} {r.get('mean_activation_bits', float('nan')):>5.2f}  {moved}")
        previous = steps or previous
    return records


class RunFrames:
    """A run's frames for the tables: `observe_frames` training frames in batches (`observe_batches`, what steps and
    biases are set from) and the first `val_frames` validation frames (0: all), with the score on them."""

    def __init__(self, run_dir: Path, cfg, val_frames: int, observe_frames: int):
        self.cfg = cfg.replace(amp=False)
        train, _, _ = split_arrays(run_dir, "train", cfg)
        val, val_masks, _ = split_arrays(run_dir, "val", cfg)
        self.val, self.val_masks = val[:val_frames or None], val_masks[:val_frames or None]
        self.observe_batches = _batches(train, observe_frames)

    def score(self, model) -> float:
        """Best-threshold Dice on the validation frames."""
        return validate(model, self.val, self.val_masks, torch.device("cpu"), self.cfg)["val_best_dice"]


class QatRun(RunFrames):
    """RUN/qat/NAME's best checkpoint (eval mode) and its QAT config, with the run's frames."""

    def __init__(self, run_dir: Path, qat_name: str, val_frames: int, observe_frames: int):
        self.path = qat_checkpoint(run_dir, qat_name)
        self.model, _, cfg, self.qcfg = load_qat_model(self.path)
        super().__init__(run_dir, cfg, val_frames, observe_frames)


def qat_checkpoint(run_dir: Path, qat_name: str) -> Path:
    """RUN/qat/NAME's best checkpoint, or a one-line error."""
    path = run_dir / "qat" / qat_name / "checkpoints" / "best.pt"
    if not path.is_file():
        raise InputError(f"{path}: not found (give --qat NAME of a finished run under RUN/qat/)")
    return path


def table_allocation(run_dir: Path, qat_name: str) -> dict:
    """Where RUN/qat/NAME spends its bits, by kind (module doc): {"weights" | "activations": {kind: {"count",
    "share", "mean_bits", "min_bits", "max_bits"}}, "mean_weight_bits", "mean_activation_bits"}. Weighted as the run's
    means are (qat.bits: weights by live weights, activations by each convolution's input elements), so the kinds'
    shares times their means add up to bits.json's means."""
    path = qat_checkpoint(run_dir, qat_name)
    model, _, cfg, _ = load_qat_model(path)
    kind_of = {id(info.quantizer): info.kind for info in describe(model)}
    rows = {"weights": defaultdict(list), "activations": defaultdict(list)}  # kind: [(bits, count), ...]
    # bits.json's own rows (qat.bits.bits_table, one per quantized convolution, in quant_convs' order)
    for (_, conv), layer in zip(quant_convs(model), bits_table(model, tuple(cfg.input_size))["layers"]):
        rows["weights"][kind_of[id(conv.weight_quant)]].append((layer["weight_bits"], layer["live_params"]))
        rows["activations"][kind_of[id(conv.input_quant)]].append((layer["activation_bits"],
                                                                    layer["activation_elements"]))
    found = {}
    print(f"\nBit allocation: {path} (weights weighted by live weights, activations by convolution input elements)")
    for side, by_kind in rows.items():
        total = sum(n for pairs in by_kind.values() for _, n in pairs)
        table = {kind: {"count": len(pairs), "share": sum(n for _, n in pairs) / total,
                        "mean_bits": sum(b * n for b, n in pairs) / sum(n for _, n in pairs),
                        "min_bits": min(b for b, _ in pairs), "max_bits": max(b for b, _ in pairs)}
                 for kind, pairs in by_kind.items()}
        found[side] = table
        found[f"mean_{side[:-1]}_bits"] = sum(r["share"] * r["mean_bits"] for r in table.values())
        print(f"  {side:<28} {'convs':>5} {'share':>7} {'mean bits':>9} {'range':>7}")
        for kind, r in sorted(table.items(), key=lambda kv: -kv[1]["mean_bits"]):
            print(f"  {kind:<28} {r['count']:>5} {r['share']:>7.1%} {r['mean_bits']:>9.2f} "
                  f"{r['min_bits']:>3}-{r['max_bits']:<3}")
        print(f"  {'all':<28} {'':>5} {'':>7} {found[f'mean_{side[:-1]}_bits']:>9.2f}")
    found["moved"] = moved_from_allocation(path.parents[1], model)
    return found


def moved_from_allocation(qat_dir: Path, model) -> dict:
    """How far the bits moved from the allocation they started at (allocation.json, weight_allocation.json; absent:
    {}): {"weights" | "activations": {kind: {"tensors", "changed", "mean_change"}}}, by quantizer, the model's bits
    now against the allocated ones. Zero for fixed bits; where the bits learned, what the gradient and the freeze did."""
    from qat.schedule import ALLOCATION_FILES

    now = {info.name: info.quantizer.bits() for info in describe(model)}
    found = {}
    for side, name in ALLOCATION_FILES.items():
        path = qat_dir / name
        if not path.is_file():
            continue
        by_kind = defaultdict(list)
        for row in json.loads(path.read_text(encoding="utf-8"))["tensors"]:
            by_kind[row["kind"]].append(now[row["name"]] - row["bits"])
        table = {kind: {"tensors": len(changes), "changed": sum(c != 0 for c in changes),
                        "mean_change": sum(changes) / len(changes)} for kind, changes in by_kind.items()}
        found[f"{side}s"] = table
        changed = sum(r["changed"] for r in table.values())
        print(f"  {side} bits moved from the allocation ({name}): {changed} of "
              f"{sum(r['tensors'] for r in table.values())} tensors")
        for kind, r in sorted(table.items()):
            if r["changed"]:
                print(f"    {kind:<26} {r['changed']:>3} of {r['tensors']:<3} mean change {r['mean_change']:+.2f} bits")
    return found


def table_start_kinds(run_dir: Path, qat_name: str, val_frames: int, observe_frames: int) -> dict:
    """The start-kinds table (module doc): RUN/qat/NAME's start (checkpoints/start.pt, a fixed-bits run's model before
    epoch 1), scored as it is, with the float model's biases (the bias correction undone), then with those biases:
    weights alone, activations alone, and each activation kind below 8 bits alone and all but it. Which side and
    which kinds the model cannot hold together, before any training."""
    from qat.checkpoint import START_NAME, build_qat_model

    path = run_dir / "qat" / qat_name / "checkpoints" / START_NAME
    if not path.is_file():
        raise InputError(f"{path}: not found (start-kinds needs a fixed-bits run's start)")
    model, checkpoint, cfg, qcfg = load_qat_model(path)
    frames = RunFrames(run_dir, cfg, val_frames, observe_frames)
    found = {"as started": frames.score(model)}
    float_model = load_model(run_dir / "checkpoints" / "best.pt")[0]
    folded = dict(quant_convs(build_qat_model(checkpoint["arch"], qcfg, float_model, init_steps=False)))
    with torch.no_grad():
        for name, conv in quant_convs(model):
            conv.bias.copy_(folded[name].bias)
    infos = describe(model)
    weights = [i.quantizer for i in infos if i.is_weight]
    kinds = defaultdict(list)
    for info in infos:
        if not info.is_weight and info.quantizer.bits() < 8:
            kinds[info.kind].append(info.quantizer)
    lowered = [q for qs in kinds.values() for q in qs]

    def score(active) -> float:
        with only_quantizers(model, active):
            return frames.score(model)

    found["float biases: all quantized"] = frames.score(model)
    found["float biases: none (the float model)"] = score([])
    found["float biases: weights alone"] = score(weights)
    found["float biases: activations below 8 bits alone"] = score(lowered)
    by_kind = {}
    for kind, qs in kinds.items():
        ids = {id(q) for q in qs}
        rest = [q for q in lowered if id(q) not in ids]
        by_kind[kind] = {"bits": sorted(q.bits() for q in qs), "alone": score(qs), "all but it": score(rest)}
    found["activation kinds"] = by_kind
    print(f"\nStart by kind: {path} ({len(frames.val)} validation frames, best-threshold Dice)")
    for key, value in found.items():
        if key != "activation kinds":
            print(f"  {key:<44} {value:.3f}")
    print(f"  {'activation kind (float biases, weights float)':<44} {'alone':>6} {'all but it':>10}  bits")
    for kind, r in by_kind.items():
        print(f"  {kind:<44} {r['alone']:>6.3f} {r['all but it']:>10.3f}  {r['bits']}")
    return found


def table_bias_reference(run_dir: Path, qat_name: str, val_frames: int, observe_frames: int) -> dict:
    run = QatRun(run_dir, qat_name, val_frames, observe_frames)
    path, model, frames, score, val = run.path, run.model, run.observe_batches, run.score, run.val
    towards_float, towards_own = copy.deepcopy(model), copy.deepcopy(model)
    found = {"as trained": score(model)}
    correct_biases(towards_float, frames)
    found["corrected towards the float model's means"] = score(towards_float)
    correct_biases(towards_own, frames, own_moments(towards_own, frames))
    found["corrected towards its own means"] = score(towards_own)
    print(f"\nBias correction of a fine-tuned model: {path} (best-T Dice on {len(val)} validation frames, biases "
          f"corrected on {observe_frames} training frames)")
    for label, dice in found.items():
        print(f"  {label:<45} {dice:.4f}")
    return found


def observed(model, frames, qcfg) -> dict:
    """{activation quantizer name: what it saw} on `frames`, by the run's rule (qat.prepare.observe_activations: the
    float model's pass, whatever the bits, so one pass serves every row of the cliff table); by name, as the rows
    lower copies of the model."""
    seen, _ = observe_activations(model, frames, qcfg.activation_percentile, qcfg.activation_init)
    return {info.name: seen[id(info.quantizer)] for info in describe(model) if not info.is_weight}


def lowered_kinds(model, infos, kinds: set[str], bits: int, qcfg, frames, reference, seen: dict) -> torch.nn.Module:
    """A copy of the QAT model with every quantizer of `infos` whose kind is in `kinds` frozen at `bits`, as a bit
    schedule's stage lowers it (qat.schedule.BitPlan): weight steps re-chosen from the weights, activation steps from
    what they saw (`seen`, from `observed`: the run's rule), then with the run's bias correction the biases towards
    `reference`."""
    lowered = copy.deepcopy(model)
    with torch.no_grad():
        for info in infos:
            if info.kind in kinds:
                q = lowered.get_submodule(info.name)
                q.freeze_bits(bits)
                if q.per_channel:
                    q.init_from_tensor(weight_of(lowered, info))
                else:
                    q.observation = seen[info.name]
                    q.init_from_samples()
    if qcfg.bias_correction:
        correct_biases(lowered, frames, reference)
    return lowered.eval()


def table_cliff(run_dir: Path, qat_name: str, bits: int, val_frames: int, observe_frames: int) -> dict:
    """The cliff table (module doc): RUN/qat/NAME lowered to `bits`, all, by kind, and kinds kept cumulatively."""
    if not 2 <= bits <= 7:
        raise InputError(f"--cliff-bits: 2 to 7 bits, got {bits}")
    run = QatRun(run_dir, qat_name, val_frames, observe_frames)
    path, model, qcfg, frames, score, val = run.path, run.model, run.qcfg, run.observe_batches, run.score, run.val
    # the quantizers a schedule would lower: those the run keeps below 8 bits and above the new bits
    infos = [i for i in describe(model) if bits < i.quantizer.bits() < 8]
    if not infos:
        raise InputError(f"{path}: no quantizer between {bits} and 8 bits to lower (--cliff-bits)")
    kinds = list(dict.fromkeys(i.kind for i in infos))
    reference = own_moments(model, frames) if qcfg.bias_correction else None
    seen = observed(model, frames, qcfg)
    lower = lambda chosen: lowered_kinds(model, infos, chosen, bits, qcfg, frames, reference, seen)  # noqa: E731
    found = {"as trained": score(model)}
    print(f"\nCliff: {path} lowered to {bits} bits (best-T Dice on {len(val)} validation frames, no training at the "
          f"new bits; steps and biases re-chosen on {observe_frames} training frames)")
    print(f"  {'as trained':<44} {found['as trained']:.4f}")
    found["all lowered"] = score(lower(set(kinds)))
    print(f"  {'all ' + str(len(infos)) + ' lowered':<44} {found['all lowered']:.4f}")
    print(f"  {'kind (quantizers)':<32} {'alone lowered':>13} {'all but it lowered':>19}")
    for kind in kinds:
        count = sum(i.kind == kind for i in infos)
        alone, others = score(lower({kind})), score(lower(set(kinds) - {kind}))
        found[kind] = {"quantizers": count, "alone": alone, "all_but": others}
        print(f"  {f'{kind} ({count})':<32} {alone:>13.4f} {others:>19.4f}", flush=True)
    # how much must stay at the run's bits: kinds kept, the most harmful alone first, until within 0.05 of as trained
    print("  kept at the run's bits, cumulatively (the most harmful alone first), the rest lowered:")
    kept, found["kept cumulatively"] = [], []
    for kind in sorted(kinds, key=lambda k: found[k]["alone"])[:-1]:
        kept.append(kind)
        dice = score(lower(set(kinds) - set(kept)))
        count = sum(i.kind in kept for i in infos)
        found["kept cumulatively"].append({"kept": list(kept), "quantizers_kept": count, "dice": dice})
        print(f"    + {kind:<30} {dice:.4f}  ({count} of {len(infos)} quantizers kept)", flush=True)
        if dice >= found["as trained"] - 0.05:
            break
    return found


class Context(RunFrames):
    """The float model, its diagnosis copy (every quantizer at 8 bits, BN folded), the frames and the score."""

    def __init__(self, run_dir: Path, val_frames: int, observe_frames: int, percentile: float):
        self.start = time.perf_counter()
        self.float_model, _, cfg = load_model(run_dir / "checkpoints" / "best.pt")
        super().__init__(run_dir, cfg, val_frames, observe_frames)
        self.percentile = percentile
        self.model = prepare_qat(copy.deepcopy(self.float_model), weight_bits=8, activation_bits=8,
                                 learn_weight_bits=False, learn_activation_bits=False).eval()
        self.infos = describe(self.model)
        self.seen = observe(self.model, self.observe_batches, percentile)
        initialise_steps(self.model, self.observe_batches, percentile)  # 8-bit steps: the int32 bias grids of s_in s_w
        self.float_dice = self.score(self.float_model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a tuned float run")
    parser.add_argument("--qat", metavar="NAME", help="a QAT run RUN/qat/NAME whose metrics.jsonl to read")
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=[t for t in TABLES if t != "start-kinds"],
                        help="default: all but start-kinds, which needs a fixed-bits run's start (trajectory, "
                             "bias-reference, cliff and allocation only with --qat)")
    parser.add_argument("--variants", nargs="+", default=["4:pct", "3:pct", "3:mse-tight"])
    parser.add_argument("--drift-bits", nargs="+", type=int, default=[4, 3])
    parser.add_argument("--cliff-bits", type=int, default=3, help="the cliff table lowers the --qat run to these")
    parser.add_argument("--val-frames", type=int, default=0, help="validation frames scored (0: all)")
    parser.add_argument("--observe-frames", type=int, default=32, help="training frames the steps are set from")
    parser.add_argument("--percentile", type=float, default=99.99, help="as QAT's activation_percentile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    try:
        for variant in args.variants:
            parse_variant(variant)
        run_dir = Path(args.run_dir)
        if not (run_dir / "checkpoints" / "best.pt").is_file():
            raise InputError(f"{run_dir / 'checkpoints' / 'best.pt'}: not found (a tuned float run is needed)")
        found = {}
        if "trajectory" in args.tables and args.qat:
            found["trajectory"] = table_trajectory(run_dir / "qat" / args.qat)
        if "bias-reference" in args.tables and args.qat:
            found["bias_reference"] = table_bias_reference(run_dir, args.qat, args.val_frames, args.observe_frames)
        if "cliff" in args.tables and args.qat:
            found["cliff"] = table_cliff(run_dir, args.qat, args.cliff_bits, args.val_frames, args.observe_frames)
        if "allocation" in args.tables and args.qat:
            found["allocation"] = table_allocation(run_dir, args.qat)
        if "start-kinds" in args.tables and args.qat:
            found["start_kinds"] = table_start_kinds(run_dir, args.qat, args.val_frames, args.observe_frames)
        if set(args.tables) - WITH_QAT:
            ctx = Context(run_dir, args.val_frames, args.observe_frames, args.percentile)
            with only_quantizers(ctx.model):
                folded = ctx.score(ctx.model)
            print(f"float best-T Dice {ctx.float_dice:.4f} on {len(ctx.val)} validation frames; BN folded, every "
                  f"quantizer bypassed {folded:.4f}; {len(ctx.infos)} quantizers")
            if "sensitivity" in args.tables:
                found["sensitivity"] = table_sensitivity(ctx, args.variants, args.top)
            if "ranges" in args.tables:
                drops = found.get("sensitivity", {}).get("drops", {})
                order = sorted(drops[args.variants[-1]], key=lambda n: -drops[args.variants[-1]][n]) if drops else None
                found["ranges"] = table_ranges(ctx, args.top, order)
            if "drift" in args.tables:
                found["drift"] = table_drift(ctx, args.drift_bits, _batches(ctx.val, len(ctx.val)))
            print(f"\n[{time.perf_counter() - ctx.start:.0f} s]", file=sys.stderr)
    except InputError as err:
        raise SystemExit(f"error: {err}") from None
    if args.json:
        write_json(args.json, found)


if __name__ == "__main__":
    main()
