"""Training throughput in images/s: the data pipeline alone, and full training steps, per recipe.

    python scripts/bench_train.py                       # paper and edge recipes, CPU (and CUDA+AMP if present)
    python scripts/bench_train.py --recipes edge --steps 10 --workers 2
    python scripts/bench_train.py --variants --recipes small --rounds 3   # input size x memory format, CPU
    python scripts/bench_train.py --dead-taps --recipes small --rounds 3  # live kernel taps vs whole kernels, CPU
    python scripts/bench_train.py --compile --recipes small --steps 12 --rounds 3  # torch.compile vs eager, CPU
                                                        # (fewer timed steps catch eager still warming up)

    python scripts/bench_train.py --run-cost quick old_quick.toml --train-frames 190 --val-frames 24

Run cost (CPU): for each recipe, the CPU seconds of one training step (its batch and input size, its
augmentation) and of one validation (BatchNorm re-estimation over the training frames + the validation
frames), in interleaved rounds; then the training stage of a whole run = steps x step + validations x
validation, from the recipe's budget and `val_every`. Used to compare the phantom demo's recipes.

Variants (CPU): the recipe at 256x256 and 192x192, each in contiguous and channels-last memory, timed in
interleaved rounds (so a machine whose load changes treats every variant alike); images/s of wall time and
of CPU time of this process (its threads), median over the rounds.

Compile (CPU): the recipe's training step eager and under `torch.compile` (inductor), interleaved rounds; the
compiled case also prints the seconds its two warm-up steps took (tracing and compiling, forward and backward),
which a run pays once per process: what a fold would save is steps x (eager - compiled step) - that time.

Frames come from the synthetic phantom at the recipe's input size, through the same cached dataset,
augmentation and DataLoader as `nerveseg train`. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.config import build_config
from training.data.dataset import SegmentationDataset
from training.data.synth import generate_phantom
from training.data.transforms import AugmentConfig, build_train_transform
from training.evaluation.predict import autocast
from training.live_taps import whole_kernels
from training.losses import BCEDiceLoss
from training.model import build_model_of


def make_loader(cfg, frames: int, workers: int) -> DataLoader:
    images, masks, _ = generate_phantom(frames, seed=0, size=tuple(cfg.input_size))
    dataset = SegmentationDataset(images.astype(np.float32) / 255.0, masks,
                                  build_train_transform(AugmentConfig.from_config(cfg)))
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def loader_rate(loader: DataLoader, batches: int) -> float:
    seen, start, it = 0, None, iter(loader)
    for index in range(batches + 1):
        image, _ = next(it)
        if index == 0:
            start = time.perf_counter()  # the first batch pays for worker start-up
        else:
            seen += len(image)
    return seen / (time.perf_counter() - start)


def step_rate(cfg, loader: DataLoader, device: torch.device, steps: int, amp: bool,
              channels_last: bool | None = None, cpu_rate: list | None = None, whole: bool = False,
              warmup_s: list | None = None) -> float:
    """Training images/s of wall time; with `cpu_rate`, images/s of this process's CPU time is appended to it.
    `whole`: every convolution computes with its whole kernel (training.live_taps.whole_kernels).
    `warmup_s`: the model runs under torch.compile, and the wall seconds of the two warm-up steps (where it
    compiles) are appended to this list."""
    model = build_model_of(cfg).to(device).train()
    if whole:
        whole_kernels(model)
    if channels_last is None:
        channels_last = device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if warmup_s is not None:
        model = torch.compile(model)
    begin = time.perf_counter()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    criterion = BCEDiceLoss()
    seen, start = 0, None
    batches = iter(loader)
    for step in range(steps + 2):
        try:
            image, mask = next(batches)
        except StopIteration:
            batches = iter(loader)
            image, mask = next(batches)
        if step == 2:  # two warm-up steps (cuDNN autotuning, allocator, compiling)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if warmup_s is not None:
                warmup_s.append(time.perf_counter() - begin)
            start, seen, cpu_start = time.perf_counter(), 0, time.process_time()
        image = image.to(device, non_blocking=True).to(memory_format=memory_format)
        mask = mask.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(image)["out"]
        loss = criterion(logits, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(image)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if cpu_rate is not None:
        cpu_rate.append(seen / (time.process_time() - cpu_start))
    return seen / (time.perf_counter() - start)


def validation_cpu_seconds(cfg, train_frames: int, val_frames: int) -> float:
    """CPU seconds of one validation as `nerveseg train` does it: re-estimate BatchNorm, then predict."""
    from training.batchnorm import recalibrate_batchnorm
    from training.evaluation.predict import predict_probabilities

    model = build_model_of(cfg)
    images = np.random.default_rng(0).random((train_frames + val_frames, *cfg.input_size), dtype=np.float32)
    start = time.process_time()
    recalibrate_batchnorm(model, images[:train_frames], torch.device("cpu"), cfg.batch_size)
    predict_probabilities(model, images[train_frames:], torch.device("cpu"), cfg.val_batch_size)
    return time.process_time() - start


def run_cost(recipes: list[str], train_frames: int, val_frames: int, steps: int, rounds: int) -> None:

    from training.schedule import plan_budget

    configs = {r: build_config(r) for r in recipes}
    loaders = {r: make_loader(c, max(train_frames, 2 * c.batch_size), 0) for r, c in configs.items()}
    step_s: dict = {r: [] for r in recipes}
    val_s: dict = {r: [] for r in recipes}
    for _ in range(rounds):
        for r, cfg in configs.items():
            rate: list = []
            step_rate(cfg, loaders[r], torch.device("cpu"), steps, False, False, rate)
            step_s[r].append(cfg.batch_size / rate[0])
            val_s[r].append(validation_cpu_seconds(cfg, train_frames, val_frames))
    for r, cfg in configs.items():
        budget = plan_budget(cfg, train_frames // cfg.batch_size)
        validations = len({e for e in range(1, budget.epochs + 1) if e % cfg.val_every == 0} | {budget.epochs})
        t_step, t_val = float(np.median(step_s[r])), float(np.median(val_s[r]))
        total = budget.total_steps * t_step + validations * t_val
        print(f"{r}: {cfg.input_size[0]}x{cfg.input_size[1]} batch {cfg.batch_size}: {budget.total_steps} steps x "
              f"{t_step:.2f} CPU-s + {validations} validations x {t_val:.2f} CPU-s = {total:.0f} CPU-s "
              f"({total / 60:.1f} CPU-min) training stage", flush=True)


def compare_steps(prefix: str, cases: dict, rounds: int) -> None:
    """Training step rates of `cases` ({label: run(cpu_rates) -> wall img/s}, each a `step_rate` call) in
    interleaved rounds, so a machine whose load changes treats every case alike; medians printed per case."""
    wall: dict = {label: [] for label in cases}
    cpu: dict = {label: [] for label in cases}
    for r in range(rounds):
        for label, run in cases.items():
            wall[label].append(run(cpu[label]))
        print(f"round {r + 1}/{rounds} done", flush=True)
    width = max(len(label) for label in cases)
    for label in cases:
        print(f"{prefix} {label:<{width}}: {np.median(wall[label]):.2f} img/s wall, {np.median(cpu[label]):.2f} img/s "
              f"per CPU-second (rounds: {', '.join(f'{w:.2f}' for w in wall[label])})")


def variants(recipe: str, frames: int, steps: int, rounds: int) -> None:
    """Input size x memory format on the CPU, interleaved rounds, medians."""
    configs = {size: build_config(recipe, input_size=(size, size)) for size in (256, 192)}
    loaders = {size: make_loader(cfg, frames, 0) for size, cfg in configs.items()}
    cases = {f"{size}x{size} {'channels_last' if cl else 'contiguous'}":
             (lambda cpu, size=size, cl=cl: step_rate(configs[size], loaders[size], torch.device("cpu"), steps, False,
                                                       cl, cpu))
             for size in (256, 192) for cl in (False, True)}
    compare_steps(f"{recipe} cpu", cases, rounds)


def dead_taps(recipe: str, frames: int, steps: int, rounds: int) -> None:
    """The recipe's training step with the kernel taps that read only padding skipped (training.live_taps, the
    default) and with whole kernels, interleaved rounds, medians."""
    cfg = build_config(recipe)
    loader = make_loader(cfg, frames, 0)
    cases = {label: (lambda cpu, whole=whole: step_rate(cfg, loader, torch.device("cpu"), steps, False,
                                                        cfg.channels_last, cpu, whole))
             for label, whole in (("live taps (default)", False), ("whole kernels", True))}
    compare_steps(f"{recipe} cpu {cfg.input_size[0]}x{cfg.input_size[1]} batch {cfg.batch_size}", cases, rounds)


def compiled(recipe: str, frames: int, steps: int, rounds: int) -> None:
    """The recipe's training step eager and under torch.compile, interleaved rounds, medians; and the compile time."""
    cfg = build_config(recipe)
    loader = make_loader(cfg, frames, 0)
    warmup: list = []
    cases = {label: (lambda cpu, on=on: step_rate(cfg, loader, torch.device("cpu"), steps, False, cfg.channels_last,
                                                  cpu, warmup_s=warmup if on else None))
             for label, on in (("eager (default)", False), ("torch.compile", True))}
    compare_steps(f"{recipe} cpu {cfg.input_size[0]}x{cfg.input_size[1]} batch {cfg.batch_size}", cases, rounds)
    print(f"{recipe} torch.compile: two warm-up steps took {', '.join(f'{w:.0f}' for w in warmup)} s of wall time "
          "(first round: nothing cached; later rounds may reuse inductor's on-disk cache)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["paper", "edge"])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per case")
    parser.add_argument("--frames", type=int, default=160, help="phantom frames in the benchmark dataset")
    parser.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 1)))
    parser.add_argument("--variants", action="store_true", help="CPU: 256 vs 192 input, contiguous vs channels-last")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --variants / --run-cost")
    parser.add_argument("--run-cost", nargs="+", metavar="RECIPE", help="CPU cost of whole runs of these recipes")
    parser.add_argument("--dead-taps", action="store_true",
                        help="CPU: training steps skipping the kernel taps that read only padding vs whole kernels")
    parser.add_argument("--compile", action="store_true", help="CPU: training steps under torch.compile vs eager")
    parser.add_argument("--train-frames", type=int, default=190)
    parser.add_argument("--val-frames", type=int, default=24)
    args = parser.parse_args()
    if args.run_cost:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        run_cost(args.run_cost, args.train_frames, args.val_frames, args.steps, args.rounds)
        return
    if args.dead_taps:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for recipe in args.recipes:
            dead_taps(recipe, args.frames, args.steps, args.rounds)
        return
    if args.compile:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for recipe in args.recipes:
            compiled(recipe, args.frames, args.steps, args.rounds)
        return
    if args.variants:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for recipe in args.recipes:
            variants(recipe, args.frames, args.steps, args.rounds)
        return
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.workers} loader workers"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"))
    for recipe in args.recipes:
        cfg = build_config(recipe)
        loader = make_loader(cfg, args.frames, args.workers)
        print(f"{recipe:>6} {cfg.arch} {cfg.input_size[0]}x{cfg.input_size[1]} batch {cfg.batch_size}: "
              f"data pipeline {loader_rate(loader, min(6, len(loader) - 1)):.0f} img/s")
        for device in devices:
            for amp in ([False, True] if device.type == "cuda" else [False]):
                rate = step_rate(cfg, loader, device, args.steps, amp)
                print(f"{recipe:>6} {device.type}{' AMP' if amp else ''}: training {rate:.1f} img/s")


if __name__ == "__main__":
    main()
