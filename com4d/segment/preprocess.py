"""The official preprocessing of a clip for COM4D (reference §4.1), as plain array operations.

Frames are padded to a square (white), resized to `size` x `size`, and then frames and masks are
translated together so that the box around all masks of all frames sits in the image centre
(white / black fill), as `sh/process_video.sh` does. `SquareTransform` records pad, scale and shift so
a source-pixel coordinate (a user's click) maps onto the written frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from com4d.errors import ParameterError

WHITE = 255
CLOSING_RADIUS = 3


@dataclass(frozen=True)
class SquareTransform:
    """Source frame (width x height) -> padded square of side `side` -> `size` x `size` -> shift.

    Mapping of a source pixel coordinate: `X = (x + pad_left) * scale + shift_x`, same for y.
    """

    source_width: int
    source_height: int
    size: int
    pad_left: int
    pad_top: int
    side: int
    shift_x: int = 0
    shift_y: int = 0

    @property
    def scale(self) -> float:
        return self.size / self.side

    @property
    def pad_right(self) -> int:
        return self.side - self.source_width - self.pad_left

    @property
    def pad_bottom(self) -> int:
        return self.side - self.source_height - self.pad_top

    def map_point(self, x: float, y: float) -> tuple[float, float]:
        """A source-pixel coordinate on the written frames."""
        return (x + self.pad_left) * self.scale + self.shift_x, (y + self.pad_top) * self.scale + self.shift_y

    def with_shift(self, shift_x: int, shift_y: int) -> SquareTransform:
        return SquareTransform(
            self.source_width, self.source_height, self.size, self.pad_left, self.pad_top, self.side,
            shift_x, shift_y,
        )

    def to_dict(self) -> dict:
        return {
            "source_size": [self.source_width, self.source_height],
            "size": self.size,
            "pad": [self.pad_left, self.pad_top, self.pad_right, self.pad_bottom],
            "scale": self.scale,
            "shift": [self.shift_x, self.shift_y],
        }


def square_transform(width: int, height: int, size: int) -> SquareTransform:
    """Pad the shorter side equally on both ends (the extra pixel, if any, after the image)."""
    if size < 16:
        raise ParameterError(f"output size must be at least 16 pixels, got {size}")
    side = max(width, height)
    return SquareTransform(width, height, size, (side - width) // 2, (side - height) // 2, side)


def pad_and_resize_frame(frame: np.ndarray, t: SquareTransform) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: white square padding, Lanczos resize."""
    square = np.full((t.side, t.side, 3), WHITE, dtype=np.uint8)
    square[t.pad_top : t.pad_top + t.source_height, t.pad_left : t.pad_left + t.source_width] = frame
    if t.side == t.size:
        return square
    return np.asarray(Image.fromarray(square).resize((t.size, t.size), Image.Resampling.LANCZOS))


def pad_and_resize_mask(mask: np.ndarray, t: SquareTransform) -> np.ndarray:
    """(H, W) bool -> (size, size) bool: area-weighted resize, then half coverage counts as inside."""
    square = np.zeros((t.side, t.side), dtype=np.uint8)
    square[t.pad_top : t.pad_top + t.source_height, t.pad_left : t.pad_left + t.source_width] = mask * 255
    if t.side != t.size:
        square = np.asarray(Image.fromarray(square).resize((t.size, t.size), Image.Resampling.BILINEAR))
    return square >= 128


def centring_shift(union: np.ndarray) -> tuple[int, int]:
    """Integer (dx, dy) that moves the bounding box of `union` to the image centre; (0, 0) if empty."""
    if not union.any():
        return 0, 0
    rows = np.flatnonzero(union.any(axis=1))
    cols = np.flatnonzero(union.any(axis=0))
    h, w = union.shape
    dx = round((w - (cols[0] + cols[-1] + 1)) / 2)
    dy = round((h - (rows[0] + rows[-1] + 1)) / 2)
    return int(dx), int(dy)


def shift_image(image: np.ndarray, dx: int, dy: int, fill: int) -> np.ndarray:
    """Translate by (dx, dy) pixels; uncovered pixels get `fill`."""
    if dx == 0 and dy == 0:
        return image
    out = np.full_like(image, fill)
    h, w = image.shape[:2]
    if abs(dx) >= w or abs(dy) >= h:
        return out
    src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[dst_y, dst_x] = image[src_y, src_x]
    return out


def disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def close_mask(mask: np.ndarray, radius: int = CLOSING_RADIUS) -> np.ndarray:
    """Morphological closing with a disk; the image border does not eat into the mask."""
    if radius <= 0:
        return mask.astype(bool)
    padded = np.pad(mask.astype(bool), radius, mode="edge")
    closed = ndimage.binary_closing(padded, structure=disk(radius))
    return closed[radius:-radius, radius:-radius]


def remove_background(frame: np.ndarray, union: np.ndarray, radius: int = CLOSING_RADIUS) -> np.ndarray:
    """The frame with every pixel outside the (closed) union of object masks painted white."""
    keep = close_mask(union, radius)
    out = frame.copy()
    out[~keep] = WHITE
    return out
