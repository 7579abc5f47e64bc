"""Atomic writes: a file or folder either keeps its old contents or gets the complete new ones, never half."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on error removed.

    Example:
        with atomic_path("runs/a/checkpoints/last.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a run or bundle must stay readable by other users (a service)
    try:
        yield tmp
        os.replace(tmp, path)  # atomic on POSIX when both sit on one file system, as here
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it becomes `path`, on error it is removed.

    Without `replace`, `path` must not exist or be an empty folder, so a finished dataset is never overwritten by
    accident. With `replace` (a bundle), an existing `path` is swapped out by renames only: `path` is always
    either the complete old folder or the complete new one.

    Raises:
        InputError: without `replace`, `path` exists and is a file or a non-empty folder.
    """
    path = Path(path)
    if not replace:
        _check_free(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the finished folder should be as readable as any other
    try:
        yield tmp
        old = None
        if replace and path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        elif not replace:
            _check_free(path)  # someone may have filled it meanwhile; rename would fail less clearly
            if path.is_dir():
                path.rmdir()
        os.replace(tmp, path)  # atomic on POSIX within one file system, as here (same parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _check_free(path: Path) -> None:
    if path.is_dir() and any(path.iterdir()):
        raise InputError(f"{path}: folder already exists and is not empty; remove it or choose another folder")
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a folder; choose another folder")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
