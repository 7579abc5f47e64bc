"""One-bit grids (issue 33's W2A2): binary weights and [0, 1] activations read through ReLU, given by the allocation
at a 2-bit budget; the exported graph holds the integers the fake-quant model computes."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from qat.allocation import bit_choices
from qat.config import build_qat_config
from qat.prepare import activation_quantizers, initialise_steps, prepare_qat, quant_convs
from qat.quantizers import FakeQuant
from device_runtime.core.errors import InputError


def _binary(w: torch.Tensor) -> FakeQuant:
    q = FakeQuant(narrow=True, channels=w.shape[0], bits=4, learn_bits=False)
    q.freeze_bits(1)
    q.init_from_tensor(w)
    return q


def test_binary_weights_are_the_sign_times_the_least_squares_scale():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.linspace(0.1, 2.0, 6).reshape(6, 1, 1, 1)
    w[0, 0, 0, 0] = 0.0  # a zero weight takes +1: two levels, no zero
    q = _binary(w)
    rows = w.reshape(6, -1)
    scale = q.step()
    torch.testing.assert_close(scale, rows.abs().mean(dim=1))
    for factor in (0.9, 1.1):  # mean |w| is the least squared error of scale x sign(w)
        signs = torch.where(rows >= 0, 1.0, -1.0)
        assert ((signs * scale[:, None] - rows) ** 2).sum() < ((signs * factor * scale[:, None] - rows) ** 2).sum()
    integers = q.quantize_integers(w)
    assert set(integers.unique().tolist()) == {-1.0, 1.0} and integers[0, 0, 0, 0] == 1.0
    torch.testing.assert_close(q(w), integers * scale.reshape(6, 1, 1, 1))
    assert tuple(q.export_params())[1:] == (-1, 1, 1) and "binary" in repr(q)


def test_binary_gradients_follow_lsq_within_the_grid_and_stop_outside():
    """d(scale x sign(w)) / d scale = sign(w) times LSQ's grad_factor 1 / sqrt(N x qmax) (qmax 1); the weight's gradient
    passes straight through where |w / scale| <= 1 and is zero beyond, as a clipped weight's in LSQ."""
    w = torch.tensor([[-3.0, -0.5, 0.25, 2.0]]).reshape(1, 4, 1, 1)
    q = _binary(w)  # scale = mean |w| = 1.4375
    weight = w.clone().requires_grad_(True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1, 1)
    (q(weight) * upstream).sum().backward()
    assert weight.grad.flatten().tolist() == [0.0, 2.0, 3.0, 0.0]
    expected_log_step_grad = (-1 - 2 + 3 + 4) / 4 ** 0.5 * q.step() * np.log(2.0)  # through log2(step)
    torch.testing.assert_close(q.log2_step.grad, expected_log_step_grad)


def test_one_bit_activations_only_where_every_reader_applies_relu():
    x = torch.tensor([-1.0, 0.2, 0.6, 3.0])
    unsigned = FakeQuant(narrow=False, bits=4, learn_bits=False)
    unsigned.set_unsigned()
    unsigned.freeze_bits(1)
    with torch.no_grad():
        unsigned.log2_step.fill_(0.0)  # step 1
    assert tuple(unsigned.export_params())[1:] == (0, 1, 1)
    assert unsigned(x).tolist() == [0.0, 0.0, 1.0, 1.0]
    relu_read = FakeQuant(narrow=False, bits=3, learn_bits=False)
    relu_read.set_tight(read_through_relu=True)
    relu_read.freeze_bits(1)
    assert relu_read.integer_range(1) == (0, 1)
    signed, tight = FakeQuant(narrow=False, bits=3, learn_bits=False), FakeQuant(narrow=False, bits=3, learn_bits=False)
    tight.set_tight()
    for q in (signed, tight):
        with pytest.raises(ValueError, match="one bit: weights, or activations read through ReLU"):
            q.freeze_bits(1)
    with pytest.raises(ValueError, match="2-8 bits"):
        FakeQuant(narrow=True, channels=2, bits=4, learn_bits=False).freeze_bits(0)


def test_a_2_bit_budget_may_give_one_bit_only_to_fixed_quantizers_with_a_one_bit_grid():
    weight = FakeQuant(narrow=True, channels=4, bits=2, learn_bits=False)
    unsigned = FakeQuant(narrow=False, bits=2, learn_bits=False)
    unsigned.set_unsigned()
    hardswish = FakeQuant(narrow=False, bits=2, learn_bits=False)
    hardswish.set_tight()
    learned = FakeQuant(narrow=True, channels=4, bits=2, learn_bits=True)
    assert bit_choices(weight, 2) == bit_choices(unsigned, 2) == [1, 2, 3, 4]
    assert bit_choices(hardswish, 2) == bit_choices(learned, 2) == [2, 3, 4]
    assert bit_choices(weight, 3) == [2, 3, 4, 5], "above a 2-bit budget nothing changes"


def _one_bit_model():
    """The edge network at W2A2 on the x86 grid with tight ranges, every weight binary and every ReLU'd activation at
    one bit (the rest at 2), steps initialised from frames."""
    from training.model import build_model

    torch.manual_seed(0)
    model = prepare_qat(build_model("mobilenet_v3_large").eval(), "mobilenet_v3_large", weight_bits=2,
                        activation_bits=2, learn_weight_bits=False, learn_activation_bits=False,
                        activation_range="tight", grid="x86")
    for _, conv in quant_convs(model):
        conv.weight_quant.freeze_bits(1)
        conv.weight_quant.init_from_tensor(conv.weight)
    for q in activation_quantizers(model):
        if q.bits() == 2 and q.takes_one_bit:
            q.freeze_bits(1)
    frames = torch.from_numpy(np.random.default_rng(1).random((4, 1, 64, 64), dtype=np.float32))
    initialise_steps(model, [frames], 99.99, "mse")
    return model.eval()


def test_the_one_bit_graph_holds_the_fake_quant_integers(tmp_path):
    """The exported QDQ graph stores each binary kernel as int8 {-1, +1} (the model's integers) and gives each
    one-bit activation's reader exactly the model's integers {0, 1}; its output is the fake-quant model's."""
    from conftest import conv_input_integers
    from export.bundle.int8_graph import WEIGHT_SUFFIX, build_int8_model

    model = _one_bit_model()
    graph = build_int8_model(model, (64, 64), tmp_path / "twin.onnx")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    kernels = [a for name, a in inits.items() if name.endswith(WEIGHT_SUFFIX)]
    assert kernels and all(set(np.unique(k).tolist()) <= {-1, 1} for k in kernels)
    one_bit = [(name, conv) for name, conv in quant_convs(model) if conv.input_quant.bits() == 1]
    assert len(one_bit) > 10
    frames = np.random.default_rng(7).random((2, 1, 64, 64), dtype=np.float32)
    output, integers, received = conv_input_integers(graph, [name for name, _ in one_bit], frames)
    for (name, conv), q, x in zip(one_bit, integers, received):
        expected = conv.input_quant.quantize_integers(torch.from_numpy(x)).numpy()
        assert set(np.unique(expected).tolist()) <= {0.0, 1.0}
        np.testing.assert_array_equal(q.astype(np.int32), expected, err_msg=name)
    with torch.no_grad():
        out = model(torch.from_numpy(frames))["out"].numpy()
    np.testing.assert_allclose(output, out, atol=1e-3 * max(1.0, float(np.abs(out).max())))


def test_a_2_bit_run_allocates_one_bit_tensors_within_both_budgets(tiny_run):
    """`--bits 2 --grid x86` with both allocations (refused before one-bit grids: every tensor was at its floor):
    the allocation gives some weights and some ReLU'd activations one bit, never an activation without a one-bit
    grid, and bits.json's means (the frame's 8 bits in the activations') are at most 2."""
    from conftest import load_script
    from qat.checkpoint import load_qat_model, trained_checkpoint
    from training.checkpoint import load_model
    from qat.run import run_qat
    from qat.sensitivity import describe

    qcfg = build_qat_config("quick", run_dir=str(tiny_run), bits="2", name="w2a2-alloc", epochs=1, observe_frames=4,
                            fragile_frames=4, grid="x86", activation_range="tight", activation_init="mse",
                            activation_allocation="sensitivity", weight_allocation="sensitivity", bias_correction=True,
                            device="cpu")
    run_qat(qcfg)
    weights = json.loads((qcfg.qat_dir / "weight_allocation.json").read_text())["tensors"]
    activations = json.loads((qcfg.qat_dir / "allocation.json").read_text())["tensors"]
    assert any(row["bits"] == 1 for row in weights) and any(row["bits"] == 1 for row in activations)
    assert all(1 <= row["bits"] <= 4 for row in weights + activations)
    model = load_qat_model(trained_checkpoint(qcfg.qat_dir / "checkpoints"))[0]
    one_bit = {info.name: info.quantizer for info in describe(model) if info.quantizer.bits() == 1}
    assert {row["name"] for row in weights + activations if row["bits"] == 1} == set(one_bit)
    assert all(q.takes_one_bit for q in one_bit.values())
    bits = json.loads((qcfg.qat_dir / "bits.json").read_text())
    assert bits["mean_weight_bits"] <= 2.0 + 1e-9 and bits["mean_activation_bits"] <= 2.0 + 1e-9
    # diag_lowbit's allocation table: the one-bit share by kind, and no bit moved from the allocation (fixed bits)
    diag = load_script("diag_lowbit")
    found = diag.table_allocation(tiny_run, qcfg.name)
    assert min(r["min_bits"] for r in found["weights"].values()) == 1
    assert set(found["moved"]) == {"weights", "activations"}
    assert all(r["changed"] == 0 for side in found["moved"].values() for r in side.values())
    # a start that differs from the model's bits in one tensor (as learned bits move) is counted there
    moved = qcfg.qat_dir.parent / "w2a2-alloc-moved"
    shutil.copytree(qcfg.qat_dir, moved)
    allocation = json.loads((moved / "allocation.json").read_text())
    row = next(r for r in allocation["tensors"] if r["bits"] == 1)
    row["bits"] = 3
    (moved / "allocation.json").write_text(json.dumps(allocation))
    table = diag.table_allocation(tiny_run, moved.name)["moved"]["activations"][row["kind"]]
    assert table["changed"] == 1 and table["mean_change"] == pytest.approx(-2 / table["tensors"])
    # diag_lowbit's start-kinds: with the float model's biases and every quantizer bypassed, the start is the float
    # model (its best-threshold validation Dice, as the float run's validation computes it); every kind is scored
    start = diag.table_start_kinds(tiny_run, qcfg.name, 0, 4)
    float_cfg = load_qat_model(qcfg.qat_dir / "checkpoints" / "start.pt")[2]
    frames = diag.RunFrames(tiny_run, float_cfg, 0, 4)
    assert start["float biases: none (the float model)"] == pytest.approx(
        frames.score(load_model(tiny_run / "checkpoints" / "best.pt")[0]), abs=1e-3)
    assert set(start["activation kinds"]) and all(0 <= r["alone"] <= 1 for r in start["activation kinds"].values())
    with pytest.raises(InputError, match="start-kinds needs a fixed-bits run's start"):
        diag.table_start_kinds(tiny_run, "no-such-run", 0, 4)


def test_a_2_bit_run_may_lower_its_activations_last(tiny_run):
    """`--bits 2` with both allocations and `--bit-schedule 3@2,2@3 --bit-schedule-side activations` (the weights
    first, then the activations: at 2 bits the weights alone hold and the activations do not): the allocated weights,
    binary ones among them, train from the first epoch; the activations are at 8 bits (7 on a tight grid) in epoch
    1, at least 3 in epoch 2, and at their allocated bits in epoch 3, one-bit ones among them; only epoch 3 may
    become best.pt, and both means end at most 2."""
    from qat.run import run_qat

    qcfg = build_qat_config("quick", run_dir=str(tiny_run), bits="2", name="w2a2-act-last", epochs=3,
                            observe_frames=4, fragile_frames=4, grid="x86", activation_range="tight",
                            activation_init="mse", activation_allocation="sensitivity",
                            weight_allocation="sensitivity", bias_correction=True, bit_schedule="3@2,2@3",
                            bit_schedule_side="activations", device="cpu")
    run_qat(qcfg)
    weights = {row["name"]: row["bits"] for row in
               json.loads((qcfg.qat_dir / "weight_allocation.json").read_text())["tensors"]}
    activations = {row["name"]: row["bits"] for row in
                   json.loads((qcfg.qat_dir / "allocation.json").read_text())["tensors"]}
    assert 1 in weights.values() and 1 in activations.values()
    records = [json.loads(line) for line in (qcfg.qat_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        steps = record["steps"]
        assert {name: steps[name][0] for name in weights} == weights, record["epoch"]
        bits = [steps[name][0] for name in activations]
        if record["epoch"] == 1:
            assert set(bits) <= {7, 8}
        elif record["epoch"] == 2:
            assert min(bits) == 3 and all(b == max(3, activations[n]) for n, b in zip(activations, bits))
        else:
            assert bits == list(activations.values())
    assert torch.load(qcfg.qat_dir / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 3
    means = json.loads((qcfg.qat_dir / "bits.json").read_text())
    assert means["mean_weight_bits"] <= 2.0 + 1e-9 and means["mean_activation_bits"] <= 2.0 + 1e-9
