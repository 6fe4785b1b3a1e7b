"""Tracked topology on analytic fields whose surfaces and motions are known exactly.

Every field is a plain torch function, positive inside with its surface at level 0 like the VAE's
occupancy logit; each frame's own mesh comes from marching cubes on a 64^3 grid of that field, as the
pipeline's per-frame extraction would give it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.measure import marching_cubes

from com4d.errors import InputError, ParameterError
from com4d.events import WarningEvent
from com4d.topology import (
    SequenceTracker,
    TrackedSequence,
    TrackingConfig,
    sampling_floor,
    surface_topology,
    track_frame,
    track_sequence,
)

BOUND = 1.005  # the canonical cube


# ---------------------------------------------------------------------------------------------------
# Analytic fields and their level-set meshes


def level_set_mesh(field_fn, resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of `field_fn` at level 0 on a resolution^3 grid over the canonical cube."""
    axis = torch.linspace(-BOUND, BOUND, resolution)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    with torch.no_grad():
        values = field_fn(grid).reshape(resolution, resolution, resolution).numpy()
    vertices, faces, _, _ = marching_cubes(values, level=0.0)
    vertices = vertices * (2 * BOUND / (resolution - 1)) - BOUND
    # skimage orients faces towards increasing values (inwards here): flip to outward normals
    return vertices.astype(np.float32), np.ascontiguousarray(faces[:, ::-1]).astype(np.int32)


def ellipsoid(axes):
    """4·(1 − Σ (x_i/a_i)²): not a distance field, steeper near the centre, like a logit."""
    a = torch.tensor(axes, dtype=torch.float32)
    return lambda p: 4.0 * (1.0 - ((p / a.to(p.device)) ** 2).sum(-1))


def rotation_matrix(angle: float, axis=(0.3, 1.0, 0.2)) -> np.ndarray:
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def box(half_sizes, rotation: np.ndarray, centre):
    """−20·(signed distance to a box rotated by `rotation` about its centre and moved to `centre`)."""
    half = torch.tensor(half_sizes, dtype=torch.float32)
    r = torch.tensor(rotation, dtype=torch.float32)
    c = torch.tensor(centre, dtype=torch.float32)

    def field(p):
        q = (p - c.to(p.device)) @ r.to(p.device)  # into the box's frame: R^T (p - c)
        d = q.abs() - half.to(p.device)
        return -20.0 * (d.clamp_min(0).norm(dim=-1) + d.max(dim=-1).values.clamp_max(0))

    return field


def capsule_polyline(bend: float, length: float = 1.2, segments: int = 24) -> np.ndarray:
    """The centreline of a capsule bent along a circular arc of total angle `bend` (xy plane)."""
    s = np.linspace(0.0, length, segments + 1)
    if abs(bend) < 1e-9:
        return np.stack([s - length / 2, 0 * s, 0 * s], axis=1)
    radius = length / bend
    return np.stack([radius * np.sin(s / radius) - length / 2, radius * (1 - np.cos(s / radius)), 0 * s], 1)


def distance_to_polyline(p: torch.Tensor, line: np.ndarray) -> torch.Tensor:
    a = torch.tensor(line[:-1], dtype=torch.float32, device=p.device)  # (S, 3)
    ab = torch.tensor(line[1:] - line[:-1], dtype=torch.float32, device=p.device)
    ap = p[:, None, :] - a[None]  # (P, S, 3)
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1)).clamp(0, 1)
    return (ap - t[..., None] * ab).norm(dim=-1).min(dim=1).values  # (P,)


CAPSULE_RADIUS = 0.16


def bent_capsule(bend: float):
    line = capsule_polyline(bend)
    return lambda p: 20.0 * (CAPSULE_RADIUS - distance_to_polyline(p, line))


def metaballs(separation: float, sigma: float = 0.28, level: float = 0.5):
    """Two Gaussian blobs on the x axis; one body until the separation passes SPLIT_SEPARATION."""
    centres = torch.tensor([[-separation / 2, 0, 0], [separation / 2, 0, 0]], dtype=torch.float32)

    def field(p):
        d2 = ((p[:, None, :] - centres.to(p.device)[None]) ** 2).sum(-1)
        return 10.0 * (torch.exp(-d2 / (2 * sigma**2)).sum(-1) - level)

    return field


# The midpoint value 2·exp(−(s/2)²/(2σ²)) drops below the level 0.5 when s > 2σ·sqrt(2 ln 4).
SPLIT_SEPARATION = 2 * 0.28 * math.sqrt(2 * math.log(4))


def torus(major: float = 0.45, minor: float = 0.18):
    return lambda p: 20.0 * (minor - torch.sqrt((torch.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2) - major) ** 2
                                                + p[:, 1] ** 2))


def frames_of(fields, resolution: int = 64):
    """(field_fn, vertices, faces) per frame, as track_sequence takes them, and the meshes."""
    meshes = [level_set_mesh(f, resolution) for f in fields]
    return [(f, v, fc) for f, (v, fc) in zip(fields, meshes)], meshes


def track(fields, config: TrackingConfig | None = None, **kwargs) -> tuple[TrackedSequence, list]:
    per_frame, meshes = frames_of(fields)
    base_vertices, base_faces = meshes[0]
    return track_sequence(base_vertices, base_faces, per_frame, config, **kwargs), meshes


def outward_face_agreement(vertices: np.ndarray, faces: np.ndarray, field_fn) -> float:
    """Share of faces whose normal points where the field decreases (outwards): 1.0 = nothing folded."""
    corners = vertices[faces]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    centres = torch.tensor(corners.mean(axis=1), dtype=torch.float32, requires_grad=True)
    (grad,) = torch.autograd.grad(field_fn(centres).sum(), centres)
    return float(((normals * -grad.numpy()).sum(1) > 0).mean())


# ---------------------------------------------------------------------------------------------------
# Known motions are followed


STRETCH = [(0.5 + 0.04 * i, 0.5 - 0.02 * i, 0.5 - 0.015 * i) for i in range(7)]


def test_sphere_stretching_into_ellipsoid_lands_on_each_frames_surface():
    fields = [ellipsoid(axes) for axes in STRETCH]
    result, meshes = track(fields)

    base_vertices, base_faces = meshes[0]
    assert result.vertices.shape == (len(fields), len(base_vertices), 3)
    assert result.vertices.dtype == np.float32
    np.testing.assert_array_equal(result.faces, base_faces)  # one topology for the whole clip
    assert result.fallback_frames == [] and result.reasons == {}
    for i, axes in enumerate(STRETCH):
        implicit = ((result.vertices[i] / np.asarray(axes)) ** 2).sum(1)  # 1 on the true surface
        assert np.abs(implicit - 1).max() < 2e-3, i
        # the tracked mesh scores what sampling alone gives against the frame's own mesh
        assert result.chamfer[i] < result.chamfer_floor[i] + 0.003, i
        assert outward_face_agreement(result.vertices[i], result.faces, fields[i]) == 1.0, i


def test_bending_capsule_is_followed_without_folds():
    bends = [i * (math.pi / 2) / 6 for i in range(7)]  # straight to a quarter circle
    fields = [bent_capsule(b) for b in bends]
    result, meshes = track(fields)

    assert result.fallback_frames == []
    assert len(result.faces) == len(meshes[0][1])
    base_lengths = _edge_lengths(result.vertices[0], result.faces)
    for i, bend in enumerate(bends):
        distance = distance_to_polyline(torch.tensor(result.vertices[i]), capsule_polyline(bend)).numpy()
        assert np.abs(distance - CAPSULE_RADIUS).max() < 2e-3, i  # on the bent capsule's surface
        assert outward_face_agreement(result.vertices[i], result.faces, fields[i]) > 0.999, i
        stretch = _edge_lengths(result.vertices[i], result.faces) / base_lengths
        assert 0.4 < stretch.min() and stretch.max() < 2.5, i  # triangles stay regular
    assert result.chamfer.max() < (result.chamfer_floor + 0.003).min()


def test_rigidly_moving_box_keeps_each_vertex_on_its_material_point():
    angles = [i * math.radians(8) for i in range(7)]
    centres = [(0.04 * i, -0.02 * i, 0.01 * i) for i in range(7)]
    rotations = [rotation_matrix(a) for a in angles]
    fields = [box((0.35, 0.25, 0.2), r, c) for r, c in zip(rotations, centres)]
    result, _ = track(fields)

    assert result.fallback_frames == []
    start = result.vertices[0].astype(np.float64)
    for i, (r, c) in enumerate(zip(rotations, centres)):
        expected = start @ r.T + np.asarray(c)  # where the material point of each vertex went
        error = np.linalg.norm(result.vertices[i] - expected, axis=1)
        assert error.mean() < 2e-3 and error.max() < 5e-3, (i, error.mean(), error.max())


def test_either_face_winding_is_tracked_alike():
    fields = [bent_capsule(b) for b in (0.0, 0.4, 0.8)]
    per_frame, meshes = frames_of(fields)
    vertices, faces = meshes[0]
    outwards = track_sequence(vertices, faces, per_frame)
    inwards = track_sequence(vertices, faces[:, ::-1].copy(), per_frame)  # as marching cubes returns them
    np.testing.assert_array_equal(inwards.faces, faces[:, ::-1])
    assert inwards.fallback_frames == [] and {s.folded for s in inwards.stats} == {0.0}
    np.testing.assert_allclose(inwards.vertices, outwards.vertices, atol=1e-5)


def _edge_lengths(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    return np.linalg.norm(vertices[faces[:, [1, 2, 0]]] - vertices[faces], axis=2).reshape(-1)


# ---------------------------------------------------------------------------------------------------
# Fallback


def test_blob_splitting_in_two_falls_back_from_the_split_to_the_end():
    separations = [0.3, 0.5, 0.7, 0.85, 1.1, 1.3]
    fields = [metaballs(s) for s in separations]
    numbers = [10, 12, 14, 16, 18, 20]  # source frame numbers of the selected frames
    result, _ = track(fields, frames=numbers)

    split = [n for n, s in zip(numbers, separations) if s > SPLIT_SEPARATION]
    assert split == [18, 20]
    assert result.fallback_frames == split
    assert result.stretches() == [(18, 20)]
    assert "split into 2 parts" in result.reasons[18]
    assert np.isfinite(result.chamfer).all() and result.vertices.shape[0] == len(numbers)

    warning = result.warning("blob")
    assert isinstance(warning, WarningEvent)
    assert warning.code == "tracking_fallback" and warning.frames == [18, 20]
    assert "'blob'" in warning.message and "18-20" in warning.message
    assert track(fields[:4])[0].warning("blob") is None


def test_one_frame_glitch_costs_only_that_frame():
    sphere = ellipsoid((0.5, 0.5, 0.5))
    result, _ = track([sphere, sphere, torus(), sphere, sphere])

    assert result.fallback_frames == [2]
    assert "holes or handles" in result.reasons[2]
    for i in (3, 4):  # tracking resumed from frame 1 and is back on the sphere
        assert np.abs(np.linalg.norm(result.vertices[i], axis=1) - 0.5).max() < 2e-3


def test_a_frame_without_its_own_mesh_falls_back_and_keeps_the_last_positions():
    sphere = ellipsoid((0.5, 0.5, 0.5))
    vertices, faces = level_set_mesh(sphere)
    tracker = SequenceTracker(vertices, faces)
    first = tracker.add_frame(sphere, vertices, faces, frame=0)
    empty = tracker.add_frame(sphere, np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int32), frame=1)
    assert first.accepted and not empty.accepted
    assert "no mesh of its own" in empty.reason
    np.testing.assert_array_equal(empty.vertices, first.vertices)
    assert empty.stats.field_calls == 0
    flat = tracker.add_frame(sphere, np.zeros((3, 3)), np.array([[0, 1, 2]]), frame=2)  # zero area
    assert not flat.accepted and "no mesh of its own" in flat.reason
    assert tracker.result().fallback_frames == [1, 2]
    with pytest.raises(InputError, match="outside"):
        tracker.add_frame(sphere, vertices, faces + len(vertices), frame=3)


def test_threshold_decides_between_tracked_and_fallback():
    # held to two short steps, tracking cannot reach a sphere that shrank by 0.2: the check decides
    fields = [ellipsoid((0.5, 0.5, 0.5)), ellipsoid((0.3, 0.3, 0.3))]
    held = {"iterations": 2, "max_step": 0.01, "prealign_iterations": 0}
    result, _ = track(fields, TrackingConfig(**held))
    assert result.fallback_frames == [1]
    assert result.chamfer[1] > result.chamfer_floor[1] + 0.1
    assert "no longer matches" in result.reasons[1] and "did not reach the surface" in result.reasons[1]
    lenient, _ = track(fields, TrackingConfig(**held, chamfer_threshold=1.0, off_surface_fraction=1.0))
    assert lenient.fallback_frames == []
    followed, _ = track(fields)  # with the default steps it follows
    assert followed.fallback_frames == []
    assert np.abs(np.linalg.norm(followed.vertices[1], axis=1) - 0.3).max() < 2e-3


def test_a_quarter_bend_between_two_frames_needs_the_piecewise_prealignment():
    fields = [bent_capsule(0.0), bent_capsule(math.pi / 2)]
    result, _ = track(fields)
    assert result.fallback_frames == []
    distance = distance_to_polyline(torch.tensor(result.vertices[1]), capsule_polyline(math.pi / 2)).numpy()
    assert np.abs(distance - CAPSULE_RADIUS).max() < 2e-3
    assert outward_face_agreement(result.vertices[1], result.faces, fields[1]) == 1.0
    # one rigid fit leaves each half 45 degrees off: the projection folds the mesh, and the check sees it
    rigid_only, _ = track(fields, TrackingConfig(prealign_parts=1))
    assert rigid_only.fallback_frames == [1]
    assert "folds over itself" in rigid_only.reasons[1]


# ---------------------------------------------------------------------------------------------------
# Gradients and field evaluations


class CountingField:
    """Wraps a field and records every call's number of points."""

    def __init__(self, field_fn, detach: bool = False):
        self.field_fn = field_fn
        self.detach = detach
        self.calls: list[int] = []

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(points))
        if self.detach:  # as a decoder run under torch.no_grad() returns it
            with torch.no_grad():
                return self.field_fn(points)
        return self.field_fn(points)


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_field_evaluations_are_batched_and_reported(method):
    vertices, faces = level_set_mesh(ellipsoid(STRETCH[0]))
    field = CountingField(ellipsoid(STRETCH[3]))
    config = TrackingConfig(gradient=method)
    moved, stats = track_frame(vertices, faces, field, config)

    per_call = len(vertices) * (1 if method == "autograd" else 7)  # central differences: x and x ± h·e_k
    assert field.calls == [per_call] * stats.field_calls
    assert stats.field_points == sum(field.calls)
    assert stats.gradient == method
    assert 1 <= stats.iterations == stats.field_calls <= config.iterations
    assert stats.converged and stats.residual_p95 < config.tolerance


def test_finite_differences_and_autograd_agree():
    fields = [ellipsoid(axes) for axes in STRETCH[:4]]
    by_autograd, _ = track(fields, TrackingConfig(gradient="autograd"))
    by_differences, _ = track(fields, TrackingConfig(gradient="finite_difference"))
    assert {s.gradient for s in by_autograd.stats} == {"autograd"}
    assert {s.gradient for s in by_differences.stats} == {"finite_difference"}
    for i, axes in enumerate(STRETCH[:4]):  # both land on the surface ...
        for result in (by_autograd, by_differences):
            assert np.abs(((result.vertices[i] / np.asarray(axes)) ** 2).sum(1) - 1).max() < 2e-3
    # ... at nearly the same places: within a quarter of a 512^3 extraction cell on average (rounding
    # can stop one frame an iteration earlier, which slides the smoothing a little along the surface)
    assert np.linalg.norm(by_autograd.vertices - by_differences.vertices, axis=2).mean() < 1e-3


@pytest.mark.parametrize("context", ["no_grad_field", "inference_mode"])
def test_auto_uses_finite_differences_when_the_field_cannot_be_differentiated(context):
    vertices, faces = level_set_mesh(ellipsoid(STRETCH[0]))
    target = ellipsoid(STRETCH[3])
    field = CountingField(target, detach=context == "no_grad_field")
    if context == "inference_mode":
        with torch.inference_mode():
            moved, stats = track_frame(vertices, faces, field)
    else:
        moved, stats = track_frame(vertices, faces, field)
    assert stats.gradient == "finite_difference"
    assert field.calls[:2] == [len(vertices), 6 * len(vertices)]  # the probe's values are reused
    implicit = ((moved.numpy() / np.asarray(STRETCH[3])) ** 2).sum(1)
    assert np.abs(implicit - 1).max() < 2e-3


def test_auto_gradient_choice_is_kept_for_the_rest_of_the_object():
    fields = [CountingField(ellipsoid(axes), detach=True) for axes in STRETCH[:3]]
    per_frame, meshes = frames_of(fields)
    for field in fields:
        field.calls.clear()  # forget the marching-cubes grids
    result = track_sequence(*meshes[0], per_frame)
    assert {s.gradient for s in result.stats} == {"finite_difference"}
    n = len(meshes[0][0])
    assert fields[1].calls and set(fields[1].calls) == {7 * n}  # no autograd probe after the first frame


@pytest.mark.parametrize("make_fields", [
    lambda: [ellipsoid(axes) for axes in STRETCH[:4]],  # round: its rotation is not determined
    lambda: [bent_capsule(b) for b in (0.0, 0.3, 0.6, 0.9)],  # free about its own axis
])
def test_rounding_level_changes_of_the_field_do_not_move_the_result(make_fields):
    fields = make_fields()
    per_frame, meshes = frames_of(fields)
    exact = track_sequence(*meshes[0], per_frame)

    def rounded(field_fn):
        return lambda p: field_fn(p) * (1 + 1e-6) + 1e-7

    perturbed = track_sequence(*meshes[0], [(rounded(f), v, fc) for f, v, fc in per_frame])
    assert np.abs(perturbed.vertices - exact.vertices).max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tracking_runs_on_cuda_like_on_the_cpu():
    fields = [ellipsoid(axes) for axes in STRETCH[:4]]
    per_frame, meshes = frames_of(fields)
    on_cpu = track_sequence(*meshes[0], per_frame, TrackingConfig(gradient="finite_difference"))
    devices = []

    def on_gpu(field_fn):
        def field(points):
            devices.append(points.device.type)
            return field_fn(points)
        return field

    gpu_frames = [(on_gpu(f), v, fc) for f, v, fc in per_frame]
    on_cuda = track_sequence(*meshes[0], gpu_frames, TrackingConfig(gradient="finite_difference"),
                             device="cuda")
    assert set(devices) == {"cuda"}
    assert on_cuda.fallback_frames == []
    # The GPU rounds differently; tracking is stable under that: the test above bounds the drift from a
    # 1e-6 relative change of the field at 1e-4. This CUDA bound (1e-3) has NOT been measured: no GPU was
    # available to the sessions that wrote it. It is 10x the CPU bound to allow for cuBLAS/TF32 rounding in
    # the projection; measure the real difference on a card and tighten it (docs/algorithm.md, "Unmeasured").
    assert np.abs(on_cuda.vertices - on_cpu.vertices).max() < 1e-3


# ---------------------------------------------------------------------------------------------------
# Bad input and helpers


def test_bad_field_output_is_named():
    vertices, faces = level_set_mesh(ellipsoid(STRETCH[0]))
    with pytest.raises(InputError, match=r"shape \(3,\)"):
        track_frame(vertices, faces, lambda p: torch.zeros(3))
    with pytest.raises(InputError, match="non-finite"):
        track_frame(vertices, faces, lambda p: torch.full((len(p),), float("nan")))
    with pytest.raises(ParameterError, match="finite_difference"):
        track_frame(vertices, faces, lambda p: torch.ones(len(p)), TrackingConfig(gradient="autograd"))


def test_bad_mesh_and_config_are_named():
    vertices, faces = level_set_mesh(ellipsoid(STRETCH[0]))
    field = ellipsoid(STRETCH[0])
    with pytest.raises(InputError, match="outside"):
        track_frame(vertices, faces + len(vertices), field)
    with pytest.raises(InputError, match=r"\(V, 3\)"):
        track_frame(vertices[:, :2], faces, field)
    with pytest.raises(InputError, match="integers"):
        track_frame(vertices, faces.astype(np.float32), field)
    with pytest.raises(ParameterError, match="smoothing"):
        TrackingConfig(smoothing=1.5)
    with pytest.raises(ParameterError, match="gradient"):
        TrackingConfig(gradient="magic")
    with pytest.raises(InputError, match="frame numbers"):
        track_sequence(vertices, faces, frames_of([field, field])[0], frames=[0])
    with pytest.raises(InputError, match="no frames"):
        track_sequence(vertices, faces, [])


def test_surface_topology_counts_parts_and_handles():
    sphere = level_set_mesh(ellipsoid((0.5, 0.5, 0.5)))
    assert surface_topology(*sphere) == (1, 2)
    assert surface_topology(*level_set_mesh(torus())) == (1, 0)
    assert surface_topology(*level_set_mesh(metaballs(1.3))) == (2, 4)
    vertices, faces = sphere
    soup = vertices[faces].reshape(-1, 3), np.arange(3 * len(faces)).reshape(-1, 3)
    assert surface_topology(*soup) == (1, 2)  # unshared vertices are merged first


def test_sampling_floor_matches_identical_surfaces():
    vertices, faces = level_set_mesh(ellipsoid((0.5, 0.5, 0.5)))
    tracker = SequenceTracker(vertices, faces, TrackingConfig(iterations=1))
    frame = tracker.add_frame(ellipsoid((0.5, 0.5, 0.5)), vertices, faces)
    assert frame.chamfer == pytest.approx(frame.chamfer_floor, rel=0.05)
    assert sampling_floor(4.0, 10_000) == pytest.approx(0.02)
