"""Pictures that let a user check the masks before spending GPU time on a reconstruction.

`overlay` tints each object's mask in its colour with an outline and its name; `ContactSheet`
collects small overlays of the clip into one grid with a legend, and frames where an object was lost
get a red frame and a note, so a glance is enough.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

# Colours (0-255) per object index, distinct and readable on most footage.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127),
)
LOST_RED = (230, 20, 20)


def object_color(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class MaskLayer:
    """One object's mask on one frame, as drawn."""

    name: str
    mask: np.ndarray  # (H, W) bool
    color: tuple[int, int, int]
    lost: bool = False


def overlay(
    frame: np.ndarray, layers: Sequence[MaskLayer], title: str = "", alpha: float = 0.45
) -> np.ndarray:
    """(H, W, 3) uint8 frame with each mask tinted, outlined and labelled; lost objects listed in red."""
    out = frame.astype(np.float32)
    for layer in layers:
        m = layer.mask
        if m.any():
            out[m] = (1 - alpha) * out[m] + alpha * np.asarray(layer.color, dtype=np.float32)
            edge = m & ~ndimage.binary_erosion(m, iterations=max(1, frame.shape[0] // 256))
            out[edge] = layer.color
    image = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    fsize = max(10, frame.shape[0] // 40)
    font = _font(fsize)
    for layer in layers:
        if layer.mask.any():
            ys, xs = np.nonzero(layer.mask)
            text_h = draw.textbbox((0, 0), layer.name, font=font)[3]
            _label(draw, (int(xs.min()), max(0, int(ys.min()) - text_h - 4)), layer.name, layer.color, font)
    lost = [layer.name for layer in layers if layer.lost]
    lines = ([title] if title else []) + ([f"LOST: {', '.join(lost)}"] if lost else [])
    for row, text in enumerate(lines):
        color = LOST_RED if text.startswith("LOST") else (0, 0, 0)
        _label(draw, (4, 4 + row * (fsize + 6)), text, color, font)
    return np.asarray(image)


class ContactSheet:
    """Thumbnails of a clip's overlays in one grid, sampled evenly, lost frames always kept."""

    def __init__(self, tile: int = 192, max_tiles: int = 48):
        self.tile = tile
        self.max_tiles = max_tiles
        self._thumbs: list[tuple[int, np.ndarray, bool]] = []

    def add(self, frame_number: int, image: np.ndarray, lost: bool) -> None:
        thumb = Image.fromarray(image)
        thumb.thumbnail((self.tile, self.tile), Image.Resampling.BILINEAR)
        self._thumbs.append((frame_number, np.asarray(thumb), lost))

    def _chosen(self) -> list[tuple[int, np.ndarray, bool]]:
        n = len(self._thumbs)
        if n <= self.max_tiles:
            return self._thumbs
        lost = [k for k, t in enumerate(self._thumbs) if t[2]][: self.max_tiles // 2]
        even = np.linspace(0, n - 1, self.max_tiles - len(lost)).round().astype(int).tolist()
        return [self._thumbs[k] for k in sorted(set(even) | set(lost))]

    def render(self, legend: Sequence[tuple[str, str, tuple[int, int, int]]]) -> np.ndarray:
        """The sheet as (H, W, 3) uint8; `legend` = (name, role, colour) per object."""
        tiles = self._chosen()
        if not tiles:
            raise ValueError("contact sheet has no frames")
        cols = min(len(tiles), 8)
        rows = -(-len(tiles) // cols)
        fsize = 12
        font = _font(fsize)
        cell_w = self.tile + 8
        cell_h = self.tile + 8 + fsize + 4
        per_row = max(1, (cols * cell_w) // 220)
        legend_h = 8 + (fsize + 6) * max(1, -(-len(legend) // per_row))
        sheet = Image.new("RGB", (cols * cell_w + 8, rows * cell_h + 8 + legend_h), (40, 40, 40))
        draw = ImageDraw.Draw(sheet)
        for k, (frame_number, thumb, lost) in enumerate(tiles):
            x, y = 8 + (k % cols) * cell_w, 8 + (k // cols) * cell_h
            h, w = thumb.shape[:2]
            if lost:
                draw.rectangle((x - 4, y - 4, x + w + 3, y + h + 3), outline=LOST_RED, width=4)
            sheet.paste(Image.fromarray(thumb), (x, y))
            note = f"frame {frame_number}" + ("  LOST" if lost else "")
            draw.text((x, y + h + 2), note, fill=LOST_RED if lost else (230, 230, 230), font=font)
        y0 = rows * cell_h + 8
        for k, (name, role, color) in enumerate(legend):
            x, y = 8 + (k % per_row) * 220, y0 + (k // per_row) * (fsize + 6)
            draw.rectangle((x, y + 2, x + fsize, y + 2 + fsize), fill=color)
            draw.text((x + fsize + 6, y), f"{name} ({role})", fill=(230, 230, 230), font=font)
        return np.asarray(sheet)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, color, font) -> None:
    x, y = xy
    box = draw.textbbox((x, y), text, font=font)
    draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(255, 255, 255))
    draw.text((x, y), text, fill=color, font=font)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()
