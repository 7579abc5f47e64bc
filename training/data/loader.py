"""The batches a training process sees, and where that process stands in a torchrun job (one process or several).

A run's batches depend only on (seed, epoch), so a resumed run sees the same ones; under torchrun the recipe's
batch size is the global batch, split over the processes (DistributedDataParallel).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from device_runtime.core.errors import InputError

from ..config import TrainConfig
from ..evaluation.predict import resolve_device
from .dataset import SegmentationDataset


@dataclass
class Dist:
    """Where this process stands in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return Dist(dist.get_rank(), world, local_rank), device


def loader_workers(cfg: TrainConfig, device: torch.device, ddp: Dist) -> int:
    """On CUDA, augmentation must keep the GPU fed: several worker processes. On a CPU-only run the
    cores are busy with the network itself, and workers would only compete with it."""
    if cfg.workers >= 0:
        return cfg.workers
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // ddp.world - 1))


def build_loader(dataset: SegmentationDataset, cfg: TrainConfig, ddp: Dist, epoch: int, workers: int) -> DataLoader:
    """A loader whose order depends only on (seed, epoch), so a resumed run sees the same batches."""
    batch = cfg.batch_size // ddp.world
    if batch < 2:  # one frame per process: BatchNorm in DeepLabV3's image-pooling branch cannot train on it
        where = f" over {ddp.world} processes leaves {batch} frame(s) per process;" if ddp.world > 1 else ":"
        raise InputError(f"--batch-size {cfg.batch_size}{where} DeepLabV3's image-pooling BatchNorm needs at least 2 "
                         f"frames per step: use --batch-size {2 * ddp.world} or more")
    # a last batch of one frame would break BatchNorm in DeepLabV3's image-pooling branch: drop remainders
    drop_last = len(dataset) // ddp.world > batch
    if ddp.world > 1:
        sampler = DistributedSampler(dataset, ddp.world, ddp.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)
