"""Where `nerveseg export --out` may write: a new (or empty) folder, or an existing nerveseg bundle.

A bundle folder is replaced whole (by an atomic exchange, see `device_runtime.core.fileio.atomic_dir`), so anything
in it that is not part of a bundle would be deleted with it. Hence the rule: `--out` is refused when it is a
file, a run folder, a dataset, the folder holding any of them, or any folder with something foreign in it;
an existing bundle is replaced only when the caller says so (`--replace`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from device_runtime.core.errors import InputError
from device_runtime.core.manifest import MANIFEST_NAME

# what a bundle folder may hold besides the files its manifest lists: TensorRT engines cached on the device
# (model.<gpu>.<precision>.trt<version>.<sha>.engine) and the JSON record beside each
_ENGINE_CACHE = re.compile(r"^model\..+\.engine$|^model\..+\.trt[^/]*\.json$")


def check_bundle_out(out_dir: str | os.PathLike, protected: dict[str, Path], replace: bool) -> bool:
    """Refuse an `--out` that would destroy something; return True when it is an existing bundle to replace.

    Args:
        out_dir: the bundle folder asked for.
        protected: {what: path} that must survive: the run folder, the checkpoint, the dataset root...;
            `out_dir` may be neither one of them nor a folder above one.
        replace: the user asked to replace an existing bundle.

    Raises:
        InputError: one line naming `out_dir` and why it is refused.
    """
    out = Path(out_dir)
    if out.is_symlink():
        raise InputError(f"--out {out}: is a symbolic link; give the bundle folder itself")
    target = out.resolve()
    for what, path in protected.items():
        if path is None:
            continue
        path = Path(path).resolve()
        if target == path or target in path.parents:
            where = "is" if target == path else "holds"
            raise InputError(f"--out {out}: {where} the {what} ({path}); export writes only a new folder or a "
                             "bundle, which it replaces whole; choose another folder")
    if not out.exists():
        return False
    if not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder; choose a new folder name")
    entries = sorted(out.iterdir())
    if not entries:
        return False
    manifest_path = out / MANIFEST_NAME
    listed = _listed_files(manifest_path)
    if listed is None:
        raise InputError(f"--out {out}: folder is not empty and is not a nerveseg bundle (no readable "
                         f"{MANIFEST_NAME}); choose a new folder")
    foreign = [p.name for p in entries if not (p.is_file() and (p.name == MANIFEST_NAME or p.name in listed
                                                                 or _ENGINE_CACHE.match(p.name)))]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise InputError(f"--out {out}: holds {foreign[0]!r}{more}, which is not part of a bundle and would be "
                         "deleted with it; move it away or choose another folder")
    if not replace:
        raise InputError(f"--out {out}: a bundle exists there; pass --replace to replace it (atomically)")
    return True


def _listed_files(manifest_path: Path) -> set[str] | None:
    """Names of the files a bundle's manifest lists, or None when it is no readable nerveseg manifest."""
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = {str(entry["path"]) for entry in data["files"]}
        data["format_version"]  # noqa: B018 (a nerveseg manifest has one)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files
