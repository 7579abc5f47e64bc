"""The network behind one interface: `infer(batch) -> logits`, whatever runs it.

Order for `--backend auto`: a TensorRT engine (tensorrt + cuda-python + a GPU), then ONNX Runtime with the
TensorRT, CUDA or CPU execution provider, the first present. Which ONNX file of the bundle runs follows
`--precision` (see `select_model`). Nothing here downloads anything: the model is the bundle's file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from ..core.errors import InputError
from ..core.manifest import Manifest, ModelFile
from ..core.ort_session import OnnxRuntimeBackend, ProviderFellBack
from . import tensorrt_backend

BACKEND_ORDER = ("tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu")
ORT_PROVIDERS = {
    "ort-tensorrt": "TensorrtExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-cpu": "CPUExecutionProvider",
}
_TENSORRT_KINDS = ("tensorrt", "ort-tensorrt")


class Backend(Protocol):
    name: str  # e.g. "onnxruntime CPUExecutionProvider", for messages and the summary
    model_file: str
    input_buffer: np.ndarray  # (1, 1, H, W) float32: preprocess writes here, so infer copies nothing

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(1, 1, H, W) float32 -> (1, 1, H', W') logits, in a buffer reused by the next call."""

    def close(self) -> None: ...


def backend_availability() -> dict[str, str]:
    """Each backend -> "" when it can run here, else the reason it cannot."""
    ok, detail = tensorrt_backend.tensorrt_status()
    status = {"tensorrt": "" if ok else detail}
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError as err:
        providers, why = [], f"onnxruntime not installed ({err})"
    else:
        why = f"ONNX Runtime {ort.__version__} has no {{}} (providers: {', '.join(providers)})"
    for name, provider in ORT_PROVIDERS.items():
        status[name] = "" if provider in providers else why.format(provider)
    return status


def resolve_backend(requested: str, availability: dict[str, str] | None = None) -> str:
    """`auto` -> the first backend that can run here; a named one -> itself if it can, else InputError."""
    availability = backend_availability() if availability is None else availability
    if requested == "auto":
        for name in BACKEND_ORDER:
            if not availability[name]:
                return name
        raise InputError("no backend can run here: " + "; ".join(f"{k}: {v}" for k, v in availability.items()))
    if requested not in availability:
        raise InputError(f"--backend {requested!r} is not one of auto, {', '.join(BACKEND_ORDER)}")
    if availability[requested]:
        usable = [name for name in BACKEND_ORDER if not availability[name]]
        raise InputError(f"--backend {requested} cannot run here: {availability[requested]}; "
                         f"available: {', '.join(usable) or 'none'}")
    return requested


def auto_precision(manifest: Manifest, backend: str) -> tuple[str, str]:
    """What `--precision auto` runs on this backend, and why (one phrase, for the log line).

    TensorRT: INT8 (explicit quantization) when the bundle has it, else FP16. ONNX Runtime CUDA/CPU: whichever
    of FP32 and INT8 the manifest measured faster on that provider; INT8 where it measured nothing (ONNX
    Runtime's integer kernels are the point of the INT8 file); FP32 when the bundle has no INT8 file.
    """
    fp32, int8 = manifest.file("fp32", "onnx"), manifest.file("int8", "onnx")
    if backend in _TENSORRT_KINDS:
        if manifest.file("int8", "onnx", backend, made_for=True):
            return "int8", "the bundle has an INT8 graph"
        if int8 and manifest.left_out():
            return "fp16", "the bundle's TensorRT INT8 file was left out at export; its INT8 graph is for ONNX Runtime"
        return "fp16", ("the bundle's INT8 graph is for ONNX Runtime only (x86 grid)" if int8 else
                        "the bundle has no INT8 graph")
    if not int8:
        return "fp32", "the bundle has no INT8 graph"
    if not fp32:
        return "int8", "the bundle has no FP32 graph"
    measured = manifest.latency_ms(backend)
    if "fp32" in measured and "int8" in measured:
        faster = "int8" if measured["int8"] <= measured["fp32"] else "fp32"
        return faster, (f"the manifest measured {backend} INT8 {measured['int8']:.1f} ms vs FP32 "
                        f"{measured['fp32']:.1f} ms at export")
    return "int8", f"the manifest has no {backend} timing; INT8 by default"


def select_model(manifest: Manifest, backend: str, precision: str) -> tuple[ModelFile, str]:
    """Which ONNX file of the bundle runs, and at which precision.

    auto: see `auto_precision`. fp16 needs TensorRT: ONNX Runtime's CUDA and CPU providers would run an FP32
    graph in FP32 and report it as FP16. Of two INT8 files the one made for this backend runs (the manifest's
    `runtimes`): signed activations on TensorRT, unsigned (zero point 128) on x86 ONNX Runtime.
    """
    if precision == "auto":
        precision, _ = auto_precision(manifest, backend)
    if precision == "fp16" and backend not in _TENSORRT_KINDS:
        raise InputError(f"--precision fp16 needs TensorRT (--backend tensorrt or ort-tensorrt), not {backend}")
    if precision in ("fp32", "fp16"):
        fp32 = manifest.file("fp32", "onnx", backend)
        if not fp32:
            raise InputError(f"--precision {precision}: the bundle lists no FP32 ONNX file; try --precision int8")
        return fp32, precision
    if precision == "int8":
        int8 = manifest.file("int8", "onnx", backend)
        if not int8:
            raise InputError("--precision int8: the bundle lists no INT8 (QDQ) ONNX file; export one "
                             "('nerveseg export --qat NAME'), or use --precision fp16 (TensorRT) or fp32")
        if backend in _TENSORRT_KINDS and not manifest.file("int8", "onnx", backend, made_for=True):
            raise tensorrt_backend.not_for_tensorrt(int8, manifest)
        return int8, precision
    raise InputError(f"--precision {precision!r} is not one of auto, fp32, fp16, int8")


def open_backend(bundle: Path, manifest: Manifest, backend: str = "auto", precision: str = "auto",
                 threads: int = 0, engine_cache: Path | None = None, workspace_mib: int = 1024) -> Backend:
    """The named backend, or for `auto` the first that starts (a provider that is listed but cannot start,
    as when ONNX Runtime's GPU build finds no CUDA libraries, hands over to the next with a warning)."""
    args = (Path(bundle), manifest, precision, threads, engine_cache, workspace_mib)
    if backend != "auto":
        return _open(resolve_backend(backend), *args)
    availability = backend_availability()
    candidates = [name for name in BACKEND_ORDER if not availability[name]] or [resolve_backend("auto", availability)]
    for name in candidates[:-1]:
        try:
            return _open(name, *args)
        except ProviderFellBack as err:
            print(f"warning: {err}; trying the next backend", file=sys.stderr)
    return _open(candidates[-1], *args)


def _open(backend: str, bundle: Path, manifest: Manifest, precision: str, threads: int,
          engine_cache: Path | None, workspace_mib: int) -> Backend:
    if precision == "auto":
        chosen, why = auto_precision(manifest, backend)
        print(f"info: --precision auto on {backend}: {chosen} ({why})", flush=True)  # stdout: errors alone on stderr
    model, precision = select_model(manifest, backend, precision)
    cache_dir = Path(engine_cache) if engine_cache else bundle
    if backend == "tensorrt":
        engine, path = tensorrt_backend.load_or_build_engine(bundle, manifest, model, precision, cache_dir,
                                                             workspace_mib)
        return tensorrt_backend.TensorRTBackend(engine, manifest, path.name)
    options = _provider_options(backend, precision, cache_dir, workspace_mib)
    return OnnxRuntimeBackend(bundle / model.path, manifest, backend, options, threads)


def _provider_options(backend: str, precision: str, cache_dir: Path, workspace_mib: int) -> list:
    """Providers in order of preference, each with its options; the CPU provider always closes the list."""
    providers = []
    if backend == "ort-tensorrt":
        cache_dir.mkdir(parents=True, exist_ok=True)
        providers.append(("TensorrtExecutionProvider", {
            "trt_fp16_enable": precision in ("fp16", "int8"),
            "trt_int8_enable": precision == "int8",  # a QDQ graph: explicit quantization, no calibration table
            "trt_engine_cache_enable": True,  # ONNX Runtime keys its cache by graph and GPU itself
            "trt_engine_cache_path": str(cache_dir),
            "trt_max_workspace_size": workspace_mib << 20,
        }))
    if backend in ("ort-tensorrt", "ort-cuda"):
        providers.append(("CUDAExecutionProvider", {}))
    providers.append(("CPUExecutionProvider", {}))
    return providers

