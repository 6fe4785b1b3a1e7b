"""The one coordinate change between our meshes (glTF, y up, front towards +z) and Blender (z up)."""

from __future__ import annotations

import numpy as np


def y_up_to_z_up(vertices: np.ndarray) -> np.ndarray:
    """Map `(x, y, z)` to `(x, -z, y)` on the last axis, as docs/contracts.md fixes; returns float32."""
    vertices = np.asarray(vertices, dtype=np.float32)
    if vertices.shape[-1] != 3:
        raise ValueError(f"vertices must have 3 coordinates on the last axis, got shape {vertices.shape}")
    out = np.empty_like(vertices)
    out[..., 0] = vertices[..., 0]
    out[..., 1] = -vertices[..., 2]
    out[..., 2] = vertices[..., 1]
    return out
