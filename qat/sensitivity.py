"""Which tensors break a quantized model: every quantizer named and sorted into a kind, one quantizer at a time
lowered with the rest float (sensitivity), and the float activations each quantizer sees (its observation).

Used by scripts/diag_lowbit.py (the diagnosis tables) and by qat.run for `hold_fragile` (the most sensitive
tensors kept at 8 bits). One-at-a-time sensitivity is the first-order ranking that mixed-precision methods start
from (HAWQ, Dong et al. 2019, ranks by Hessian trace; measuring the task metric directly is its black-box form,
affordable here because the model has ~220 quantizers and the validation split is small).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from .modules import QuantConv2d, QuantGate, QuantHardswish, QuantResidual
from .prepare import fake_quants, quant_convs, quantizers_read_only_through_relu
from .quantizers import FakeQuant
from .step_init import Observation


@dataclass
class QuantizerInfo:
    """A quantizer once: its first module path (its name in tables and logs), every path, and its kind."""

    name: str
    quantizer: FakeQuant
    kind: str
    paths: tuple[str, ...]

    @property
    def is_weight(self) -> bool:
        return self.quantizer.per_channel


def _is_depthwise(conv: QuantConv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


def _weight_kind(name: str, conv: QuantConv2d, last: bool) -> str:
    if last:
        return "weight classifier"
    if ".fc1" in name or ".fc2" in name:
        return "weight SE fc"
    if name.startswith("classifier"):
        return "weight ASPP/head"
    return "weight dw" if _is_depthwise(conv) else f"weight {conv.kernel_size[0]}x{conv.kernel_size[1]}"


def _followed_by_relu(model: nn.Module, conv_name: str) -> bool:
    """Whether the module registered after the convolution in its parent (past the Identity left by BN folding)
    is a ReLU (torchvision's Conv2dNormActivation, ASPP's branches and head); else it is a linear output."""
    parent_name, _, attr = conv_name.rpartition(".")
    siblings = list((model.get_submodule(parent_name) if parent_name else model).named_children())
    after = [m for n, m in siblings[[n for n, _ in siblings].index(attr) + 1:] if not isinstance(m, nn.Identity)]
    return bool(after) and isinstance(after[0], nn.ReLU)


def _activation_kind(model: nn.Module, paths: list[str], convs: dict[str, QuantConv2d], last: str, first: str) -> str:
    """The tensor's producer decides the kind; a tensor only read (the input of a convolution, computed by float
    operators between quantizers) is named by its reader."""
    readers = [p.rpartition(".")[0] for p in paths if p.endswith(".input_quant")]
    if last in readers:
        return "classifier in"
    for path in paths:
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(parent, QuantGate):
            return "SE scale (8b)"
        if isinstance(parent, QuantHardswish):
            return "hswish gate (8b)" if attr == "gate_quant" else "hswish out"
        if isinstance(parent, QuantResidual):
            return "residual sum"
        if isinstance(parent, QuantConv2d) and attr == "output_quant":
            if ".fc1" in parent_name or ".fc2" in parent_name:
                kind = f"SE {parent_name[-3:]} out"
            elif parent_name.endswith("convs.4.1"):
                kind = "ASPP pool out"
            else:
                kind = "dw out" if _is_depthwise(parent) else "conv out"
                kind += "+relu" if _followed_by_relu(model, parent_name) else " linear"
            return kind if readers else f"{kind} (8b)"  # read by no convolution: a fixed 8-bit output in runs
    reader = readers[0] if readers else ""
    if reader == first:
        return "frame"
    if reader.endswith(".fc1"):
        return "SE squeeze"
    if reader.endswith("convs.4.1"):
        return "ASPP pool mean"
    if reader.endswith("project.0"):
        return "ASPP concat"
    block, _, index = reader.rpartition(".")[0].rpartition(".")
    if index.isdigit() and int(index) > 0 and block:
        if isinstance(model.get_submodule(f"{block}.{int(index) - 1}"), SqueezeExcitation):
            return "SE product"
    return "conv in"


def describe(model: nn.Module) -> list[QuantizerInfo]:
    """Every quantizer once, in module order, weights and activations."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FakeQuant):
            paths.setdefault(id(module), []).append(path)
    convs = dict(quant_convs(model))
    names = list(convs)
    found = []
    for q in fake_quants(model):
        where = paths[id(q)]
        if q.per_channel:
            conv_name = where[0].rpartition(".")[0]
            kind = _weight_kind(conv_name, convs[conv_name], conv_name == names[-1])
        else:
            kind = _activation_kind(model, where, convs, names[-1], names[0])
        found.append(QuantizerInfo(where[0], q, kind, tuple(where)))
    return found


@contextlib.contextmanager
def only_quantizers(model: nn.Module, active: Iterable[FakeQuant] = ()):
    """Every quantizer but `active` hands its input on unchanged (the float model, BN folded) inside the block."""
    keep = {id(q) for q in active}
    quantizers = fake_quants(model)
    try:
        for q in quantizers:
            q.bypass = id(q) not in keep
        yield model
    finally:
        for q in quantizers:
            q.bypass = False


@torch.no_grad()
def observe(model: nn.Module, batches: Iterable[torch.Tensor], percentile: float) -> dict[int, Observation]:
    """{id(quantizer): what it saw} for every activation quantizer, on the float model (eval mode)."""
    quantizers = [q for q in fake_quants(model) if not q.per_channel]
    seen = {id(q): Observation(percentile, q.unsigned, sides=True) for q in quantizers}
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.observing, q.observation = True, seen[id(q)]
    try:
        for batch in batches:
            model(batch)
    finally:
        for q in quantizers:
            q.observing, q.observation = False, None
        model.train(was_training)
    return seen


@contextlib.contextmanager
def lowered(quantizer: FakeQuant, bits: int, weight: torch.Tensor | None = None, seen: Observation | None = None,
            init: str = "percentile", tight: bool = False, relu_read: bool = False):
    """Inside the block `quantizer` works at `bits` with its step chosen as QAT chooses it (weights: from `weight`;
    activations: from `seen` by `init`, on a tight grid with `tight`, [0, 2^b - 1] when every reader applies ReLU,
    `relu_read`); its state is restored afterwards."""
    saved = {k: v.clone() for k, v in quantizer.state_dict().items()}
    saved_attrs = (quantizer.b_min, quantizer.b_max, quantizer.observe_init, quantizer.log2_range.requires_grad,
                   quantizer.relu_read)
    try:
        quantizer.negative_share.fill_(-1.0)
        quantizer.freeze_bits(bits)
        if weight is not None:
            quantizer.init_from_tensor(weight)
        else:
            if tight and not quantizer.unsigned and bits <= 7:
                quantizer.set_tight(relu_read)
            quantizer.observe_init, quantizer.observation = init, seen
            quantizer.init_from_samples()
        yield quantizer
    finally:
        quantizer.load_state_dict(saved)
        quantizer.b_min, quantizer.b_max, quantizer.observe_init = saved_attrs[:3]
        quantizer.log2_range.requires_grad_(saved_attrs[3])
        quantizer.relu_read = saved_attrs[4]
        quantizer.observation = None


def weight_of(model: nn.Module, info: QuantizerInfo) -> torch.Tensor:
    return model.get_submodule(info.name.rpartition(".")[0]).weight


def relu_read_ids(model: nn.Module) -> set[int]:
    """ids of the activation quantizers whose every reader applies ReLU (a tight grid puts them on [0, 2^b - 1])."""
    return {id(q) for q in quantizers_read_only_through_relu(model)}


def sensitivity(model: nn.Module, infos: list[QuantizerInfo], bits: int, score: Callable[[nn.Module], float],
                seen: dict[int, Observation], init: str = "percentile", tight: bool = False,
                progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """{quantizer name: score(model) with that quantizer alone at `bits`, every other one bypassed (float)}."""
    found = {}
    relu = relu_read_ids(model) if tight else set()
    for index, info in enumerate(infos):
        weight = weight_of(model, info) if info.is_weight else None
        with lowered(info.quantizer, bits, weight, seen.get(id(info.quantizer)), init, tight,
                     id(info.quantizer) in relu), \
                only_quantizers(model, [info.quantizer]):
            found[info.name] = score(model)
        if progress is not None:
            progress(f"{index + 1}/{len(infos)} {info.name}")
    return found


def step_log(model: nn.Module) -> dict[str, list[float]]:
    """{quantizer name: [integer bits, log2 step (mean over channels for weights)]}: what the QAT log records each
    epoch so that a run's step and bit trajectories can be read back (scripts/diag_lowbit.py)."""
    return {info.name: [info.quantizer.bits(), round(float(info.quantizer.log2_step.detach().float().mean()), 5)]
            for info in describe(model)}


def rank_fragile(model: nn.Module, candidates: list[tuple[FakeQuant, int]], score: Callable[[nn.Module], float],
                 seen: dict[int, Observation], init: str = "percentile",
                 tight: bool = False) -> list[tuple[QuantizerInfo, int, float]]:
    """(info, bits, drop) per candidate (quantizer, its bits in the run), the largest drop first: the drop is the
    score of the float model (every quantizer bypassed) minus the score with that quantizer alone at its bits."""
    infos = {id(info.quantizer): info for info in describe(model)}
    relu = relu_read_ids(model) if tight else set()
    with only_quantizers(model):
        base = score(model)
    found = []
    for quantizer, bits in candidates:
        info = infos[id(quantizer)]
        weight = weight_of(model, info) if info.is_weight else None
        with lowered(quantizer, bits, weight, seen.get(id(quantizer)), init, tight, id(quantizer) in relu), \
                only_quantizers(model, [quantizer]):
            found.append((info, bits, base - score(model)))
    return sorted(found, key=lambda item: -item[2])
