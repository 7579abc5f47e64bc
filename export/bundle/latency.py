"""ONNX Runtime CPU latency of several graphs, timed interleaved in one run (the machine is noisy: rivals timed
in turns see the same background load). Sessions are set up as the device runtime sets them up (all graph
optimisations, no spinning worker threads), batch 1."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from device_runtime.core.ort_session import session_options


def ort_session(path: str | Path, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def interleaved_latency(graphs: dict[str, str | Path], input_size: tuple[int, int], threads: int = 2,
                        rounds: int = 30, warmup: int = 3, seed: int = 0) -> dict[str, dict]:
    """{name: {"median_ms", "p10_ms", "p90_ms", "runs"}}: each round runs every graph once, in turn, on one
    random frame of the input size."""
    sessions = {name: ort_session(path, threads) for name, path in graphs.items()}
    frame = np.random.default_rng(seed).random((1, 1, *input_size), dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for round_index in range(warmup + rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"input": frame})
            if round_index >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    result = {}
    for name, values in times.items():
        deciles = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
        result[name] = {"median_ms": statistics.median(values), "p10_ms": deciles[0], "p90_ms": deciles[-1],
                        "runs": len(values)}
    return result
