"""Topology: one mesh per moving object that deforms through the clip (topology="tracked", issue 7).

The reference extracts every frame of a moving object on its own: each frame gets a different vertex
count and no correspondence, which an animator cannot rig, texture or key as shape keys. Here the
first frame's mesh (the *base*) is carried from frame to frame, so every frame shares its vertices and
faces and only the positions change.

Per frame, with the decoded field `f` of that frame (positive inside, surface at level 0, as the VAE's
occupancy logit) and that frame's own extracted mesh (the *reference*, which the pipeline makes anyway):

0. **Base relaxation** (first frame only). Marching cubes leaves slivers: triangles with an edge a
   twentieth of the mesh's typical edge or less. Any force that moves a vertex by a fraction of the typical
   edge folds them, so on the first frame the base's vertices slide along its own surface towards their
   neighbours' centroid (`base_relaxation`, `base_iterations`) while the field keeps them on it. The
   faces stay those of the base; the slivers become ordinary triangles.
1. **Pre-alignment.** Point-to-plane ICP moves the last accepted positions rigidly onto the frame's
   own mesh, then fits `prealign_parts` regions rigidly each and blends their motions. This takes care
   of the part of the motion a field cannot show locally: a translating or rotating flat face looks the
   same to the field wherever its vertices sit on it (the aperture problem), so only a fit over a
   region keeps each vertex on its material point; and a part that moved farther than its own
   thickness (a swinging limb) would be projected onto the wrong side of the surface.
2. **Field projection.** Each iteration evaluates `f` and `∇f` at all vertices in one batched call
   (autograd through `field_fn`, or central finite differences: one call with 7·V points) and moves every
   vertex by the Newton step `-f ∇f / |∇f|²` onto the zero level, clamped to `max_step` because a logit
   field saturates away from the surface. The level set decides where the surface is; only the normal
   component of a vertex's motion comes from here.
3. **Smoothing, tangential only.** Between field calls, cheap sub-steps (no field evaluation) apply
   `smoothing` times the uniform Laplacian of this frame's displacement, so neighbouring vertices move
   alike; it is zero for any rigid motion, so it does not make vertices drift. The move is projected
   onto the surface's tangent plane (the field's gradient gives the normal) and clamped per vertex to a
   quarter of its smallest triangle height, which keeps every triangle's area within a quarter per
   sub-step: the regulariser cannot fold the mesh. Where triangles did fold (their normal against the
   field's, e.g. where a bend squeezes the inside of a joint), the vertices around them are relaxed
   like the base until they unfold. (Edge springs and per-triangle shape matching, tried as rigidity
   terms, folded the slivers of the raw extraction; after relaxation, shape matching still moved a
   rigidly moving box's vertices off their material points, 0.006 against 0.0007 without it, and
   improved no measured case, so neither is here.)
4. **Quality check** against the frame's own mesh, from `samples` random surface points of each
   (`com4d.metrics`): the Chamfer distance (the reference's metric: the average error), the share of the
   tracked surface that lies off the frame's surface (the worst part: a bridge across a split or a
   membrane across a newly opened hole is a small area far from the surface, which an average hides),
   the share of folded triangles (a fold lies on the surface, so neither distance sees it), and the
   number of separate parts (more parts than the base means the object split).

Fallback. A frame is a *fallback frame* when any of these holds:
- its Chamfer distance exceeds `sampling_floor + chamfer_threshold`. Even a perfect tracked mesh scores
  about sqrt(area / samples) (two independent samplings of one surface; 0.018 for a sphere of radius
  0.5 at 10,000 samples), so the threshold is the error *beyond* what sampling alone gives, and means
  the same for small and large objects;
- more than `off_surface_fraction` of the tracked samples are farther than
  max(`off_surface_distance`, 3·floor) from the frame's samples (sampling alone leaves practically none
  beyond 3·floor);
- more than `folded_fraction` of the triangles are still folded after tracking;
- the frame's own mesh has more parts (of at least 1 % of its area) than the base mesh.

The caller keeps that frame's own per-frame mesh. The next frame starts again from the **last
accepted** positions (rigidly pre-aligned to the new frame), not from the failed attempt. So the
fallback covers exactly the stretch until tracking recovers: a one-frame glitch of the field costs one
frame, and a lasting topology change (one blob splitting in two) falls back to the end of the clip. We
chose this over "fall back to the end after the first failure" because transient failures (a bad frame,
a brief contact) are common and should not throw away a clip's worth of good tracking, and over
"continue from the failed attempt" because a mesh dragged across a topology change is a poor start
once the shape comes back. Each fallback frame gets a reason that says why, in numbers.

Everything is torch on the vertices' device (CUDA works) plus numpy/scipy on the CPU for the
pre-alignment and the check; the field is only called through `field_fn(points (P,3) float32) -> (P,)`,
all vertices at once (7·V points per call with finite differences). docs/tracking.md has measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from com4d import events
from com4d.errors import InputError, ParameterError
from com4d.metrics import as_trimesh, nearest_distances, sample_surface

FieldFn = Callable[[torch.Tensor], torch.Tensor]
GRADIENT_METHODS = ("auto", "autograd", "finite_difference")


@dataclass(frozen=True)
class TrackingConfig:
    """How hard tracking tries per frame and when it gives up. Lengths are in canonical-cube units.

    The defaults suit the VAE's field on the [-1.005, 1.005]^3 cube (a 512^3 extraction cell is 0.0039).
    """

    iterations: int = 10  # field calls per frame at most (each: all vertices at once)
    tolerance: float = 1e-3  # stop once 95 % of vertices are this close to the level set (estimated)
    step: float = 1.0  # fraction of the Newton step taken per iteration
    max_step: float = 0.05  # a vertex moves at most this far per iteration (the logit field saturates)
    smoothing: float = 0.3  # weight of the displacement Laplacian, per sub-step (0..1)
    substeps: int = 4  # regularisation sub-steps between two field calls (no field evaluation)
    base_iterations: int = 6  # field iterations relaxing the base's triangles on the first frame; 0 = off
    base_relaxation: float = 0.5  # weight of that relaxation, per sub-step (0..1)
    gradient: str = "auto"  # "auto": autograd when field_fn is differentiable, else finite differences
    fd_step: float = 2e-3  # central finite-difference spacing
    prealign_iterations: int = 10  # rigid ICP iterations onto the frame's reference mesh; 0 turns it off
    prealign_points: int = 4000  # tracked vertices used by ICP at most
    prealign_parts: int = 8  # regions fitted rigidly each after the whole; 1 = one rigid fit only
    chamfer_threshold: float = 0.02  # fall back where Chamfer exceeds the sampling floor by more
    off_surface_distance: float = 0.05  # a tracked sample this far from the frame's surface is off it
    off_surface_fraction: float = 0.01  # fall back where a larger share of the tracked surface is off
    folded_fraction: float = 0.001  # fall back where a larger share of the triangles stays folded
    samples: int = 10_000  # surface samples per mesh for the check (the reference's n)
    seed: int = 0  # sampling seed of the check

    def __post_init__(self) -> None:
        positive = {"tolerance": self.tolerance, "step": self.step, "max_step": self.max_step,
                    "fd_step": self.fd_step, "chamfer_threshold": self.chamfer_threshold,
                    "off_surface_distance": self.off_surface_distance}
        for name, value in positive.items():
            if not value > 0:
                raise ParameterError(f"tracking {name} must be positive, got {value}")
        for name, value in {"smoothing": self.smoothing,
                            "base_relaxation": self.base_relaxation,
                            "off_surface_fraction": self.off_surface_fraction,
                            "folded_fraction": self.folded_fraction}.items():
            if not 0 <= value <= 1:
                raise ParameterError(f"tracking {name} must be within [0, 1], got {value}")
        for name, value in {"iterations": self.iterations, "samples": self.samples,
                            "prealign_points": self.prealign_points,
                            "prealign_parts": self.prealign_parts}.items():
            if value < 1:
                raise ParameterError(f"tracking {name} must be at least 1, got {value}")
        for name, value in {"substeps": self.substeps, "prealign_iterations": self.prealign_iterations,
                            "base_iterations": self.base_iterations}.items():
            if value < 0:
                raise ParameterError(f"tracking {name} must not be negative, got {value}")
        if self.gradient not in GRADIENT_METHODS:
            raise ParameterError(f"tracking gradient must be one of {GRADIENT_METHODS}, "
                                 f"got {self.gradient!r}")


@dataclass(frozen=True)
class TrackStats:
    """What tracking one frame cost and how close it got. `field_points` counts every queried point."""

    iterations: int
    field_calls: int
    field_points: int
    gradient: str  # the method actually used: "autograd" or "finite_difference"
    residual_mean: float  # estimated distance |f|/|∇f| to the level set before the last step
    residual_p95: float
    folded: float  # share of triangles whose normal points against the surface's at the end
    converged: bool
    seconds: float


@dataclass(frozen=True)
class FrameResult:
    """One tracked frame: positions, its Chamfer distance to the frame's own mesh, and the verdict."""

    frame: int
    vertices: np.ndarray  # (V, 3) float32
    chamfer: float
    chamfer_floor: float  # what sampling alone gives for this frame's surface, see `sampling_floor`
    off_surface: float  # share of the tracked surface samples off the frame's surface
    parts: int  # separate parts of the frame's own mesh (of at least 1 % of its area)
    accepted: bool
    reason: str  # empty when accepted
    stats: TrackStats
    prealign_seconds: float
    check_seconds: float


@dataclass(frozen=True)
class TrackedSequence:
    """A dynamic object as one topology: `vertices[i]` are the positions at `frames[i]`, faces shared.

    On fallback frames the vertices hold the tracking attempt (it does not match that frame's surface);
    the caller shows the frame's own per-frame mesh there instead.
    """

    frames: list[int]
    vertices: np.ndarray  # (F, V, 3) float32
    faces: np.ndarray  # (Fc, 3) int32
    chamfer: np.ndarray  # (F,) float64, tracked vs the frame's own mesh
    chamfer_floor: np.ndarray  # (F,) float64, the sampling floor of each frame's check
    off_surface: np.ndarray  # (F,) float64, share of the tracked surface off the frame's surface
    fallback_frames: list[int]
    reasons: dict[int, str]  # fallback frame -> why
    stats: list[TrackStats] = field(default_factory=list)

    def stretches(self) -> list[tuple[int, int]]:
        """The fallback frames as runs of consecutive selected frames, (first, last) frame numbers."""
        fallback = set(self.fallback_frames)
        runs: list[tuple[int, int]] = []
        start = previous = None
        for frame in self.frames:
            if frame in fallback:
                if start is None:
                    start = frame
                previous = frame
            elif start is not None:
                runs.append((start, previous))
                start = None
        if start is not None:
            runs.append((start, previous))
        return runs

    def warning(self, name: str) -> events.WarningEvent | None:
        """The event that tells the user where the tracked mesh of `name` was replaced, or None."""
        if not self.fallback_frames:
            return None
        spans = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.stretches())
        first = self.fallback_frames[0]
        message = (f"Tracked mesh of '{name}' fell back to per-frame meshes on frames {spans}: "
                   f"{self.reasons[first]}")
        return events.WarningEvent(code="tracking_fallback", message=message, frames=list(self.fallback_frames))


class MeshGraph:
    """The edges and faces of a triangle mesh on a torch device, for the Laplacian and the step limit."""

    def __init__(self, faces: np.ndarray, num_vertices: int, device: torch.device | str):
        faces = np.asarray(faces, dtype=np.int64)
        pairs = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
        keys = np.unique(pairs[:, 0] * num_vertices + pairs[:, 1])  # one int64 per undirected edge
        edges = torch.as_tensor(np.stack([keys // num_vertices, keys % num_vertices], axis=1), device=device)
        self.num_vertices = num_vertices
        self.faces = torch.as_tensor(faces, device=device)  # (F, 3)
        self.i, self.j = edges[:, 0], edges[:, 1]  # (E,)
        degree = torch.bincount(edges.flatten(), minlength=num_vertices)
        self.connected = (degree > 0).unsqueeze(1)  # (V, 1)
        self.inv_degree = 1.0 / degree.clamp_min(1).to(torch.float32).unsqueeze(1)  # (V, 1)

    def safe_step(self, x: torch.Tensor) -> torch.Tensor:
        """Per vertex (V, 1): a quarter of its smallest height over its triangles.

        Moving a vertex by less than a quarter of its height in a triangle changes that triangle's area
        by less than a quarter, so a regularising sub-step clamped to this cannot fold a triangle, however
        thin.
        """
        corners = x[self.faces]  # (F, 3, 3)
        edge_1, edge_2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
        double_area = torch.cross(edge_1, edge_2, dim=1).norm(dim=1)  # (F,)
        opposite = (corners[:, [2, 0, 1]] - corners[:, [1, 2, 0]]).norm(dim=2).clamp_min(1e-12)  # (F, 3)
        height = double_area.unsqueeze(1) / opposite  # (F, 3): height of corner k over its opposite edge
        smallest = torch.full((self.num_vertices,), float("inf"), device=x.device, dtype=x.dtype)
        smallest.scatter_reduce_(0, self.faces.reshape(-1), height.reshape(-1), reduce="amin")
        return (0.25 * smallest).unsqueeze(1)

    def folded(self, x: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        """(F,) bool: triangles that face the other way than most, judged by the field's normal.

        Either winding is accepted (marching cubes output faces inwards, glTF outwards): the winding of
        the majority of triangles is taken as the mesh's own.
        """
        corners = x[self.faces]  # (F, 3, 3)
        face_normal = torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=1)
        agreement = (face_normal * normal[self.faces].sum(1)).sum(1)  # (F,) > 0: faces outwards
        outwards = bool((agreement > 0).sum() >= (agreement < 0).sum())
        return agreement < 0 if outwards else agreement > 0

    def around(self, faces: torch.Tensor, rings: int) -> torch.Tensor:
        """(V,) bool: the corners of the selected faces and `rings` rings of neighbours around them."""
        mask = torch.zeros(self.num_vertices, dtype=torch.bool, device=faces.device)
        mask[self.faces[faces].reshape(-1)] = True
        for _ in range(rings):
            grown = mask.clone()
            grown[self.i[mask[self.j]]] = True
            grown[self.j[mask[self.i]]] = True
            mask = grown
        return mask

    def laplacian(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform Laplacian (V, 3): mean of the neighbours minus the vertex; zero on unreferenced ones."""
        total = torch.zeros_like(x).index_add_(0, self.i, x[self.j]).index_add_(0, self.j, x[self.i])
        return torch.where(self.connected, total * self.inv_degree - x, torch.zeros_like(x))


def track_frame(vertices: torch.Tensor | np.ndarray, faces: torch.Tensor | np.ndarray, field_fn: FieldFn,
                config: TrackingConfig | None = None, relax_base: bool = False
                ) -> tuple[torch.Tensor, TrackStats]:
    """Move `vertices` onto the zero level of `field_fn` (steps 2-3 of the module docstring).

    With `relax_base`, instead run step 0: even out a freshly extracted mesh's triangles along the
    surface. No pre-alignment and no check: `SequenceTracker` adds those. Works on the device of
    `vertices` (CPU for numpy); returns the new positions (V, 3) float32 there and what it cost.
    """
    config = config or TrackingConfig()
    x = _as_vertices(vertices, None)
    graph = MeshGraph(_as_faces(faces, len(x)), len(x), x.device)
    return _track(x, x, graph, field_fn, config, config.gradient, relax_base)


def track_sequence(base_vertices: torch.Tensor | np.ndarray, base_faces: torch.Tensor | np.ndarray,
                   per_frame: Iterable[tuple[FieldFn, np.ndarray, np.ndarray]],
                   config: TrackingConfig | None = None, frames: Sequence[int] | None = None,
                   device: torch.device | str | None = None) -> TrackedSequence:
    """Carry the base mesh through every frame of `per_frame`: (field_fn, ref_vertices, ref_faces) each.

    The first item is the first frame itself: the base is relaxed and projected onto its field (so a
    decimated or cleaned base works as well as the raw extraction). `frames` are the source frame
    numbers used in the result and the fallback messages (default 0, 1, 2, ...). `per_frame` may be a
    generator, so each frame's field only needs to live while that frame is meshed.
    """
    tracker = SequenceTracker(base_vertices, base_faces, config, device)
    numbers = iter(frames) if frames is not None else None
    for index, (field_fn, ref_vertices, ref_faces) in enumerate(per_frame):
        frame = next(numbers, None) if numbers is not None else index
        if frame is None:
            raise InputError(f"more frames were given than the {index} frame numbers in `frames`")
        tracker.add_frame(field_fn, ref_vertices, ref_faces, frame)
    return tracker.result()


class SequenceTracker:
    """Frame-by-frame form of `track_sequence`, for a pipeline that meshes and tracks as it goes.

    `device` is where the vertices live and where `field_fn` receives its query points (e.g. "cuda" when
    the decoder runs on the GPU); by default the base vertices' device (CPU for numpy).
    """

    def __init__(self, base_vertices: torch.Tensor | np.ndarray, base_faces: torch.Tensor | np.ndarray,
                 config: TrackingConfig | None = None, device: torch.device | str | None = None):
        self.config = config = config or TrackingConfig()
        self._accepted = _as_vertices(base_vertices, device)  # the last accepted positions
        self._faces_np = _as_faces(base_faces, len(self._accepted)).astype(np.int32)
        self._graph = MeshGraph(self._faces_np, len(self._accepted), self._accepted.device)
        self._base_parts, self._base_euler = surface_topology(self._accepted.cpu().numpy(), self._faces_np)
        self._gradient = config.gradient
        self._base_relaxed = config.base_iterations == 0
        self.results: list[FrameResult] = []

    def add_frame(self, field_fn: FieldFn, ref_vertices: np.ndarray, ref_faces: np.ndarray,
                  frame: int | None = None) -> FrameResult:
        """Track one more frame; `ref_*` is that frame's own mesh (for pre-alignment and the check)."""
        frame = len(self.results) if frame is None else int(frame)
        ref_vertices = np.asarray(ref_vertices, dtype=np.float64).reshape(-1, 3)
        ref_faces = np.asarray(ref_faces).reshape(-1, 3)
        if len(ref_faces) == 0 or not _has_area(ref_vertices, ref_faces):  # the object vanished here
            return self._record(frame, self._accepted, _idle_stats(self._gradient), 0.0, 0.0,
                                chamfer=float("inf"), floor=0.0, off_surface=1.0, parts=0,
                                reason=f"frame {frame}: the object has no mesh of its own in this frame")
        ref_mesh = as_trimesh((ref_vertices, ref_faces), f"the own mesh of frame {frame}")
        started = time.perf_counter()
        start = rigid_prealign(self._accepted, ref_vertices, ref_faces, self.config)
        prealign_seconds = time.perf_counter() - started
        relax_base = not self._base_relaxed  # the first frame with a mesh: even out the base's triangles
        tracked, stats = _track(start, start, self._graph, field_fn, self.config, self._gradient, relax_base)
        self._base_relaxed = True
        self._gradient = stats.gradient  # an "auto" probe is decided once per object
        started = time.perf_counter()
        rng = np.random.default_rng(self.config.seed)
        tracked_np = tracked.detach().cpu().numpy()
        tracked_points = sample_surface((tracked_np, self._faces_np), self.config.samples, rng)
        ref_points = sample_surface(ref_mesh, self.config.samples, rng)
        d_tracked, d_ref = nearest_distances(tracked_points, ref_points)
        chamfer = float(d_tracked.mean() + d_ref.mean())
        floor = sampling_floor(ref_mesh.area, self.config.samples)
        off_surface = float((d_tracked > max(self.config.off_surface_distance, 3 * floor)).mean())
        parts, euler = surface_topology(ref_vertices, ref_faces)
        reason = self._verdict(frame, chamfer, floor, off_surface, parts, euler, stats)
        check_seconds = time.perf_counter() - started
        if not reason:
            self._accepted = tracked
        return self._record(frame, tracked, stats, prealign_seconds, check_seconds, chamfer=chamfer,
                            floor=floor, off_surface=off_surface, parts=parts, reason=reason)

    def result(self) -> TrackedSequence:
        if not self.results:
            raise InputError("no frames were tracked; give at least one (field_fn, vertices, faces) frame")
        return TrackedSequence(
            frames=[r.frame for r in self.results],
            vertices=np.stack([r.vertices for r in self.results]),
            faces=self._faces_np,
            chamfer=np.array([r.chamfer for r in self.results], dtype=np.float64),
            chamfer_floor=np.array([r.chamfer_floor for r in self.results], dtype=np.float64),
            off_surface=np.array([r.off_surface for r in self.results], dtype=np.float64),
            fallback_frames=[r.frame for r in self.results if not r.accepted],
            reasons={r.frame: r.reason for r in self.results if not r.accepted},
            stats=[r.stats for r in self.results],
        )

    def _record(self, frame: int, vertices: torch.Tensor, stats: TrackStats, prealign_seconds: float,
                check_seconds: float, *, chamfer: float, floor: float, off_surface: float, parts: int,
                reason: str) -> FrameResult:
        result = FrameResult(frame=frame, vertices=vertices.detach().cpu().numpy().astype(np.float32),
                             chamfer=chamfer, chamfer_floor=floor, off_surface=off_surface, parts=parts,
                             accepted=not reason, reason=reason, stats=stats,
                             prealign_seconds=prealign_seconds, check_seconds=check_seconds)
        self.results.append(result)
        return result

    def _verdict(self, frame: int, chamfer: float, floor: float, off_surface: float, parts: int, euler: int,
                 stats: TrackStats) -> str:
        """Why this frame falls back, or "" when the tracked mesh is accepted."""
        config = self.config
        allowed = floor + config.chamfer_threshold
        numbers = (f"Chamfer distance {chamfer:.4f}, allowed {allowed:.4f} (sampling floor {floor:.4f} + "
                   f"threshold {config.chamfer_threshold:.4f}); {100 * off_surface:.1f} % of the tracked "
                   f"surface off the frame's surface, allowed {100 * config.off_surface_fraction:.1f} %")
        if parts > self._base_parts:
            return (f"frame {frame}: the object split into {parts} parts (the tracked mesh has "
                    f"{self._base_parts}), which one shared topology cannot follow; {numbers}")
        if stats.folded > config.folded_fraction:
            cause = (f"the tracked mesh folds over itself on {100 * stats.folded:.2f} % of its triangles "
                     f"(allowed {100 * config.folded_fraction:.2f} %)")
        elif chamfer > allowed:
            cause = "the tracked mesh no longer matches this frame's surface"
        elif off_surface > config.off_surface_fraction:
            cause = ("part of the tracked mesh lies off this frame's surface: it bridges a gap or covers a "
                     "hole that the frame's surface does not have")
        else:
            return ""
        if parts != self._base_parts:
            cause += f" (the frame's mesh has {parts} parts, the tracked mesh {self._base_parts})"
        elif euler != self._base_euler:
            cause += (f" (the frame's mesh has a different number of holes or handles: Euler characteristic "
                      f"{euler}, tracked mesh {self._base_euler})")
        elif stats.residual_p95 >= config.tolerance:
            cause += (f" (tracking did not reach the surface in {stats.iterations} iterations: 95 % of the "
                      f"vertices within {stats.residual_p95:.4f})")
        return f"frame {frame}: {cause}; {numbers}"


def sampling_floor(area: float, samples: int) -> float:
    """The Chamfer distance two independent `samples`-point samplings of one surface show: sqrt(area/n).

    Each direction's mean nearest-neighbour distance to n uniform points on an area A is 0.5·sqrt(A/n);
    a perfect tracked mesh cannot score below the sum of the two.
    """
    return float(np.sqrt(max(area, 0.0) / samples))


def rigid_prealign(vertices: torch.Tensor, ref_vertices: np.ndarray, ref_faces: np.ndarray,
                   config: TrackingConfig) -> torch.Tensor:
    """Move `vertices` onto the frame's own mesh: one rigid ICP, then piecewise-rigid ICP of its parts.

    The whole mesh is first fitted rigidly. Then it is cut into `prealign_parts` regions (farthest-point
    centres, each vertex to the nearest); a region that this fit leaves farther from the surface than
    `max_step` (median) is fitted rigidly on its own, and every vertex moves by the blend of the regions'
    motions, weighted by a Gaussian of its distance to their centres. A limb that swings, or the two
    halves of a bending body, each get their own motion, which a single rigid fit cannot give and which
    a field's nearest-surface projection cannot find once a part moved farther than its own thickness.
    Regions already close keep the whole's fit: on them a rigid fit of their own is poorly determined
    along the surface (a patch of a sphere or a box face may slide) and would only shear the mesh.
    Runs on the CPU (a KD-tree); the result is applied on the device.
    """
    if config.prealign_iterations == 0 or len(ref_vertices) < 3:
        return vertices
    source = vertices.detach().cpu().numpy().astype(np.float64)
    sample = source[:: max(1, len(source) // config.prealign_points)]
    tree = cKDTree(ref_vertices)
    normals = _vertex_normals(ref_vertices, ref_faces)
    rotation, translation = _icp(sample, tree, ref_vertices, normals, config.prealign_iterations)
    moved = source @ rotation.T + translation  # (V, 3)
    if config.prealign_parts > 1 and len(sample) >= 8 * config.prealign_parts:
        sample = sample @ rotation.T + translation
        moved = _piecewise_rigid(moved, sample, tree, ref_vertices, normals, config)
    return torch.as_tensor(moved, dtype=torch.float32, device=vertices.device)


def _piecewise_rigid(moved: np.ndarray, sample: np.ndarray, tree: cKDTree, ref_vertices: np.ndarray,
                     normals: np.ndarray, config: TrackingConfig) -> np.ndarray:
    """Blend of per-region rigid fits (see `rigid_prealign`); `sample` is a subset of `moved`."""
    centres = sample[_farthest_points(sample, config.prealign_parts)]  # (K, 3)
    owner = np.argmin(((sample[:, None] - centres[None]) ** 2).sum(-1), axis=1)  # (S,)
    spacing = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1) + np.eye(len(centres)) * 1e9).min(1)
    sigma = 0.5 * float(np.median(spacing))  # regions blend over about half their spacing
    blended = np.zeros_like(moved)
    weight_sum = np.zeros((len(moved), 1))
    for k, centre in enumerate(centres):
        part = sample[owner == k]
        rotation, translation = np.eye(3), np.zeros(3)  # a region near the surface keeps the whole's fit
        if np.median(tree.query(part, k=1)[0]) > config.max_step:
            rotation, translation = _icp(part, tree, ref_vertices, normals, config.prealign_iterations,
                                         point_weight=0.5)
        weight = np.exp(-((moved - centre) ** 2).sum(1, keepdims=True) / (2 * sigma**2))  # (V, 1)
        blended += weight * (moved @ rotation.T + translation)
        weight_sum += weight
    return np.where(weight_sum > 1e-12, blended / np.maximum(weight_sum, 1e-12), moved)


def _icp(points: np.ndarray, tree: cKDTree, ref_vertices: np.ndarray, normals: np.ndarray, iterations: int,
         point_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Rigid ICP of `points` onto a mesh's vertices: (rotation (3, 3), translation (3,)).

    Point-to-plane (each pair's distance measured along the reference's vertex normal) converges to
    the true pose although the two meshes sample the surface at different points. On a patch of a
    curved surface it also lets the patch slide along the surface, so a region's fit adds
    `point_weight` times the point-to-point distances, which pin it. Rotations that nothing determines
    stay at zero (a prior on the total rotation, 1 % of a well-determined one's
    weight), and pairs farther apart than three times the median are left out,
    so parts the reference lacks do not drag the fit.
    """
    rotation = np.eye(3)
    translation = np.zeros(3)
    for _ in range(iterations):
        moved = points @ rotation.T + translation
        distance, nearest = tree.query(moved, k=1)
        keep = distance <= 3 * np.median(distance) + 1e-12
        if keep.sum() < 6:
            break
        p, q, n = moved[keep], ref_vertices[nearest[keep]], normals[nearest[keep]]
        centre = p.mean(0)
        arm = p - centre  # (K, 3)
        jacobian = np.concatenate([np.cross(arm, n), n], axis=1)  # (K, 6): d(plane residual)/d(omega, t)
        residual = ((p - q) * n).sum(1)  # (K,)
        system = jacobian.T @ jacobian
        rhs = jacobian.T @ residual
        if point_weight:
            # d(p + omega x arm + t)/d(omega, t) = [-[arm]x, I] per point, stacked (3K, 6)
            skew = np.zeros((len(p), 3, 3))
            skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -arm[:, 2], arm[:, 1], -arm[:, 0]
            skew = skew - skew.transpose(0, 2, 1)
            identity = np.broadcast_to(np.eye(3), skew.shape)
            point_jacobian = np.concatenate([-skew, identity], axis=2).reshape(-1, 6)  # (3K, 6)
            system = system + point_weight**2 * point_jacobian.T @ point_jacobian
            rhs = rhs + point_weight**2 * point_jacobian.T @ (p - q).reshape(-1)
        # a prior towards no rotation, only about the axes that the surface leaves (nearly) free (all
        # of a sphere's, a cylinder's own axis): there the fit stays put instead of wandering with the
        # sampling noise, while a rotation the surface does determine is fitted without bias
        scale = len(p) * np.mean(np.sum(arm**2, 1))
        curvature, axes = np.linalg.eigh(system[:3, :3])
        free = axes[:, curvature < 0.02 * scale]  # (3, k)
        prior = 0.02 * scale * free @ free.T  # (3, 3)
        system = system + np.diag([0.0] * 3 + [1e-7 * len(p)] * 3)
        system[:3, :3] += prior + 1e-6 * scale * np.eye(3)
        rhs = rhs + np.concatenate([prior @ _rotation_vector(rotation), np.zeros(3)])
        delta = -np.linalg.solve(system, rhs)
        step_r = _rotation_from_vector(delta[:3])
        step_t = centre + delta[3:] - step_r @ centre  # rotate about the centroid, then translate
        rotation = step_r @ rotation
        translation = step_r @ translation + step_t
        if np.abs(delta).max() < 1e-7:
            break
    return rotation, translation


def _farthest_points(points: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` points spread by farthest-point sampling (deterministic: starts at point 0)."""
    chosen = [0]
    distance = ((points - points[0]) ** 2).sum(1)
    for _ in range(1, min(count, len(points))):
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, ((points - points[chosen[-1]]) ** 2).sum(1))
    return np.asarray(chosen)


def surface_topology(vertices: np.ndarray, faces: np.ndarray, min_area_fraction: float = 0.01
                     ) -> tuple[int, int]:
    """(number of parts, Euler characteristic V − E + F) of a mesh, ignoring parts under 1 % of its area.

    Vertices at the same position are merged first, so a mesh stored as triangle soup counts right.
    For closed surfaces, Euler characteristic = 2·(parts − handles).
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        return 0, 0
    if len(vertices) > len(faces):  # an indexed closed mesh has about F/2 vertices; this looks like soup
        _, first, inverse = np.unique(np.round(vertices, 7), axis=0, return_index=True, return_inverse=True)
        vertices, faces = vertices[first], inverse.reshape(-1)[faces]
    n = len(vertices)
    pairs = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    keys = np.unique(pairs[:, 0] * n + pairs[:, 1])  # one int64 per undirected edge
    edges = np.stack([keys // n, keys % n], axis=1)  # (E, 2)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    corners = vertices[faces]  # (F, 3, 3)
    area = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]),
                                axis=1)
    part_area = np.bincount(label[faces[:, 0]], weights=area, minlength=label.max() + 1)
    big = part_area >= min_area_fraction * part_area.sum()
    used = np.zeros(n, dtype=bool)
    used[faces.reshape(-1)] = True
    v = int((used & big[label]).sum())
    e = int(big[label[edges[:, 0]]].sum())
    f = int(big[label[faces[:, 0]]].sum())
    return int(big.sum()), v - e + f


def _track(x: torch.Tensor, rest: torch.Tensor, graph: MeshGraph, field_fn: FieldFn, config: TrackingConfig,
           gradient: str, relax_base: bool = False) -> tuple[torch.Tensor, TrackStats]:
    """Newton steps onto the level set with tangential regularising sub-steps in between.

    A frame stops as soon as 95 % of the vertices are within `tolerance` of the level set and at most
    `folded_fraction` of the triangles are folded (at most `iterations` field calls); relaxing the base
    always runs `base_iterations`. Where triangles are folded (their normal against the field's), the vertices
    around them are relaxed towards their neighbours' centroid like the base, which unfolds them.
    """
    started = time.perf_counter()
    iterations = config.base_iterations if relax_base else config.iterations
    x = x.detach().clone()
    rest = rest.detach()
    calls = points = 0
    normal = None
    repair = torch.ones(len(x), 1, device=x.device) if relax_base else torch.zeros(len(x), 1, device=x.device)
    residual = torch.zeros(len(x), device=x.device)
    folded = torch.zeros(len(graph.faces), dtype=torch.bool, device=x.device)
    converged = False
    iteration = 0
    for iteration in range(1, iterations + 1):  # noqa: B007 - reported below
        if normal is not None:
            for _ in range(config.substeps):
                # neighbours move alike (zero for a rigid motion); the repair region relaxes instead
                move = (1 - repair) * config.smoothing * graph.laplacian(x - rest)  # (V, 3)
                move = move + repair * config.base_relaxation * graph.laplacian(x)
                move = move - (move * normal).sum(1, keepdim=True) * normal  # tangential part only
                limit = torch.where(repair > 0, config.max_step, graph.safe_step(x))  # (V, 1)
                x = x + move * (limit / move.norm(dim=1, keepdim=True).clamp_min(1e-20)).clamp(max=1.0)
        value, grad, gradient, n_calls, n_points = _field_and_gradient(field_fn, x, gradient, config.fd_step)
        calls += n_calls
        points += n_points
        grad_sq = (grad * grad).sum(1).clamp_min(1e-20)  # (V,)
        residual = value.abs() / grad_sq.sqrt()  # estimated distance to the level set
        newton = -(config.step * value / grad_sq).unsqueeze(1) * grad  # (V, 3)
        length = newton.norm(dim=1, keepdim=True)
        x = x + newton * (config.max_step / length.clamp_min(config.max_step))
        normal = -grad / grad_sq.sqrt().unsqueeze(1)  # outward: the field grows inwards
        folded = graph.folded(x, normal)  # (F,)
        if not relax_base:
            repair = graph.around(folded, rings=2).unsqueeze(1).to(x.dtype)  # (V, 1)
            surface_reached = _quantile(residual, 0.95) < config.tolerance
            if surface_reached and float(folded.float().mean()) <= config.folded_fraction:
                converged = True
                break
    if gradient == "auto":  # no iteration ran the probe (cannot happen with iterations >= 1)
        gradient = "finite_difference"
    stats = TrackStats(iterations=iteration, field_calls=calls, field_points=points, gradient=gradient,
                       residual_mean=float(residual.mean()), residual_p95=_quantile(residual, 0.95),
                       folded=float(folded.float().mean()), converged=converged,
                       seconds=time.perf_counter() - started)
    return x, stats


def _field_and_gradient(field_fn: FieldFn, x: torch.Tensor, method: str, h: float
                        ) -> tuple[torch.Tensor, torch.Tensor, str, int, int]:
    """f(x) (V,) and ∇f(x) (V, 3), the method used, and the calls and points it took."""
    n = len(x)
    if method in ("auto", "autograd"):
        value = None
        try:
            with torch.enable_grad():
                query = x.detach().clone().requires_grad_(True)
                value = _call_field(field_fn, query, n)
                if value.requires_grad:
                    (grad,) = torch.autograd.grad(value.sum(), query)
                    return value.detach(), grad.detach(), "autograd", 1, n
        except RuntimeError as err:  # e.g. called under torch.inference_mode()
            if method == "autograd":
                raise ParameterError(f"cannot differentiate field_fn with autograd ({err}); "
                                     "use gradient='finite_difference'") from err
        if method == "autograd":
            raise ParameterError("field_fn's output does not depend on its input through autograd (no "
                                 "grad_fn); use gradient='finite_difference'")
        if value is not None:  # "auto": keep the probe's values, add the six offsets
            offsets = _fd_offsets(x, h)
            around = _call_field(field_fn, offsets, 6 * n).detach().view(6, n)
            return value.detach(), _central_difference(around, h), "finite_difference", 2, 7 * n
    with torch.no_grad():
        query = torch.cat([x, _fd_offsets(x, h)])  # (7V, 3)
        out = _call_field(field_fn, query, 7 * n).view(7, n)
    return out[0], _central_difference(out[1:], h), "finite_difference", 1, 7 * n


def _fd_offsets(x: torch.Tensor, h: float) -> torch.Tensor:
    eye = torch.eye(3, dtype=x.dtype, device=x.device) * h
    return torch.cat([x + eye[k] * sign for k in range(3) for sign in (1.0, -1.0)])  # (6V, 3): +x,-x,+y,...


def _central_difference(around: torch.Tensor, h: float) -> torch.Tensor:
    return torch.stack([(around[2 * k] - around[2 * k + 1]) / (2 * h) for k in range(3)], dim=1)  # (V, 3)


def _call_field(field_fn: FieldFn, points: torch.Tensor, n: int) -> torch.Tensor:
    out = field_fn(points)
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(np.asarray(out))
    if out.shape not in ((n,), (n, 1)):
        raise InputError(f"field_fn returned shape {tuple(out.shape)} for {n} points; expected ({n},)")
    out = out.reshape(n).to(device=points.device, dtype=torch.float32)
    bad = int((~torch.isfinite(out.detach())).sum())
    if bad:
        raise InputError(f"field_fn returned non-finite values at {bad} of {n} points")
    return out


def _rotation_from_vector(omega: np.ndarray) -> np.ndarray:
    """Rodrigues: the rotation by |omega| radians about omega's direction."""
    angle = float(np.linalg.norm(omega))
    if angle < 1e-12:
        return np.eye(3)
    k = omega / angle
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _rotation_vector(rotation: np.ndarray) -> np.ndarray:
    """The inverse of `_rotation_from_vector`: axis times angle (radians) of a rotation matrix."""
    angle = float(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0)))
    if angle < 1e-9:
        return np.zeros(3)
    axis = np.array([rotation[2, 1] - rotation[1, 2], rotation[0, 2] - rotation[2, 0],
                     rotation[1, 0] - rotation[0, 1]])
    return axis / max(2 * np.sin(angle), 1e-9) * angle


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (V, 3); zero where a vertex has no faces."""
    corners = vertices[faces]  # (F, 3, 3)
    face_normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # |.| = 2 area
    corner = np.asarray(faces).reshape(-1)  # (3F,) each face's normal goes to its three corners
    normals = np.stack([np.bincount(corner, weights=np.repeat(face_normal[:, k], 3), minlength=len(vertices))
                        for k in range(3)], axis=1)  # (V, 3)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return normals / np.maximum(length, 1e-20)


def _quantile(values: torch.Tensor, q: float) -> float:
    if values.numel() == 0:
        return 0.0
    k = max(1, int(np.ceil(q * values.numel())))
    return float(values.float().kthvalue(k).values)


def _has_area(vertices: np.ndarray, faces: np.ndarray) -> bool:
    if faces.min() < 0 or faces.max() >= len(vertices):
        return True  # not ours to judge: as_trimesh names the bad index
    corners = vertices[faces]  # (F, 3, 3)
    doubled = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # (F, 3)
    return bool(np.linalg.norm(doubled, axis=1).sum() > 0)


def _idle_stats(gradient: str) -> TrackStats:
    return TrackStats(iterations=0, field_calls=0, field_points=0, gradient=gradient, residual_mean=0.0,
                      residual_p95=0.0, folded=0.0, converged=False, seconds=0.0)


def _as_vertices(vertices: torch.Tensor | np.ndarray, device: torch.device | str | None) -> torch.Tensor:
    if isinstance(vertices, torch.Tensor):
        target = device if device is not None else vertices.device
        x = vertices.detach().to(device=target, dtype=torch.float32)
    else:
        x = torch.as_tensor(np.asarray(vertices, dtype=np.float32), device=device)
    if x.ndim != 2 or x.shape[1] != 3 or len(x) == 0:
        raise InputError(f"vertices must have shape (V, 3) with V >= 1, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise InputError("vertices contain non-finite coordinates")
    return x


def _as_faces(faces: torch.Tensor | np.ndarray, num_vertices: int) -> np.ndarray:
    f = faces.detach().cpu().numpy() if isinstance(faces, torch.Tensor) else np.asarray(faces)
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0 or not np.issubdtype(f.dtype, np.integer):
        raise InputError(f"faces must be integers of shape (F, 3) with F >= 1, got {f.dtype} {f.shape}")
    if f.min() < 0 or f.max() >= num_vertices:
        raise InputError(f"faces index vertices outside 0..{num_vertices - 1}")
    return f.astype(np.int64)
