import numpy as np
import pytest
import torch
from torch import nn

from training.batchnorm import recalibrate_batchnorm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x):
        return self.bn(self.drop(x))


def test_statistics_become_the_average_over_the_frames_with_dropout_off():
    model = Net()
    model.bn.running_mean.fill_(100.0)  # stale statistics, as after fast training
    images = np.stack([np.full((2, 2), v, np.float32) for v in (0.0, 1.0, 2.0, 3.0)])
    recalibrate_batchnorm(model, images, torch.device("cpu"), batch_size=2)
    # batches {0, 1} and {2, 3}: means 0.5 and 2.5 -> cumulative average 1.5 (dropout would have changed it)
    assert float(model.bn.running_mean) == pytest.approx(1.5)
    # unbiased batch variances: each batch is 4 pixels of a and 4 of a+1 -> 0.25 * 8 / 7
    assert float(model.bn.running_var) == pytest.approx(0.25 * 8 / 7)
    assert model.bn.momentum == 0.1 and not model.training


def test_a_last_batch_of_one_frame_is_folded_into_the_previous_one():
    model = Net()
    images = np.stack([np.full((2, 2), v, np.float32) for v in (0.0, 1.0, 2.0)])
    recalibrate_batchnorm(model, images, torch.device("cpu"), batch_size=2)
    assert float(model.bn.running_mean) == pytest.approx(1.0)  # one batch of all three frames
    assert int(model.bn.num_batches_tracked) == 1
