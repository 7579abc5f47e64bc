"""Turn a trained float DeepLabV3 into its QAT form: fold BatchNorm, swap every Conv2d for a QuantConv2d.

BatchNorm is folded once, before QAT, with the float run's (re-estimated) statistics: torch's own
`torch.nn.utils.fusion.fuse_conv_bn_eval` computes the folded weights. The quantized weights are then exactly
the deployed ones and the exported graph has no BatchNormalization node. Folding before (rather than
simulating BN during QAT and freezing it after a warm-up) is the "BN frozen from the start" end of that
choice: the float model has converged and its statistics were re-estimated on the training frames, so
there is nothing left for BN to learn, and fine-tuning folded weights costs no extra convolution.

Not torch.ao.quantization's eager `fuse_modules_qat` / `prepare_qat`: they are deprecated (torchao is the
successor; torch 2.x warns), need the model's Conv-BN-ReLU triples named by hand for two backbones, and put
observers/fake-quants whose learnable variant does not export to ONNX and has no learnable bitwidth. The
learned-bitwidth quantizer is our own module either way; the only part of torch.ao's fusion worth keeping,
the folding arithmetic, is `fuse_conv_bn_eval`, which lives in torch.nn.utils and is used here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.ops.misc import SqueezeExcitation

from .config import ACTIVATION_RANGES, GRIDS
from .modules import QuantConv2d, QuantGate, QuantHardswish, QuantResidual, activation_quantizer
from .quantizers import FakeQuant
from .step_init import Observation

FIRST_INPUT_BITS = 8  # the grey frame in [0, 1]: an 8-bit picture stays an 8-bit picture
OUTPUT_BITS = 8  # every output quantizer: what ONNX Runtime's QLinearConv produces


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d into the Conv2d registered just before it in the same parent; the BatchNorm
    becomes nn.Identity. Works in place (eval-mode statistics) and returns the model.

    In torchvision's DeepLabV3 (both backbones) every BatchNorm directly follows its convolution in the
    parent's registration order (Conv2dNormActivation, Bottleneck's conv1/bn1..., downsample, ASPP).

    Raises:
        ValueError: a BatchNorm that follows no convolution (the model is not what this code knows).
    """
    model.eval()
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    left = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ValueError(f"BatchNorm layers that follow no convolution, cannot fold: {left[:5]}")
    return model


def set_submodule(model: nn.Module, name: str, value: nn.Module) -> None:
    """Put `value` at the dotted module path `name` of `model`."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, value)


def prepare_qat(model: nn.Module, arch: str = "", *, weight_bits: int = 8, activation_bits: int = 8,
                learn_weight_bits: bool = True, learn_activation_bits: bool = True, b_min: int = 2, b_max: int = 8,
                init_steps: bool = True, grid: str = "tensorrt", activation_range: str = "signed") -> nn.Module:
    """Fold BN, replace every Conv2d (at the same attribute path) by a QuantConv2d, quantize the element-wise
    operations between them, and share one quantizer per tensor; in place, returned.

    The first convolution's input is fixed at 8 bits; every conv output quantizer is fixed at 8 bits unless a
    convolution reads it (through ReLU), when it becomes that input's activation quantizer; the last
    convolution (the classifier's, in module order) has no output quantizer. Hardswish, the squeeze-excitation
    gates and the residual sums of MobileNetV3 get their quantizers (qat/modules.py says why). Weight steps
    are initialised from the folded weights here; activation steps need data: call `initialise_steps` next.

    Args:
        model: a float torchvision DeepLabV3 (training.model.build_model).
        arch: "resnet50" or "mobilenet_v3_large" (recorded on the model; the code is the same).
        weight_bits, activation_bits: initial bitwidths (learned runs) or the fixed ones (uniform runs).
        learn_weight_bits, learn_activation_bits: whether the weight / activation bitwidths learn.
        b_min, b_max: range of learned bitwidths.
        init_steps: initialise weight steps from the weights (False when a checkpoint's state follows).
        grid: "tensorrt" (every activation on a signed grid, zero point 0: one set of integers for TensorRT and
            x86) or "x86" (a quantizer whose every reader applies ReLU first is unsigned, [0, 2^b - 1]: ONNX
            Runtime's uint8 with zero point 0, which folds the ReLU into the integer convolution; no TensorRT).
        activation_range: "signed" or "tight": every activation quantizer that can go below 8 bits (and is not
            unsigned already) splits its 2^b levels between negative and positive values as the data do, chosen at
            `initialise_steps` (FakeQuant.set_tight; at most 7 bits, inside int8 with zero point 0: both runtimes).
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    fold_batchnorm(model)
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no Conv2d to quantize")
    # the new modules are made on the CPU; they follow the model to its device (a GPU run stopped at the first
    # probe on "Expected all tensors to be on the same device", torch 2.11, H100)
    device = convs[0][1].weight.device
    for index, (name, conv) in enumerate(convs):
        first, last = index == 0, index == len(convs) - 1
        set_submodule(model, name, QuantConv2d(
            conv, weight_bits=weight_bits, activation_bits=FIRST_INPUT_BITS if first else activation_bits,
            learn_weight_bits=learn_weight_bits, learn_activation_bits=learn_activation_bits and not first,
            output_bits=None if last else OUTPUT_BITS, b_min=b_min, b_max=b_max,
            init_steps=init_steps))

    def new_activation_quantizer() -> FakeQuant:  # on the model's device: share_input_quantizers makes some too
        return activation_quantizer(activation_bits, learn_activation_bits, b_min, b_max).to(device)

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Hardswish):
            set_submodule(model, name, QuantHardswish(new_activation_quantizer()))
        elif isinstance(module, SqueezeExcitation):
            module.scale_activation = QuantGate(module.scale_activation)
    for name, module in list(model.named_modules()):
        if isinstance(module, InvertedResidual) and module.use_res_connect:
            set_submodule(model, name, QuantResidual(module, new_activation_quantizer()))
    model.to(device)  # the QuantConv2d quantizers and biases, before the probe passes below
    share_input_quantizers(model, new_activation_quantizer)
    if grid == "x86":
        for quantizer in quantizers_read_only_through_relu(model):
            quantizer.set_unsigned()
    if activation_range not in ACTIVATION_RANGES:
        raise ValueError(f"activation_range must be one of {', '.join(ACTIVATION_RANGES)}, got {activation_range!r}")
    if activation_range == "tight":
        relu_read = {id(q) for q in quantizers_read_only_through_relu(model)}
        for quantizer in activation_quantizers(model):
            if not quantizer.unsigned and (quantizer.learns_bits or quantizer.bits() < 8):
                quantizer.set_tight(id(quantizer) in relu_read)
    model.qat_arch = arch
    return model


@torch.no_grad()
def probe_forward(model: nn.Module, hooks: list, input_size: tuple[int, int] = (64, 64), mode=None) -> None:
    """One eval-mode forward pass of a zero (1, 1, H, W) frame for what `hooks` record (inside the context
    manager `mode`, if given); the hooks are removed and the training flag restored afterwards, error or not."""
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with mode if mode is not None else contextlib.nullcontext():
            model(torch.zeros(1, 1, *input_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)


class _ReaderLog(torch.overrides.TorchFunctionMode):
    """Records, for every tensor a per-tensor FakeQuant produced, the torch functions that compute from it.

    A ReLU of such a tensor is remembered as derived from the quantizer: a shared quantizer applied again to
    its own ReLU'd output (a reader's input_quant, see share_input_quantizers) rounds grid points onto the same
    grid, a step the exported graph drops, so that application's readers are not the quantizer's readers."""

    def __init__(self):
        super().__init__()
        self.tensors: dict[int, tuple[FakeQuant, int, bool]] = {}  # id -> (quantizer, version, derived by ReLU)
        self.alive: list[torch.Tensor] = []  # keeps ids from being reused during the pass
        self.readers: dict[int, set[str]] = {}  # id(quantizer) -> names of the functions that read its output

    def _entry(self, tensor) -> tuple[FakeQuant, bool] | None:
        entry = self.tensors.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return (entry[0], entry[2]) if entry is not None and entry[1] == tensor._version else None

    def _remember(self, tensor: torch.Tensor, quantizer: FakeQuant, derived: bool) -> None:
        self.tensors[id(tensor)] = (quantizer, tensor._version, derived)
        self.alive.append(tensor)

    def quantized(self, quantizer: FakeQuant, source: torch.Tensor, out: torch.Tensor) -> None:
        self.readers.setdefault(id(quantizer), set())
        entry = self._entry(source)
        if entry is None or entry[0] is not quantizer or not entry[1]:  # not a re-application to its own ReLU
            self._remember(out, quantizer, derived=False)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = []  # before the call: an in-place function bumps the version of what it reads
        stack = list(args) + list(kwargs.values())
        while stack:
            item = stack.pop()
            if isinstance(item, (list, tuple)):
                stack.extend(item)
            elif (entry := self._entry(item)) is not None and not entry[1]:
                read.append(entry[0])
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor):  # a value computed (not a shape or dtype query)
            for quantizer in read:
                self.readers[id(quantizer)].add(getattr(func, "__name__", str(func)))
            if func in RELU_FUNCTIONS and len(read) == 1:
                self._remember(result, read[0], derived=True)
        return result


RELU_FUNCTIONS = (torch.nn.functional.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)
RELU_NAMES = {f.__name__ for f in RELU_FUNCTIONS}


@torch.no_grad()
def quantizers_read_only_through_relu(model: nn.Module) -> list[FakeQuant]:
    """The per-tensor quantizers whose output every reader takes through ReLU (and at least one reads it).

    Their readers see only the non-negative half of a signed grid, so the unsigned grid clamp(round(x / d), 0,
    2^b - 1) gives them ReLU's output with all 2^b levels: the x86 grid. Found by one small forward pass under a
    TorchFunctionMode that sees every torch function (F.relu, the residual `+`, torch.cat, F.interpolate...),
    not only modules, so an unseen reader cannot make a tensor unsigned by mistake."""
    log = _ReaderLog()
    hooks = [q.register_forward_hook(lambda module, args, out: log.quantized(module, args[0], out))
             for q in activation_quantizers(model)]
    probe_forward(model, hooks, mode=log)
    return [q for q in activation_quantizers(model) if log.readers.get(id(q)) and log.readers[id(q)] <= RELU_NAMES]


# modules that hand their input on unchanged or keep it on its grid (ReLU or max of grid points are grid points)
GRID_KEEPING = (nn.ReLU, nn.Identity, nn.Dropout, nn.MaxPool2d)


@torch.no_grad()
def share_input_quantizers(model: nn.Module, new_activation_quantizer) -> None:
    """Give every convolution whose input already is a quantized tensor (a quantizer's output, possibly
    through ReLU / Identity / Dropout / MaxPool) that tensor's quantizer as its input quantizer, so each tensor
    is rounded once. A fixed 8-bit conv output quantizer that a convolution reads this way is first replaced
    by a new activation quantizer (learned bits in learned runs), shared by producer and readers.

    Found by running one small frame through the model and following tensors by identity AND version: an
    in-place operation (ResNet's `out += identity`) keeps the Python object but bumps its version, and its
    result is not on the grid. The tensors are kept alive during the pass so that no id is reused."""
    producer: dict[int, tuple[int, int]] = {}  # id(tensor) -> (id(quantizer), tensor version then)
    alive: list[torch.Tensor] = []
    pending: dict[int, int | None] = {}  # id(grid-keeping module) -> the quantizer of its current input
    readers: dict[int, int] = {}  # id(conv) -> id(the quantizer of its input)

    def source_of(t: torch.Tensor) -> int | None:
        entry = producer.get(id(t))
        return entry[0] if entry is not None and entry[1] == t._version else None

    def mark(t: torch.Tensor, source: int) -> None:
        producer[id(t)] = (source, t._version)
        alive.append(t)

    def before_keep(module, args):
        pending[id(module)] = source_of(args[0])

    def after_keep(module, _args, out):
        source = pending.pop(id(module), None)
        if source is not None:
            mark(out, source)

    hooks = []
    for m in model.modules():
        if isinstance(m, FakeQuant) and not m.per_channel:
            hooks.append(m.register_forward_hook(lambda module, _a, out: mark(out, id(module))))
        elif isinstance(m, GRID_KEEPING):
            hooks.append(m.register_forward_pre_hook(before_keep))
            hooks.append(m.register_forward_hook(after_keep))
    convs = quant_convs(model)

    def before_conv(conv, args):
        source = source_of(args[0])
        if source is None:  # a float tensor: the first convolution reading it quantizes it, later readers share
            source = id(conv.input_quant)
            mark(args[0], source)
        readers[id(conv)] = source

    hooks += [conv.register_forward_pre_hook(before_conv) for _, conv in convs]
    probe_forward(model, hooks)
    by_id = {id(m): m for m in model.modules() if isinstance(m, FakeQuant)}
    output_of = {id(conv.output_quant): conv for _, conv in convs if conv.output_quant is not None}
    replaced: dict[int, FakeQuant] = {}
    for _, conv in convs[1:]:  # the first convolution reads the frame: its own 8-bit quantizer
        source = readers[id(conv)]
        if source in output_of and source not in replaced:
            replaced[source] = output_of[source].output_quant = new_activation_quantizer()
        conv.input_quant = replaced.get(source, by_id[source])


def quant_convs(model: nn.Module) -> list[tuple[str, QuantConv2d]]:
    """(name, module) of every QuantConv2d, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantConv2d)]


def fake_quants(model: nn.Module) -> list[FakeQuant]:
    """Every quantizer once (a shared one is listed once)."""
    return [m for m in model.modules() if isinstance(m, FakeQuant)]


def activation_quantizers(model: nn.Module) -> list[FakeQuant]:
    """Every per-tensor (activation) quantizer once; weight quantizers are per channel."""
    return [q for q in fake_quants(model) if not q.per_channel]


@torch.no_grad()
def observe_activations(model: nn.Module, batches: Iterable[torch.Tensor], percentile: float = 0.0,
                        init: str = "percentile") -> tuple[dict[int, Observation], int]:
    """What every activation quantizer sees on `batches` (eval mode), recorded for the rule `init` / `percentile`
    asks (FakeQuant.init_from_samples): ({id(quantizer): its Observation}, frames seen). While a convolution's input
    observes it takes float weights, so this is the float model's pass whatever the bits: one pass serves any
    bitwidths the steps are then set for.

    Shape:
        each batch: (N, 1, H, W) float in [0, 1], on the model's device.
    """
    activation_quants = activation_quantizers(model)
    was_training = model.training
    model.eval()
    for q in activation_quants:
        q.observing, q.observe_percentile, q.observe_init = True, percentile, init
    seen = 0
    try:
        for batch in batches:
            model(batch)
            seen += len(batch)
        return {id(q): q.observation for q in activation_quants}, seen
    finally:
        for q in activation_quants:
            q.observing, q.observation = False, None
        model.train(was_training)


@torch.no_grad()
def initialise_steps(model: nn.Module, batches: Iterable[torch.Tensor], percentile: float = 0.0,
                     init: str = "percentile", only: Iterable[FakeQuant] | None = None) -> int:
    """Observe the float activations of `batches` (observe_activations) and set every activation quantizer's step so
    that its grid reaches the largest magnitude seen (FakeQuant.init_from_samples says why not an MSE search).
    `percentile` P > 0: the grid reaches the mean per-batch P-th percentile of |x| instead of the maximum.
    `init` "mse": below 8 bits the squared-error search instead. `only`: set these quantizers' steps, leave the
    others' (a schedule that lowers some bits re-initialises those). Returns the number of frames seen.

    Shape:
        each batch: (N, 1, H, W) float in [0, 1], on the model's device.
    """
    observations, seen = observe_activations(model, batches, percentile, init)
    if seen == 0:
        raise ValueError("initialise_steps: no frames given")
    chosen = {id(q) for q in only} if only is not None else observations.keys()
    for q in activation_quantizers(model):
        if id(q) in chosen:
            q.observation = observations[id(q)]
            q.init_from_samples()
    return seen


def project_bits_(model: nn.Module) -> None:
    """Keep every learned bitwidth inside its range; call after each optimiser step."""
    for q in fake_quants(model):
        q.project_()


def freeze_bits_(model: nn.Module) -> int:
    """Fix every learned bitwidth at its current integer value (the fine-tuning phase); returns how many were
    still learning (0 once frozen, or in a fixed-bits run)."""
    learning = [q for q in fake_quants(model) if q.learns_bits]
    for q in learning:
        q.freeze_bits()
    return len(learning)
