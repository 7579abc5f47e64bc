"""Test-time flip averaging: the module's numbers, its graph, and a run tuned, evaluated, exported and run with it."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from conftest import load_script

from device_runtime.backends.selection import open_backend
from device_runtime.core.manifest import load_manifest
from device_runtime.pipeline import Segmenter
from device_runtime.timing import Timings
from export.bundle.onnx_export import export_onnx, tensorrt_problems
from export.bundle.parity import onnx_probabilities
from export.bundle.writer import FP32_NAME, export_bundle
from export.cli import main as cli_main
from training import pretrain, stages
from training.config import build_config
from training.model import FLIP_LOGIT_LIMIT, FlipAveraged, as_deployed, build_model


class FixedLogits(nn.Module):
    """A stand-in network whose logits are its input times a column ramp: not mirror-symmetric, and as large as
    asked (the extremes of the sigmoid)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        ramp = torch.linspace(-1.0, 2.0, x.shape[-1])
        return {"out": self.scale * (x - 0.3) * ramp}


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


@pytest.mark.parametrize("scale", [3.0, 400.0])  # ordinary logits, and logits far beyond float32's sigmoid
def test_the_output_is_the_logit_of_the_mean_of_the_two_probabilities(scale):
    net = FixedLogits(scale)
    x = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = FlipAveraged(net)(x)["out"].numpy()
        plain = net(x)["out"].numpy()
        mirrored = net(x.flip(3))["out"].flip(3).numpy()
    expected = 0.5 * (_sigmoid(plain) + _sigmoid(mirrored))
    assert np.isfinite(out).all() and np.abs(out).max() <= FLIP_LOGIT_LIMIT
    assert np.abs(_sigmoid(out) - expected).max() < 1e-6
    assert not np.allclose(plain, mirrored)  # the mirror did change something to average


def test_no_tensor_of_the_averaging_graph_is_infinite_where_both_logits_saturate(tmp_path):
    """ONNX Runtime's Percentile and Entropy calibrators read the range of every tensor, the float tail included, and
    stop on an infinite one (on usgra-seg they failed so, and PTQ fell back to MinMax alone)."""
    import onnxruntime as ort

    model = onnx.load(str(export_onnx(FlipAveraged(FixedLogits(400.0)), tmp_path / "f.onnx", (5, 7))))
    names = [out for node in model.graph.node for out in node.output]
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((2, 1, 5, 7), dtype=np.float32)
    values = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))
    floats = {name: v for name, v in values.items() if np.issubdtype(v.dtype, np.floating)}
    assert len(floats) > 5 and [name for name, v in floats.items() if not np.isfinite(v).all()] == []


def test_a_mirrored_frame_gives_the_mirrored_output():
    net = FixedLogits(3.0)
    x = torch.rand(1, 1, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(FlipAveraged(net)(x.flip(3))["out"], FlipAveraged(net)(x)["out"].flip(3), atol=1e-6)


def test_as_deployed_wraps_only_when_asked():
    net = FixedLogits(1.0)
    assert as_deployed(net, False) is net and isinstance(as_deployed(net, True), FlipAveraged)


def test_the_graph_holds_one_network_tensorrt_accepts_and_matches_pytorch_at_any_batch(tmp_path):
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_large").eval()
    plain = onnx.load(str(export_onnx(model, tmp_path / "plain.onnx", (64, 48))))
    path = export_onnx(FlipAveraged(model), tmp_path / "flip.onnx", (64, 48))
    graph = onnx.load(str(path))
    count = lambda g, op: sum(n.op_type == op for n in g.graph.node)  # noqa: E731
    assert count(graph, "Conv") == count(plain, "Conv")  # the frame and its mirror run as one batch
    assert count(graph, "Gather") >= 2 and tensorrt_problems(path) == []
    images = np.random.default_rng(0).random((3, 64, 48), dtype=np.float32)
    with torch.no_grad():
        reference = torch.sigmoid(FlipAveraged(model)(torch.from_numpy(images)[:, None])["out"][:, 0]).numpy()
    assert np.abs(onnx_probabilities(path, images) - reference).max() < 1e-5


@pytest.fixture(scope="module")
def flip_run(tiny_run, tmp_path_factory):
    """The shared tiny run, copied, tuned with --flip-tta, evaluated and exported."""
    run = tmp_path_factory.mktemp("flip") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("bundle", "qat"))  # its own QAT runs, not the shared
    assert cli_main(["tune", "--run-dir", str(run), "--device", "cpu", "--flip-tta"]) == 0
    stages.evaluate_run(run, "cpu")
    export_bundle(run / "checkpoints" / "best.pt", device="cpu")
    return run


def test_tune_records_the_choice_and_evaluation_and_export_follow_it(flip_run, capsys):
    tuned = json.loads((flip_run / "threshold.json").read_text())
    assert tuned["flip_tta"] is True
    manifest = load_manifest(flip_run / "bundle")
    assert manifest.training_config["flip_tta"] is True and manifest.threshold == pytest.approx(tuned["threshold"])
    assert manifest.metrics["parity"]["fp32"]["max_prob_diff"] < 1e-4
    assert manifest.metrics["tensorrt_problems"] == []
    # the PyTorch evaluation averaged too: the graph scores the test frames as it did
    test = json.loads((flip_run / "test_metrics.json").read_text())
    assert manifest.metrics["test_onnx"]["dice"] == pytest.approx(test["dice"], abs=1e-3)
    assert "Gather" in {n.op_type for n in onnx.load(str(flip_run / "bundle" / FP32_NAME)).graph.node}


def test_the_device_runtime_runs_the_bundle_unchanged_and_gets_the_averaged_probabilities(flip_run):
    from training.checkpoint import load_model

    manifest = load_manifest(flip_run / "bundle")
    net = open_backend(flip_run / "bundle", manifest, "ort-cpu", "fp32", threads=1)
    model, _, cfg = load_model(flip_run / "checkpoints" / "best.pt")
    frame = np.round(stages.split_arrays(flip_run, "val", cfg)[0][0] * 255).astype(np.uint8)  # a phantom frame
    result = Segmenter(manifest, net)(frame, Timings())
    x = torch.from_numpy(net.input_buffer.copy())  # the frame as the runtime preprocessed it
    with torch.no_grad():
        expected = 0.5 * (torch.sigmoid(model(x)["out"]) + torch.sigmoid(model(x.flip(3))["out"]).flip(3))
    # the bundle's own fp32 parity bound: ONNX Runtime's and PyTorch's float32 kernels differ by up to ~2e-5 here
    assert np.abs(result.prob - expected[0, 0].numpy()).max() < 1e-4


def test_tune_without_the_flag_follows_the_config_and_no_flip_tta_overrides_it(flip_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(flip_run, run)
    assert cli_main(["tune", "--run-dir", str(run), "--device", "cpu", "--flip-tta"]) == 0
    assert "(flip-averaged)" in capsys.readouterr().out
    assert cli_main(["tune", "--run-dir", str(run), "--device", "cpu", "--no-flip-tta"]) == 0
    assert "(flip-averaged)" not in capsys.readouterr().out
    assert json.loads((run / "threshold.json").read_text())["flip_tta"] is False
    assert stages.tune_run(run, "cpu")["flip_tta"] is False  # the tiny run's config (quick) has it off


def test_qat_and_the_int8_bundle_of_a_flip_tuned_run_average_too(flip_run):
    from export.bundle.int8 import CPU_NAME, TENSORRT_NAME, export_int8_bundle
    from qat.config import QatConfig
    from qat.run import run_qat

    qat_dir = run_qat(QatConfig(run_dir=str(flip_run), name="w8a8", bits="w8a8", epochs=1, observe_frames=8,
                                device="cpu"))
    assert json.loads((qat_dir / "threshold.json").read_text())["flip_tta"] is True
    bundle, manifest = export_int8_bundle(flip_run, qat_dir.name, device="cpu")
    plain_convs = sum(n.op_type == "Conv" for n in onnx.load(str(flip_run / "bundle" / FP32_NAME)).graph.node)
    for name in (FP32_NAME, TENSORRT_NAME, CPU_NAME):
        nodes = onnx.load(str(bundle / name)).graph.node
        assert "Gather" in {n.op_type for n in nodes} and sum(n.op_type == "Conv" for n in nodes) == plain_convs
    assert all(manifest.metrics["parity"][name]["gate"]["passed"] for name in (TENSORRT_NAME, CPU_NAME))
    assert manifest.metrics["parity"]["fp32"]["max_prob_diff"] < 1e-4  # its FP32 graph is checked too (write_bundle)
    assert [p for p in manifest.metrics["tensorrt_problems"] if p.startswith(TENSORRT_NAME)] == []


def test_the_flag_reaches_the_config_and_never_the_phantom_stage():
    from training.train import config_from_args, get_args_parser

    args = get_args_parser().parse_args(["--recipe", "quick", "--run-dir", "r", "--flip-tta", "--pretrained", "phantom"])
    cfg = config_from_args(args)
    assert cfg.flip_tta is True and pretrain.phantom_config(cfg).flip_tta is False
    args = get_args_parser().parse_args(["--recipe", "quick", "--run-dir", "r", "--no-flip-tta"])
    assert config_from_args(args).flip_tta is False
    assert build_config("quick").flip_tta is False and build_config("small").flip_tta is True  # (r), docs/accuracy.md


def test_training_ignores_the_flag(tiny_config, tmp_path):
    """flip_tta is a deployment choice: the same recipe with and without it trains the very same weights."""
    from training import train
    from training.checkpoint import read_checkpoint

    states = []
    for flip_tta in (False, True):
        cfg = tiny_config.replace(run_dir=str(tmp_path / str(flip_tta)), steps=2, flip_tta=flip_tta)
        states.append(read_checkpoint(train.main(cfg) / "checkpoints" / "best.pt")["model"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_bench_graphs_times_the_plain_and_the_averaged_graph_side_by_side(flip_run, tmp_path, capsys):
    from training.checkpoint import load_model

    bench = load_script("bench_graphs")
    model, _, _ = load_model(flip_run / "checkpoints" / "best.pt")
    plain = export_onnx(model, tmp_path / "plain.onnx", (64, 64))
    flip = flip_run / "bundle" / FP32_NAME
    assert bench.main([f"plain={plain}", f"flip={flip}", "--rounds", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "64x64" in out and "plain: median" in out and "flip: median" in out
    assert bench.main([f"plain={plain}", f"other={tmp_path / 'missing.onnx'}"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line, no traceback


def test_ort_ptq_quantizes_the_network_and_leaves_the_averaging_in_float(tmp_path):
    from export.report.ptq import flip_averaging_nodes, preprocess_for_ptq, quantize_ptq

    torch.manual_seed(0)
    model = build_model("mobilenet_v3_large").eval()
    plain = preprocess_for_ptq(export_onnx(model, tmp_path / "p.onnx", (64, 64)), tmp_path / "pp.onnx")
    flip = preprocess_for_ptq(export_onnx(FlipAveraged(model), tmp_path / "f.onnx", (64, 64)), tmp_path / "fp.onnx")
    assert flip_averaging_nodes(plain) == []
    excluded = flip_averaging_nodes(flip)
    ops = {n.name: n.op_type for n in onnx.load(str(flip)).graph.node}
    assert {ops[name] for name in excluded} >= {"Gather", "Concat", "Sigmoid", "Log", "Clip"}
    assert "Conv" not in {ops[name] for name in excluded}
    frames = np.random.default_rng(0).random((4, 64, 64), dtype=np.float32)
    nodes = onnx.load(str(quantize_ptq(flip, tmp_path / "q.onnx", frames, "MinMax"))).graph.node
    made_by = {out: n.name for n in nodes for out in n.output}
    quantized = {made_by.get(n.input[0], n.input[0]) for n in nodes if n.op_type == "QuantizeLinear"}
    # the mirror and the average stay float; the batch of two (Concat) is the network's input, quantized as such
    assert {ops[name] for name in quantized & set(excluded)} == {"Concat"} and "input" not in quantized
    assert sum(n.op_type == "QuantizeLinear" for n in nodes) > 10  # the network itself is quantized
