"""What a bundle may say about where it was made: nothing that locates the training machine or its data.

Bundles travel (to devices, to other sites); folder names of datasets and runs often carry patient, site or
user names. So the manifest describes the dataset by a content hash of its split (relative file names and the
split's sides) and the frame counts, and the training config loses its machine paths.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_PATH_FIELDS = ("run_dir", "data", "phantom_dir")  # absolute or relative paths of the training machine


def portable_config(config: dict) -> dict:
    """The resolved training config without machine paths (run folder, dataset root, local weight files)."""
    out = dict(config)
    for name in _PATH_FIELDS:
        if name in out:
            out[name] = "" if not out[name] else "(removed: a path of the training machine)"
    pretrained = str(out.get("pretrained", "none"))
    if pretrained not in ("none", "imagenet", "phantom"):
        out["pretrained"] = f"local file {Path(pretrained).name!r}" if pretrained else pretrained
    return out


def split_fingerprint(split_path: str | os.PathLike) -> str:
    """sha256 of a run's split: its sides and the files' paths relative to the dataset root, not the root."""
    data = json.loads(Path(split_path).read_text(encoding="utf-8"))
    sides = {side: [[e["name"], e["image"], e["mask"]] for e in data.get(side, [])] for side in ("train", "val", "test")}
    return hashlib.sha256(json.dumps(sides, sort_keys=True).encode("utf-8")).hexdigest()


def dataset_description(run_dir: Path, cfg, frames: dict[str, int]) -> dict:
    return {
        "source": "real data (see sha256)" if cfg.data else "synthetic phantom (nerveseg synth)",
        "split_sha256": split_fingerprint(Path(run_dir) / "split.json"),
        "mask_label": cfg.mask_label,
        "frames": frames,
    }


def absolute_paths_in(obj, roots: list[str]) -> list[str]:
    """Strings inside `obj` (a manifest dict) that contain any of `roots`: for tests and the fault battery."""
    found = []
    if isinstance(obj, dict):
        for value in obj.values():
            found += absolute_paths_in(value, roots)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found += absolute_paths_in(value, roots)
    elif isinstance(obj, str) and any(root and root in obj for root in roots):
        found.append(obj)
    return found
