"""Folders that appear whole or not at all (a generated dataset, a calibration set)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from device_runtime.errors import InputError


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it is renamed to `path`, on error removed.

    `path` must not exist, or be an empty folder: an interrupted writer then never leaves a half-written
    dataset under the real name, and a finished one is never overwritten by accident.

    Raises:
        InputError: `path` exists and is a file or a non-empty folder.
    """
    path = Path(path)
    _check_free(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the finished folder should be as readable as any other
    try:
        yield tmp
        _check_free(path)  # someone may have filled it meanwhile; rename would fail less clearly
        if path.is_dir():
            path.rmdir()
        os.replace(tmp, path)  # atomic on POSIX within one file system, as here (same parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _check_free(path: Path) -> None:
    if path.is_dir() and any(path.iterdir()):
        raise InputError(f"{path}: folder already exists and is not empty; remove it or choose another folder")
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a folder; choose another folder")
