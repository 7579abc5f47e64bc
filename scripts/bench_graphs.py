"""Latency of ONNX graphs side by side: ONNX Runtime on the CPU, batch 1, every graph run once per round, in turn,
in one loop (this machine is shared: interleaving keeps a drift out of the comparison). A benchmark: it prints.

    PYTHONPATH=. python scripts/bench_graphs.py plain=CV/fold-1/bundle/model.fp32.onnx \
        flip=CV-FLIP/fold-1/bundle/model.fp32.onnx [--threads 2] [--rounds 40]

Each graph's input size is read from its input (N x 1 x H x W, as `nerveseg export` writes it); the frame is random
(latency does not depend on the pixels). Used for test-time flip averaging (docs/accuracy.md, (r)): the averaged
graph runs the network on a batch of two.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.core.errors import InputError, exit_code_of  # noqa: E402


def input_size(path: Path) -> tuple[int, int]:
    import onnx

    try:
        dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line
        raise InputError(f"{path}: not an ONNX graph ({type(err).__name__})") from None
    if len(dims) != 4 or not all(d.dim_value > 0 for d in dims[2:]):
        raise InputError(f"{path}: input is not N x 1 x H x W with a fixed H and W")
    return int(dims[2].dim_value), int(dims[3].dim_value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+", metavar="NAME=PATH", help="ONNX graphs to time, each with a name")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)

    def run() -> None:
        from export.bundle.latency import interleaved_latency

        graphs = {}
        for item in args.graphs:
            name, sep, path = item.partition("=")
            if not sep or not name:
                raise InputError(f"{item}: give each graph as NAME=PATH")
            if not Path(path).is_file():
                raise InputError(f"{path}: not found")
            graphs[name] = Path(path)
        sizes = {input_size(path) for path in graphs.values()}
        if len(sizes) != 1:
            raise InputError(f"the graphs take different input sizes {sorted(sizes)}; time like with like")
        size = sizes.pop()
        timing = interleaved_latency(graphs, size, threads=args.threads, rounds=args.rounds)
        print(f"ONNX Runtime CPU, batch 1, {size[0]}x{size[1]}, {args.threads} threads, {args.rounds} interleaved rounds")
        first = next(iter(timing))
        for name, t in timing.items():
            ratio = t["median_ms"] / timing[first]["median_ms"]
            print(f"{name:>12}: median {t['median_ms']:7.2f} ms  p10 {t['p10_ms']:7.2f}  p90 {t['p90_ms']:7.2f}  "
                  f"x{ratio:.2f} of {first}")

    return exit_code_of(run, "bench_graphs")


if __name__ == "__main__":
    sys.exit(main())
