"""`nerveseg-device info`: what this machine has (cv2 and its video back-ends, ONNX Runtime providers, TensorRT,
cuda-python, GPU, display) and which backend a run would use. On a Jetson it answers "did pip's cv2 shadow
the system's GStreamer build?" and "will this use the GPU?" before anything is run."""

from __future__ import annotations

import importlib
import platform
import sys
import textwrap
from collections import Counter
from pathlib import Path

from .backends import tensorrt_backend
from .backends.selection import BACKEND_ORDER, auto_precision, backend_availability, resolve_backend, select_model
from .core.errors import InputError
from .core.manifest import load_manifest
from .outputs.sinks import display_unavailable
from .sources.live import cv2_video_backends


def _version(module_name: str) -> str:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        return f"not installed ({err})"
    return f"{getattr(module, '__version__', '?')} at {Path(getattr(module, '__file__', '?') or '?').parent}"


def _cuda_python() -> str:
    try:
        cudart = tensorrt_backend.import_cudart()
    except InputError as err:
        return str(err)
    try:
        version = tensorrt_backend.cuda_check(cudart.cudaRuntimeGetVersion())
        return f"{cudart.__name__} (CUDA runtime {version // 1000}.{version % 1000 // 10})"
    except RuntimeError as err:
        return f"{cudart.__name__} ({err})"


def _gpu() -> str:
    try:
        return tensorrt_backend.gpu_identity()
    except (InputError, RuntimeError) as err:
        return f"none usable ({err})"


def machine_lines() -> list[str]:
    import cv2

    video = cv2_video_backends()
    yes_no = {True: "yes", False: "NO"}
    display = display_unavailable() or "available"
    lines = [
        f"python       {platform.python_version()} ({sys.executable})",
        f"numpy        {_version('numpy')}",
        f"cv2          {cv2.__version__} at {Path(cv2.__file__).parent}",
        f"  GStreamer  {yes_no[video['gstreamer']]}   FFmpeg {yes_no[video['ffmpeg']]}   "
        f"V4L2 {yes_no[video['v4l2']]}",
        f"onnxruntime  {_version('onnxruntime')}",
    ]
    try:
        import onnxruntime as ort

        lines.append(f"  providers  {', '.join(ort.get_available_providers())}")
    except ImportError:
        pass
    tensorrt_ok, tensorrt_detail = tensorrt_backend.tensorrt_status()
    lines += [
        f"tensorrt     {_version('tensorrt') if tensorrt_ok else tensorrt_detail}",
        f"cuda-python  {_cuda_python()}",
        f"gpu          {_gpu()}",
        f"display      {display}",
    ]
    return lines


def backend_lines(bundle: Path | None, backend: str = "auto", precision: str = "auto",
                  engine_cache: Path | None = None, layers: bool = False) -> list[str]:
    availability = backend_availability()
    lines = ["backends"] + [f"  {name:<13}{'available' if not availability[name] else availability[name]}"
                            for name in BACKEND_ORDER]
    try:
        chosen = resolve_backend(backend, availability)
    except InputError as err:
        return lines + [f"would run    nothing: {err}"]
    lines.append(f"would run    {chosen}")
    if bundle is None:
        return lines
    manifest = load_manifest(bundle)  # verifies: a tampered bundle is reported here as it would be by run
    model, effective = select_model(manifest, chosen, precision)
    height, width = manifest.input_size
    lines.append(f"bundle       {bundle}: {manifest.architecture}, input {height}x{width}, T* {manifest.threshold:.2f}"
                 " (verified)")
    lines += bundle_lines(manifest, layers)
    lines.append(f"temporal     {manifest.temporal.describe(manifest.threshold)} (nerveseg-device --temporal on|off)")
    why = f" ({auto_precision(manifest, chosen)[1]})" if precision == "auto" else ""
    lines.append(f"model        {model.path} at {effective}{why}")
    if chosen == "tensorrt":
        key = tensorrt_backend.EngineKey(tensorrt_backend.gpu_identity(),
                                         tensorrt_backend.import_tensorrt().__version__, model.sha256, effective)
        path = tensorrt_backend.engine_path(Path(engine_cache or bundle), key)
        state = "cached" if tensorrt_backend.cached_engine(path, key) is not None else "built on first run"
        lines.append(f"engine       {path} ({state})")
    return lines


def _bits(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "?"


def _prob(value: float) -> str:
    """A probability difference rounded to 3 decimals, without rounding a small one down to a false 0.000."""
    return "0" if value == 0 else "< 0.001" if value < 0.001 else f"{value:.3f}"


def bundle_lines(manifest, layers: bool = False) -> list[str]:
    """The bundle's files (precision, size, which runtimes; the INT8 files left out at export, and why), its quantization (bits: counted per setting, or every
    layer with `layers`), parity (with the INT8 gate's verdict) and the latency measured at export, in rounded figures."""
    lines = ["  files"]
    for f in manifest.files:
        serves = f"  for {', '.join(f.runtimes)}" if f.runtimes else ""
        lines.append(f"    {f.path:<28}{f.precision:<6}{f.format:<6}{f.bytes / 1e6:>8.2f} MB{serves}")
    for name, why in manifest.left_out().items():
        lines.append(f"    {name:<28}left out at export by the parity gate: {why}")
    q = manifest.quantization
    if q.get("scheme", "none") != "none":
        per_layer = q.get("layers", [])
        lines += textwrap.wrap(f"quantization {q['scheme']}", 110, initial_indent="  ", subsequent_indent="    ")
        lines += [f"    mean bits: weights {_bits(q.get('mean_weight_bits'))}, activations "
                  f"{_bits(q.get('mean_activation_bits'))} over {len(per_layer)} layers"]
        if q.get("int8_file_bytes"):
            lines.append(f"    INT8 file {q['int8_file_bytes'] / 1e6:.2f} MB; packed at the learned bits "
                         f"{q.get('packed_bytes', 0) / 1e6:.2f} MB")
        if layers:
            lines += [f"    {layer['name']:<44} W{layer['weight_bits']} A{layer['activation_bits']}"
                      for layer in per_layer]
        elif per_layer:
            counts = Counter((layer["weight_bits"], layer["activation_bits"]) for layer in per_layer)
            lines.append("    layers by bits: " + ", ".join(f"W{w} A{a} x{n}" for (w, a), n in sorted(counts.items()))
                         + " (--layers: every layer)")
    for name, p in manifest.metrics.get("parity", {}).items():
        if "max_prob_diff" not in p:  # the gate's rule, not a measurement
            continue
        extra = f", pixels flipped {100 * p['flipped_fraction']:.3f} %" if "flipped_fraction" in p else ""
        if "prob_diff_p99" in p:
            extra += f", |dp| p99 {_prob(p['prob_diff_p99'])}"
        if "reference_max_prob_diff" in p:
            extra += f", reference max |dp| {_prob(p['reference_max_prob_diff'])}"
        gate = p.get("gate", {})
        verdict = (f"; gate: {'passed' if gate['passed'] else 'refused'} at {gate['worst_ratio']:.2f} of its allowance"
                   if "worst_ratio" in gate else "")
        lines.append(f"  parity {name:<26} mask Dice {p['mask_dice']:.4f}, max |dp| {_prob(p['max_prob_diff'])}{extra} "
                     f"({p.get('frames', '?')} frames){verdict}")
    for backend, measured in manifest.metrics.get("latency_ms", {}).items():
        timed = ", ".join(f"{_LATENCY_NAMES.get(k, k)} {v:.1f} ms" for k, v in measured.items()
                          if isinstance(v, (int, float)) and k not in ("threads", "runs"))
        how = ", ".join(f"{measured[k]:g} {k}" for k in ("threads", "runs")
                        if isinstance(measured.get(k), (int, float)))
        lines.append(f"  latency at export on {backend}{f' ({how}, median)' if how else ''}: {timed}")
    return lines


_LATENCY_NAMES = {"fp32": "FP32", "int8": "INT8", "int8_tensorrt_form": "INT8 (TensorRT form)"}


def report(bundle: Path | None = None, backend: str = "auto", precision: str = "auto",
           engine_cache: Path | None = None, layers: bool = False) -> str:
    return "\n".join(machine_lines() + backend_lines(bundle, backend, precision, engine_cache, layers))
