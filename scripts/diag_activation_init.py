"""Where W8A8 loses Dice before any fine-tuning: the activation grid's initial step and its sign.

Loads a tuned float run, makes its W8A8 fake-quant model (bits fixed), sets every activation step from
training frames in several ways, and prints the validation best-threshold Dice of each (the float model's
first). Ways: the observed maximum |x| (what `initialise_steps` does), the mean per-batch percentile of |x|,
and, as a what-if that TensorRT cannot run, the tensors that were never negative on an unsigned [0, 255] grid
(ONNX Runtime's u8 PTQ gives a ReLU'd tensor all 8 bits; the signed grid gives it 7).

    PYTHONPATH=. python scripts/diag_activation_init.py --run-dir runs/edge [--frames 32]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch

from qat.prepare import activation_quantizers, initialise_steps, prepare_qat, set_submodule
from qat.quantizers import FakeQuant, integer_range
from training.checkpoint import load_model
from training.predict import predict_probabilities
from training.stages import split_arrays
from training.tune import tune

class UnsignedGrid(torch.nn.Module):
    """clamp(round(x / s), 0, 255) * s: the what-if grid of a never-negative tensor."""

    observing = False  # read by QuantConv2d, as of the FakeQuant it replaces

    def __init__(self, step: float):
        super().__init__()
        self.register_buffer("scale", torch.tensor(step))

    def step(self) -> torch.Tensor:  # read by QuantConv2d for the bias grid, as of the FakeQuant it replaces
        return self.scale

    def forward(self, x):
        return torch.clamp(torch.round(x / self.scale), 0, 255) * self.scale


def w8a8(float_model, frames: torch.Tensor, percentile: float, unsigned: bool) -> tuple[torch.nn.Module, int]:
    """The W8A8 fake-quant model with its activation steps set by `initialise_steps` on `frames` (batches of 8;
    percentile 0: the maximum); with `unsigned`, every activation quantizer whose input was never negative is
    replaced by the what-if grid reaching the same magnitude. Returns the model and how many were replaced."""
    model = prepare_qat(copy.deepcopy(float_model), learn_weight_bits=False, learn_activation_bits=False).eval()
    quantizers = activation_quantizers(model)
    minimum = {id(q): 0.0 for q in quantizers}

    def track_minimum(module, args):  # runs on the float activations of initialise_steps' observing pass
        minimum[id(module)] = min(minimum[id(module)], float(args[0].min()))

    hooks = [q.register_forward_pre_hook(track_minimum) for q in quantizers]
    initialise_steps(model, (frames[start:start + 8] for start in range(0, len(frames), 8)), percentile)
    for hook in hooks:
        hook.remove()
    if not unsigned:
        return model, 0
    replaced = set()
    for name, q in list(model.named_modules(remove_duplicate=False)):  # a shared quantizer sits at several paths
        if isinstance(q, FakeQuant) and minimum.get(id(q), -1.0) >= 0:
            _, qmax = integer_range(q.bits(), q.narrow)
            set_submodule(model, name, UnsignedGrid(float(q.step().detach()) * qmax / 255))
            replaced.add(id(q))
    return model, len(replaced)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--frames", type=int, default=32, help="training frames the steps are set from")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    float_model, _, cfg = load_model(run_dir / "checkpoints" / "best.pt")
    train, _, _ = split_arrays(run_dir, "train", cfg)
    val, val_masks, _ = split_arrays(run_dir, "val", cfg)
    frames = torch.from_numpy(np.ascontiguousarray(train[:args.frames]))[:, None]

    def dice(model) -> float:
        return tune(predict_probabilities(model, val, torch.device("cpu"), 4), val_masks)["validation"]["dice"]

    print(f"{'float':<48}{dice(float_model):.4f}")
    for unsigned in (False, True):
        for percentile in (0.0, 99.999, 99.99, 99.9):
            if unsigned and percentile not in (0.0, 99.99):
                continue
            model, swapped = w8a8(float_model, frames, percentile, unsigned)
            label = f"W8A8, step from {f'p{percentile}' if percentile else 'max'}"
            label += f", {swapped} tensors unsigned" if unsigned else ""
            print(f"{label:<48}{dice(model):.4f}", flush=True)


if __name__ == "__main__":
    main()
