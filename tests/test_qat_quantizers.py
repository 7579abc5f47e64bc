"""The QAT building blocks: integer grids, gradients, BN folding, both backbones."""

import math

import pytest
import torch
from torch import nn

from qat.bits import activation_elements, bits_table, live_weights, mean_bits
from qat.modules import QuantConv2d
from qat.prepare import fold_batchnorm, freeze_bits_, initialise_steps, prepare_qat, project_bits_, quant_convs
from qat.quantizers import FakeQuant, integer_range
from training.model import build_model


def _set_continuous_bits(fq: FakeQuant, b_c: float) -> None:
    """Move a learned quantizer's range so that its continuous bitwidth is b_c (step unchanged)."""
    n = 2.0 ** (b_c - 1.0) - 1.0
    with torch.no_grad():
        if fq.per_channel:
            fq.log2_range.fill_(math.log2(n + 1.0))
        else:
            fq.log2_range.copy_(torch.log2(n * fq.step()))


@pytest.mark.parametrize("narrow,channels", [(False, None), (True, 6)])
@pytest.mark.parametrize("b_c,expected", [(8.0, 8), (4.3, 5), (3.0, 3), (2.2, 3), (1.5, 2)])
def test_forward_sits_on_the_integer_grid_of_the_current_bits(narrow, channels, b_c, expected):
    torch.manual_seed(0)
    fq = FakeQuant(narrow=narrow, channels=channels)
    x = torch.randn(6, 3, 5, 5) * 3
    if channels:
        fq.init_from_tensor(x)
    else:
        fq.observing = True
        fq(x)
        fq.observing = False
        fq.init_from_samples()
    _set_continuous_bits(fq, b_c)
    fq.project_()
    assert fq.bits() == expected
    p = fq.export_params()
    qmin, qmax = integer_range(expected, narrow)
    assert (p.qmin, p.qmax, p.bits) == (qmin, qmax, expected)
    assert qmin == (-(2 ** (expected - 1)) + (1 if narrow else 0)) and qmax == 2 ** (expected - 1) - 1
    fq.eval()
    y = fq(x)
    scale = p.scale.reshape(-1, 1, 1, 1) if channels else p.scale
    ratio = y / scale
    # (q * s) / s is q up to one float32 rounding
    assert (ratio - torch.round(ratio)).abs().max() < 1e-4, "values / step are integers"
    ratio = torch.round(ratio)
    assert ratio.min() >= qmin and ratio.max() <= qmax
    assert ratio.max() == qmax, "the range is used (the input is wider than it)"
    # the export contract, bit for bit
    assert torch.equal(y, torch.clamp(torch.round(x / scale), p.qmin, p.qmax) * scale)
    assert p.scale.shape == ((channels,) if channels else ())


def test_frozen_bits_stay_and_ignore_the_range():
    fq = FakeQuant(narrow=False, bits=4, learn_bits=False)
    _set_continuous_bits(fq, 8.0)
    assert fq.bits() == 4 and not fq.learns_bits
    learned = FakeQuant(narrow=False)
    _set_continuous_bits(learned, 5.0)
    learned.freeze_bits()
    _set_continuous_bits(learned, 8.0)
    assert learned.bits() == 5 and int(learned.frozen_bits) == 5


def test_projection_keeps_learned_bits_in_range():
    fq = FakeQuant(narrow=True, channels=3, b_min=3, b_max=6, bits=6)
    _set_continuous_bits(fq, 1.2)
    fq.project_()
    assert fq.bits() == 3
    _set_continuous_bits(fq, 7.9)
    fq.project_()
    assert fq.bits() == 6


def test_gradients_reach_weights_steps_and_bits():
    torch.manual_seed(0)
    conv = QuantConv2d(nn.Conv2d(3, 4, 3, padding=1), weight_bits=4, activation_bits=4)
    x = torch.randn(2, 3, 8, 8)
    initialise_steps(nn.Sequential(conv), [x])
    assert conv.input_quant.bits() == 4 and conv.weight_quant.bits() == 4, "initialisation keeps the bits"
    # the grid reaches max |x|, so a wider input clips and the range matters to the loss
    loss = (conv(x * 1.5) ** 2).mean()
    loss.backward()
    for name, tensor in [("weight", conv.weight), ("bias", conv.bias),
                         ("input step", conv.input_quant.log2_step), ("weight steps", conv.weight_quant.log2_step),
                         ("output step", conv.output_quant.log2_step),
                         ("input bits", conv.input_quant.log2_range), ("weight bits", conv.weight_quant.log2_range)]:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, f"no gradient reached the {name}"
    assert conv.output_quant.log2_range.grad is None or conv.output_quant.log2_range.grad.abs().sum() == 0


def test_bit_cost_gradient_pulls_bits_down():
    fq = FakeQuant(narrow=False)
    fq.bits_ste().backward()
    # per tensor: b_c = log2(q_max / d + 1) + 1, so a lower cost means a smaller q_max and a larger step
    assert fq.log2_range.grad > 0 and fq.log2_step.grad < 0


def test_bias_on_the_int32_grid_of_input_step_times_weight_step():
    torch.manual_seed(0)
    conv = QuantConv2d(nn.Conv2d(2, 5, 3), weight_bits=8)
    with torch.no_grad():
        conv.bias.copy_(torch.randn(5))
    initialise_steps(nn.Sequential(conv), [torch.randn(2, 2, 6, 6)])
    s = conv.input_quant.export_params().scale * conv.weight_quant.export_params().scale
    assert torch.equal(conv.quantized_bias(), conv.bias_integers().float() * s)
    assert conv.bias_integers().dtype == torch.int32
    w = conv.weight_quant.export_params()
    assert torch.equal(conv.quantized_weight(), conv.weight_integers().float() * w.scale.reshape(-1, 1, 1, 1))
    assert conv.weight_integers().dtype == torch.int8


def _randomise_batchnorm(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "resnet50"])
def test_batchnorm_folding_keeps_the_float_output(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    _randomise_batchnorm(model)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        before = model(x)["out"]
        after = fold_batchnorm(model)(x)["out"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert (before - after).abs().max() <= 1e-4 * max(1.0, before.abs().max().item())


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "resnet50"])
def test_both_backbones_prepare_and_train(arch):
    torch.manual_seed(0)
    model = build_model(arch)
    conv_names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    prepare_qat(model, arch)
    convs = quant_convs(model)
    assert [n for n, _ in convs] == conv_names, "convolutions replaced at the same attribute paths"
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules())
    first, last = convs[0][1], convs[-1][1]
    assert convs[0][0] == ("backbone.conv1" if arch == "resnet50" else "backbone.0.0")
    assert convs[-1][0] == "classifier.4" and last.output_quant is None
    assert first.input_quant.bits() == 8 and not first.input_quant.learns_bits
    inputs = {id(c.input_quant) for _, c in convs}
    for name, c in convs[:-1]:  # an output quantizer is fixed 8-bit, or the (learned) input quantizer of a reader
        assert c.output_quant is not None, name
        assert (c.output_quant.bits() == 8 and not c.output_quant.learns_bits) or id(c.output_quant) in inputs, name
    initialise_steps(model, [torch.rand(2, 1, 64, 64)])
    model.train()
    x, target = torch.rand(2, 1, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    logits = model(x)["out"]
    assert logits.shape == (2, 1, 64, 64)
    w_bits, a_bits = mean_bits(model, activation_elements(model, (64, 64)))
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target) + 0.25 * (w_bits + a_bits) / 8
    loss.backward()
    middle = convs[len(convs) // 2][1]
    assert middle.weight.grad.abs().sum() > 0
    assert middle.weight_quant.log2_range.grad.abs() > 0 and middle.input_quant.log2_range.grad.abs() > 0
    project_bits_(model)
    freeze_bits_(model)
    table = bits_table(model, (64, 64))
    assert len(table["layers"]) == len(convs)
    assert table["mean_weight_bits"] == 8.0 and table["mean_activation_bits"] == 8.0
    assert table["layers"][0]["activation_elements"] == 64 * 64
    # live weights at 64x64 (a 4x4 map): ASPP's rate-12/24/36 kernels keep their centre tap, 1/9 of their weights
    rows = {row["name"]: row for row in table["layers"]}
    for name in ("classifier.0.convs.1.0", "classifier.0.convs.2.0", "classifier.0.convs.3.0"):
        assert rows[name]["live_params"] * 9 == rows[name]["params"]
    assert rows["classifier.0.convs.0.0"]["live_params"] == rows["classifier.0.convs.0.0"]["params"]  # 1x1
    assert table["mean_weight_bits_all_params"] == 8.0


@pytest.mark.parametrize("bits,learn", [(8, True), (4, False), (3, True)])
def test_activation_step_initialised_from_the_observed_maximum(bits, learn):
    fq = FakeQuant(narrow=False, bits=bits, learn_bits=learn)
    fq.observing = True
    for scale in (1.0, 3.0, 2.0):
        fq(torch.linspace(-1, 1, 101) * scale)
    fq.observing = False
    fq.init_from_samples()
    p = fq.export_params()
    assert p.bits == bits
    assert float(p.scale) * p.qmax == pytest.approx(3.0, rel=1e-5)


def test_placement_one_quantizer_per_tensor_on_mobilenet():
    """Hardswish, squeeze-excitation gates and residual sums are quantized; a conv after ReLU reads its producer's
    grid (shared quantizer, no second rounding); Hardswish outputs are shared by their readers."""
    from torchvision.models.mobilenetv3 import InvertedResidual
    from torchvision.ops.misc import SqueezeExcitation

    from qat.modules import QuantGate, QuantHardswish, QuantResidual

    float_model = build_model("mobilenet_v3_large")
    hardswish = sum(isinstance(m, nn.Hardswish) for m in float_model.modules())
    gates = sum(isinstance(m, SqueezeExcitation) for m in float_model.modules())
    residuals = sum(isinstance(m, InvertedResidual) and m.use_res_connect for m in float_model.modules())
    model = prepare_qat(float_model, "mobilenet_v3_large")
    assert sum(isinstance(m, QuantHardswish) for m in model.modules()) == hardswish > 0
    assert sum(isinstance(m, QuantGate) for m in model.modules()) == gates > 0
    assert sum(isinstance(m, QuantResidual) for m in model.modules()) == residuals > 0
    convs = dict(quant_convs(model))
    # backbone.1 is an inverted residual without expansion: depthwise conv (ReLU) -> projection conv
    depthwise, projection = convs["backbone.1.block.0.0"], convs["backbone.1.block.1.0"]
    assert projection.input_quant is depthwise.output_quant and depthwise.output_quant.learns_bits
    stem_hardswish = model.get_submodule("backbone.0.2")
    assert isinstance(stem_hardswish, QuantHardswish) and depthwise.input_quant is stem_hardswish.output_quant
    residual = model.get_submodule("backbone.1")
    assert isinstance(residual, QuantResidual) and convs["backbone.2.block.0.0"].input_quant is residual.output_quant


def test_in_place_residual_sum_is_not_taken_for_a_grid_point():
    """ResNet's `out += identity` keeps the Python object of conv3's quantized output but not its grid: the
    next block must quantize the sum itself (tensors are followed by identity and version)."""
    model = prepare_qat(build_model("resnet50"), "resnet50")
    convs = dict(quant_convs(model))
    after_sum = convs["backbone.layer2.0.conv1"].input_quant
    assert after_sum is not convs["backbone.layer1.2.conv3"].output_quant
    assert convs["backbone.layer2.0.downsample.0"].input_quant is after_sum, "two readers of one tensor share"
    assert convs["backbone.layer1.0.conv1"].input_quant is convs["backbone.conv1"].output_quant, "through MaxPool"


def test_activation_step_from_a_percentile_ignores_a_rare_outlier():
    x = torch.linspace(-1.0, 1.0, 10_001)
    x[0] = -50.0  # one outlier in ten thousand
    steps = {}
    for percentile in (0.0, 99.9):
        q = FakeQuant(narrow=False, learn_bits=False)
        q.observing, q.observe_percentile = True, percentile
        q(x)
        q(x * 0.5)
        q.observing = False
        q.init_from_samples()
        steps[percentile] = float(q.step().detach())
    assert steps[0.0] == pytest.approx(50.0 / 127, rel=1e-5)  # the maximum
    # the mean of the two batches' 99.9th percentiles of |x| (about 1.0 and 0.5)
    assert steps[99.9] == pytest.approx(0.75 / 127, rel=0.01)


def test_dead_weights_do_not_buy_bits():
    """The mean weight bits count live weights only: a layer whose weights mostly read padding moves the mean by
    its live share, not its parameter count (qat/bits.py)."""
    from qat.prepare import prepare_qat, quant_convs
    from training.model import build_model

    torch.manual_seed(0)
    model = prepare_qat(build_model("mobilenet_v3_large").eval(), "mobilenet_v3_large")
    for name, conv in quant_convs(model):
        if name in ("classifier.0.convs.2.0", "classifier.0.convs.3.0"):
            conv.weight_quant.freeze_bits(2)
    elements = activation_elements(model, (64, 64))
    live = live_weights(model, (64, 64))
    w_live = float(mean_bits(model, elements, live)[0].detach())
    w_all = float(mean_bits(model, elements)[0].detach())
    params = {name: conv.weight.numel() for name, conv in quant_convs(model)}
    dead_share = sum(params[n] for n in ("classifier.0.convs.2.0", "classifier.0.convs.3.0")) / sum(params.values())
    live_share = sum(live[n] for n in ("classifier.0.convs.2.0", "classifier.0.convs.3.0")) / sum(live.values())
    assert w_all == pytest.approx(8 - 6 * dead_share) and w_live == pytest.approx(8 - 6 * live_share)
    assert live_share < dead_share / 4 and w_live > w_all + 1
