"""The bundle contract: manifest.json, written by `export`, verified and read by the device.

A bundle is a folder holding manifest.json and the model files it lists. The device refuses a bundle
whose format version it does not know, whose files are missing or do not match their sha256, or whose
model input is not what this runtime feeds (float32, 1 channel, N x 1 x H x W, values in [0, 1]).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError
from .fileio import read_json_object, sha256_file, write_json
from .postprocess import Morphology
from .temporal import TemporalParams

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INPUT_NAME = "input"  # fixed ONNX names: export writes them, the runtime binds them
OUTPUT_NAME = "logits"
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class ModelFile:
    """One model file of the bundle: an ONNX graph or a TensorRT engine."""

    path: str  # relative to the bundle folder
    sha256: str
    precision: str  # one of PRECISIONS
    format: str  # "onnx" or "tensorrt"
    bytes: int = 0
    # the backends this file is made for (see backends.BACKEND_ORDER); empty = any. An INT8 bundle holds two
    # ONNX files of the same integers: signed activations for TensorRT, unsigned (zero point 128) for x86 CPUs
    runtimes: list = field(default_factory=list)


@dataclass
class Manifest:
    architecture: str
    input_size: tuple[int, int]  # (height, width)
    threshold: float
    morphology: Morphology
    files: list[ModelFile]
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    output_kind: str = "logits"  # the network emits logits; the runtime applies the sigmoid
    preprocessing: dict = field(
        default_factory=lambda: {
            "grey": "OpenCV BGR->grey weights for colour frames",
            "scale": "divide by the dtype maximum (255 for 8 bit, 65535 for 16 bit) to [0, 1]",
            "resize": "bilinear (cv2.INTER_LINEAR) to input_size",
        }
    )
    quantization: dict = field(default_factory=lambda: {"scheme": "none"})
    metrics: dict = field(default_factory=dict)  # {"validation": {...}, "test": {...}, "parity": {...}}
    training_config: dict = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # stabilisation over video frames (`device_runtime.core.temporal`; `nerveseg tune-temporal` tunes it); older
    # bundles have none and get the defaults
    temporal: TemporalParams = field(default_factory=TemporalParams)

    @property
    def input_shape(self) -> list:
        """ONNX input shape with a dynamic batch dimension."""
        return ["batch", 1, int(self.input_size[0]), int(self.input_size[1])]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        data["model"] = {
            "input": {"name": self.input_name, "shape": self.input_shape, "dtype": "float32", "range": [0.0, 1.0]},
            "output": {"name": self.output_name, "kind": self.output_kind},
        }
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST_NAME) -> "Manifest":
        try:
            return cls(
                architecture=str(data["architecture"]),
                input_size=(int(data["input_size"][0]), int(data["input_size"][1])),
                threshold=float(data["threshold"]),
                morphology=Morphology.from_dict(data["morphology"]),
                files=[ModelFile(**entry) for entry in data["files"]],
                input_name=data.get("input_name", INPUT_NAME),
                output_name=data.get("output_name", OUTPUT_NAME),
                output_kind=data.get("output_kind", "logits"),
                preprocessing=data.get("preprocessing", {}),
                quantization=data.get("quantization", {"scheme": "none"}),
                metrics=data.get("metrics", {}),
                training_config=data.get("training_config", {}),
                dataset=data.get("dataset", {}),
                format_version=int(data["format_version"]),
                temporal=TemporalParams.from_dict(data.get("temporal")),
            )
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise InputError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from None

    def file(self, precision: str, fmt: str = "onnx", backend: str | None = None,
             made_for: bool = False) -> ModelFile | None:
        """The listed file of this precision and format, or None. With a backend: the file made for it, else
        one made for any backend, else the first of that precision (it still runs, just not at its best), or
        with `made_for` None: TensorRT cannot run an INT8 file made for ONNX Runtime only (a --grid x86 run's
        unsigned activations)."""
        matches = [f for f in self.files if f.precision == precision and f.format == fmt]
        if backend is not None:
            for wanted in (lambda f: backend in f.runtimes, lambda f: not f.runtimes):
                chosen = next((f for f in matches if wanted(f)), None)
                if chosen is not None:
                    return chosen
            if made_for:
                return None
        return matches[0] if matches else None

    def left_out(self) -> dict[str, str]:
        """{file: why} of the INT8 files the exporter's parity gate left out of this bundle ({} when none was, and
        for bundles written before the gate kept files one by one)."""
        refused = self.quantization.get("refused", {})
        return {str(k): str(v) for k, v in refused.items()} if isinstance(refused, dict) else {}

    def latency_ms(self, backend: str) -> dict:
        """{precision: median ms} measured at export on this backend (`metrics["latency_ms"]`), or {}."""
        measured = self.metrics.get("latency_ms", {}).get(backend, {})
        return {k: float(v) for k, v in measured.items() if k in PRECISIONS and isinstance(v, (int, float))}


def describe_file(bundle_dir: str | os.PathLike, relative_path: str, precision: str, fmt: str) -> ModelFile:
    """A ModelFile entry for a file already written inside the bundle."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    full = Path(bundle_dir) / relative_path
    return ModelFile(relative_path, sha256_file(full), precision, fmt, full.stat().st_size)


def write_manifest(bundle_dir: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(bundle_dir) / MANIFEST_NAME
    write_json(path, manifest.to_dict())
    return path


def load_manifest(bundle_dir: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read a bundle's manifest; with verify, refuse it unless every check of this module passes."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise InputError(f"{bundle_dir}: bundle folder not found")
    if not path.is_file():
        raise InputError(f"{path}: not found; {_bundle_hint(bundle_dir)}")
    data = read_json_object(path, "manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            f"{path}: bundle format version {version!r}, this runtime reads version {FORMAT_VERSION}; "
            "re-export the bundle with a matching nerveseg"
        )
    check_fields(data, str(path))
    manifest = Manifest.from_dict(data, str(path))
    if verify:
        verify_bundle(bundle_dir, manifest)
    return manifest


_MISSING = object()


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text(value) -> bool:
    return isinstance(value, str) and value != ""


def _one_of(*choices):
    return lambda value: isinstance(value, str) and value in choices


# every field the runtime reads, with what it must be; the writer (Manifest.to_dict) writes all of them
_FIELDS = (
    ("architecture", _text, "a text"),
    ("input_size", lambda v: isinstance(v, list) and len(v) == 2 and all(_count(x) for x in v),
     "[height, width] in whole pixels"),
    ("threshold", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0,
     "a number in [0, 1]"),
    ("morphology.open_radius", _count, "a whole number >= 0"),
    ("morphology.close_radius", _count, "a whole number >= 0"),
    ("morphology.min_area", _count, "a whole number >= 0"),
    ("morphology.fill_holes", lambda v: isinstance(v, bool), "true or false"),
    ("files", lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list of model files"),
    ("input_name", _text, "a text (the ONNX input's name)"),
    ("output_name", _text, "a text (the ONNX output's name)"),
    ("output_kind", _one_of("logits", "probabilities"), '"logits" or "probabilities"'),
    ("model.input", lambda v: isinstance(v, dict), "an object (name, shape, dtype, range)"),
    ("model.output", lambda v: isinstance(v, dict), "an object (name, kind)"),
)
_FILE_FIELDS = {
    "path": (_text, "a text"),
    "sha256": (lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
               "64 lower-case hex digits"),
    "precision": (_one_of(*PRECISIONS), " or ".join(PRECISIONS)),
    "format": (_one_of("onnx", "tensorrt"), '"onnx" or "tensorrt"'),
}
_FILE_OPTIONAL = {  # absent from bundles written before these fields existed
    "bytes": (_count, "a whole number >= 0"),
    "runtimes": (lambda v: isinstance(v, list) and all(_text(x) for x in v), "a list of backend names"),
}
_OPTIONAL_OBJECTS = ("preprocessing", "quantization", "metrics", "training_config", "dataset")


def check_fields(data: dict, where: str) -> None:
    """Refuse a manifest whose fields are missing or of the wrong type, before anything reads them: one line
    naming the manifest and the field (a threshold written as "0.5" would otherwise run, compared as text).

    Raises:
        InputError: "WHERE: malformed manifest: FIELD must be WHAT, got VALUE".
    """
    def need(ok: bool, field: str, expected: str, value) -> None:
        if not ok:
            got = "nothing (it is missing)" if value is _MISSING else f"{type(value).__name__} {value!r:.60}"
            raise InputError(f"{where}: malformed manifest: {field} must be {expected}, got {got}")

    for field, check, expected in _FIELDS:
        value = _at(data, field)
        need(value is not _MISSING and check(value), field, expected, value)
    height, width = data["input_size"]
    for field, expected in (("model.input.name", data["input_name"]), ("model.output.name", data["output_name"]),
                            ("model.output.kind", data["output_kind"]), ("model.input.dtype", "float32"),
                            ("model.input.shape", ["batch", 1, height, width]), ("model.input.range", [0.0, 1.0])):
        value = _at(data, field)
        need(value == expected, field, f"{expected!r}, as the rest of the manifest says", value)
    for index, entry in enumerate(data["files"]):
        need(isinstance(entry, dict), f"files[{index}]", "an object", entry)
        for key in entry.keys() - _FILE_FIELDS.keys() - _FILE_OPTIONAL.keys():
            need(False, f"files[{index}].{key}", "absent (not a field of a model file)", entry[key])
        for key, (check, expected) in (_FILE_FIELDS | _FILE_OPTIONAL).items():
            value = entry.get(key, _MISSING)
            need((value is _MISSING and key in _FILE_OPTIONAL) or (value is not _MISSING and check(value)),
                 f"files[{index}].{key}", expected, value)
    for field in _OPTIONAL_OBJECTS:
        need(isinstance(data.get(field, {}), dict), field, "an object", data.get(field))


def _at(data: dict, dotted: str):
    """data["a"]["b"] for "a.b", or _MISSING."""
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return _MISSING
        data = data[key]
    return data


def _bundle_hint(folder: Path) -> str:
    """What to point --bundle at when `folder` is not a bundle: a run folder's own bundles, or how to make one."""
    candidates = (folder / "bundle" / MANIFEST_NAME, *sorted(folder.glob(f"qat/*/bundle/{MANIFEST_NAME}")))
    inside = [p.parent for p in candidates if p.is_file()]
    if inside:
        return "this is a run folder; its bundles: " + ", ".join(str(p) for p in inside)
    if (folder / "checkpoints").is_dir():
        return f"this is a run folder without a bundle; write one with 'nerveseg export --run-dir {folder}'"
    return "a bundle folder holds manifest.json (written by 'nerveseg export')"


def verify_bundle(bundle_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Check the input contract and the sha256 of every listed file; raise InputError on any mismatch."""
    bundle_dir = Path(bundle_dir)
    height, width = manifest.input_size
    if height < 8 or width < 8:
        raise InputError(f"{bundle_dir / MANIFEST_NAME}: input size {manifest.input_size} is too small")
    if manifest.output_kind not in ("logits", "probabilities"):
        raise InputError(f"{bundle_dir / MANIFEST_NAME}: unknown output kind {manifest.output_kind!r}")
    if not manifest.files:
        raise InputError(f"{bundle_dir / MANIFEST_NAME}: lists no model file")
    for entry in manifest.files:
        full = (bundle_dir / entry.path).resolve()
        if bundle_dir.resolve() not in full.parents:
            raise InputError(f"{bundle_dir / MANIFEST_NAME}: file {entry.path!r} lies outside the bundle")
        if not full.is_file():
            raise InputError(f"{full}: listed in the manifest but missing")
        if sha256_file(full) != entry.sha256:
            raise InputError(f"{full}: sha256 does not match the manifest; the file was changed or corrupted")
