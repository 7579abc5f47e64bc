"""The run: verify the bundle, open source, network and outputs, then loop until the source ends or a signal.

SIGINT or SIGTERM sets a flag that the loop reads between frames: the frame in progress is finished, then
every output is closed (a playable MP4, a complete JSONL) and the run returns normally, so the exit status
is 0. A second signal acts as usual (SIGINT raises KeyboardInterrupt; outputs are still closed on the way out).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import numpy as np

from .backends.selection import open_backend
from .config import RunConfig
from .core.errors import InputError
from .core.fileio import write_json
from .core.manifest import load_manifest
from .outputs.guard import check_outputs
from .outputs.sinks import open_outputs
from .pipeline import Segmenter
from .sources.dispatch import open_source
from .timing import END_TO_END, Timings, format_table, rss_bytes

_MIB = 1 << 20


def run(cfg: RunConfig, source=None) -> dict:
    """Run the bundle over `cfg.source` (or an already open `source`); returns the summary."""
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(stop_on_signals())  # first, so a signal during start-up also ends cleanly
        manifest = load_manifest(cfg.bundle)  # trust: format version, sha256 of every file, before anything runs
        # once, before the backend speaks: a refused output is the one line the user sees; nothing the run reads
        # or the user keeps is overwritten, and every path is writable
        check_outputs(cfg)
        source = stack.enter_context(source or open_source(cfg.source, cfg.loop, cfg.queue_size,
                                                           cfg.reconnect_backoff_s))
        net = stack.enter_context(contextlib.closing(open_backend(
            cfg.bundle, manifest, cfg.backend, cfg.precision, cfg.threads, cfg.engine_cache, cfg.workspace_mib)))
        segment = Segmenter(manifest, net, cfg.pixel_spacing_mm, manifest.temporal.with_overrides(**cfg.temporal))
        outputs = stack.enter_context(open_outputs(cfg, source.fps, stop))
        timings, report = Timings(cfg.warmup), Report(cfg, source, net)
        while not stop.is_set() and timings.frames != cfg.max_frames:
            with timings.stage("capture"):
                frame = source.capture(cfg.capture_timeout_s)
            if frame is None:  # a live timeout (check for a stop, wait again) or the end of a file source
                if source.finished:
                    break
                continue
            if not is_finite_frame(frame.image):  # NaN/Inf would reach the mask and the JSON as NaN
                source.counters.skip_nonfinite(frame.name)
                continue
            result = segment(frame.image, timings)
            with timings.stage("output"):
                outputs.write(frame, result, timings)
            timings.end_frame(frame.captured_at)
            report.tick(timings)
        # summarised before the outputs close, so the end RSS is that of the running pipeline
        reason = "signal" if stop.is_set() else "max-frames" if timings.frames == cfg.max_frames else "end of source"
        summary = report.finish(timings, reason)
        if timings.frames == 0 and reason != "signal":
            counters = source.counters
            raise InputError(f"source {cfg.source}: no frame was processed ({counters.read} read, "
                             f"{counters.undecodable} undecodable, {counters.nonfinite} with NaN/Inf pixels)")
        return summary


def is_finite_frame(image: np.ndarray) -> bool:
    """Integer frames always are; a float frame (a float TIFF) only without NaN or Inf pixels."""
    return not np.issubdtype(image.dtype, np.floating) or bool(np.isfinite(image).all())


@contextlib.contextmanager
def stop_on_signals():
    """Yield an Event set by the first SIGINT or SIGTERM; restore the previous handlers on exit."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # handlers can only be installed from the main thread; the caller stops us some other way
        return
    previous = {}

    def handler(signum, _frame):
        stop.set()
        signal.signal(signum, previous[signum])  # a second signal is not ignored: it acts as it did before

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class Report:
    """Progress lines every `cfg.report_every` frames (stderr), and the summary at the end."""

    def __init__(self, cfg: RunConfig, source, net):
        self.cfg, self.source, self.net = cfg, source, net
        self.rss_first_frame = None

    def tick(self, timings: Timings) -> None:
        if timings.frames == 1:
            self.rss_first_frame = rss_bytes()  # model, buffers and outputs all in place by now
        every = self.cfg.report_every
        if every and timings.frames > timings.warmup and (timings.frames - timings.warmup) % every == 0:
            print(self._progress_line(timings), file=sys.stderr, flush=True)
            timings.reset_window()

    def _progress_line(self, timings: Timings) -> str:
        window = timings.summary(window=True)
        stages = window["stages_ms"]
        counters = self.source.counters
        return (f"[frame {timings.frames}] {window['fps']:.1f} fps | end-to-end p50 {stages[END_TO_END]['p50']:.1f}"
                f" p99 {stages[END_TO_END]['p99']:.1f} ms | inference p50 {stages['inference']['p50']:.1f} ms | "
                f"outside inference {100 * window['outside_inference']:.1f} % | dropped {counters.dropped} "
                f"undecodable {counters.undecodable} reconnects {counters.reconnects} | "
                f"rss {rss_bytes() / _MIB:.1f} MiB")

    def finish(self, timings: Timings, stopped_by: str) -> dict:
        summary = {
            "source": self.source.description,
            "backend": self.net.name,
            "model": self.net.model_file,
            "stopped_by": stopped_by,
            "frames": timings.frames,
            "counters": self.source.counters.to_dict(),
            "timing": timings.summary(),
            "rss_mib": {"first_frame": None if self.rss_first_frame is None else self.rss_first_frame / _MIB,
                        "last_frame": rss_bytes() / _MIB},
        }
        if self.cfg.summary_json:
            write_json(self.cfg.summary_json, summary)  # strict JSON: NaN (no frame timed) becomes null
        if not self.cfg.quiet and timings.frames:
            print(format_summary(summary))
        return summary


def format_summary(summary: dict) -> str:
    timing, counters, rss = summary["timing"], summary["counters"], summary["rss_mib"]
    first = "n/a" if rss["first_frame"] is None else f"{rss['first_frame']:.1f} MiB"
    return "\n".join([
        f"source {summary['source']} | backend {summary['backend']} | model {summary['model']}",
        f"frames {summary['frames']} (timed {timing['frames']}) in {timing['seconds']:.2f} s: {timing['fps']:.2f} fps"
        f" | undecodable {counters['undecodable']} dropped {counters['dropped']} failures {counters['failures']}"
        f" reconnects {counters['reconnects']} | stopped by {summary['stopped_by']}",
        format_table(timing),
        f"outside inference: {100 * timing['outside_inference']:.1f} % of frame time",
        f"rss: first frame {first}, last frame {rss['last_frame']:.1f} MiB",
    ])
