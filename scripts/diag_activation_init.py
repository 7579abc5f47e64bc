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
import math
from pathlib import Path

import numpy as np
import torch

from qat.prepare import activation_quantizers, prepare_qat
from qat.quantizers import FakeQuant, integer_range
from training.checkpoint import load_model
from training.predict import predict_probabilities
from training.stages import split_arrays
from training.tune import tune

SAMPLE = 2_000_000  # values per tensor and batch for a percentile (torch.quantile's input limit is 16M)


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


def observe(model, frames: torch.Tensor, percentile: float | None) -> dict[int, tuple[float, float]]:
    """{id(quantizer): (magnitude, minimum)} over the frames, batches of 8."""
    seen: dict[int, list] = {}

    def hook(module, args):
        x = args[0].detach()
        flat = x.abs().flatten()
        if flat.numel() > SAMPLE:
            flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLE]]
        value = float(flat.max()) if percentile is None else float(torch.quantile(flat, percentile / 100))
        seen.setdefault(id(module), []).append((value, float(x.min())))

    quantizers = activation_quantizers(model)
    hooks = [q.register_forward_pre_hook(hook) for q in quantizers]
    for q in quantizers:
        q.observing = True
    with torch.no_grad():
        for start in range(0, len(frames), 8):
            model(frames[start:start + 8])
    for q, h in zip(quantizers, hooks):
        q.observing = False
        h.remove()
    combine = max if percentile is None else (lambda values: float(np.mean(values)))
    return {key: (combine([v for v, _ in rows]), min(m for _, m in rows)) for key, rows in seen.items()}


def w8a8(float_model, frames, percentile: float | None, unsigned: bool) -> tuple[torch.nn.Module, int]:
    model = prepare_qat(copy.deepcopy(float_model), learn_weight_bits=False, learn_activation_bits=False).eval()
    stats = observe(model, frames, percentile)
    swapped = 0
    for name, q in [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, FakeQuant)]:
        if id(q) not in stats:
            continue  # a weight quantizer
        magnitude, minimum = stats[id(q)]
        if unsigned and minimum >= 0:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, UnsignedGrid(max(magnitude, 1e-8) / 255))
            swapped += 1
        else:
            _, qmax = integer_range(q.bits(), q.narrow)
            q.log2_step.data.fill_(math.log2(max(magnitude, 1e-8) / qmax))
    return model, swapped


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
        for percentile in (None, 99.999, 99.99, 99.9):
            if unsigned and percentile not in (None, 99.99):
                continue
            model, swapped = w8a8(float_model, frames, percentile, unsigned)
            label = f"W8A8, step from {'max' if percentile is None else f'p{percentile}'}"
            label += f", {swapped} tensors unsigned" if unsigned else ""
            print(f"{label:<48}{dice(model):.4f}", flush=True)


if __name__ == "__main__":
    main()
