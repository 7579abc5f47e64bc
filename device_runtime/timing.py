"""Per-stage latency statistics in constant memory, and the process's resident memory.

A device runs for days, so samples are not kept: each stage has a histogram with logarithmic bins 1 % wide
(1 µs .. 1000 s), which gives p50/p90/p99 to within 0.5 % and never grows. Sums and the maximum are exact.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

STAGES = ("capture", "preprocess", "inference", "postprocess", "output")
END_TO_END = "end_to_end"  # from the frame's capture timestamp to its last output written
FRAME = "frame"  # one turn of the loop: capture wait + the five stages; fps and the inference share use it
PERCENTILES = (50, 90, 99)

_MIN_S = 1e-6
_LOG_STEP = math.log(1.01)
_BINS = int(math.ceil(math.log(1e3 / _MIN_S) / _LOG_STEP)) + 1


class Histogram:
    """Latencies in seconds, binned logarithmically."""

    def __init__(self):
        self.counts = np.zeros(_BINS, np.int64)
        self.reset()

    def reset(self) -> None:
        self.counts[:] = 0
        self.count, self.total, self.max = 0, 0.0, 0.0

    def add(self, seconds: float) -> None:
        index = int(math.log(max(seconds, _MIN_S) / _MIN_S) / _LOG_STEP)
        self.counts[min(index, _BINS - 1)] += 1
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def percentile(self, q: float) -> float:
        """The q-th percentile in seconds: the geometric middle of the bin holding it, capped at the maximum."""
        if not self.count:
            return float("nan")
        rank = math.ceil(q / 100.0 * self.count)
        index = int(np.searchsorted(np.cumsum(self.counts), max(rank, 1)))
        return min(_MIN_S * math.exp((index + 0.5) * _LOG_STEP), self.max)

    def summary_ms(self) -> dict:
        out = {f"p{q}": 1e3 * self.percentile(q) for q in PERCENTILES}
        out["max"] = 1e3 * self.max
        out["mean"] = 1e3 * self.total / self.count if self.count else float("nan")
        return out


class _Stage:
    """A reusable `with` block that adds its duration to one stage (a class, not a generator: ~1 µs)."""

    __slots__ = ("timings", "name", "start")

    def __init__(self, timings: "Timings", name: str):
        self.timings, self.name, self.start = timings, name, 0.0

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timings.current[self.name] += time.perf_counter() - self.start
        return False


class Timings:
    """Stage durations of the frame in progress, and histograms over the run and over the last window.

    Usage: `with timings.stage("inference"): ...` inside a frame, then `timings.end_frame(captured_at)`. A frame
    begins when the previous one ends (or at construction), so live capture timeouts count as capture wait.
    The first `warmup` frames are timed but left out of the statistics.
    """

    def __init__(self, warmup: int = 0):
        names = STAGES + (END_TO_END, FRAME)
        self.total = {name: Histogram() for name in names}
        self.window = {name: Histogram() for name in names}
        self._stages = {name: _Stage(self, name) for name in STAGES}
        self.current = dict.fromkeys(STAGES, 0.0)
        self.warmup = warmup
        self.frames = 0  # processed, warm-up included
        self.started = time.perf_counter()  # of the measured part: reset when the warm-up ends
        self.window_started = self.started
        self._frame_started = self.started

    def stage(self, name: str) -> _Stage:
        return self._stages[name]

    def end_frame(self, captured_at: float) -> None:
        """Close the frame in progress (its capture wait began when the previous frame ended)."""
        now = time.perf_counter()
        self.frames += 1
        sample = dict(self.current, **{END_TO_END: now - captured_at, FRAME: now - self._frame_started})
        self._frame_started = now
        for name in STAGES:
            self.current[name] = 0.0
        if self.frames <= self.warmup:
            self.started = self.window_started = now
            return
        for name, seconds in sample.items():
            self.total[name].add(seconds)
            self.window[name].add(seconds)

    @property
    def measured_frames(self) -> int:
        return self.total[FRAME].count

    def current_ms(self, captured_at: float) -> dict:
        """The frame in progress, for its JSON line: the stages so far and the time since capture."""
        out = {name: round(1e3 * seconds, 3) for name, seconds in self.current.items()}
        out[END_TO_END] = round(1e3 * (time.perf_counter() - captured_at), 3)
        return out

    def summary(self, window: bool = False) -> dict:
        """fps, per-stage p50/p90/p99/max/mean in ms, and the share of frame time spent outside inference."""
        hists = self.window if window else self.total
        elapsed = time.perf_counter() - (self.window_started if window else self.started)
        frame_total = hists[FRAME].total
        return {
            "frames": hists[FRAME].count,
            "seconds": elapsed,
            "fps": hists[FRAME].count / elapsed if elapsed > 0 else float("nan"),
            "stages_ms": {name: hist.summary_ms() for name, hist in hists.items()},
            "outside_inference": 1.0 - hists["inference"].total / frame_total if frame_total else float("nan"),
        }

    def reset_window(self) -> None:
        for hist in self.window.values():
            hist.reset()
        self.window_started = time.perf_counter()


def rss_bytes() -> int:
    """Resident memory of this process now (Linux: /proc; elsewhere the peak, from getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def format_table(summary: dict) -> str:
    """A fixed-width table of a `Timings.summary`, one stage a row."""
    lines = [f"{'stage':<12}" + "".join(f"{h:>10}" for h in ("p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms"))]
    for name, row in summary["stages_ms"].items():
        values = (row["p50"], row["p90"], row["p99"], row["max"], row["mean"])
        lines.append(f"{name:<12}" + "".join(f"{v:>10.2f}" for v in values))
    return "\n".join(lines)
