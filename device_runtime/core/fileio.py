"""Atomic writes: a file or folder either keeps its old contents or gets the complete new ones, never half.

Temporary names carry the writer's process id (`.NAME.PID.RANDOM.tmp`), so the next write of the same path
can remove what a killed writer left behind (its process is gone) without touching a live writer's file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import InputError, os_error_line

_LEGACY_STALE_S = 3600.0  # temporaries of the old naming (no pid): stale when an hour old


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, sweep: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on error removed.

    Example:
        with atomic_path("runs/a/checkpoints/last.pt") as tmp:
            torch.save(state, tmp)

    Args:
        sweep: first remove temporaries of `path` left by killed writers. Per-frame files pass False: the
            sweep lists the folder, which for a folder of thousands of masks would cost more than the frame.

    Raises:
        InputError: the folder cannot be created or written, or `path` is a folder (the message names the path).
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name")
    _make_parent(path)
    if sweep:
        remove_stale_temporaries(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise InputError(f"{path}: cannot write here ({describe_os_error(err)})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a run or bundle must stay readable by other users (a service)
    try:
        try:
            yield tmp
        except OSError as err:  # name the file being written, whatever the writer's own message says
            raise InputError(f"{path}: writing failed ({os_error_line(err)}); the previous file, if any, is kept") from None
        os.replace(tmp, path)  # atomic on POSIX when both sit on one file system, as here
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it becomes `path`, on error it is removed.

    Without `replace`, `path` must not exist or be an empty folder, so a finished dataset is never overwritten by
    accident. With `replace` (a bundle), an existing `path` is exchanged with the new folder in one atomic
    `renameat2(RENAME_EXCHANGE)` where the kernel has it (Linux), so `path` is at every instant either the
    complete old folder or the complete new one, even under kill -9 or power loss; elsewhere two renames.
    Callers decide what may be replaced (see export's guard); this function only swaps.

    Raises:
        InputError: without `replace`, `path` exists and is a file or a non-empty folder; the parent cannot
            be created or written.
    """
    path = Path(path)
    if not replace:
        _check_free(path)
    _make_parent(path)
    remove_stale_temporaries(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    except OSError as err:
        raise InputError(f"{path}: cannot write here ({describe_os_error(err)})") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the finished folder should be as readable as any other
    try:
        try:
            yield tmp
        except OSError as err:  # a full disk inside a library (ONNX, torch) often names no file: name ours
            reason = os_error_line(err).replace(str(tmp), str(path))
            raise InputError(f"{path}: writing failed ({reason}); nothing was changed there") from None
        except InputError as err:  # messages name the staging folder's files by the folder's real name
            if str(tmp) not in str(err):
                raise
            raise type(err)(str(err).replace(str(tmp), str(path))) from None
        if replace and path.exists():
            if _exchange(tmp, path):  # tmp now holds the old folder; removed below
                return
            old = path.with_name(f".{path.name}.{os.getpid()}.old.tmp")
            path.rename(old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
            return
        if not replace:
            _check_free(path)  # someone may have filled it meanwhile; rename would fail less clearly
        if path.is_dir():
            path.rmdir()
        os.replace(tmp, path)  # atomic on POSIX within one file system, as here (same parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a file system or kernel without it: fall back
        return False
    raise OSError(code, os.strerror(code), str(b))


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove temporaries of `path` left by writers that no longer run (a kill -9, a power loss).

    Returns the paths removed. A temporary whose writer process is alive is kept; one of the old naming
    (no process id) is removed only once it is an hour old.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)\.)?(?:[^.]+\.)?(?:old\.)?tmp$")
    legacy_old = f".{path.name}.old"  # the old two-rename swap's parking place
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        match = pattern.match(sibling.name)
        if not match and sibling.name != legacy_old:
            continue
        pid = match.group(1) if match else None
        try:
            if pid is not None:
                if _alive(int(pid)):
                    continue
            elif match and time.time() - sibling.lstat().st_mtime < _LEGACY_STALE_S:
                continue
            parked = sibling.name == legacy_old or sibling.name.endswith(".old.tmp")
            if parked and not path.exists() and not path.is_symlink():
                # a two-rename swap killed between its renames: the old folder is the only complete one
                sibling.rename(path)
                continue
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling)
            else:
                sibling.unlink()
            removed.append(sibling)
        except OSError:
            continue  # not ours to remove (permissions): leave it
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:  # a file sits where a folder of the path should be
        raise InputError(f"{err.filename or path.parent}: is a file, not a folder") from None
    except OSError as err:
        raise InputError(f"{err.filename or path.parent}: cannot create the folder ({describe_os_error(err)})") from None
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: is not a folder")


def _check_free(path: Path) -> None:
    if path.is_dir() and any(path.iterdir()):
        raise InputError(f"{path}: folder already exists and is not empty; remove it or choose another folder")
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a folder; choose another folder")


def describe_os_error(err: OSError) -> str:
    """A short reason for an OS error, without repeating the path: 'No space left on device', ..."""
    return err.strerror or str(err)


PROBE_BYTES = 64 << 10  # more than a first mask or overlay, about a video's header and first frames


def check_writable_file(path: str | os.PathLike, flag: str) -> Path:
    """Fail now, before long work, if a file cannot be written at `path` (its folder is created if needed).

    Raises:
        InputError: `path` is a folder, its parent is not a folder, or it does not take real bytes now
            (read-only, permission, a full disk, a file size limit): named, with the reason.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot create its folder ({describe_os_error(err)})") from None
    probe_write(path.parent, f".{path.name}.{os.getpid()}.", f"{flag} {path}")
    return path


def probe_write(folder: Path, prefix: str, what: str, size: int = PROBE_BYTES) -> None:
    """Prove that `folder` takes `size` real bytes now: a temporary is written, flushed to the disk, removed.

    Creating an empty file proves nothing: a full disk still has inodes, so the file appears and only its
    first write fails (the zero-byte masks and videos of a run started on a full disk).

    Raises:
        InputError: "`what`: cannot write here (reason)".
    """
    probe = None
    try:
        fd, probe = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
        try:
            write_all(fd, bytes(size))
            os.fsync(fd)  # where space is only claimed on the way to the disk (NFS, some FUSE), it is claimed now
        finally:
            os.close(fd)
    except OSError as err:
        raise InputError(f"{what}: cannot write here ({describe_os_error(err)})") from None
    finally:
        if probe is not None:
            os.unlink(probe)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written; a write that stops short and then writes nothing is an error.

    Raises:
        OSError: the write failed (ENOSPC, EFBIG, EIO, ...); part of `data` may have been written.
    """
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.ENOSPC, "the write stopped short")
        view = view[written:]


def write_bytes(path: str | os.PathLike, data: bytes, what: str) -> None:
    """Write a per-frame file whole or not at all: a temporary beside it, every byte checked, then a rename.

    A failed write (full disk, file size limit) leaves neither an empty nor a cut file, and an older file
    of that name (an --overwrite run) is kept. A kill -9 mid-write can leave one hidden temporary.

    Raises:
        InputError: "`what` PATH: writing failed (reason)".
    """
    with atomic_path(path, sweep=False) as tmp:
        try:
            with open(tmp, "wb") as handle:
                write_all(handle.fileno(), data)
        except OSError as err:
            raise InputError(f"{what} {path}: writing failed ({describe_os_error(err)})") from None


def strict_json(obj):
    """`obj` with every non-finite float (NaN, +-Infinity) replaced by None, numpy scalars as Python numbers.

    JSON has no NaN or Infinity; Python's json writes them anyway, and strict parsers (browsers, jq, most
    languages) then refuse the whole file. Everything the project writes passes through here.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "shape", None) == ():  # numpy scalar
        return strict_json(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def dumps_strict(obj, **kwargs) -> str:
    """json.dumps of `strict_json(obj)`; refuses (ValueError) anything that would still not be JSON."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        try:
            tmp.write_text(text, encoding="utf-8")
        except OSError as err:
            raise InputError(f"{path}: cannot write ({describe_os_error(err)}); the previous file, if any, is kept") from None


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, dumps_strict(obj, indent=2, sort_keys=False) + "\n")


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`; one-line InputError naming the file and `what` it should hold otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read {what} ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: malformed {what} (expected a JSON object)")
    return data


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
