"""Mesh quality metrics of the reference (COM4D `src/utils/metric_utils.py`, reference §7).

The reference scores a reconstruction with four numbers, all in the canonical cube's units and without
any normalisation or alignment inside the metric:

- Chamfer distance: area-weighted random surface samples (n = 10,000), 1-NN *Euclidean* (not squared)
  distances both ways, CD = mean(d_A→B) + mean(d_B→A).
- F-score at τ = 0.1: p_A = fraction of A's samples whose nearest B sample is closer than τ, p_B likewise,
  F = 2·p_A·p_B / (p_A + p_B).
- Volumetric IoU: each mesh voxelized solid at pitch 2/64, voxel set = round(points / pitch),
  IoU = |A ∩ B| / |A ∪ B|.
- Scene IoU: the mean pairwise IoU between the parts of one predicted scene (inter-part overlap, lower is
  better) — not an IoU against ground truth.

We use the same definitions so that our numbers can be compared with the paper's. Sampling is random
like the reference's; a `seed` makes it reproducible (A and B get independent samples from one seeded
generator, so even identical meshes show the small sampling floor of about 0.5·sqrt(area / n) per side).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from com4d.errors import InputError

DEFAULT_SAMPLES = 10_000
DEFAULT_TAU = 0.1
DEFAULT_PITCH = 2.0 / 64

MeshLike = trimesh.Trimesh | tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class MeshMetrics:
    """The per-pair numbers of the reference: Chamfer distance, F-score at `tau`, volumetric IoU."""

    chamfer: float
    fscore: float
    iou: float


def as_trimesh(mesh: MeshLike, what: str = "mesh") -> trimesh.Trimesh:
    """A `trimesh.Trimesh` from a Trimesh or a `(vertices (V,3), faces (F,3))` pair, checked.

    The pair is wrapped without processing so that vertex order is kept; an empty or malformed mesh is
    an `InputError` naming `what`, because every metric below is undefined on it.
    """
    if isinstance(mesh, trimesh.Trimesh):
        out = mesh
    else:
        try:
            vertices, faces = mesh
        except (TypeError, ValueError) as err:
            raise InputError(f"{what} must be a trimesh.Trimesh or a (vertices, faces) pair") from err
        vertices = np.asarray(vertices, dtype=np.float64)
        faces = np.asarray(faces)
        if vertices.ndim != 2 or vertices.shape[1] != 3:
            raise InputError(f"{what}: vertices must have shape (V, 3), got {vertices.shape}")
        if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
            raise InputError(f"{what}: faces must be integers of shape (F, 3), "
                             f"got {faces.dtype} {faces.shape}")
        if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
            raise InputError(f"{what}: faces index vertices outside 0..{len(vertices) - 1}")
        out = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
    if len(out.faces) == 0 or not np.isfinite(out.vertices).all():
        raise InputError(f"{what} is empty or has non-finite vertices; it cannot be measured")
    if out.area <= 0:
        raise InputError(f"{what} has zero surface area; it cannot be sampled")
    return out


def sample_surface(mesh: MeshLike, n: int = DEFAULT_SAMPLES, seed: int | np.random.Generator | None = 0
                   ) -> np.ndarray:
    """`n` area-weighted random points on the surface, (n, 3) float64 (`trimesh.sample`, as the reference)."""
    if n < 1:
        raise InputError(f"the number of surface samples must be at least 1, got {n}")
    points, _ = trimesh.sample.sample_surface(as_trimesh(mesh), int(n), seed=seed)
    return np.asarray(points, dtype=np.float64)


def nearest_distances(points_a: np.ndarray, points_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean 1-NN distances A→B and B→A (each point to the closest point of the other set)."""
    d_ab, _ = cKDTree(points_b).query(points_a, k=1)
    d_ba, _ = cKDTree(points_a).query(points_b, k=1)
    return d_ab, d_ba


def chamfer_from_points(points_a: np.ndarray, points_b: np.ndarray) -> float:
    """CD = mean(d_A→B) + mean(d_B→A), distances not squared (reference metric_utils.py:55-63)."""
    d_ab, d_ba = nearest_distances(_check_points(points_a, "A"), _check_points(points_b, "B"))
    return float(d_ab.mean() + d_ba.mean())


def fscore_from_points(points_a: np.ndarray, points_b: np.ndarray, tau: float = DEFAULT_TAU) -> float:
    """F = 2·p_A·p_B/(p_A+p_B) with p_X the fraction of X's points closer than `tau` to the other set."""
    d_ab, d_ba = nearest_distances(_check_points(points_a, "A"), _check_points(points_b, "B"))
    return _fscore(d_ab, d_ba, tau)


def chamfer_distance(mesh_a: MeshLike, mesh_b: MeshLike, n: int = DEFAULT_SAMPLES, seed: int = 0) -> float:
    """Chamfer distance between two meshes from `n` random surface samples of each."""
    points_a, points_b = _sample_pair(mesh_a, mesh_b, n, seed)
    return chamfer_from_points(points_a, points_b)


def fscore(mesh_a: MeshLike, mesh_b: MeshLike, tau: float = DEFAULT_TAU, n: int = DEFAULT_SAMPLES,
           seed: int = 0) -> float:
    """F-score at `tau` between two meshes from `n` random surface samples of each."""
    points_a, points_b = _sample_pair(mesh_a, mesh_b, n, seed)
    return fscore_from_points(points_a, points_b, tau)


def voxel_set(mesh: MeshLike, pitch: float = DEFAULT_PITCH) -> np.ndarray:
    """The solid voxels of a mesh as integer cells (K, 3): `voxelized(pitch).fill()`, round(points / pitch).

    Filling closes the interior of a watertight surface; an open surface stays a shell, as in the
    reference.
    """
    if pitch <= 0:
        raise InputError(f"the voxel pitch must be positive, got {pitch}")
    grid = as_trimesh(mesh).voxelized(pitch).fill()
    return np.unique(np.round(np.asarray(grid.points) / pitch).astype(np.int64), axis=0)


def volume_iou(mesh_a: MeshLike, mesh_b: MeshLike, pitch: float = DEFAULT_PITCH) -> float:
    """|A ∩ B| / |A ∪ B| of the two meshes' solid voxel sets at `pitch` (reference metric_utils:110-135)."""
    return _voxel_iou(voxel_set(mesh_a, pitch), voxel_set(mesh_b, pitch))


def scene_iou(parts: Sequence[MeshLike], pitch: float = DEFAULT_PITCH) -> float:
    """Mean IoU over all pairs of parts of one scene: how much the parts overlap (lower is better).

    A scene of fewer than two parts has no pairs and so no overlap: 0.0.
    """
    cells = [voxel_set(part, pitch) for part in parts]
    pairs = list(itertools.combinations(range(len(cells)), 2))
    if not pairs:
        return 0.0
    return float(np.mean([_voxel_iou(cells[i], cells[j]) for i, j in pairs]))


def compare_meshes(mesh_a: MeshLike, mesh_b: MeshLike, n: int = DEFAULT_SAMPLES, tau: float = DEFAULT_TAU,
                   pitch: float = DEFAULT_PITCH, seed: int = 0) -> MeshMetrics:
    """Chamfer, F-score and IoU of one pair, sharing one set of surface samples for the first two."""
    points_a, points_b = _sample_pair(mesh_a, mesh_b, n, seed)
    d_ab, d_ba = nearest_distances(points_a, points_b)
    return MeshMetrics(chamfer=float(d_ab.mean() + d_ba.mean()), fscore=_fscore(d_ab, d_ba, tau),
                       iou=volume_iou(mesh_a, mesh_b, pitch))


def _sample_pair(mesh_a: MeshLike, mesh_b: MeshLike, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = as_trimesh(mesh_a, "mesh A")
    b = as_trimesh(mesh_b, "mesh B")
    return sample_surface(a, n, rng), sample_surface(b, n, rng)


def _fscore(d_ab: np.ndarray, d_ba: np.ndarray, tau: float) -> float:
    if tau <= 0:
        raise InputError(f"the F-score threshold tau must be positive, got {tau}")
    precision = float((d_ab < tau).mean())
    recall = float((d_ba < tau).mean())
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _voxel_iou(cells_a: np.ndarray, cells_b: np.ndarray) -> float:
    keys_a = _cell_keys(cells_a)
    keys_b = _cell_keys(cells_b)
    intersection = np.intersect1d(keys_a, keys_b, assume_unique=True).size
    union = keys_a.size + keys_b.size - intersection
    return float(intersection / union) if union else 0.0


def _cell_keys(cells: np.ndarray) -> np.ndarray:
    """One int64 per cell (21 bits per axis: ±2^20 cells, far beyond any pitch used on the unit cube)."""
    offset = 1 << 20
    c = cells + offset
    if c.size and (c.min() < 0 or c.max() >= (1 << 21)):
        raise InputError("mesh too large for this voxel pitch (over a million cells per axis)")
    return np.unique((c[:, 0] << 42) | (c[:, 1] << 21) | c[:, 2])


def _check_points(points: np.ndarray, what: str) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise InputError(f"point set {what} must have shape (N, 3) with N >= 1, got {points.shape}")
    if not np.isfinite(points).all():
        raise InputError(f"point set {what} has non-finite coordinates")
    return points
