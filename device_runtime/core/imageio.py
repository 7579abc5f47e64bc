"""Reading frames and masks from disk: TIFF (8/16 bit, multi-page) through tifffile, PNG/JPG through OpenCV.

Colour comes back in OpenCV's BGR order whatever the format, so one grey conversion serves all.

Compressed TIFFs: tifffile decodes Deflate and PackBits with the standard library, but LZW (how copies of the
Kaggle 2016 frames circulate) and the rarer codecs need `imagecodecs` (the `tiff` extra; 80 MB installed, more
than ONNX Runtime, so the device install does not require it). Without it, such a TIFF is decoded by OpenCV's
libtiff, which every OpenCV build (pip's and JetPack's) carries with LZW and Deflate; so the device reads
them either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import tifffile

from .errors import InputError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")


class _TifffileNotes(logging.Handler):
    """tifffile logs what it finds wrong in a damaged file as warnings, which Python's last-resort handler
    prints as lines of their own before our one-line error. This handler takes them instead (an application
    that configures logging still gets them), and the reads below put them into their own error line."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self._local = threading.local()  # sources read in their own threads

    def emit(self, record: logging.LogRecord) -> None:
        notes = getattr(self._local, "notes", None)
        if notes is not None:
            notes.append(re.sub(r"^<[^>]*>\s*", "", record.getMessage()))  # without tifffile's "<TiffPages @8>"

    @contextlib.contextmanager
    def collect(self) -> Iterator[list[str]]:
        self._local.notes = notes = []
        try:
            yield notes
        finally:
            self._local.notes = None


_NOTES = _TifffileNotes()
logging.getLogger("tifffile").addHandler(_NOTES)


def _noted(notes: list[str]) -> str:
    return f"; tifffile: {notes[0]}" if notes else ""


def _rgb_to_bgr(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return array[..., [2, 1, 0] + ([3] if array.shape[-1] == 4 else [])]
    return array


def _check_frame(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(f"{path}: expected a grey or colour image, got an array of shape {array.shape}")
    if array.shape[0] < 2 or array.shape[1] < 2:
        raise InputError(f"{path}: image is too small ({array.shape[1]}x{array.shape[0]})")
    return array


def _needs_codec(err: Exception) -> bool:
    """tifffile's way of saying that a codec it lacks (imagecodecs not installed) is needed."""
    return isinstance(err, ValueError) and "imagecodecs" in str(err)


def _opencv_tiff_pages(path: Path, err: Exception) -> list[np.ndarray]:
    """Every page of a TIFF through OpenCV's libtiff, for codecs tifffile cannot decode here.

    Raises:
        InputError: OpenCV cannot decode it either; the message names tifffile's reason and the fix.
    """
    ok, pages = cv2.imreadmulti(str(path), flags=cv2.IMREAD_UNCHANGED)
    if not ok or not pages:
        raise InputError(f"{path}: cannot decode compressed TIFF ({err}; OpenCV could not read it either); "
                         "install imagecodecs: pip install 'nerveseg[tiff]'")
    return list(pages)  # OpenCV already gives colour in BGR order


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one frame (the first page of a TIFF).

    Returns:
        (H, W) or (H, W, 3|4) array in its stored dtype (uint8, uint16, ...), colour in BGR order.

    Raises:
        InputError: the file is missing, not an image, or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with _NOTES.collect() as notes:
        try:
            if path.suffix.lower() in TIFF_SUFFIXES:
                with tifffile.TiffFile(path) as tif:
                    try:
                        array = _rgb_to_bgr(tif.pages[0].asarray())
                    except ValueError as err:
                        if not _needs_codec(err):
                            raise
                        array = _opencv_tiff_pages(path, err)[0]
            else:
                array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        except InputError:
            raise
        except Exception as err:  # tifffile raises many types for corrupt files; all mean "unreadable"
            raise InputError(f"{path}: cannot decode image ({type(err).__name__}: {err}{_noted(notes)})") from None
    if array is None:
        raise InputError(f"{path}: cannot decode image (not a valid {path.suffix or 'image'} file)")
    return _check_frame(np.asarray(array), path)


def iter_tiff_pages(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Yield each page of a (multi-page) TIFF as a frame, colour in BGR order; any bad page raises InputError."""
    for page in iter_tiff_page_results(path):
        if isinstance(page, InputError):
            raise page
        yield page


def iter_tiff_page_results(path: str | os.PathLike) -> Iterator[np.ndarray | InputError]:
    """Each page of a TIFF, or an InputError for a page that cannot be decoded, then the next page.

    A stream of frames (the device runtime) skips a bad page instead of ending. The file is opened here, not on
    the first `next`, so a file that cannot be opened at all, or holds no page, raises InputError at the call.
    When tifffile could list only the first pages (a file cut short), one InputError after them says so.
    """
    path = Path(path)
    with _NOTES.collect() as listing:  # what tifffile found wrong while listing the pages
        try:
            tif = tifffile.TiffFile(path)
            count = len(tif.pages)
        except Exception as err:  # tifffile raises many types for a file that is not a TIFF
            raise InputError(f"{path}: cannot open TIFF ({type(err).__name__}: {err}{_noted(listing)})") from None
    if count == 0:  # tifffile only logs a warning for a header whose first page offset is bad
        tif.close()
        raise InputError(f"{path}: TIFF holds no readable page{_noted(listing)}")

    def pages() -> Iterator[np.ndarray | InputError]:
        fallback: list[np.ndarray] | None = None  # every page through OpenCV, once tifffile lacked a codec
        with tif:
            for index in range(count):
                with _NOTES.collect() as notes:
                    try:
                        if fallback is None:
                            try:
                                array = _rgb_to_bgr(tif.pages[index].asarray())
                            except ValueError as err:
                                if not _needs_codec(err):
                                    raise
                                fallback = _opencv_tiff_pages(path, err)
                        if fallback is not None:
                            if index >= len(fallback):
                                raise InputError(f"{path}: OpenCV decoded only {len(fallback)} of {count} pages")
                            array = fallback[index]
                        page = _check_frame(array, path)
                    except InputError as err:
                        page = InputError(f"{err} (page {index})")
                    except Exception as err:  # a corrupt page, whatever tifffile raises for it
                        page = InputError(f"{path}: cannot decode page {index} ({type(err).__name__}: {err}"
                                          f"{_noted(notes)})")
                yield page  # outside the collection: the consumer's own logging is not ours to take
            if listing:  # the page list broke off (a file cut short): the pages after it are lost, and counted
                yield InputError(f"{path}: no page after page {count - 1} can be read ({listing[0]}; "
                                 "the file may be cut short)")

    return pages()
