"""Hierarchical mesh extraction: parity with the official extraction (fixture case d) and behaviour
on analytic fields.

Depths, bounds and query counts come from the `vae_decode` sidecar; the field is the tiny VAE
loaded with `ShapeVAE.from_pretrained`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity_utils import load_case, parity_dir  # noqa: E402

from com4d.errors import InputError  # noqa: E402
from com4d.meshing import (  # noqa: E402
    DEFAULT_BOUNDS,
    band_voxels,
    dense_field,
    extract_mesh,
    flip_winding,
    hierarchical_field,
    marching_cubes,
    write_glb,
)
from com4d.vae import ShapeVAE  # noqa: E402

# The fixture ran the official extraction in float32 on the CPU (README case d, sidecar mesh.function).
FIXTURE_BAND_DTYPE = torch.float32


@pytest.fixture(scope="module")
def case() -> tuple[dict, dict[str, torch.Tensor]]:
    return load_case("vae_decode")


@pytest.fixture(scope="module")
def field_fn(case):
    _, t = case
    vae = ShapeVAE.from_pretrained(parity_dir() / "weights" / "TripoSG")
    return vae.field_fn(t["latents"])


def mesh_args(side: dict) -> dict:
    p = side["params"]
    return {
        "bounds": tuple(p["bounds"]),
        "dense_depth": p["dense_octree_depth"],
        "final_depth": p["hierarchical_octree_depth"],
    }


def dense_name(side: dict) -> str:
    """Name of the dense-pass grid tensor; the fixture names it by its points per axis (2^depth)."""
    return f"mesh_dense{2 ** side['params']['dense_octree_depth']}_field"


def fine_name(side: dict) -> str:
    """Name of the grid handed to marching cubes (2^final_depth points per axis)."""
    return f"mesh_grid{2 ** side['params']['hierarchical_octree_depth']}_field"


def grid_tol(side: dict) -> dict:
    tol = side["suggested_tolerance"]
    return {"atol": tol["atol"], "rtol": tol["rtol"]}


def test_dense_pass_matches_official(case, field_fn):
    side, t = case
    args = mesh_args(side)
    dense = dense_field(field_fn, 2 ** args["dense_depth"], args["bounds"])
    assert dense.shape == tuple(side["tensors"][dense_name(side)]["shape"])
    torch.testing.assert_close(dense, t[dense_name(side)], **grid_tol(side))


def test_refined_grid_handed_to_marching_cubes_matches_official(case, field_fn):
    side, t = case
    grid, counts = hierarchical_field(field_fn, band_dtype=FIXTURE_BAND_DTYPE, **mesh_args(side))
    assert grid.shape == tuple(side["tensors"][fine_name(side)]["shape"])
    torch.testing.assert_close(grid, t[fine_name(side)], **grid_tol(side))
    geometry_pass = side["mesh"]["query_counts"][: len(counts)]
    assert counts == geometry_pass


def test_marching_cubes_maps_vertices_as_official(case):
    side, t = case
    args = mesh_args(side)
    vertices, faces = marching_cubes(t[fine_name(side)], args["bounds"], args["final_depth"])
    assert vertices.dtype == np.float32
    np.testing.assert_array_equal(faces, t["mesh_faces"].numpy())
    # The sidecar gives no vertex tolerance: this mesh comes from the official grid itself, so only the
    # float32 rounding of the index-to-position mapping can differ (a few ulps of coordinates near 1).
    np.testing.assert_allclose(vertices, t["mesh_vertices"].numpy(), rtol=0, atol=1e-6)


def test_extracted_mesh_matches_official_counts_faces_and_vertices(case, field_fn):
    side, t = case
    args = mesh_args(side)
    result = extract_mesh(field_fn, band_dtype=FIXTURE_BAND_DTYPE, **args)
    assert result.grid is None  # the fine grid is not kept unless asked for
    mesh = result.mesh
    assert isinstance(mesh, trimesh.Trimesh)
    expected = side["mesh"]["trimesh_processed_counts_stageA"]
    assert (len(mesh.vertices), len(mesh.faces)) == (expected["vertices"], expected["faces"])
    assert (result.stats["vertices"], result.stats["faces"]) == (expected["vertices"], expected["faces"])
    np.testing.assert_array_equal(mesh.faces, t["mesh_faces"].numpy())
    # A field error e moves a vertex by e / |field step| of a cell; allow 1e-3 of a cell.
    lo, hi = args["bounds"][0], args["bounds"][3]
    cell = (hi - lo) / 2 ** args["final_depth"]
    np.testing.assert_allclose(mesh.vertices, t["mesh_vertices"].numpy(), rtol=0, atol=1e-3 * cell)


def test_keep_grid_returns_the_marching_cubes_input(case, field_fn):
    side, t = case
    result = extract_mesh(field_fn, band_dtype=FIXTURE_BAND_DTYPE, keep_grid=True, **mesh_args(side))
    torch.testing.assert_close(result.grid, t[fine_name(side)], **grid_tol(side))


def test_fp16_band_keeps_only_unsaturated_logits():
    values = [0.0, 5.0, -5.0, 12.0, -12.0, 30.0, -30.0, 0.5, -0.5]
    grid = torch.zeros(3, 3, len(values) + 2)
    grid[1, 1, 1:-1] = torch.tensor(values)  # the only interior voxels
    def selected(dtype):
        v = band_voxels(grid, dtype)
        return set(grid[v[:, 0], v[:, 1], v[:, 2]].tolist())

    assert selected(torch.float32) == {0.0, 5.0, -5.0, 12.0, -12.0, 0.5, -0.5}  # fp32: nearly everything
    assert selected(torch.float16) == {0.0, 5.0, -5.0, 0.5, -0.5}  # fp16: |logit| below ~8-9 only


def sphere_field(radius: float, steepness: float):
    def field(points: torch.Tensor) -> torch.Tensor:
        return steepness * (radius - points.norm(dim=-1))  # positive inside

    return field


def test_refined_sphere_mesh_lies_on_the_sphere():
    radius, dense, final = 0.6, 4, 6
    mesh = extract_mesh(sphere_field(radius, 50.0), DEFAULT_BOUNDS, dense, final).mesh
    assert mesh.is_watertight
    # The official faces (as marching cubes returns them) wind inwards for a positive-inside field.
    assert mesh.volume < 0
    assert flip_winding(mesh).volume == pytest.approx(-mesh.volume)
    # Refined cells are queried at -h + i * 2h / 2^d, exactly where marching cubes maps index i.
    cell = 2 * DEFAULT_BOUNDS[3] / 2**final
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(r - radius).max() < 0.02 * cell


def test_unrefined_grid_shows_the_official_vertex_scale():
    """Without refinement the grid is linspace(lo, hi, N) but vertices are mapped with / N (not
    N - 1), as the official code does: the sphere appears scaled by (N-1)/N and centred at -h/N."""
    radius, depth = 0.6, 5
    mesh = extract_mesh(sphere_field(radius, 50.0), DEFAULT_BOUNDS, depth, depth).mesh
    n, h = 2**depth, DEFAULT_BOUNDS[3]
    r = np.linalg.norm(mesh.vertices - np.full(3, -h / n), axis=1)
    assert np.abs(r - radius * (n - 1) / n).max() < 0.02 * (2 * h / n)


def test_fp16_band_queries_fewer_points_than_fp32_on_a_steep_field():
    field = sphere_field(0.5, 200.0)
    wide = extract_mesh(field, DEFAULT_BOUNDS, 4, 5, band_dtype=torch.float32)
    narrow = extract_mesh(field, DEFAULT_BOUNDS, 4, 5, band_dtype=torch.float16)
    assert narrow.stats["query_counts"][1] < wide.stats["query_counts"][1]
    assert narrow.stats["query_counts"][0] == wide.stats["query_counts"][0] == 16**3
    assert len(narrow.mesh.faces) == len(wide.mesh.faces)  # same surface: the band covers it


def test_field_without_surface_gives_no_mesh():
    result = extract_mesh(lambda p: -torch.ones(p.shape[0]), DEFAULT_BOUNDS, 3, 4)
    assert result.mesh is None and result.stats["faces"] == 0


def test_off_centre_bounds_are_refused():
    with pytest.raises(InputError, match="centred"):
        extract_mesh(sphere_field(0.5, 1.0), (-1.0, -1.0, -1.0, 1.0, 1.0, 2.0), 3, 4)


def test_field_function_with_wrong_output_size_is_refused():
    with pytest.raises(ValueError, match="field function"):
        dense_field(lambda p: torch.zeros(p.shape[0] + 1), 4)


def test_nan_field_is_refused():
    with pytest.raises(InputError, match="NaN"):
        extract_mesh(lambda p: torch.full((p.shape[0],), float("nan")), DEFAULT_BOUNDS, 3, 3)


def test_glb_round_trip_keeps_vertices_as_they_are(tmp_path):
    mesh = extract_mesh(sphere_field(0.4, 20.0), DEFAULT_BOUNDS, 3, 5).mesh
    path = write_glb(mesh, tmp_path / "out" / "sphere.glb")
    assert path.read_bytes()[:4] == b"glTF"
    loaded = trimesh.load(path, force="mesh")
    assert len(loaded.faces) == len(mesh.faces)
    np.testing.assert_allclose(np.sort(loaded.vertices, axis=0), np.sort(mesh.vertices, axis=0), atol=1e-6)
    assert not list(path.parent.glob("*.tmp"))
