"""What every source hands the loop: a `Frame`, and the `Counters` of what it read, dropped and skipped."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

_WARN_LIMIT = 5  # undecodable frames named on stderr; the rest are only counted


@dataclass
class Frame:
    """One captured frame. `image` is (H, W) or (H, W, 3|4) BGR, any integer or float dtype."""

    image: np.ndarray
    index: int  # the source's own count: gaps mean dropped frames
    name: str  # stem for per-frame output files
    captured_at: float  # time.perf_counter(): when a live frame was read, when the loop asked for a file frame


@dataclass
class Counters:
    read: int = 0
    undecodable: int = 0
    dropped: int = 0  # live only: replaced in the queue by a newer frame before the loop took it
    failures: int = 0  # live only: the stream broke
    reconnects: int = 0  # live only: reopened after a failure
    nonfinite: int = 0  # float frames with NaN or Inf pixels: skipped, never segmented (see runner)

    def skip_nonfinite(self, name: str) -> None:
        self.nonfinite += 1
        if self.nonfinite <= _WARN_LIMIT:
            suffix = " (further ones are counted, not shown)" if self.nonfinite == _WARN_LIMIT else ""
            print(f"warning: skipped frame {name}: it holds NaN or Inf pixels{suffix}", file=sys.stderr)

    def skip(self, err: Exception) -> None:
        self.undecodable += 1
        if self.undecodable <= _WARN_LIMIT:
            suffix = " (further undecodable frames are counted, not shown)" if self.undecodable == _WARN_LIMIT else ""
            print(f"warning: skipped a frame: {err}{suffix}", file=sys.stderr)

    def to_dict(self) -> dict:
        return dict(self.__dict__)
