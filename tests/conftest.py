"""Shared fixtures: paths, a tiny synthetic dataset and one tiny trained run that the stage tests share."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "usgra-seg"
SCRIPTS = REPO / "scripts"


def run_qat_interrupted_in_epoch(monkeypatch, run_qat, qcfg, epoch: int = 2) -> None:
    """Run `run_qat(qcfg)` and stop it with KeyboardInterrupt as its `epoch`-th training epoch starts (the epochs
    before it are checkpointed), then put the real epoch back so that a resume trains normally."""
    from qat import train as qat_train

    real_epoch, calls = qat_train.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(qat_train, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_qat(qcfg)
    monkeypatch.setattr(qat_train, "train_one_epoch", real_epoch)


def conv_input_integers(graph, conv_names: list[str], frames):
    """Run an exported QDQ graph as written (ONNX Runtime CPU, no optimisation) on `frames` and return (its output,
    the int8 integers each named convolution's QuantizeLinear gives its input, the float values it quantized), the
    last two in the order of `conv_names`."""
    import onnx
    import onnxruntime as ort

    producer = {o: n for n in graph.graph.node for o in n.output}
    by_name = {n.name: n for n in graph.graph.node if n.op_type == "Conv"}
    quantizes = [producer[producer[by_name[name].input[0]].input[0]] for name in conv_names]
    probe = onnx.ModelProto.FromString(graph.SerializeToString())
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in
                              [q.output[0] for q in quantizes] + [q.input[0] for q in quantizes])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outputs = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"input": frames})
    count = len(conv_names)
    return outputs[0], outputs[1:1 + count], outputs[1 + count:]


def load_script(name: str):
    """A script of scripts/ as a module (they are run as files, not installed)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there while the script runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "images").is_dir():
        pytest.skip(f"real data not present at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    """The quick recipe shrunk to seconds: 64x64 frames, 2 epochs on 30 phantom frames."""
    from training.config import build_config

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return build_config("quick", run_dir=str(run_dir), input_size=(64, 64), epochs=2, batch_size=4,
                        synth_count=30, device="cpu", val_batch_size=8)


@pytest.fixture(scope="session")
def tiny_run(tiny_config) -> Path:
    """A trained, tuned and evaluated run folder (train -> tune -> evaluate), shared by the stage tests."""
    from training import stages, train

    run_dir = train.main(tiny_config)
    stages.tune_run(run_dir, "cpu")
    stages.evaluate_run(run_dir, "cpu")
    return run_dir


@pytest.fixture(scope="session")
def tiny_qat_run(tiny_run) -> Path:
    """A W8A8 QAT run (1 epoch) of the tiny run, finished and tuned: RUN/qat/w8a8; shared by the INT8 tests. It
    deploys its trained model (keep_start off): the parity tests need a model whose steps training has moved off
    the values their initialisation gives; its start (checkpoints/start.pt) is checked apart (tests/test_parity_gate.py,
    tests/test_qat_selection.py)."""
    pytest.importorskip("qat.run", reason="the qat training loop is not installed")
    from qat.config import QatConfig
    from qat.run import run_qat

    return run_qat(QatConfig(run_dir=str(tiny_run), name="w8a8", bits="w8a8", epochs=1, observe_frames=8,
                             keep_start=False, device="cpu"))
