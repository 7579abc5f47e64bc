"""torchvision DeepLabV3 with one grey input channel and one output channel (nerve logits).

`resnet50` is the paper's network (output stride 8); `mobilenet_v3_large` is the edge network. The
torchvision blocks keep Conv-BN-ReLU as separate modules, which is what QAT fusion needs. `decoder = "skip"` adds a
light DeepLabV3+ decoder (see SkipDecoder): the logits come from a map twice as fine.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, deeplabv3_resnet50
from torchvision.models.segmentation.deeplabv3 import ASPP

from device_runtime.core.errors import InputError

from .config import DECODERS, TORCHVISION_ASPP_RATES, TrainConfig
from .live_taps import skip_dead_taps
from .trust import safe_load

_BUILDERS = {"resnet50": deeplabv3_resnet50, "mobilenet_v3_large": deeplabv3_mobilenet_v3_large}
# the backbone block whose output the skip decoder reads: half the output stride of the ASPP's input
# (mobilenet_v3_large: block 6, 40 channels at stride 8; resnet50, output stride 8: layer1, 256 channels at stride 4)
_SKIP_LAYER = {"resnet50": ("layer1", 256), "mobilenet_v3_large": ("6", 40)}
_IMAGENET = {"resnet50": ResNet50_Weights.IMAGENET1K_V1, "mobilenet_v3_large": MobileNet_V3_Large_Weights.IMAGENET1K_V1}
DOWNLOAD_TIMEOUT_S = 20


def _stem_path(arch: str) -> tuple[str, ...]:
    """Attribute path, inside the segmentation model, of the backbone's first convolution."""
    return ("backbone", "conv1") if arch == "resnet50" else ("backbone", "0", "0")


def _get(module: nn.Module, path: tuple[str, ...]) -> nn.Module:
    for name in path:
        module = getattr(module, name)
    return module


def _set(module: nn.Module, path: tuple[str, ...], value: nn.Module) -> None:
    setattr(_get(module, path[:-1]), path[-1], value)


def _grey_stem(conv: nn.Conv2d) -> nn.Conv2d:
    """A copy of a 3-channel convolution taking 1 channel; its weights summed over the input channels, so a
    grey image gives the pretrained filter the same response as that grey image repeated in RGB."""
    grey = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None)
    with torch.no_grad():
        grey.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            grey.bias.copy_(conv.bias)
    return grey


def _imagenet_state(arch: str) -> dict:
    """torchvision's ImageNet classification weights, from the local cache or the network; never hangs."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return _IMAGENET[arch].get_state_dict(progress=False)
    except Exception as err:  # URLError, timeouts, HTTP errors: all mean "not reachable from here"
        raise InputError(
            f"cannot fetch torchvision's ImageNet weights for {arch} ({type(err).__name__}: {err}); "
            "offline, pass --pretrained PATH to a local backbone state dict, or --pretrained none"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _file_state(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: pretrained weights file not found")
    state = safe_load(path, "weights file")  # weights_only=True: it cannot run code (training/trust.py)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a state dict of tensors")
    return state


def _load_backbone(model: nn.Module, arch: str, state: dict, source: str) -> None:
    """Load a classification network's weights into the segmentation backbone (its head is skipped)."""
    backbone = model.backbone
    own = backbone.state_dict()
    mapped = {}
    for key, value in state.items():
        for prefix in ("backbone.", "features.", ""):  # segmentation, mobilenet classification, resnet
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name is not None and name in own:
                mapped[name] = value
                break
    stem_key = "conv1.weight" if arch == "resnet50" else "0.0.weight"
    if stem_key in mapped and mapped[stem_key].shape[1] == 3:  # an RGB stem: see _grey_stem for why a sum
        mapped[stem_key] = mapped[stem_key].sum(dim=1, keepdim=True)
    shape_mismatch = [k for k, v in mapped.items() if v.shape != own[k].shape]
    if shape_mismatch or len(mapped) < 0.9 * len(own):
        raise InputError(
            f"{source}: does not fit the {arch} backbone ({len(mapped)} of {len(own)} tensors matched, "
            f"{len(shape_mismatch)} with other shapes)"
        )
    backbone.load_state_dict(mapped, strict=False)


def _load_whole(model: nn.Module, state: dict, source: str) -> None:
    """Load a segmentation checkpoint of the same network, ASPP head and classifier included."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    shape_mismatch = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or shape_mismatch:
        raise InputError(f"{source}: is not a checkpoint of this network ({len(missing)} tensors missing, "
                         f"{len(shape_mismatch)} with other shapes)")
    model.load_state_dict({k: state[k] for k in own})


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class SkipDecoder(nn.Module):
    """DeepLabV3+'s decoder (Chen et al., "Encoder-Decoder with Atrous Separable Convolution", ECCV 2018), narrowed for
    a CPU: the head's features are upsampled to the skip layer's map, concatenated with a 48-channel projection of
    it, and one 3x3 convolution of 64 channels (the paper: two of 256) feeds the classifier.

    Why: a nerve covers about 2.6 % of a usgra-seg frame (median, mask label 1), a blob of about 40 pixels across
    at 256x256, about three cells of the 16x16 logit map of output stride 16. The ground-truth masks themselves,
    averaged onto that grid and upsampled bilinearly, score a mean Dice of only 0.82 against themselves (10 % of
    frames below 0.60); on a 32x32 grid 0.96, on 64x64 0.99 (scripts/resolution_ceiling.py). Its cost at 256x256
    on mobilenet_v3_large is about 0.2 GMAC against about 1.4 for the rest. Measured on usgra-seg (5-fold CV, ablation
    (j) in docs/accuracy.md): +0.011 [-0.013, +0.035] test Dice for 13 % more CPU; fewer frames missed, the outlines
    of frames found no better. Not the default.
    """

    def __init__(self, skip_channels: int, head_channels: int = 256, num_classes: int = 1):
        super().__init__()
        self.project = _conv_bn_relu(skip_channels, 48, 1)
        self.fuse = _conv_bn_relu(head_channels + 48, 64, 3)
        self.classifier = nn.Conv2d(64, num_classes, 1)

    def forward(self, head: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        head = F.interpolate(head, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([head, self.project(skip)], dim=1)))


class DeepLabV3Skip(nn.Module):
    """torchvision's DeepLabV3 (same `backbone`, the same ASPP head as `classifier` minus its last convolution)
    with a SkipDecoder after it; the same interface: model(x)["out"] is (N, classes, H, W) logits."""

    def __init__(self, deeplab: nn.Module, arch: str, num_classes: int):
        super().__init__()
        layer, channels = _SKIP_LAYER[arch]
        self.backbone = deeplab.backbone
        self.backbone.return_layers = {layer: "skip", **self.backbone.return_layers}
        self.classifier = nn.Sequential(*list(deeplab.classifier)[:-1])  # ASPP, 3x3 conv, BN, ReLU
        self.decoder = SkipDecoder(channels, deeplab.classifier[-1].in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        logits = self.decoder(self.classifier(features["out"]), features["skip"])
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def build_model(arch: str, *, pretrained: str = "none", num_classes: int = 1,
                aspp_rates: tuple[int, ...] = TORCHVISION_ASPP_RATES, decoder: str = "none",
                relu_backbone: bool = False, with_head: bool = False) -> nn.Module:
    """DeepLabV3 for one grey input channel.

    Args:
        arch: "resnet50" or "mobilenet_v3_large".
        pretrained: "none", "imagenet" (torchvision's enum; cache or network) or a path to a state dict.
        num_classes: output channels; 1 for nerve logits.
        aspp_rates: dilation rates of the ASPP's 3x3 branches. torchvision's 12/24/36 were chosen for 513x513
            crops; on the 16x16 map of a 256x256 frame at output stride 16 the rate-24/36 taps read only
            padding (each branch is a 1x1 convolution). Scaling the paper's 6/12/18 (output stride 16, 33x33
            map) to a 16x16 map gives 3/6/9.
        decoder: "none" (torchvision's DeepLabV3) or "skip" (DeepLabV3Skip: logits from a map twice as fine).
        relu_backbone: mobilenet_v3_large only: its hardswish layers become ReLU (relu_hardswish_).
        with_head: `pretrained` is a checkpoint of this same network: load its ASPP head and classifier too.

    Shape:
        input (N, 1, H, W) float in [0, 1] -> model(x)["out"] (N, num_classes, H, W) logits.
    """
    if arch not in _BUILDERS:
        raise InputError(f"arch must be one of {sorted(_BUILDERS)}, got {arch!r}")
    if decoder not in DECODERS:
        raise InputError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    model = _BUILDERS[arch](weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    stem = _stem_path(arch)
    _set(model, stem, _grey_stem(_get(model, stem)))
    if tuple(aspp_rates) != TORCHVISION_ASPP_RATES:
        aspp = model.classifier[0]
        model.classifier[0] = ASPP(aspp.convs[0][0].in_channels, tuple(aspp_rates), aspp.project[0].out_channels)
    if relu_backbone and not relu_hardswish_(model):
        raise InputError(f"relu_backbone replaces MobileNetV3's hardswish; {arch} has none (it uses ReLU already)")
    if decoder == "skip":
        model = DeepLabV3Skip(model, arch, num_classes)
    skip_dead_taps(model)  # e.g. ASPP's rate-24/36 kernels at 256x256 read only padding: same output, less work
    if pretrained == "imagenet":
        _load_backbone(model, arch, _imagenet_state(arch), f"torchvision {arch} ImageNet weights")
    elif pretrained not in ("none", ""):
        state = _file_state(Path(pretrained))
        if with_head:
            _load_whole(model, state, pretrained)
        else:
            _load_backbone(model, arch, state, pretrained)
    return model


def build_model_of(cfg: TrainConfig, **kwargs) -> nn.Module:
    """The network `cfg` describes (arch, ASPP rates, decoder, activation): the one place a config becomes a model, so
    a new architecture setting reaches training, checkpoints, QAT and the benches alike. `kwargs` go to build_model."""
    return build_model(cfg.arch, aspp_rates=cfg.aspp_rates, decoder=cfg.decoder, relu_backbone=cfg.relu_backbone,
                       **kwargs)


def relu_hardswish_(model: nn.Module) -> int:
    """Replace every nn.Hardswish of `model` by ReLU, in place; returns how many (20 in DeepLabV3-MobileNetV3-Large).

    Why: below 8 bits the hardswish outputs are the tensors the model cannot lose a bit of (docs/QUANTIZATION.md,
    the allocation and W2A2 sections): their negative tail (down to -0.375) takes levels of a low-bit grid or is
    clipped, and they can take no unsigned or one-bit grid. A ReLU output is never negative, so on the x86 grid each
    such tensor takes the unsigned [0, 2^b - 1] and ONNX Runtime folds the ReLU into its integer convolution. The
    squeeze-excitation gates stay hardsigmoid (in [0, 1], already unsigned). A model trained with hardswish does not
    become a ReLU model by this swap: the weights must be trained with it (the `small` recipe's phantom stage trains
    the network from scratch, so it is trained with ReLU throughout)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Hardswish)]
    for name in names:
        _set(model, tuple(name.split(".")), nn.ReLU(inplace=True))
    return len(names)


class LogitsOnly(nn.Module):
    """Wraps a DeepLabV3 so its forward returns the logits tensor: the ONNX graph has one named output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


# Where FlipAveraged clips the network's logits (and its own output): a probability moves by at most
# sigmoid(-16) = 1.1e-7, and the tuned T* lies in [0.01, 0.99]. Clipped before the sigmoids, no tensor of the graph
# is infinite: ONNX Runtime's CPU sigmoid returns 0 below about -17.3, so a wider clip would still leave log(0) there,
# and its histogram calibrators (Percentile, Entropy) stop on an infinite range
FLIP_LOGIT_LIMIT = 16.0


class FlipAveraged(nn.Module):
    """Test-time flip averaging: the probability of each pixel is the mean of the frame's and of its left-right
    mirror's (the mirrored frame's output mirrored back), returned as the logit of that mean, so everything after
    the network (the sigmoid, T*, the bundle contract, the device runtime) stays as it is.

    Left-right is the one mirror an ultrasound frame allows (the skin is at the top; the recipes train with hflip,
    not vflip). Both frames go through the network as one batch of 2N, so the exported graph holds one copy of it;
    the mirror is a Gather with constant reversed column indices (an operator every TensorRT version parses).
    The logit of the mean probability is log(p + q) - log(p' + q'), with p, q the two probabilities and p', q'
    their complements computed as sigmoid(-logit), never as 1 - p: no cancellation near 0 or 1.
    Measured on usgra-seg in docs/accuracy.md, ablations (h) and (r); costs twice the network's inference.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, width = x.shape[0], int(x.shape[-1])  # the width as a constant: the graph's input size is fixed
        reversed_columns = torch.arange(width - 1, -1, -1, device=x.device)
        logits = self.model(torch.cat([x, x.index_select(3, reversed_columns)]))["out"]
        logits = logits.clamp(-FLIP_LOGIT_LIMIT, FLIP_LOGIT_LIMIT)
        plain, mirrored = logits[:n], logits[n:].index_select(3, reversed_columns)
        averaged = (torch.log(torch.sigmoid(plain) + torch.sigmoid(mirrored))
                    - torch.log(torch.sigmoid(-plain) + torch.sigmoid(-mirrored)))
        return {"out": averaged.clamp(-FLIP_LOGIT_LIMIT, FLIP_LOGIT_LIMIT)}


def as_deployed(model: nn.Module, flip_tta: bool) -> nn.Module:
    """The model as a bundle runs it: with test-time flip averaging (FlipAveraged) or as trained."""
    return FlipAveraged(model) if flip_tta else model
