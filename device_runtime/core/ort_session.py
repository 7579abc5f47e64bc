"""An ONNX Runtime session as the device opens it (all graph optimisations, no spinning worker threads, buffers
bound once), in the core so that desktop measurements (`export.report.measure`) run exactly what the device runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .manifest import Manifest


class ProviderFellBack(InputError):
    """ONNX Runtime started another provider than the one asked for (its GPU libraries are missing, say)."""


def session_options(threads: int = 0):
    """How the device sets up every ONNX Runtime session: all graph optimisations, `threads` intra-op threads (0: ONNX
    Runtime's choice), errors only in its log, and no spin-waiting worker threads: between runs the device loop
    decodes, post-processes and writes, and on a small device spinning threads would take those cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: a provider fallback is reported by OnnxRuntimeBackend itself
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeBackend:
    """An ONNX Runtime session with its input and output bound once to numpy buffers (no per-frame allocation)."""

    def __init__(self, model_path: Path, manifest: Manifest, backend: str, providers: list, threads: int = 0):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=session_options(threads),
                                                providers=[p for p, _ in providers],
                                                provider_options=[o for _, o in providers])
        except Exception as err:  # ONNX Runtime's own error types for a graph it cannot load
            raise InputError(f"{model_path}: ONNX Runtime cannot load it ({type(err).__name__}: {err})") from None
        active = self.session.get_providers()[0]
        if active != providers[0][0]:
            raise ProviderFellBack(f"--backend {backend}: ONNX Runtime could not start {providers[0][0]} and fell back "
                             f"to {active}; check the GPU libraries, or use --backend ort-cpu")
        self.name, self.model_file = f"onnxruntime {active}", model_path.name
        self._input_name, self._output_name = _check_io(self.session, manifest, model_path)
        self.input_buffer = np.zeros((1, 1, *manifest.input_size), np.float32)
        # one plain run learns the output's shape (its dimensions may be symbolic) and takes the first-run cost
        first = self.session.run([self._output_name], {self._input_name: self.input_buffer})[0]
        self.output_buffer = np.empty(first.shape, first.dtype)
        self._binding = self.session.io_binding()
        # OrtValues over our numpy memory: ONNX Runtime reads and writes them in place
        self._binding.bind_ortvalue_input(self._input_name, ort.OrtValue.ortvalue_from_numpy(self.input_buffer))
        self._binding.bind_ortvalue_output(self._output_name, ort.OrtValue.ortvalue_from_numpy(self.output_buffer))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if batch is not self.input_buffer:
            np.copyto(self.input_buffer, batch)
        self.session.run_with_iobinding(self._binding)
        return self.output_buffer

    def close(self) -> None:
        self._binding = None
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_io(session, manifest: Manifest, model_path: Path) -> tuple[str, str]:
    """The graph must take what preprocess makes and give what the manifest promises; InputError otherwise."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    expected = ["batch", 1, *manifest.input_size]
    spec = inputs.get(manifest.input_name)
    if spec is None or len(inputs) != 1:
        raise InputError(f"{model_path}: expected one input named {manifest.input_name!r}, found {sorted(inputs)}")
    shape = list(spec.shape)
    if len(shape) != 4 or shape[1:] != expected[1:] or spec.type != "tensor(float)":
        raise InputError(f"{model_path}: input {spec.name!r} is {spec.type} {shape}; the manifest and this "
                         f"runtime feed float32 {expected}")
    if not isinstance(shape[0], str) and shape[0] != 1:
        raise InputError(f"{model_path}: input batch dimension is {shape[0]}; the runtime feeds 1 frame at a time")
    if manifest.output_name not in outputs:
        raise InputError(f"{model_path}: no output named {manifest.output_name!r} (found {sorted(outputs)})")
    return spec.name, manifest.output_name
