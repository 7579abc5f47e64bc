"""`open_source(spec)`: the file, video, synthetic or live source that a `--source` spec names (see `files`)."""

from __future__ import annotations

from ..core.errors import InputError
from . import live
from .files import file_source, synthetic_source


def open_source(spec: str, loop: bool = False, queue_size: int = 2, backoff_s=(0.5, 8.0)):
    """A FileSource or a live.LiveSource for `spec` (the forms are listed in `files`' docstring); InputError if
    it cannot open."""
    spec = spec.strip()
    if not spec:
        raise InputError("--source is empty")
    if spec.startswith("synthetic"):
        return synthetic_source(spec)
    if live.is_live_spec(spec):
        return live.open_live_source(spec, queue_size=queue_size, backoff_s=backoff_s)
    return file_source(spec, loop)
