"""Helpers for the device runtime tests: tiny ONNX models, bundles, frames, and a torch-blocking subprocess.

The model is one 1x1 convolution, logits = GAIN * (x - 0.5), so the probability is above 0.5 exactly where a
pixel is brighter than half its range: masks of constructed frames are known by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from device_runtime.core.manifest import Manifest, describe_file, write_manifest
from device_runtime.core.postprocess import Morphology

REPO = Path(__file__).resolve().parents[1]
GAIN = 20.0


def tiny_onnx(path: Path, size=(32, 32), qdq: bool = False) -> Path:
    """input [batch, 1, H, W] float32 -> logits [batch, 1, H, W]; with qdq, an INT8 QDQ graph of the same."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    height, width = size
    weight = numpy_helper.from_array(np.full((1, 1, 1, 1), GAIN, np.float32), "weight")
    bias = numpy_helper.from_array(np.array([-GAIN / 2], np.float32), "bias")
    initializers, nodes, conv_in, conv_w = [weight, bias], [], "input", "weight"
    if qdq:  # explicit quantization, as export writes it: Q/DQ pairs carry the scales
        initializers += [numpy_helper.from_array(np.array(1 / 255, np.float32), "x_scale"),
                         numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
                         numpy_helper.from_array(np.array(GAIN / 127, np.float32), "w_scale"),
                         numpy_helper.from_array(np.array(0, np.int8), "w_zero")]
        nodes += [helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero"], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
                  helper.make_node("QuantizeLinear", ["weight", "w_scale", "w_zero"], ["w_q"]),
                  helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"])]
        conv_in, conv_w = "x_dq", "w_dq"
    nodes.append(helper.make_node("Conv", [conv_in, conv_w, "bias"], ["logits"]))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, height, width])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="nerveseg-tests")
    model.ir_version = 8  # readable by any ONNX Runtime from 1.10 on
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_bundle(folder: Path, size=(32, 32), threshold: float = 0.5, morphology: Morphology | None = None,
                fp32: bool = True, int8: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    if fp32:
        tiny_onnx(folder / "model.fp32.onnx", size)
        files.append(describe_file(folder, "model.fp32.onnx", "fp32", "onnx"))
    if int8:
        tiny_onnx(folder / "model.int8.onnx", size, qdq=True)
        files.append(describe_file(folder, "model.int8.onnx", "int8", "onnx"))
    manifest = Manifest(architecture="tiny-1x1-conv", input_size=size, threshold=threshold,
                        morphology=morphology or Morphology(), files=files,
                        quantization={"scheme": "int8-qdq" if int8 else "none"})
    write_manifest(folder, manifest)
    return folder


def disc_frame(height=48, width=64, centre=(20, 24), radius=8, dtype=np.uint8, colour=False) -> np.ndarray:
    """A dark frame with one bright disc: its mask is the disc."""
    yy, xx = np.mgrid[:height, :width]
    inside = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius ** 2
    top = np.iinfo(dtype).max
    frame = np.where(inside, top, top // 10).astype(dtype)
    return np.repeat(frame[..., None], 3, axis=2) if colour else frame


BLOCKER = textwrap.dedent('''
    import sys

    class _Blocker:
        """Fail any import of torch (and the desktop packages) so the runtime cannot use them unnoticed."""
        blocked = ("torch", "torchvision", "training", "qat", "export")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                sys.stderr.write("BLOCKED IMPORT: " + name + "\\n")
                raise ImportError("import of " + name + " is blocked in the device runtime tests")
            return None

    sys.meta_path.insert(0, _Blocker())
''')


def device_env(tmp_path: Path) -> dict:
    """Environment for a subprocess in which importing torch fails (a sitecustomize on PYTHONPATH)."""
    site = tmp_path / "blocker_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("DISPLAY", None)
    return env


def device_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "device_runtime", *args]


def run_device(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(device_cmd(*args), env=device_env(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout)


# --- a stand-in for TensorRT and cuda-python ------------------------------------------------------------------
# It follows the TensorRT 10 and cuda-python call shapes the runtime uses, and "executes" the tiny model on the
# host, so the plumbing of the TensorRT backend (build, cache, deserialize, buffers, copies) runs here. It says
# nothing about real TensorRT: the tests marked `tensorrt` do that where it is installed.


def fake_tensorrt_modules(height: int = 32, width: int = 32) -> dict:
    import ctypes
    import importlib.machinery
    import types

    log = {"builds": [], "executions": 0}
    memory = {}

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = "10.3.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT")
    trt.nptype = lambda dtype: np.float32

    class Config:
        def __init__(self):
            self.flags, self.pools, self.profiles, self.int8_calibrator = set(), {}, [], None

        def set_flag(self, flag):
            self.flags.add(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.shape = (name, tuple(low), tuple(opt), tuple(high))

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network["onnx"] = path
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            assert flags == 0  # TensorRT 10: explicit batch without a flag
            return {}

        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            log["builds"].append({"flags": set(config.flags), "profile": config.profiles[0].shape,
                                  "onnx": network["onnx"], "calibrator": config.int8_calibrator})
            return b"FAKE-ENGINE:" + ",".join(sorted(config.flags)).encode()

    trt.Builder, trt.OnnxParser = Builder, Parser

    class Context:
        def __init__(self):
            self.addresses, self.shape = {}, None

        def set_input_shape(self, name, shape):
            self.shape = tuple(shape)
            return self.shape == (1, 1, height, width)

        def get_tensor_shape(self, name):
            return self.shape

        def set_tensor_address(self, name, address):
            self.addresses[name] = address

        def execute_async_v3(self, stream):
            assert isinstance(stream, int)
            count = height * width
            x = np.frombuffer((ctypes.c_float * count).from_address(self.addresses["input"]), np.float32)
            y = np.frombuffer((ctypes.c_float * count).from_address(self.addresses["logits"]), np.float32)
            y[:] = GAIN * (x - 0.5)
            log["executions"] += 1
            return True

    class Engine:
        num_io_tensors = 2
        get_tensor_name = staticmethod(["input", "logits"].__getitem__)
        get_tensor_dtype = staticmethod(lambda name: "FLOAT")
        create_execution_context = staticmethod(Context)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if bytes(data).startswith(b"FAKE-ENGINE:") else None

    trt.Runtime = Runtime

    cudart = types.ModuleType("cuda.bindings.runtime")
    ok = 0

    def malloc(nbytes):
        buffer = ctypes.create_string_buffer(nbytes)
        memory[ctypes.addressof(buffer)] = buffer
        return ok, ctypes.addressof(buffer)

    def free(address):
        memory.pop(int(address))
        return (ok,)

    cudart.cudaMalloc = cudart.cudaMallocHost = malloc
    cudart.cudaFree = cudart.cudaFreeHost = free
    cudart.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudart.cudaMemcpyAsync = lambda dst, src, n, kind, stream: (ctypes.memmove(int(dst), int(src), n), ok)[1:]
    cudart.cudaStreamCreate = lambda: (ok, 7)
    cudart.cudaStreamSynchronize = cudart.cudaStreamDestroy = lambda stream: (ok,)
    cudart.cudaGetDevice = lambda: (ok, 0)
    cudart.cudaGetDeviceCount = lambda: (ok, 1)
    cudart.cudaGetDeviceProperties = lambda device: (ok, types.SimpleNamespace(name=b"Fake Orin\0", major=8,
                                                                               minor=7))
    cudart.cudaRuntimeGetVersion = lambda: (ok, 12060)
    cudart.cudaGetErrorString = lambda err: (ok, b"fake error")
    return {"tensorrt": trt, "cuda.bindings.runtime": cudart, "log": log, "memory": memory}
