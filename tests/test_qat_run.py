"""The QAT loop end to end on the tiny phantom run: files, resume, the bit cost, and every bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_qat_interrupted_in_epoch
from device_runtime.core.errors import InputError
from export.cli import main as cli
from qat.checkpoint import load_qat_model, read_qat_checkpoint
from qat.config import QatConfig, build_qat_config, parse_bits
from qat.loss import QatLoss
from qat.modules import QuantConv2d
from qat.prepare import initialise_steps, project_bits_, quant_convs
from qat.run import run_qat
from qat.train import build_optimizer, train_one_epoch
from training.checkpoint import RESUME_ONLY

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(epochs=2, bit_epochs=1, observe_frames=8, batch_size=12, device="cpu")


@pytest.fixture(scope="module")
def qat_run(tiny_run):
    return run_qat(QatConfig(run_dir=str(tiny_run), **SMALL))


def test_run_writes_the_qat_folder(qat_run, tiny_run):
    assert qat_run == tiny_run / "qat" / "learned"
    for name in ("config.toml", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt", "bits.json",
                 "threshold.json", "threshold_curve.png", "test_metrics.json"):
        assert (qat_run / name).is_file(), name
    lines = [json.loads(l) for l in (qat_run / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2] and all("mean_weight_bits" in l for l in lines)
    assert [l["bits_frozen"] for l in lines] == [False, True]
    bits = json.loads((qat_run / "bits.json").read_text())
    assert set(bits) == {"layers", "mean_weight_bits", "mean_weight_bits_all_params", "mean_activation_bits"}
    assert set(bits["layers"][0]) == {"name", "weight_bits", "activation_bits", "params", "live_params",
                                      "activation_elements"}
    assert all(2 <= row["weight_bits"] <= 8 and 2 <= row["activation_bits"] <= 8 for row in bits["layers"])
    test = json.loads((qat_run / "test_metrics.json").read_text())
    float_test = json.loads((tiny_run / "test_metrics.json").read_text())
    assert set(float_test) <= set(test) and set(test["per_image"]) == set(float_test["per_image"])


def test_checkpoint_loads_weights_only_and_keeps_the_export_contract(qat_run):
    model, checkpoint, cfg, qcfg = load_qat_model(qat_run / "checkpoints" / "best.pt")
    assert checkpoint["threshold"] is not None and checkpoint["morphology"] is not None
    assert qcfg.bits == "learned" and cfg.input_size == (64, 64)
    assert not set(RESUME_ONLY) & set(checkpoint)  # best.pt is what export reads; resuming reads last.pt
    last = torch.load(qat_run / "checkpoints" / "last.pt", weights_only=True)  # finished: where it stopped, no more
    assert last["finished"] and last["epoch"] == 2 and not set(RESUME_ONLY) & set(last) and "model" not in last
    assert (qat_run / "checkpoints" / "last.pt").stat().st_size < 1e5
    table = json.loads((qat_run / "bits.json").read_text())
    for row, (name, conv) in zip(table["layers"], quant_convs(model)):
        assert row["name"] == name and row["weight_bits"] == conv.weight_quant.export_params().bits
        assert not conv.weight_quant.learns_bits, "the kept model has frozen (deployed) bits"
    conv = quant_convs(model)[5][1]
    x = torch.randn(1, conv.in_channels, 8, 8)
    p = conv.input_quant.export_params()
    assert torch.equal(conv.input_quant(x), torch.clamp(torch.round(x / p.scale), p.qmin, p.qmax) * p.scale)


def test_resume_continues_exactly(tiny_run, qat_run, monkeypatch):
    cfg = QatConfig(run_dir=str(tiny_run), name="resumed", **SMALL)
    run_qat_interrupted_in_epoch(monkeypatch, run_qat, cfg)
    with pytest.raises(InputError, match="already exists"):
        run_qat(cfg)
    run_qat(cfg, resume=True)
    straight = read_qat_checkpoint(qat_run / "checkpoints" / "best.pt")
    resumed = read_qat_checkpoint(tiny_run / "qat" / "resumed" / "checkpoints" / "best.pt")
    for key, value in straight["model"].items():  # best.pt: a finished run's last.pt keeps no weights
        assert torch.equal(value, resumed["model"][key]), key
    resumed = read_qat_checkpoint(tiny_run / "qat" / "resumed" / "checkpoints" / "last.pt")
    lines = (tiny_run / "qat" / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
    assert resumed["finished"] and "optimizer" not in resumed and "rng" not in resumed  # slimmed at the end


def test_resume_of_a_finished_qat_run_scores_it_again_without_training(tiny_run, qat_run, capsys):
    cfg = QatConfig(run_dir=str(tiny_run), name=qat_run.name, **SMALL)
    last = qat_run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    assert run_qat(cfg, resume=True) == qat_run
    assert "training finished earlier" in capsys.readouterr().out and last.read_bytes() == before
    assert (qat_run / "test_metrics.json").is_file()
    with pytest.raises(InputError, match="cannot be continued"):
        run_qat(cfg.replace(epochs=cfg.epochs + 1), resume=True)


# One process of a QAT run, SIGKILLed at the call-th call of MODULE:ATTRIBUTE, before that call runs or once it has
# returned. No handler runs and nothing is flushed: what is on disk is what a kill -9 leaves. "fresh" starts the run
# with the given QatConfig fields; otherwise the arguments are a `nerveseg` command line.
KILLED_PROCESS = """
import importlib, json, os, signal, sys
import torch
target, call, when, threads, *command = sys.argv[1:]
torch.set_num_threads(int(threads))
module_name, attribute = target.split(":")
module = importlib.import_module(module_name)
real, calls = getattr(module, attribute), []
def killing(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(call) and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(*args, **kwargs)
    if len(calls) == int(call):
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(module, attribute, killing)
if command[0] == "fresh":
    from qat.config import QatConfig
    from qat.run import run_qat
    run_qat(QatConfig(**json.loads(command[1])))
else:
    from export.cli import main
    main(command)
"""
# (where the kill falls, what is killed, which call, before/after it, (last.pt's epoch, log lines) it leaves)
KILLS = [
    ("before epoch 1's last.pt", "training.loop:save_checkpoint", 1, "before", (0, 1)),
    ("between epoch 2's best.pt and last.pt", "training.loop:save_checkpoint", 3, "before", (1, 2)),
    ("while writing epoch 2's last.pt", "torch:save", 2, "after", (1, 2)),
    ("before bits.json", "qat.run:write_json", 1, "before", (2, 2)),
]
TIMING = ("train_images_per_s", "train_seconds")


def _log(qat_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (qat_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_killed_again_and_again_resumes_to_the_same_run(tiny_run, qat_run):
    """kill -9 at four moments, each in the process that resumed the last kill (the first resume starts again: no
    checkpoint was written yet), then one last --resume: the same log, bits, threshold, test metrics and weights as
    the run that was never stopped."""
    name = "killed"
    qat_dir, resume = tiny_run / "qat" / name, ["qat", "--run-dir", str(tiny_run), "--name", name, "--resume",
                                                "--device", "cpu"]
    for number, (point, target, call, when, left) in enumerate(KILLS):
        command = ["fresh", json.dumps({**SMALL, "run_dir": str(tiny_run), "name": name})] if number == 0 else resume
        killed = subprocess.run([sys.executable, "-c", KILLED_PROCESS, target, str(call), when,
                                 str(torch.get_num_threads()), *command],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                                text=True, timeout=1200)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        last = qat_dir / "checkpoints" / "last.pt"
        last_epoch = torch.load(last, weights_only=True)["epoch"] if last.exists() else 0
        assert (last_epoch, len(_log(qat_dir))) == left, point  # the log is a line ahead of last.pt, or done
        assert not (qat_dir / "bits.json").exists(), point
        if target == "torch:save":
            assert list((qat_dir / "checkpoints").glob(".last.pt.*.tmp")), "the kill left a half-written temporary"

    assert cli(resume) == 0
    assert _log(qat_dir) == _log(qat_run)
    for file in ("bits.json", "threshold.json", "test_metrics.json"):
        assert json.loads((qat_dir / file).read_text()) == json.loads((qat_run / file).read_text()), file
    straight = read_qat_checkpoint(qat_run / "checkpoints" / "best.pt")["model"]  # a finished last.pt keeps none
    resumed = read_qat_checkpoint(qat_dir / "checkpoints" / "best.pt")["model"]
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[key], resumed[key]) for key in straight)
    assert read_qat_checkpoint(qat_dir / "checkpoints" / "last.pt")["finished"]
    assert not list((qat_dir / "checkpoints").glob(".*.tmp"))  # the next write of last.pt removed it


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(QuantConv2d(nn.Conv2d(1, 8, 3, padding=1)), nn.ReLU(),
                          QuantConv2d(nn.Conv2d(8, 8, 3, padding=1)), nn.ReLU(),
                          QuantConv2d(nn.Conv2d(8, 1, 3, padding=1), output_bits=None))
    return model


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _toy_model()

    def forward(self, x):
        return {"out": self.net(x)}


@pytest.mark.parametrize("bit_weight,falls", [(5.0, True), (0.0, False)])
def test_bits_fall_with_a_large_lambda_and_not_without(bit_weight, falls):
    model = _Toy()
    x = torch.rand(16, 1, 16, 16)
    target = (x > 0.5).float()
    initialise_steps(model, [x])
    elements = {name: 16 * 16 * conv.in_channels for name, conv in quant_convs(model)}
    criterion = QatLoss(elements, bit_weight=bit_weight)
    optimizer = build_optimizer(model, QatConfig(lr_bits=0.1))
    before = [b.detach() for b in criterion.bit_cost(model)[1:]]
    loader = [(x[i:i + 4], target[i:i + 4]) for i in range(0, 16, 4)] * 10
    train_one_epoch(model, loader, criterion, optimizer, torch.device("cpu"), "toy", show=False)
    weight_bits, activation_bits = (float(b.detach()) for b in criterion.bit_cost(model)[1:])
    assert [float(b) for b in before] == [8.0, 8.0]
    if falls:
        assert weight_bits <= 5.0 and activation_bits <= 6.0
    else:
        assert weight_bits == 8.0 and activation_bits == 8.0


def test_learned_a8_learns_weight_bits_and_keeps_every_activation_at_8():
    from qat.checkpoint import build_qat_model
    from qat.prepare import activation_quantizers

    model = build_qat_model("mobilenet_v3_large", QatConfig(bits="learned-a8"))
    convs = quant_convs(model)
    assert all(conv.weight_quant.learns_bits for _, conv in convs)
    quantizers = activation_quantizers(model)
    assert len(quantizers) > len(convs) // 2
    assert all(not q.learns_bits and q.bits() == 8 for q in quantizers)
    x = torch.rand(2, 1, 32, 32)
    initialise_steps(model, [x])
    criterion = QatLoss({name: 32 * 32 for name, _ in convs}, bit_weight=50.0)
    optimizer = build_optimizer(model, QatConfig(bits="learned-a8", lr_bits=1.0))
    for _ in range(3):
        optimizer.zero_grad()
        loss, _ = criterion(model, model(x)["out"], (x > 0.5).float())
        loss.backward()
        optimizer.step()
        project_bits_(model)
    weight_bits, activation_bits = (float(b.detach()) for b in criterion.bit_cost(model)[1:])
    assert weight_bits < 7.0 and activation_bits == 8.0


def test_learned_bits_start_at_initial_bits_and_rise_where_clipping_costs():
    from qat.checkpoint import build_qat_model

    model = build_qat_model("mobilenet_v3_large", QatConfig(bits="learned-a8", initial_bits=4))
    assert {conv.weight_quant.bits() for _, conv in quant_convs(model)} == {4}
    assert all(conv.weight_quant.learns_bits for _, conv in quant_convs(model))
    with pytest.raises(InputError, match="initial-bits"):
        QatConfig(bits="W4A8", initial_bits=4)
    with pytest.raises(InputError, match="initial-bits"):
        QatConfig(bits="learned", initial_bits=9)
    # no bit cost, a 2-bit start: the task loss alone raises the bits (clipped weights pull the range out)
    torch.manual_seed(0)
    toy = nn.Sequential(QuantConv2d(nn.Conv2d(1, 8, 3, padding=1), weight_bits=2), nn.ReLU(),
                        QuantConv2d(nn.Conv2d(8, 8, 3, padding=1), weight_bits=2), nn.ReLU(),
                        QuantConv2d(nn.Conv2d(8, 1, 3, padding=1), weight_bits=2, output_bits=None))
    x = torch.rand(16, 1, 16, 16)
    initialise_steps(toy, [x])
    net = _Toy()
    net.net = toy
    criterion = QatLoss({name: 16 * 16 * conv.in_channels for name, conv in quant_convs(net)}, bit_weight=0.0)
    optimizer = build_optimizer(net, QatConfig(lr_bits=0.1))
    loader = [(x[i:i + 4], (x[i:i + 4] > 0.5).float()) for i in range(0, 16, 4)] * 10
    train_one_epoch(net, loader, criterion, optimizer, torch.device("cpu"), "toy", show=False)
    assert float(criterion.bit_cost(net)[1].detach()) > 2.0


def test_target_bits_penalise_only_the_excess():
    model = _Toy()
    elements = {name: 1 for name, _ in quant_convs(model)}
    assert float(QatLoss(elements, target_bits=8.0).bit_cost(model)[0].detach()) == 0.0
    assert float(QatLoss(elements, target_bits=4.0).bit_cost(model)[0].detach()) == pytest.approx(0.5 + 0.5)


def test_the_freeze_caps_the_mean_weight_bits_at_the_target_taking_bits_where_the_training_nearly_did():
    from qat.bits import cap_weight_bits_
    from qat.prepare import freeze_bits_

    model = _Toy()
    convs = [conv for _, conv in quant_convs(model)]
    # continuous bits 6.9, 6.1 and 5.2 (ceil: 7, 7, 6); the second layer is the nearest to losing a bit
    for conv, n_log2 in zip(convs, (5.9, 5.1, 4.2)):
        conv.weight_quant.log2_range.data.fill_(n_log2)
    assert [c.weight_quant.bits() for c in convs] == [7, 7, 6]
    weights = {name: 100 for name, _ in quant_convs(model)}
    assert freeze_bits_(model) == 6 and freeze_bits_(model) == 0  # 3 weight + 3 input quantizers, then none
    taken = cap_weight_bits_(model, weights, 6.0)
    assert [(name[-1], old, new) for name, old, new in taken] == [("2", 7, 6), ("4", 6, 5)]  # 20/3 -> 19/3 -> 6
    assert [c.weight_quant.bits() for c in convs] == [7, 6, 5]
    for conv in convs:  # the integers of the new bits, steps re-chosen for them
        integers = conv.weight_quant.quantize_integers(conv.weight)
        assert integers.abs().max() <= 2 ** (conv.weight_quant.bits() - 1) - 1 and integers.abs().max() > 0
    assert cap_weight_bits_(model, weights, 6.0) == []  # already at the target
    cap_weight_bits_(model, weights, 1.0)  # out of reach: every layer stops at b_min
    assert [c.weight_quant.bits() for c in convs] == [2, 2, 2]


def test_a_target_run_ends_at_or_below_its_target(tiny_run, capsys):
    qat_dir = run_qat(QatConfig(run_dir=str(tiny_run), bits="learned-a8", target_bits=2.5, name="capped", **SMALL))
    bits = json.loads((qat_dir / "bits.json").read_text())
    assert bits["mean_weight_bits"] <= 2.5 and "capped at the target 2.5" in capsys.readouterr().out
    assert {row["weight_bits"] for row in bits["layers"]} >= {2, 3}  # a cap, not a uniform floor


@pytest.mark.parametrize("text,expected", [("learned", "learned"), ("8", "w8a8"), ("4", "w4a4"), ("W4A8", "w4a8"),
                                           ("w2a3", "w2a3"), ("learned-a8", "learned-a8"),
                                           ("Learned-A6", "learned-a6")])
def test_bit_settings(text, expected):
    assert parse_bits(text).default_name == expected


def test_recipes_carry_a_qat_table():
    cfg = build_qat_config("edge", run_dir="x")
    assert (cfg.epochs, cfg.bit_epochs, cfg.bit_weight) == (6, 4, 0.25)
    assert build_qat_config("quick", run_dir="x", epochs=2).bit_epochs == 1


def _error(capsys, argv) -> str:
    code = cli(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("bits", ["1", "9", "W9A2", "W4A1", "w4", "many", "learned-a9", "learned-a"])
def test_bad_bits_are_one_line_errors(tiny_run, capsys, bits):
    assert "--bits" in _error(capsys, ["qat", "--run-dir", str(tiny_run), "--bits", bits])


def test_a_run_without_a_tuned_checkpoint_is_refused(tiny_run, tmp_path, capsys):
    untuned = tmp_path / "untuned"
    shutil.copytree(tiny_run, untuned, ignore=shutil.ignore_patterns("qat"))
    from training.checkpoint import read_checkpoint, save_checkpoint

    checkpoint = read_checkpoint(untuned / "checkpoints" / "best.pt")
    checkpoint["threshold"] = None
    save_checkpoint(checkpoint, untuned / "checkpoints" / "best.pt")
    assert "not tuned" in _error(capsys, ["qat", "--run-dir", str(untuned)])
    (untuned / "checkpoints" / "best.pt").unlink()
    assert "best.pt: not found" in _error(capsys, ["qat", "--run-dir", str(untuned)])
    assert not (untuned / "qat").exists()
    assert "config.toml" in _error(capsys, ["qat", "--run-dir", str(tmp_path / "nothing")])


def test_an_existing_name_without_resume_is_refused_and_untouched(qat_run, capsys):
    before = (qat_run / "checkpoints" / "best.pt").read_bytes()
    err = _error(capsys, ["qat", "--run-dir", str(qat_run.parents[1]), "--name", "learned"])
    assert "already exists" in err and "--resume" in err
    assert (qat_run / "checkpoints" / "best.pt").read_bytes() == before


def test_unknown_qat_key_in_the_recipe_is_a_one_line_error(tiny_run, tmp_path, capsys):
    recipe = tmp_path / "odd.toml"
    recipe.write_text('arch = "mobilenet_v3_large"\n\n[qat]\nepochs = 2\nlearning_rate = 0.1\n')
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("qat"))
    config = (run / "config.toml").read_text().replace('recipe = "quick"', f'recipe = "{recipe}"')
    (run / "config.toml").write_text(config)
    err = _error(capsys, ["qat", "--run-dir", str(run)])
    assert "odd.toml" in err and "learning_rate" in err
    assert not (run / "qat").exists()


def test_a_checkpoint_of_the_previous_placement_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": "nerveseg-qat-checkpoint-1", "model": {}}, path)
    with pytest.raises(InputError, match="placement.*rerun `nerveseg qat`"):
        read_qat_checkpoint(path)


def test_lr_weights_flag_reaches_the_config_and_bad_values_are_one_line(tiny_run, capsys):
    from export.cli import get_args_parser, qat_config_from_args

    args = get_args_parser().parse_args(["qat", "--run-dir", str(tiny_run), "--bits", "8", "--lr-weights", "1e-5"])
    assert qat_config_from_args(args).lr_weights == 1e-5
    assert "lr_weights" in _error(capsys, ["qat", "--run-dir", str(tiny_run), "--bits", "8", "--lr-weights", "0"])


def test_schedule_flags_reach_the_config_and_bad_values_are_one_line(tiny_run, capsys):
    from export.cli import get_args_parser, qat_config_from_args

    argv = ["qat", "--run-dir", str(tiny_run), "--bits", "learned-a8", "--initial-bits", "4", "--epochs", "6",
            "--bit-epochs", "2"]
    cfg = qat_config_from_args(get_args_parser().parse_args(argv))
    assert (cfg.initial_bits, cfg.epochs, cfg.bit_epochs) == (4, 6, 2)
    assert "bit_epochs" in _error(capsys, argv[:-1] + ["6"])  # bits must freeze before the last epoch
    assert "initial-bits" in _error(capsys, ["qat", "--run-dir", str(tiny_run), "--bits", "8", "--initial-bits", "4"])


def test_b_min_flag_reaches_the_config_and_a_floor_outside_2_to_b_max_is_one_line(tiny_run, capsys):
    from export.cli import get_args_parser, qat_config_from_args

    argv = ["qat", "--run-dir", str(tiny_run), "--bits", "learned", "--b-min", "3"]
    assert qat_config_from_args(get_args_parser().parse_args(argv)).b_min == 3
    assert qat_config_from_args(get_args_parser().parse_args(argv[:-2])).b_min == 2  # the recipe's
    for floor in ("1", "9"):
        assert "b_min and b_max must satisfy" in _error(capsys, argv[:-1] + [floor])


def test_a_qat_checkpoint_rebuilds_the_float_runs_aspp_rates(tmp_path, tiny_config):
    from qat.checkpoint import build_qat_model, load_qat_model, make_qat_checkpoint, save_qat_checkpoint
    from training.model import build_model

    cfg = tiny_config.replace(aspp_rates=(3, 6, 9))
    qcfg = QatConfig(bits="8")
    model = build_qat_model(cfg.arch, qcfg, build_model(cfg.arch, aspp_rates=cfg.aspp_rates).eval())
    save_qat_checkpoint(make_qat_checkpoint(cfg, qcfg, model), tmp_path / "q.pt")
    loaded = load_qat_model(tmp_path / "q.pt")[0]
    assert [b[0].dilation[0] for b in loaded.classifier[0].convs[1:-1]] == [3, 6, 9]
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)["out"], model.eval()(x)["out"])


def test_a_qat_checkpoint_rebuilds_the_float_runs_relu_backbone(tmp_path, tiny_config):
    """A QAT model is rebuilt from its float config: a ReLU backbone's checkpoint loads as the ReLU network (no
    hardswish quantizers), its outputs unchanged, and the x86 grid puts the former hardswish outputs on u8."""
    from qat.checkpoint import build_qat_model, load_qat_model, make_qat_checkpoint, save_qat_checkpoint
    from qat.modules import QuantHardswish
    from training.model import build_model_of

    cfg = tiny_config.replace(relu_backbone=True)
    qcfg = QatConfig(bits="4", grid="x86")
    model = build_qat_model(cfg.arch, qcfg, build_model_of(cfg).eval())
    save_qat_checkpoint(make_qat_checkpoint(cfg, qcfg, model), tmp_path / "q.pt")
    loaded = load_qat_model(tmp_path / "q.pt")[0]
    assert not any(isinstance(m, QuantHardswish) for m in loaded.modules())
    assert loaded.get_submodule("backbone.16.0").output_quant.unsigned
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)["out"], model.eval()(x)["out"])


def test_qat_fine_tunes_under_the_float_runs_own_augmentation(tiny_run, monkeypatch):
    import training.train
    from training.config import load_run_config
    from training.data.transforms import AugmentConfig

    seen = []
    real = training.train.build_train_transform
    monkeypatch.setattr(training.train, "build_train_transform", lambda augment: seen.append(augment) or real(augment))
    run_qat(QatConfig(run_dir=str(tiny_run), name="augmented", bits="8", **{**SMALL, "epochs": 1}))
    float_cfg = load_run_config(tiny_run)
    assert seen == [AugmentConfig.from_config(float_cfg)]
    assert seen[0].gamma > 0 and seen[0].scale != (1.0, 1.0)  # the quick recipe's zoom and gamma, not only flips


def test_distillation_pulls_towards_the_teachers_probabilities_and_vanishes_where_they_match():
    criterion = QatLoss({}, bit_weight=0.0, distill=1.0)
    criterion.bit_cost = lambda model: (torch.tensor(0.0), torch.tensor(8.0), torch.tensor(8.0))  # no quantizers
    model = nn.Conv2d(1, 1, 1)
    target = torch.zeros(1, 1, 4, 4)
    teacher = torch.linspace(-3, 3, 16).reshape(1, 1, 4, 4)
    grads = []
    for start in (teacher.clone(), torch.zeros(1, 1, 4, 4)):
        logits = start.requires_grad_(True)
        distilled, parts = criterion(model, logits, target, teacher)
        plain, _ = criterion(model, logits, target)
        assert "distill" in parts and float((distilled - plain).detach()) == pytest.approx(parts["distill"])
        grads.append(torch.autograd.grad(distilled - plain, logits)[0])
    assert torch.allclose(grads[0], torch.zeros_like(grads[0]), atol=1e-7)  # at the teacher: nothing to learn
    assert torch.equal(torch.sign(grads[1]), -torch.sign(teacher))  # elsewhere: towards its probabilities


def test_a_distilled_run_logs_the_term_and_keeps_the_setting(tiny_run, capsys):
    qat_dir = run_qat(QatConfig(run_dir=str(tiny_run), name="distilled", bits="8", distill=1.0,
                                **{**SMALL, "epochs": 1}))
    line = json.loads((qat_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line["distill"] > 0 and line["train_loss"] > line["task"]
    assert load_qat_model(qat_dir / "checkpoints" / "best.pt")[3].distill == 1.0
    assert cli(["qat", "--run-dir", str(tiny_run), "--bits", "8", "--distill", "-1", "--name", "bad"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--distill must be >= 0" in err and len(err.splitlines()) == 1


def test_every_qat_flag_is_a_config_field():
    """`qat_config_from_args` takes the flags whose names are QatConfig fields: a flag that is none would be ignored."""
    from export.cli import get_args_parser

    commands = next(a for a in get_args_parser()._actions if a.dest == "command")
    flags = {action.dest for action in commands.choices["qat"]._actions} - {"help", "resume"}
    assert "lr_weights" in flags and flags <= set(QatConfig.__dataclass_fields__)
