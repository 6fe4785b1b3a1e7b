"""A dependency-free preview render of a reconstruction (PIL only, no OpenGL).

Flat-shaded triangles drawn back to front (painter's algorithm) under an orthographic camera that
looks down -z of the canonical y-up cube, slightly from above — the same view as the input frame.
Good enough to see at a glance what came out; Blender is the place for real renders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from com4d.scene import SceneWriter

LIGHT = np.array([0.35, 0.6, 0.75])
MAX_FACES = 60_000  # per image; bigger meshes are drawn from a random subset of faces


def _view(vertices: np.ndarray, elevation_deg: float = 15.0) -> np.ndarray:
    """Rotate about x so the camera looks slightly down on the scene."""
    a = np.deg2rad(elevation_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return vertices @ rot.T


def view_box(meshes: list[tuple[np.ndarray, np.ndarray, list[float]]]) -> tuple[float, float, float]:
    """(centre x, centre y, half size) of the square that frames every mesh as seen by the camera."""
    pts = [_view(np.asarray(v, dtype=np.float64)) for v, f, _ in meshes if len(f)]
    if not pts:
        return 0.0, 0.0, 1.05
    allp = np.concatenate(pts)
    lo, hi = allp[:, :2].min(0), allp[:, :2].max(0)
    centre = (lo + hi) / 2
    return float(centre[0]), float(centre[1]), float(max(hi - lo) / 2 * 1.08 + 1e-3)


def render_meshes(
    meshes: list[tuple[np.ndarray, np.ndarray, list[float]]],
    size: int = 384,
    background: tuple[int, int, int] = (245, 245, 245),
    box: tuple[float, float, float] = (0.0, 0.0, 1.05),
) -> Image.Image:
    """Render (vertices (V,3), faces (F,3), rgb 0..1) triples; `box` = (cx, cy, half size) of the
    square of the view plane shown (default: the whole canonical cube)."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    tris, depths, colors = [], [], []
    rng = np.random.default_rng(0)
    for vertices, faces, color in meshes:
        if len(faces) == 0:
            continue
        if len(faces) > MAX_FACES:
            faces = faces[rng.choice(len(faces), MAX_FACES, replace=False)]
        v = _view(np.asarray(vertices, dtype=np.float64))
        tri = v[faces]  # (F, 3, 3)
        normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
        shade = 0.35 + 0.65 * np.abs(normals @ (LIGHT / np.linalg.norm(LIGHT)))
        tris.append(tri)
        depths.append(tri[:, :, 2].mean(1))
        colors.append(np.clip(np.outer(shade, color) * 255, 0, 255).astype(np.uint8))
    if not tris:
        return image
    tri = np.concatenate(tris)
    depth = np.concatenate(depths)
    color = np.concatenate(colors)
    xy = np.empty(tri.shape[:2] + (2,))
    cx, cy, half = box
    xy[..., 0] = (tri[..., 0] - cx + half) / (2 * half) * size
    xy[..., 1] = (cy + half - tri[..., 1]) / (2 * half) * size
    for i in np.argsort(depth):  # far (small z) first: the camera sits at +z
        draw.polygon([tuple(p) for p in xy[i]], fill=tuple(int(c) for c in color[i]))
    return image


def render_scene_preview(writer: SceneWriter, path: Path, size: int = 384, max_frames: int = 4) -> Path:
    """The stage-A scene and up to `max_frames` evenly spaced frames side by side."""
    statics = [
        (*geom, o.color)
        for o in writer.objects
        if o.role == "static" and (geom := writer.geometry(o.name, None)) is not None
    ]
    frames = writer.frames
    picks = sorted({frames[round(i * (len(frames) - 1) / max(1, max_frames - 1))] for i in range(max_frames)})
    everything = statics + [
        (*geom, o.color)
        for o in writer.objects
        if o.role == "dynamic"
        for f in picks
        if (geom := writer.geometry(o.name, f)) is not None
    ]
    box = view_box(everything)  # one framing for every panel, so motion shows
    panels = []
    for f in picks:
        dyn = [
            (*geom, o.color)
            for o in writer.objects
            if o.role == "dynamic" and (geom := writer.geometry(o.name, f)) is not None
        ]
        panel = render_meshes(statics + dyn, size, box=box)
        ImageDraw.Draw(panel).text((6, 4), f"frame {f}", fill=(60, 60, 60))
        panels.append(panel)
    sheet = Image.new("RGB", (size * len(panels), size), (255, 255, 255))
    for i, p in enumerate(panels):
        sheet.paste(p, (i * size, 0))
    tmp = path.with_name(path.name + ".tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
    return path
