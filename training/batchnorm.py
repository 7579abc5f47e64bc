"""Re-estimating BatchNorm statistics ("precise BN") so that eval mode predicts what training learned.

A network trained from scratch on a few hundred frames moves its weights so fast that the running means
and variances (an exponential average over past batches, each computed with older weights) no longer
describe its activations: in eval mode it can predict nothing while batch statistics look fine. Measured
on usgra-seg after 11 epochs of the edge recipe: validation Dice 0.000 with the running statistics, 0.434
after re-estimating them. So before every validation and checkpoint the statistics are recomputed with the
current weights, as a plain average over the un-augmented training frames.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 16) -> None:
    """Replace every BatchNorm layer's running statistics by their average over `images`.

    Only the BatchNorm layers run in training mode; dropout stays off, so the statistics are those of the
    deployed network. Weights are untouched; the model is left in eval mode.

    Shape:
        images: (N, H, W) float32 in [0, 1], N >= 2.
    """
    layers = [m for m in model.modules() if isinstance(m, _BATCHNORM)]
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # None = cumulative average over the batches seen
        layer.train()
    # a batch of one frame cannot give statistics for the 1x1 image-pooling branch: fold it into the last
    starts = list(range(0, len(images), batch_size))
    if len(starts) > 1 and len(images) - starts[-1] < 2:
        starts.pop()
    for index, start in enumerate(starts):
        stop = starts[index + 1] if index + 1 < len(starts) else len(images)
        batch = torch.from_numpy(np.ascontiguousarray(images[start:stop]))[:, None].to(device)
        model(batch)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()
