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
        x, y, w, h = cv2.boundingRect(mask)  # the tint and outline are drawn only where the nerve is
        if w and h:
            inside = (slice(y, y + h), slice(x, x + w))
            picture, nerve = bgr[inside], mask[inside]
            solid = self._buffers.get("solid", shape, np.uint8, fill=self.colour)[inside]
            tinted = self._buffers.get("tinted", shape, np.uint8)[inside]
            # tint only inside the mask: blend the box once, then copy the blended pixels under the mask
            cv2.addWeighted(picture, 1.0 - self.alpha, solid, self.alpha, 0.0, dst=tinted)
            cv2.copyTo(tinted, nerve, picture)
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
        """The nerve's area and the frame's uncertainty, white on a dark translucent box in the top-left corner:
        legible on bright tissue and on the black border alike, its size a fixed share of the frame's."""
        if stats.get("area_px"):
            area = f"{stats['area_mm2']:.1f} mm2" if stats.get("area_mm2") is not None else f"{stats['area_px']} px"
            text = f"nerve {area}   uncertainty {stats['uncertainty']:.2f}"
        else:
            text = f"no nerve found   uncertainty {stats['uncertainty']:.2f}"
        height, width = bgr.shape[:2]
        (unit_w, unit_h), _ = cv2.getTextSize(text, _FONT, 1.0, 1)
        # text 3.2 % of the frame's height (16 px on a 512-pixel frame), narrowed to fit the frame's width
        scale = max(0.3, min(LABEL_HEIGHT * height / unit_h, 0.9 * width / unit_w))
        thickness = max(1, round(scale * 1.4))
        (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
        pad = max(2, text_h // 3)
        right, bottom = min(width, text_w + 3 * pad), min(height, text_h + baseline + 2 * pad)
        box = bgr[:bottom, :right]
        cv2.convertScaleAbs(box, dst=box, alpha=1.0 - BOX_OPACITY)  # darken in place: no copy of the frame
        cv2.putText(bgr, text, (pad + pad // 2, pad + text_h), _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)


_FONT = cv2.FONT_HERSHEY_SIMPLEX
LABEL_HEIGHT = 0.032  # the label's capital height as a share of the frame's height
BOX_OPACITY = 0.65  # how much of the picture under the label's box is darkened away
