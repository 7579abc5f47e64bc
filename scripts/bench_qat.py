"""Time per QAT training epoch against a float training epoch, on this machine, interleaved.

Both sides run the same frames through the same training step (forward, BCE + Dice, backward, Adam):
the float DeepLabV3 of a recipe, and its QAT form (BN folded, fake-quant with learned bits, bit cost).
Rounds alternate float, QAT, float, QAT ... so that load from other processes hits both alike; the
median per round is reported, scaled to an epoch of --epoch-frames frames.

    PYTHONPATH=. python scripts/bench_qat.py --recipe edge --epoch-frames 163
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from qat.bits import activation_elements, live_weights
from qat.config import build_qat_config
from qat.loss import QatLoss
from qat.prepare import initialise_steps, prepare_qat, project_bits_
from qat.train import build_optimizer
from training.config import build_config
from training.losses import BCEDiceLoss
from training.model import build_model_of


def timed_steps(model, step, batches) -> float:
    """Seconds for one pass over `batches` of training steps."""
    model.train()
    start = time.perf_counter()
    for image, mask in batches:
        step(image, mask)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="edge")
    parser.add_argument("--frames", type=int, default=32, help="frames per timed pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epoch-frames", type=int, default=163, help="training frames of one epoch (usgra-seg: 163)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(args.recipe)
    qcfg = build_qat_config(args.recipe, run_dir="bench")
    torch.manual_seed(0)
    h, w = cfg.input_size
    images = torch.rand(args.frames, 1, h, w)
    masks = (torch.rand(args.frames, 1, h, w) > 0.9).float()
    batches = [(images[i:i + cfg.batch_size], masks[i:i + cfg.batch_size]) for i in range(0, args.frames, cfg.batch_size)]

    float_model = build_model_of(cfg)
    float_opt = torch.optim.Adam(float_model.parameters(), lr=cfg.lr)
    task = BCEDiceLoss(cfg.bce_weight, cfg.dice_weight)

    def float_step(image, mask):
        loss = task(float_model(image)["out"], mask)
        float_opt.zero_grad(set_to_none=True)
        loss.backward()
        float_opt.step()

    qat_model = prepare_qat(copy.deepcopy(float_model).eval(), cfg.arch)
    initialise_steps(qat_model, [images[:cfg.batch_size]])
    criterion = QatLoss(activation_elements(qat_model, cfg.input_size), bit_weight=qcfg.bit_weight,
                        weights=live_weights(qat_model, cfg.input_size))
    qat_opt = build_optimizer(qat_model, qcfg)

    def qat_step(image, mask):
        loss, _ = criterion(qat_model, qat_model(image)["out"], mask)
        qat_opt.zero_grad(set_to_none=True)
        loss.backward()
        qat_opt.step()
        project_bits_(qat_model)

    timed_steps(float_model, float_step, batches[:1])  # warm-up: allocator, kernels
    timed_steps(qat_model, qat_step, batches[:1])
    times = {"float": [], "qat": []}
    for _ in range(args.rounds):
        times["float"].append(timed_steps(float_model, float_step, batches))
        times["qat"].append(timed_steps(qat_model, qat_step, batches))
    per_epoch = {k: statistics.median(v) * args.epoch_frames / args.frames for k, v in times.items()}
    print(f"{args.recipe} ({cfg.arch}, {h}x{w}, batch {cfg.batch_size}), {torch.get_num_threads()} torch threads, "
          f"{args.rounds} interleaved rounds of {args.frames} frames")
    for name in ("float", "qat"):
        rounds = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"  {name:<6} per round [{rounds}] s  ->  {per_epoch[name]:.0f} s per epoch of {args.epoch_frames} frames")
    print(f"  QAT epoch / float epoch = {per_epoch['qat'] / per_epoch['float']:.2f}")


if __name__ == "__main__":
    main()
