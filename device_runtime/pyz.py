"""`nerveseg-device build-pyz`: the runtime as one file, run with `python3 nerveseg-device.pyz run ...`.

The archive (stdlib zipapp) holds this package and a copy of tifffile (pure Python, BSD licence, its licence
file included), so the target needs only numpy, OpenCV and ONNX Runtime (plus TensorRT and cuda-python for
the TensorRT backend): the packages JetPack or NVIDIA's wheels provide, which must not be shadowed by pip.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import tempfile
import zipapp
from pathlib import Path

from .core.errors import InputError
from .core.fileio import atomic_path

_MAIN = '''"""nerveseg-device as a zipapp."""
import sys

from device_runtime.cli import main

sys.exit(main())
'''


def _copy_python_files(package: str, target: Path) -> int:
    """Copy a package's .py files and licence, subpackages included (importlib.resources: works from a folder and
    inside a zipapp)."""
    return _copy_tree(importlib.resources.files(package), target)


def _copy_tree(folder, target: Path) -> int:
    target.mkdir(parents=True)
    count = 0
    for entry in folder.iterdir():
        if entry.is_dir() and entry.name != "__pycache__" and entry.joinpath("__init__.py").is_file():
            count += _copy_tree(entry, target / entry.name)
        elif entry.is_file() and (entry.name.endswith(".py") or entry.name == "LICENSE"):
            (target / entry.name).write_bytes(entry.read_bytes())
            count += 1
    return count


def _tifffile_licence() -> str | None:
    try:
        files = importlib.metadata.files("tifffile") or []
    except importlib.metadata.PackageNotFoundError:
        return None  # running from a zipapp: the licence is inside it already
    licence = next((f for f in files if f.name.upper().startswith("LICENSE")), None)
    return licence.read_text() if licence else None


def build_pyz(out: str | os.PathLike) -> Path:
    """Write the zipapp to `out`; returns its path."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        _copy_python_files("device_runtime", staging / "device_runtime")
        try:
            _copy_python_files("tifffile", staging / "tifffile")
        except ModuleNotFoundError:
            raise InputError("build-pyz needs tifffile installed here, to carry it inside the archive") from None
        licence = _tifffile_licence()
        if licence and not (staging / "tifffile" / "LICENSE").exists():
            (staging / "tifffile" / "LICENSE").write_text(licence)
        (staging / "__main__.py").write_text(_MAIN)
        try:
            with atomic_path(out) as tmp_out:
                zipapp.create_archive(staging, tmp_out, interpreter="/usr/bin/env python3", compressed=True)
                tmp_out.chmod(0o755)
        except OSError as err:
            raise InputError(f"{out}: cannot write the archive ({err.strerror or err})") from None
    return out
