"""Before the first frame: every output of a device run is checked against what it must never touch.

Rules (README, "Outputs never destroy"):
- No output may be, or be written over, a file the run reads: a source frame (folder, glob, image, multi-page
  TIFF, video) or a file of the bundle. Paths are compared resolved (symbolic links followed) and by inode
  (hard links). A mask or overlay folder is refused when it holds a source file with the extension its per-frame
  files get, since `NAME.ext` of a frame could then be a source file.
- Outputs must differ from one another (two outputs at one path would corrupt both).
- An output that already exists (a file, or a non-empty folder) is refused unless `--overwrite` is given.
  There is one rule for all outputs; the JSONL is not appended to.
- The video is Matroska (.mkv): its frames stay playable when the recording is cut short (kill -9, power loss),
  where an MP4 without its closing index plays nothing.
- Every output path is proven writable now, with real bytes (`fileio.probe_write`), so that a read-only folder or
  a full disk fails before the first frame, not after the last (the summary), and leaves no empty file behind.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from ..config import RunConfig
from ..core.errors import InputError
from ..core.fileio import check_writable_file, describe_os_error, probe_write

VIDEO_SUFFIX = ".mkv"


def source_files(spec: str) -> list[Path]:
    """The files a file source reads (folder images, glob matches, the one file); [] for live or generated."""
    from ..core.imageio import IMAGE_SUFFIXES
    from ..sources import live

    spec = spec.strip()
    if not spec or spec.startswith("synthetic") or live.is_live_spec(spec):
        return []
    path = Path(spec)
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if path.is_file():
        return [path]
    if glob.has_magic(spec):
        return [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file()]
    return []


def _identity(path: Path):
    """(resolved path, (device, inode) or None): two names of one file share one of the two."""
    resolved = path.resolve()
    try:
        st = resolved.stat()
        return resolved, (st.st_dev, st.st_ino)
    except OSError:
        return resolved, None


def _bundle_files(bundle: Path) -> list[Path]:
    bundle = Path(bundle)
    return [p for p in bundle.iterdir() if p.is_file()] if bundle.is_dir() else []


def check_outputs(cfg: RunConfig) -> None:
    """Refuse, with one line naming the output, any output that breaks the rules above. Creates nothing
    except the output folders (which a run creates anyway)."""
    protected = {}
    for kind, files in (("source", source_files(cfg.source)), ("bundle", _bundle_files(cfg.bundle))):
        for path in files:
            resolved, inode = _identity(path)
            protected[resolved] = (kind, path)
            if inode is not None:
                protected[inode] = (kind, path)

    files = [(flag, Path(p)) for flag, p in (("--video", cfg.overlay_video), ("--jsonl", cfg.jsonl),
                                             ("--summary-json", cfg.summary_json)) if p is not None]
    folders = [(flag, Path(p), fmt) for flag, p, fmt in (("--masks", cfg.masks_dir, cfg.mask_format),
                                                         ("--overlays", cfg.overlay_dir, cfg.overlay_format))
               if p is not None]

    if cfg.overlay_video is not None and Path(cfg.overlay_video).suffix.lower() != VIDEO_SUFFIX:
        raise InputError(f"--video {cfg.overlay_video}: name it {VIDEO_SUFFIX} (Matroska): an MP4 plays only once "
                         "it is closed, so a kill or power loss would lose the whole recording")

    seen = {}
    for flag, path in files + [(flag, path) for flag, path, _ in folders]:
        resolved = path.resolve()
        if resolved in seen:
            raise InputError(f"{flag} {path}: the same path as {seen[resolved]}; give each output its own")
        seen[resolved] = flag

    for flag, path in files:
        resolved, inode = _identity(path)
        hit = protected.get(resolved) or (protected.get(inode) if inode is not None else None)
        if hit:
            raise InputError(f"{flag} {path}: is a {hit[0]} file of this run ({hit[1]}); it would be overwritten")
        if path.is_dir():
            raise InputError(f"{flag} {path}: is a folder; give a file name")
        if path.exists() and not cfg.overwrite:
            raise InputError(f"{flag} {path}: already exists; pass --overwrite to replace it, or choose a new name")
        check_writable_file(path, flag)

    for flag, folder, fmt in folders:
        resolved = folder.resolve()
        for key, (kind, original) in protected.items():
            if isinstance(key, Path) and key.parent == resolved and key.suffix.lower() in _suffixes(fmt):
                raise InputError(f"{flag} {folder}: holds the {kind} file {original.name}; the per-frame "
                                 f"{fmt.upper()} files written there could overwrite it; choose another folder")
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{flag} {folder}: exists and is not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not cfg.overwrite:
            raise InputError(f"{flag} {folder}: folder is not empty; pass --overwrite to write into it "
                             "(same-named files are replaced), or choose a new folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"{flag} {folder}: cannot create the folder ({describe_os_error(err)})") from None
        probe_write(folder, f".nerveseg-probe.{os.getpid()}.", f"{flag} {folder}")


def _suffixes(fmt: str) -> tuple[str, ...]:
    return {"tif": (".tif", ".tiff"), "jpg": (".jpg", ".jpeg")}.get(fmt, (f".{fmt}",))
