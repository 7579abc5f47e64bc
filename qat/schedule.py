"""Which bits each quantizer trains at, epoch by epoch: the freeze of learned bits (with the weight and activation
budgets), a uniform run's progressive lowering (`bit_schedule`), and the tensors held at 8 bits as fragile.

Progressive lowering: a network quantized straight to 3 bits starts far from its float function; lowering the
bits in stages (8 -> 6 -> 4 -> 3), each stage starting from the one before, keeps it near. Zhuang et al. 2018
("Towards Effective Low-bitwidth Convolutional Neural Networks", CVPR: progressive quantization), and the
incremental precision schedules of Fromm et al. 2018 / Jung et al. 2019 ("Learning to quantize deep networks by
optimizing quantization intervals with task loss", CVPR). At each stage the steps are re-chosen for the new bits
from the current model, as at the start. The last stage trains at each tensor's own bits (an allocation's may lie
below the last floor). `bit_schedule_side` "activations" lowers the activations alone, the weights at their bits
from the first epoch: at a 2-bit budget the weights alone keep the model and the activations do not (the W2A2
diagnosis in docs/QUANTIZATION.md), so the weights settle first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .bias_correction import correct_biases, own_moments
from .bits import cap_activation_bits_, cap_weight_bits_
from .config import QatConfig
from .prepare import activation_quantizers, initialise_steps, quant_convs
from .quantizers import TIGHT_MAX_BITS, FakeQuant


def bits_at(qcfg: QatConfig, epoch: int) -> int:
    """The schedule's floor for 0-based `epoch`: 8 before its first entry, 0 (none) without a schedule."""
    steps = qcfg.bit_schedule_steps
    if not steps:
        return 0
    floor = 8
    for start, bits in steps:
        if epoch + 1 >= start:
            floor = bits
    return floor


def cosine_phase(qcfg: QatConfig, epoch: int) -> tuple[int, int]:
    """(epochs into the cosine, its length) for 0-based `epoch`: the whole run, or with a bit schedule the stage
    the epoch is in, so that each stage starts at the full learning rate. Measured: with one cosine over a
    3-epoch run (8, then 4, then 3 bits) the 3-bit stage got the cosine's tail (a quarter of the rate), could not
    recover from the re-initialisation, and predicted nothing (the same 3 bits without a schedule: 0.62 test Dice)."""
    starts = [0] + [start - 1 for start, _ in qcfg.bit_schedule_steps]
    begin = max(s for s in starts if s <= epoch)
    end = min([s for s in starts if s > epoch] + [qcfg.epochs])
    return epoch - begin, end - begin


def at_final_bits(qcfg: QatConfig, epoch: int) -> bool:
    """Whether 0-based `epoch` trains at the bits the run deploys: learned bits frozen, a schedule at its end."""
    if qcfg.bit_setting.learned:
        return epoch >= qcfg.bit_epochs
    steps = qcfg.bit_schedule_steps
    return not steps or epoch + 1 >= steps[-1][0]


class BitPlan:
    """The quantizers a run lowers and their targets (built right after prepare, before any state is loaded).

    Uniform runs: every weight quantizer to the run's weight bits, every activation quantizer prepared at the run's
    activation bits to those (the fixed 8-bit ones stay). `hold` moves quantizers to 8 bits for good."""

    def __init__(self, model: nn.Module, qcfg: QatConfig):
        self.model, self.qcfg = model, qcfg
        setting = qcfg.bit_setting
        self.targets: dict[int, tuple[FakeQuant, int]] = {}
        self.weight_owner = {id(conv.weight_quant): conv for _, conv in quant_convs(model)}
        for _, conv in quant_convs(model):
            self.targets[id(conv.weight_quant)] = (conv.weight_quant, setting.weight_bits)
        for q in activation_quantizers(model):
            if q.learns_bits or q.bits() < 8:
                self.targets[id(q)] = (q, q.bits() if not q.learns_bits else setting.activation_bits)
        self.held: set[int] = set()

    def _frozen_at(self, q: FakeQuant, bits: int) -> None:
        """Freeze q at `bits`; a weight quantizer's steps are re-chosen for them at once (an activation's need data)."""
        q.freeze_bits(bits)
        self._weight_steps_for_bits(q)

    def _weight_steps_for_bits(self, q: FakeQuant) -> None:
        if q.per_channel:
            q.init_from_tensor(self.weight_owner[id(q)].weight)

    def hold(self, quantizers: Iterable[FakeQuant]) -> None:
        """Keep these at 8 bits, signed, from now on (a tight grid cannot hold 8 bits in int8). Call before the
        activation steps are initialised and before the optimiser is built (their bits no longer learn)."""
        for q in quantizers:
            with torch.no_grad():
                q.negative_share.fill_(-1.0)
            q.b_max = 8
            self._frozen_at(q, 8)
            self.held.add(id(q))

    def allocate(self, bits: dict[int, int]) -> None:
        """Give these planned quantizers (by id) these bits (qat.allocation): for good, or, where the bits learn, as
        their start (the top of that bitwidth's interval, as --initial-bits starts them); before the steps are set."""
        for key, target in bits.items():
            q, _ = self.targets[key]
            self.targets[key] = (q, target)
            if not q.learns_bits:
                self._frozen_at(q, target)
                continue
            q.start_bits_at(target)
            self._weight_steps_for_bits(q)

    def lowered(self) -> list[tuple[FakeQuant, int]]:
        return [(q, bits) for key, (q, bits) in self.targets.items() if key not in self.held]

    def _set_floor(self, floor: int) -> list[FakeQuant]:
        """Freeze every planned quantizer at max(floor, target) (tight ones at most 7; floor 0: the targets, the
        deployed bits); with the schedule on the activations alone the weights stay at their targets. Returns those
        that moved."""
        moved = []
        weights_at_target = self.qcfg.bit_schedule_side == "activations"
        for q, target in self.lowered():
            bits = target if weights_at_target and q.per_channel else max(floor, target)
            if q.tight:
                bits = min(bits, TIGHT_MAX_BITS)
            if q.bits() != bits:
                self._frozen_at(q, bits)
                moved.append(q)
        return moved

    def start(self) -> None:
        """Before the steps are first initialised: a scheduled run starts at its first floor (8 bits)."""
        if self.qcfg.bit_schedule_steps:
            self._set_floor(bits_at(self.qcfg, 0))

    def begin_epoch(self, epoch: int, weights: dict[str, int] | None, elements: dict[str, int],
                    observe: Callable[[], Iterable[torch.Tensor]], say: Callable[[str], None]) -> bool:
        """What changes before 0-based `epoch` trains: the bits freeze (and are capped to the budgets), or the
        schedule lowers them; the steps of every quantizer whose bits moved are re-chosen for its new bits.
        Returns whether a schedule stage began (the caller then restarts the optimiser's moments: those of the
        stage before describe another network; each stage of a progressive schedule starts afresh)."""
        qcfg = self.qcfg
        stage = False
        freeze = qcfg.bit_setting.learned and epoch == qcfg.bit_epochs
        next_stage = (not qcfg.bit_setting.learned and bool(qcfg.bit_schedule_steps) and epoch > 0
                      and bits_at(qcfg, epoch) != bits_at(qcfg, epoch - 1))
        # the fine-tuned model's own channel means, which the bias correction restores once the bits have moved
        reference = own_moments(self.model, observe()) if (freeze or next_stage) and qcfg.bias_correction else None
        if freeze:
            moved = self._freeze(weights, elements, say)
        elif next_stage:
            # the last stage trains at the targets themselves: an allocation's tensors below the last entry's bits
            # (B - 1, or one bit at B = 2) reach them there, and the means reach their budgets
            last = at_final_bits(qcfg, epoch)
            moved, stage = self._set_floor(0 if last else bits_at(qcfg, epoch)), True
            where = "the run's bits (each tensor's own)" if last else f"{bits_at(qcfg, epoch)} bits (floor)"
            say(f"bit schedule: epoch {epoch + 1} at {where}, {len(moved)} quantizers lowered, their steps "
                f"re-initialised, the optimiser's moments restarted")
        else:
            moved = []
        activations = list({id(q): q for q in moved if not q.per_channel}.values())
        if activations:
            initialise(self.model, qcfg, observe, only=activations, reference=reference)
        elif moved and qcfg.bias_correction:  # weights alone moved: their biases still follow
            correct_biases(self.model, list(observe()), reference)
        return stage

    def _freeze(self, weights: dict[str, int] | None, elements: dict[str, int],
                say: Callable[[str], None]) -> list[FakeQuant]:
        """Learned runs: freeze every learning bitwidth, cap the means at their budgets; returns the activation
        quantizers the cap lowered (their steps need data)."""
        qcfg, model = self.qcfg, self.model
        learning = [q for q, _ in self.lowered() if q.learns_bits]
        allowed = {id(q) for q in learning}
        for q in learning:
            q.freeze_bits()
        if qcfg.target_bits > 0:
            taken = cap_weight_bits_(model, weights, qcfg.target_bits, allowed)
            if taken:
                say(f"bits frozen; mean weight bits capped at the target {qcfg.target_bits:g} by {len(taken)} "
                    f"bit(s): " + ", ".join(f"{name} {b}->{c}" for name, b, c in taken))
        if not qcfg.target_activation_bits > 0:
            return []
        taken = cap_activation_bits_(model, elements, qcfg.target_activation_bits, allowed)
        if taken:  # often many: the count and the spread, bits.json has every layer
            firsts = {name: b for name, b, _ in reversed(taken)}
            lasts = {name: c for name, _, c in taken}
            say(f"mean activation bits capped at the budget {qcfg.target_activation_bits:g} by {len(taken)} bit(s) "
                f"over {len(lasts)} tensors (from {min(firsts.values())}-{max(firsts.values())} to "
                f"{min(lasts.values())}-{max(lasts.values())} bits; bits.json lists them)")
        by_reader = {name: conv.input_quant for name, conv in quant_convs(model)}
        return [by_reader[name] for name, _, _ in taken]


def initialise(model: nn.Module, qcfg: QatConfig, observe: Callable[[], Iterable[torch.Tensor]],
               only: list[FakeQuant] | None = None, reference: dict | None = None) -> int:
    """Set the activation steps from the observed training frames (all, or `only` these), then, with
    `bias_correction`, the biases: towards the float model's channel means, or `reference`'s (qat.bias_correction.
    own_moments, taken before bits moved in the middle of a run); returns the frames seen."""
    seen = initialise_steps(model, observe(), qcfg.activation_percentile, qcfg.activation_init, only=only)
    if qcfg.bias_correction:
        correct_biases(model, list(observe()), reference)
    return seen


def make_plan(model: nn.Module, qcfg: QatConfig, resume: bool, observe: Callable[[], Iterable[torch.Tensor]],
              score: Callable[[nn.Module], float], say: Callable[[str], None], elements: dict[str, int],
              live: dict[str, int]) -> BitPlan:
    """The run's BitPlan, right after prepare. `hold_fragile` N: a new run ranks its planned quantizers by their
    one-at-a-time drop of `score` (Dice on `fragile_frames` training frames) at the bits the run gives them (learned
    runs: the budget, or 4) and holds the N largest drops above `fragile_min_drop` at 8 bits, writing fragile.json;
    a resumed run reads that file back. `activation_allocation` "sensitivity": a new run chooses its activation bits
    by measured sensitivity under the budget of its activation bits (qat.allocation; `elements` from
    qat.bits.activation_elements), writing allocation.json, which a resumed run reads back; `weight_allocation`
    likewise its weight bits (`live` from qat.bits.live_weights), writing weight_allocation.json. Then a new run
    starts its schedule."""
    from device_runtime.core.fileio import write_json

    from .allocation import reader_elements, weight_counts
    from .sensitivity import describe, observe as observe_float, rank_fragile

    plan = BitPlan(model, qcfg)
    path = qcfg.qat_dir / "fragile.json"
    if qcfg.hold_fragile and resume:
        names = {id(info.quantizer): info.name for info in describe(model)}
        held = {row["name"] for row in _read_rows(path, "held", "the tensors held at 8 bits")}
        plan.hold(q for q, _ in plan.lowered() if names[id(q)] in held)
    elif qcfg.hold_fragile:
        learned_bits = round(qcfg.target_activation_bits or qcfg.target_bits or 4)
        candidates = [(q, max(q.b_min, learned_bits) if qcfg.bit_setting.learned else bits)
                      for q, bits in plan.lowered()]
        seen = observe_float(model, observe(), qcfg.activation_percentile)
        ranked = rank_fragile(model, candidates, score, seen, qcfg.activation_init, qcfg.activation_range == "tight")
        held = [(info, bits, drop) for info, bits, drop in ranked[:qcfg.hold_fragile] if drop > qcfg.fragile_min_drop]
        plan.hold(info.quantizer for info, _, _ in held)
        rows = [{"name": info.name, "kind": info.kind, "bits": bits, "drop": round(drop, 5)} for info, bits, drop in ranked]
        qcfg.qat_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, {"held": rows[:len(held)], "ranked": rows})
        say(f"held at 8 bits as fragile ({len(held)}): " + ", ".join(f"{i.name} ({i.kind}, -{d:.3f})" for i, _, d in held))
    if qcfg.weight_allocation:
        _allocate(plan, model, qcfg, resume, observe, weight_counts(model, live), say)
    if qcfg.activation_allocation:
        _allocate(plan, model, qcfg, resume, observe, reader_elements(model, elements), say)
    if not resume:
        plan.start()
    return plan


ALLOCATION_FILES = {"weight": "weight_allocation.json", "activation": "allocation.json"}


def _allocate(plan: BitPlan, model: nn.Module, qcfg: QatConfig, resume: bool,
              observe: Callable[[], Iterable[torch.Tensor]], counts: dict[int, tuple[FakeQuant, int]],
              say: Callable[[str], None]) -> None:
    """`--weight-allocation` / `--activation-allocation sensitivity` (make_plan): choose, or on resume read back,
    the bits of the side `counts` weighs (qat.allocation.weight_counts or reader_elements)."""
    from device_runtime.core.fileio import write_json

    from .allocation import allocate
    from .sensitivity import describe

    side = "weight" if next(iter(counts.values()))[0].per_channel else "activation"
    path = qcfg.qat_dir / ALLOCATION_FILES[side]
    planned = [q for q, _ in plan.lowered() if q.per_channel == (side == "weight")]
    if resume:
        by_name = {row["name"]: row["bits"] for row in _read_rows(path, "tensors", f"the {side} bits allocated")}
        names = {id(info.quantizer): info.name for info in describe(model)}
        plan.allocate({id(q): int(by_name[names[id(q)]]) for q in planned if names[id(q)] in by_name})
        return
    frames = _first_frames(observe(), qcfg.fragile_frames)
    budget = qcfg.allocation_budget(side)
    chosen, rows = allocate(model, planned, budget, counts, frames, qcfg.activation_percentile,
                            qcfg.activation_init, say)
    plan.allocate(chosen)
    # bits.json's mean: every tensor of the side, the frame and any held tensor included
    mean = sum(q.bits() * n for q, n in counts.values()) / sum(n for _, n in counts.values())
    qcfg.qat_dir.mkdir(parents=True, exist_ok=True)
    seen = sum(len(batch) for batch in frames)
    write_json(path, {"budget": budget, "mean_bits": round(mean, 4), "frames": seen, "tensors": rows})
    total = sum(row["elements"] for row in rows)
    spread = {}
    for row in rows:
        spread[row["bits"]] = spread.get(row["bits"], 0) + row["elements"]
    say(f"{side} bits allocated by sensitivity on {seen} training frames: mean {mean:.2f} (budget {budget}); "
        + ", ".join(f"{b} bits {100 * e / total:.0f} %" for b, e in sorted(spread.items()))
        + f" of the {'live weights' if side == 'weight' else 'elements'} ({path.name})")


def _first_frames(batches: Iterable[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The first `count` frames of `batches`, as batches."""
    taken, left = [], count
    for batch in batches:
        if left <= 0:
            break
        taken.append(batch[:left])
        left -= len(taken[-1])
    return taken


def _read_rows(path, key: str, what: str) -> list[dict]:
    """The rows of a JSON file's `key` list (fragile.json's "held", allocation.json's "tensors"); a missing or
    unreadable file is one line naming `what` it should hold."""
    import json

    from device_runtime.core.errors import InputError

    try:
        return json.loads(path.read_text(encoding="utf-8"))[key]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: cannot read {what} ({type(err).__name__}: {err})") from None
