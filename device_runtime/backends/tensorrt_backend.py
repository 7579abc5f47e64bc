"""TensorRT 10: build an engine from the bundle's ONNX on the device, cache it, and run it with cuda-python.

An engine only runs on the GPU model and TensorRT version it was built with, so it is built here, on first
use (or by `nerveseg-device build-engine`), and cached beside the bundle under a name keyed by GPU, TensorRT
version, precision and the ONNX file's sha256. A JSON file beside each engine records that key and the
engine's own sha256; an engine whose record does not match is rebuilt, never deserialized.

`tensorrt` and cuda-python are imported only when used: the rest of the runtime (and the engine cache logic
below, which the tests check everywhere) runs without them.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.fileio import atomic_path, sha256_file, write_json
from ..core.manifest import Manifest, ModelFile

ENGINE_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class EngineKey:
    """What an engine is valid for. Any field changing means another engine."""

    gpu: str  # slug of the GPU name and compute capability, e.g. "orin-sm87"
    tensorrt: str  # TensorRT version, e.g. "10.3.0"
    onnx_sha256: str
    precision: str

    def file_name(self) -> str:
        version = re.sub(r"[^0-9A-Za-z.]+", "-", self.tensorrt)
        return f"model.{self.gpu}.{self.precision}.trt{version}.{self.onnx_sha256[:16]}.engine"


def engine_path(cache_dir: Path, key: EngineKey) -> Path:
    return Path(cache_dir) / key.file_name()


def gpu_slug(name: str, major: int, minor: int) -> str:
    """'NVIDIA Jetson AGX Orin', 8, 7 -> 'nvidia-jetson-agx-orin-sm87': safe in a file name, unique per model."""
    slug = re.sub(r"[^0-9a-z]+", "-", name.lower()).strip("-") or "gpu"
    return f"{slug}-sm{major}{minor}"


def engine_precision(manifest: Manifest, precision: str) -> str:
    """`auto` -> int8 when the bundle has an INT8 graph, else fp16; any other value unchanged."""
    if precision != "auto":
        return precision
    return "int8" if manifest.file("int8", "onnx", "tensorrt", made_for=True) else "fp16"


def not_for_tensorrt(int8: ModelFile, manifest: Manifest) -> InputError:
    """The one-line refusal of an INT8 file made for ONNX Runtime only: a QAT run with --grid x86, or a bundle
    whose TensorRT form the exporter's parity gate left out."""
    if manifest.left_out():
        return InputError(f"--precision int8: the bundle's INT8 file {int8.path} is for {', '.join(int8.runtimes)} "
                          f"only; its TensorRT form was left out at export ({left_out_phrase(manifest)}); use "
                          "--precision fp16")
    return InputError(f"--precision int8: the bundle's INT8 file {int8.path} is for {', '.join(int8.runtimes)} only "
                      "(unsigned activations, a QAT run with --grid x86), which TensorRT's symmetric int8 cannot "
                      "hold; use --precision fp16, or export a --grid tensorrt QAT run")


def left_out_phrase(manifest: Manifest) -> str:
    """"model.int8.onnx: <why>; ..." of the INT8 files the export's parity gate left out."""
    return "; ".join(f"{name}: {why}" for name, why in manifest.left_out().items())


def check_engine_precision(manifest: Manifest, precision: str) -> ModelFile:
    """The ONNX file an engine of `precision` is built from; InputError for an unknown or impossible precision.

    INT8 needs the bundle's INT8 QDQ ONNX: its Q/DQ nodes carry every scale (explicit quantization), so TensorRT
    needs no calibrator and this runtime has none. An FP32 graph cannot become INT8 here.
    """
    if precision not in ENGINE_PRECISIONS:
        raise InputError(f"--precision {precision!r} is not one of {', '.join(ENGINE_PRECISIONS)}")
    wanted = "int8" if precision == "int8" else "fp32"
    model = manifest.file(wanted, "onnx", "tensorrt", made_for=True)  # of two INT8 files, the signed (TensorRT) one
    other_int8 = manifest.file("int8", "onnx") if model is None and wanted == "int8" else None
    if other_int8 is not None:
        raise not_for_tensorrt(other_int8, manifest)
    if model is None:
        hint = "export an INT8 (QDQ) bundle, or use --precision fp16" if wanted == "int8" else "re-export the bundle"
        raise InputError(f"--precision {precision}: the bundle lists no {wanted.upper()} ONNX file; {hint}")
    return model


# --- imports and the GPU ------------------------------------------------------------------------------------


def import_tensorrt():
    try:
        return importlib.import_module("tensorrt")
    except ImportError as err:
        raise InputError(f"TensorRT is not installed ({err}); use --backend ort-cuda or ort-cpu") from None


def import_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` from 12.6 on, `cuda.cudart` before."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise InputError("cuda-python is not installed (pip install cuda-python matching the CUDA version)")


def cuda_check(result):
    """cuda-python returns (error, *values): raise on an error, else return the value(s)."""
    err, *values = result
    if int(err) != 0:
        cudart = import_cudart()
        message = cudart.cudaGetErrorString(err)[1]
        raise RuntimeError(f"CUDA error {int(err)}: {message.decode() if isinstance(message, bytes) else message}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu_identity() -> str:
    cudart = import_cudart()
    device = cuda_check(cudart.cudaGetDevice())
    props = cuda_check(cudart.cudaGetDeviceProperties(device))
    name = bytes(props.name).split(b"\0")[0].decode(errors="replace")
    return gpu_slug(name, props.major, props.minor)


def tensorrt_status() -> tuple[bool, str]:
    """(True, "TensorRT 10.3.0 on <gpu>") when the TensorRT backend can run, else (False, the reason)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "tensorrt is not installed"
    try:
        trt = import_tensorrt()
        cudart = import_cudart()
        count = cuda_check(cudart.cudaGetDeviceCount())
        if not count:
            return False, "no CUDA GPU found"
        return True, f"TensorRT {trt.__version__} on {gpu_identity()}"
    except (InputError, RuntimeError, ImportError, OSError) as err:
        return False, str(err)


# --- building and caching -----------------------------------------------------------------------------------


def build_engine(onnx_path: Path, manifest: Manifest, precision: str, workspace_mib: int = 1024) -> bytes:
    """Parse the ONNX, build a serialized engine for one frame of the manifest's input size."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch: no flag needed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # for int8: the layers the QDQ graph leaves in float run in FP16
    if precision == "int8":
        # explicit quantization: the Q/DQ nodes of the graph hold the scales, so no calibrator is set
        config.set_flag(trt.BuilderFlag.INT8)
    shape = (1, 1, *manifest.input_size)  # the runtime feeds one frame at a time: min = opt = max
    profile = builder.create_optimization_profile()
    profile.set_shape(manifest.input_name, shape, shape, shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)  # an IHostMemory, or None on failure
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build a {precision} engine from {onnx_path} (see its log above)")
    return bytes(memoryview(serialized))


def _record_path(path: Path) -> Path:
    return path.with_suffix(".json")


def cached_engine(path: Path, key: EngineKey) -> bytes | None:
    """The cached engine's bytes if its record matches `key` and its sha256, else None (then it is rebuilt)."""
    record = _record_path(path)
    if not path.is_file() or not record.is_file():
        return None
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("key") != asdict(key) or data.get("engine_sha256") != sha256_file(path):
        print(f"warning: {path}: cached engine does not match its record; rebuilding", file=sys.stderr)
        return None
    return path.read_bytes()


def store_engine(path: Path, key: EngineKey, engine: bytes) -> None:
    """Write the engine, then its record, each atomically: a crash leaves no record for a partial engine."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(engine)
        write_json(_record_path(path), {"key": asdict(key), "engine_sha256": sha256_file(path),
                                        "bytes": len(engine)})
    except OSError as err:
        raise InputError(f"{path.parent}: cannot write the engine cache ({err}); use --engine-cache DIR") from None


def load_or_build_engine(bundle: Path, manifest: Manifest, model: ModelFile, precision: str, cache_dir: Path,
                         workspace_mib: int = 1024, rebuild: bool = False) -> tuple[bytes, Path]:
    """The serialized engine for this GPU, TensorRT, ONNX file and precision, and where it is cached."""
    trt = import_tensorrt()
    key = EngineKey(gpu_identity(), trt.__version__, model.sha256, precision)
    path = engine_path(cache_dir, key)
    engine = None if rebuild else cached_engine(path, key)
    if engine is None:
        print(f"info: building a {precision} TensorRT engine from {model.path} (minutes on a Jetson)...",
              file=sys.stderr)
        engine = build_engine(bundle / model.path, manifest, precision, workspace_mib)
        store_engine(path, key, engine)
        print(f"info: engine cached at {path}", file=sys.stderr)
    return engine, path


# --- running --------------------------------------------------------------------------------------------------


class TensorRTBackend:
    """One execution context; pinned host buffers and device buffers allocated once; one CUDA stream."""

    def __init__(self, engine_bytes: bytes, manifest: Manifest, model_file: str = "engine"):
        trt, self._cudart = import_tensorrt(), import_cudart()
        self._device, self._host, self._stream = [], [], None
        self.name, self.model_file = f"tensorrt {trt.__version__}", model_file
        try:
            self._setup(trt, engine_bytes, manifest)
        except BaseException:
            self.close()  # free what was allocated before the failure
            raise

    def _setup(self, trt, engine_bytes: bytes, manifest: Manifest) -> None:
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine (built by another TensorRT version?)")
        self._context = self._engine.create_execution_context()
        self._stream = cuda_check(self._cudart.cudaStreamCreate())
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        if manifest.input_name not in names or manifest.output_name not in names:
            raise InputError(f"engine tensors {names} lack {manifest.input_name!r} or {manifest.output_name!r}")
        shape = (1, 1, *manifest.input_size)
        if not self._context.set_input_shape(manifest.input_name, shape):
            raise InputError(f"the engine does not accept the input shape {shape} of the manifest")
        buffers = {name: self._allocate(name, trt) for name in names}  # every I/O tensor needs an address
        self.input_buffer, self._input_device = buffers[manifest.input_name]
        self.output_buffer, self._output_device = buffers[manifest.output_name]

    def _allocate(self, name: str, trt) -> tuple[np.ndarray, int]:
        shape = tuple(self._context.get_tensor_shape(name))
        dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
        nbytes = int(np.prod(shape)) * dtype.itemsize
        device = cuda_check(self._cudart.cudaMalloc(nbytes))
        self._device.append(device)
        # pinned (page-locked) host memory: the copies below are truly asynchronous and faster
        host_ptr = cuda_check(self._cudart.cudaMallocHost(nbytes))
        self._host.append(host_ptr)
        raw = (ctypes.c_byte * nbytes).from_address(int(host_ptr))
        host = np.frombuffer(raw, dtype=dtype).reshape(shape)
        self._context.set_tensor_address(name, int(device))
        return host, int(device)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        if batch is not self.input_buffer:
            np.copyto(self.input_buffer, batch)
        stream = self._stream
        cuda_check(cudart.cudaMemcpyAsync(self._input_device, self.input_buffer.ctypes.data,
                                          self.input_buffer.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                          stream))
        if not self._context.execute_async_v3(int(stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
        cuda_check(cudart.cudaMemcpyAsync(self.output_buffer.ctypes.data, self._output_device,
                                          self.output_buffer.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                          stream))
        cuda_check(cudart.cudaStreamSynchronize(stream))  # a CPU-GPU sync point: post-processing needs the logits
        return self.output_buffer

    def close(self) -> None:
        cudart = self._cudart
        if self._stream is not None:
            cudart.cudaStreamSynchronize(self._stream)
        # release TensorRT's objects before the memory they point at
        self._context = self._engine = self._runtime = None
        for pointer in self._device:
            cudart.cudaFree(pointer)
        for pointer in self._host:
            cudart.cudaFreeHost(pointer)
        self._device, self._host = [], []
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
