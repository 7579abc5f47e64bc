import pytest
import torch

from device_runtime.core.errors import InputError
from training.losses import BCEDiceLoss, soft_dice_loss
from training.model import LogitsOnly, build_model


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "resnet50"])
def test_one_grey_channel_in_one_logit_channel_out(arch):
    model = build_model(arch).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 96))["out"]
    assert out.shape == (2, 1, 64, 96)
    assert LogitsOnly(model)(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_resnet50_runs_at_output_stride_8():
    # the paper's DeepLabV3: dilated layer3 and layer4 keep 1/8 resolution
    model = build_model("resnet50")
    features = model.backbone(torch.rand(1, 1, 64, 64))["out"]
    assert features.shape[-2:] == (8, 8)


def test_conv_bn_relu_stay_modules_for_qat_fusion():
    model = build_model("mobilenet_v3_large")
    first = model.backbone["0"]
    assert isinstance(first[0], torch.nn.Conv2d) and first[0].in_channels == 1
    assert isinstance(first[1], torch.nn.BatchNorm2d)


def test_local_backbone_weights_are_loaded_and_the_rgb_stem_summed(tmp_path):
    from torchvision.models import mobilenet_v3_large

    classifier = mobilenet_v3_large(weights=None)
    path = tmp_path / "backbone.pth"
    torch.save(classifier.state_dict(), path)
    model = build_model("mobilenet_v3_large", pretrained=str(path))
    stem = model.backbone["0"][0].weight
    assert torch.allclose(stem, classifier.features[0][0].weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.backbone["5"].block[0][0].weight, classifier.features[5].block[0][0].weight)


def test_pretrained_file_errors_are_one_line(tmp_path):
    with pytest.raises(InputError, match="not found"):
        build_model("resnet50", pretrained=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"x": torch.zeros(3)}, wrong)
    with pytest.raises(InputError, match="does not fit"):
        build_model("resnet50", pretrained=str(wrong))


@pytest.mark.parametrize("logit, target, expected", [(20.0, 1.0, 0.0), (-20.0, 0.0, 0.0)])
def test_loss_is_zero_for_confident_correct_predictions(logit, target, expected):
    loss = BCEDiceLoss()(torch.full((1, 1, 2, 2), logit), torch.full((1, 1, 2, 2), target))
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_soft_dice_of_half_overlap():
    # prob 1 on two of four pixels, target on one of those and one other: 2*1 / (2 + 2) = 1/2 -> loss 1/2
    logits = torch.tensor([[[[50.0, 50.0], [-50.0, -50.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert float(soft_dice_loss(logits, target, smooth=1e-9)) == pytest.approx(0.5, abs=1e-6)


def test_loss_checks_its_arguments():
    with pytest.raises(ValueError):
        BCEDiceLoss(bce_weight=0, dice_weight=0)
    with pytest.raises(ValueError, match="shape"):
        BCEDiceLoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 3, 3))


def _aspp_dilations(model) -> list[int]:
    return [branch[0].dilation[0] for branch in model.classifier[0].convs[1:-1]]


def test_aspp_rates_are_a_config_choice_that_checkpoints_keep(tmp_path, tiny_config):
    from training.checkpoint import load_model, make_checkpoint, save_checkpoint

    assert _aspp_dilations(build_model("mobilenet_v3_large")) == [12, 24, 36]  # torchvision's
    cfg = tiny_config.replace(aspp_rates=(3, 6, 9))
    model = build_model(cfg.arch, aspp_rates=cfg.aspp_rates)
    assert _aspp_dilations(model) == [3, 6, 9]
    # the weights do not depend on the rates, so only the saved config can rebuild the right network
    save_checkpoint(make_checkpoint(cfg, model), tmp_path / "c.pt")
    loaded, _, loaded_cfg = load_model(tmp_path / "c.pt")
    assert loaded_cfg.aspp_rates == (3, 6, 9) and _aspp_dilations(loaded) == [3, 6, 9]
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)["out"], model.eval()(x)["out"])
    with pytest.raises(InputError, match="aspp_rates"):
        tiny_config.replace(aspp_rates=(0, 6))


def test_aspp_rates_flag_reaches_the_config(tmp_path):
    from training.train import config_from_args, get_args_parser

    def cfg(*flags):
        return config_from_args(get_args_parser().parse_args(["--recipe", "small", "--run-dir", str(tmp_path), *flags]))

    assert cfg().aspp_rates == (12, 24, 36)
    assert cfg("--aspp-rates", "3", "6", "9").aspp_rates == (3, 6, 9)


@pytest.mark.parametrize("arch, skip_shape", [("mobilenet_v3_large", (40, 16, 16)), ("resnet50", (256, 32, 32))])
def test_skip_decoder_reads_a_map_twice_as_fine_and_checkpoints_keep_it(arch, skip_shape, tmp_path, tiny_config):
    from training.checkpoint import load_model, make_checkpoint, save_checkpoint

    model = build_model(arch, decoder="skip").eval()
    x = torch.rand(1, 1, 128, 128)
    features = model.backbone(x)
    assert features["skip"].shape[1:] == skip_shape  # twice the resolution of the ASPP's input
    assert features["out"].shape[-1] * 2 == skip_shape[-1]
    with torch.no_grad():
        out = model(x)["out"]
    assert out.shape == (1, 1, 128, 128)
    # the decoder really reads the skip features: changing them changes the logits
    with torch.no_grad():
        other = model.decoder(model.classifier(features["out"]), torch.rand_like(features["skip"]))
        assert not torch.allclose(model.decoder(model.classifier(features["out"]), features["skip"]), other)
    # the last convolution in module order is the classifier's (QAT leaves its output, the logits, in float)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert last is model.decoder.classifier and last.out_channels == 1
    if arch == "mobilenet_v3_large":  # the state dict of a plain model loads only with a decoder of the same kind
        cfg = tiny_config.replace(decoder="skip")
        save_checkpoint(make_checkpoint(cfg, model), tmp_path / "c.pt")
        loaded, _, loaded_cfg = load_model(tmp_path / "c.pt")
        assert loaded_cfg.decoder == "skip" and isinstance(loaded, type(model))
        with torch.no_grad():
            assert torch.equal(loaded(x)["out"], out)


def test_skip_decoder_starts_its_backbone_from_a_plain_checkpoint(tmp_path):
    plain = build_model("mobilenet_v3_large")
    path = tmp_path / "plain.pt"
    torch.save({"model": plain.state_dict()}, path)
    model = build_model("mobilenet_v3_large", pretrained=str(path), decoder="skip")
    assert torch.equal(model.backbone["6"].block[0][0].weight, plain.backbone["6"].block[0][0].weight)
    with pytest.raises(InputError, match="decoder must be one of"):
        build_model("mobilenet_v3_large", decoder="unet")


def test_decoder_flag_reaches_the_config(tmp_path):
    from training.train import config_from_args, get_args_parser

    def cfg(*flags):
        return config_from_args(get_args_parser().parse_args(["--recipe", "small", "--run-dir", str(tmp_path), *flags]))

    assert cfg().decoder == "none"
    assert cfg("--decoder", "skip").decoder == "skip"
    with pytest.raises(InputError, match="decoder"):
        cfg().replace(decoder="unet")


def test_relu_backbone_swaps_every_hardswish_and_checkpoints_keep_it(tmp_path, tiny_config):
    """relu_backbone: the same parameters (a plain state dict loads), ReLU where the hardswish was, so the output
    features differ; the config says so, and a checkpoint of it loads back as the ReLU network."""
    from training.checkpoint import load_model, make_checkpoint, save_checkpoint

    plain = build_model("mobilenet_v3_large").eval()
    model = build_model("mobilenet_v3_large", relu_backbone=True).eval()
    assert not any(isinstance(m, torch.nn.Hardswish) for m in model.modules())
    relus = sum(isinstance(m, torch.nn.ReLU) for m in model.modules())
    assert relus == sum(isinstance(m, torch.nn.ReLU) for m in plain.modules()) + 20
    model.load_state_dict(plain.state_dict())
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        out = model(x)["out"]  # an untrained head's logits are all but constant: the features tell the two apart
        assert not torch.allclose(model.backbone(x)["out"], plain.backbone(x)["out"])
    save_checkpoint(make_checkpoint(tiny_config.replace(relu_backbone=True), model), tmp_path / "c.pt")
    loaded, _, loaded_cfg = load_model(tmp_path / "c.pt")
    assert loaded_cfg.relu_backbone and not any(isinstance(m, torch.nn.Hardswish) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x)["out"], out)
    with pytest.raises(InputError, match="resnet50 has none"):
        build_model("resnet50", relu_backbone=True)


def test_relu_backbone_flag_reaches_the_config(tmp_path):
    from training.train import config_from_args, get_args_parser

    def cfg(*flags):
        return config_from_args(get_args_parser().parse_args(["--recipe", "small", "--run-dir", str(tmp_path), *flags]))

    assert not cfg().relu_backbone
    assert cfg("--relu-backbone").relu_backbone and not cfg("--no-relu-backbone").relu_backbone
    with pytest.raises(InputError, match="relu_backbone replaces MobileNetV3's hardswish; resnet50 has none"):
        cfg("--relu-backbone", "--arch", "resnet50")
