"""Frame + mask -> a BGR uint8 picture for people: the nerve tinted and outlined, its area written in a corner."""

from __future__ import annotations

import cv2
import numpy as np

from ..buffers import BufferPool

COLOUR = (0, 215, 255)  # BGR amber: reads well on grey ultrasound and is not the red/blue of Doppler


class OverlayRenderer:
    """Renders overlays into buffers reused per frame shape (the picture is valid until the next render)."""

    def __init__(self, colour: tuple[int, int, int] = COLOUR, alpha: float = 0.35):
        self.colour, self.alpha = colour, alpha
        self._buffers = BufferPool()

    def render(self, image: np.ndarray, mask: np.ndarray, stats: dict | None = None) -> np.ndarray:
        """(H, W[, C]) frame of any dtype and (H, W) 0/1 mask -> (H, W, 3) uint8 BGR."""
        shape = (*image.shape[:2], 3)
        bgr = self._to_bgr8(image, self._buffers.get("bgr", shape, np.uint8))
        solid = self._buffers.get("solid", shape, np.uint8, fill=self.colour)
        tinted = self._buffers.get("tinted", shape, np.uint8)
        # tint only inside the mask: blend the whole picture once, then copy the blended pixels under the mask
        cv2.addWeighted(bgr, 1.0 - self.alpha, solid, self.alpha, 0.0, dst=tinted)
        cv2.copyTo(tinted, mask, bgr)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(bgr, contours, -1, self.colour, max(1, min(bgr.shape[:2]) // 300))
        if stats is not None:
            self._label(bgr, stats)
        return bgr

    @staticmethod
    def _to_bgr8(image: np.ndarray, bgr: np.ndarray) -> np.ndarray:
        """Any grey/BGR/BGRA frame -> the 8-bit BGR buffer `bgr` (16 bit scaled by its range, floats by 255)."""
        if image.dtype != np.uint8:
            scale = 255.0 / np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 255.0
            image = cv2.convertScaleAbs(image, alpha=scale)  # one 8-bit copy; the common 8-bit path has none
        if image.ndim == 2:
            cv2.cvtColor(image, cv2.COLOR_GRAY2BGR, dst=bgr)
        elif image.shape[2] == 4:
            cv2.cvtColor(image, cv2.COLOR_BGRA2BGR, dst=bgr)
        else:
            np.copyto(bgr, image)
        return bgr

    def _label(self, bgr: np.ndarray, stats: dict) -> None:
        area = f"{stats['area_mm2']:.1f} mm2" if stats.get("area_mm2") is not None else f"{stats['area_px']} px"
        text = f"nerve {area}  uncertainty {stats['uncertainty']:.2f}"
        scale = max(0.4, min(bgr.shape[:2]) / 900)
        origin = (8, int(24 * scale / 0.6))
        cv2.putText(bgr, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(bgr, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
