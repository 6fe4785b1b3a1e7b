"""The reference's metrics on shapes whose values follow from geometry alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from com4d import metrics
from com4d.errors import InputError


def sphere(radius: float, centre=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=5, radius=radius)  # facets deviate < 1e-3 from the sphere
    mesh.apply_translation(centre)
    return mesh


def cube(offset=(0.0, 0.0, 0.0), size: float = 1.0) -> trimesh.Trimesh:
    mesh = trimesh.creation.box(extents=(size, size, size))
    mesh.apply_translation(offset)
    return mesh


@pytest.mark.parametrize(("r1", "r2"), [(0.5, 0.6), (0.3, 0.45), (0.7, 0.4)])
def test_chamfer_of_concentric_spheres_is_twice_the_radius_gap(r1, r2):
    # every point of one sphere is |r1 - r2| from the other: each mean is that gap (plus a hair of
    # sampling, since the nearest sample is not exactly below the point)
    cd = metrics.chamfer_distance(sphere(r1), sphere(r2))
    assert cd == pytest.approx(2 * abs(r1 - r2), abs=0.004)


def test_identical_meshes_score_the_sampling_floor_full_fscore_and_full_iou():
    mesh = sphere(0.5)
    cd = metrics.chamfer_distance(mesh, mesh)
    # two independent uniform samplings of n points on area A: each mean nearest distance is
    # 0.5·sqrt(A/n) (planar Poisson process), so the sum is sqrt(A/n)
    assert cd == pytest.approx(math.sqrt(mesh.area / metrics.DEFAULT_SAMPLES), rel=0.05)
    assert cd < 0.02
    assert metrics.fscore(mesh, mesh) == 1.0
    assert metrics.volume_iou(mesh, mesh) == 1.0


@pytest.mark.parametrize("shift", [0.25, 0.5])
def test_iou_of_offset_unit_cubes_is_overlap_over_union(shift):
    iou = metrics.volume_iou(cube(), cube((shift, 0.0, 0.0)))
    expected = (1 - shift) / (1 + shift)  # overlap volume / union volume
    assert iou == pytest.approx(expected, abs=0.03)  # surface voxels: about one voxel per face
    assert metrics.volume_iou(cube(), cube((1.5, 0.0, 0.0))) == 0.0


def test_fscore_of_offset_spheres_follows_the_threshold():
    r, tau = 0.5, 0.1
    # offset well inside tau: every point is within tau of the other sphere
    assert metrics.fscore(sphere(r), sphere(r, (0.05, 0, 0)), tau=tau) == 1.0
    # offset 0.3: a point at angle theta from the offset axis is | |p - c'| - r | from the other sphere,
    # within tau where cos(theta) lies in ((r² + d² − (r+tau)²)/(2rd), (r² + d² − (r−tau)²)/(2rd));
    # cos(theta) is uniform over a sphere, so that interval's length / 2 is the fraction (same both ways)
    d = 0.3
    low = (r * r + d * d - (r + tau) ** 2) / (2 * r * d)
    high = (r * r + d * d - (r - tau) ** 2) / (2 * r * d)
    fraction = (min(high, 1) - max(low, -1)) / 2
    f = metrics.fscore(sphere(r), sphere(r, (d, 0, 0)), tau=tau)
    assert f == pytest.approx(fraction, abs=0.02)  # = 2p·p/(p+p) = p
    assert 0.3 < f < 0.4
    # far apart: nothing within tau
    assert metrics.fscore(sphere(r), sphere(r, (2.0, 0, 0)), tau=tau) == 0.0


def test_scene_iou_is_the_mean_over_pairs_of_parts():
    a, b = cube(), cube((0.25, 0.0, 0.0))
    far = cube((3.0, 0.0, 0.0))
    ab = metrics.volume_iou(a, b)
    assert metrics.scene_iou([a, b]) == pytest.approx(ab)
    assert metrics.scene_iou([a, b, far]) == pytest.approx(ab / 3)  # pairs (a,b), (a,far), (b,far)
    assert metrics.scene_iou([a]) == 0.0


def test_compare_meshes_matches_the_single_metrics_and_the_seed_reproduces():
    a, b = sphere(0.5), sphere(0.55, (0.02, 0.0, 0.0))
    both = metrics.compare_meshes(a, b, seed=3)
    assert both.chamfer == metrics.chamfer_distance(a, b, seed=3)
    assert both.fscore == metrics.fscore(a, b, seed=3)
    assert both.iou == metrics.volume_iou(a, b)
    assert metrics.chamfer_distance(a, b, seed=4) != both.chamfer  # a different sampling ...
    assert metrics.chamfer_distance(a, b, seed=4) == pytest.approx(both.chamfer, abs=0.002)  # ... same value


def test_vertex_face_pairs_measure_like_trimesh_meshes():
    mesh = sphere(0.4)
    pair = (np.asarray(mesh.vertices, dtype=np.float32), np.asarray(mesh.faces, dtype=np.int32))
    # the same samples up to float32 rounding of the vertices
    from_trimesh = metrics.chamfer_distance(mesh, sphere(0.5))
    assert metrics.chamfer_distance(pair, sphere(0.5)) == pytest.approx(from_trimesh, abs=1e-6)
    assert metrics.volume_iou(pair, mesh) == 1.0


def test_points_give_the_closed_form_distances():
    a = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    b = np.array([[0.0, 0.5, 0]])
    # A→B: 0.5 and sqrt(1.25); B→A: 0.5
    assert metrics.chamfer_from_points(a, b) == pytest.approx((0.5 + math.sqrt(1.25)) / 2 + 0.5)
    # precision: 1 of 2 within 0.6; recall: 1 of 1 -> F = 2·0.5·1/1.5
    assert metrics.fscore_from_points(a, b, tau=0.6) == pytest.approx(2 / 3)


def test_bad_meshes_and_arguments_are_named():
    with pytest.raises(InputError, match="empty"):
        metrics.chamfer_distance((np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)), sphere(0.5))
    with pytest.raises(InputError, match="outside"):
        metrics.volume_iou((np.zeros((3, 3)), np.array([[0, 1, 3]])), sphere(0.5))
    with pytest.raises(InputError, match=r"\(V, 3\)"):
        metrics.sample_surface((np.zeros((3, 2)), np.array([[0, 1, 2]])))
    with pytest.raises(InputError, match="zero surface area"):
        metrics.sample_surface((np.zeros((3, 3)), np.array([[0, 1, 2]])))
    with pytest.raises(InputError, match="tau"):
        metrics.fscore(sphere(0.5), sphere(0.5), tau=0)
    with pytest.raises(InputError, match="pitch"):
        metrics.volume_iou(sphere(0.5), sphere(0.5), pitch=0)
    with pytest.raises(InputError, match="non-finite"):
        metrics.chamfer_from_points(np.array([[np.nan, 0, 0]]), np.zeros((1, 3)))
