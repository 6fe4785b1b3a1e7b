"""The colour of each reconstructed object: the same palette the library writes into scene.json.

Streamed meshes carry no colour, so the add-on computes it the way `com4d.scene` does: golden-angle
hues over one running index, statics first, then dynamics. A streamed reconstruction therefore
looks the same as its output folder imported later.
"""

from __future__ import annotations

import colorsys

GOLDEN_RATIO = 0.618034


def object_color(palette_index: int) -> tuple[float, float, float]:
    """The RGB colour (0-1) of the object at `palette_index`."""
    r, g, b = colorsys.hsv_to_rgb((0.08 + int(palette_index) * GOLDEN_RATIO) % 1.0, 0.55, 0.9)
    return round(r, 3), round(g, 3), round(b, 3)


def palette_index(role: str, index: int, static_count: int) -> int:
    """Statics take the first `static_count` places, dynamics follow."""
    return int(index) if role == "static" else int(static_count) + int(index)
