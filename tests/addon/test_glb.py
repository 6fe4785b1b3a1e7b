"""The add-on's GLB reader reads what trimesh (the library's writer) writes, and rejects the rest clearly."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import trimesh
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def glb(addon):
    return addon.glb


def random_mesh(seed: int, vertices: int, faces: int) -> trimesh.Trimesh:
    rng = np.random.default_rng(seed)
    v = rng.uniform(-1, 1, (vertices, 3)).astype(np.float32)
    f = rng.integers(0, vertices, (faces, 3)).astype(np.int64)
    return trimesh.Trimesh(v, f, process=False)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), vertices=st.integers(3, 300), faces=st.integers(1, 400))
def test_reads_back_vertices_and_faces_trimesh_wrote(glb, seed, vertices, faces):
    mesh = random_mesh(seed, vertices, faces)

    read = glb.parse_glb(mesh.export(file_type="glb"))

    assert read.vertices.dtype == np.float32 and read.faces.dtype == np.int32
    np.testing.assert_allclose(read.vertices, mesh.vertices, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(read.faces, mesh.faces)


def test_applies_node_transforms_and_merges_meshes(glb, tmp_path):
    a = random_mesh(1, 10, 8)
    b = random_mesh(2, 12, 9)
    transform = trimesh.transformations.compose_matrix(
        scale=[2, 2, 2], angles=[0.3, -0.2, 1.0], translate=[0.5, -1.0, 2.0]
    )
    scene = trimesh.Scene()
    scene.add_geometry(a, node_name="a")
    scene.add_geometry(b, node_name="b", transform=transform)
    path = tmp_path / "scene.glb"
    path.write_bytes(scene.export(file_type="glb"))

    read = glb.read_glb(path)

    expected = trimesh.util.concatenate(scene.dump())
    assert len(read.vertices) == len(expected.vertices) and len(read.faces) == len(expected.faces)
    # the same set of triangles, in whatever order the nodes come
    got = np.sort(np.round(read.vertices[read.faces].reshape(-1, 9), 4), axis=0)
    want = np.sort(np.round(expected.vertices[expected.faces].reshape(-1, 9), 4), axis=0)
    np.testing.assert_allclose(got, want, atol=2e-4)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"not a glb at all, just text", "does not start with 'glTF'"),
        (b"glTF" + struct.pack("<II", 1, 20) + b"\0" * 8, "version 1"),
        (b"glTF" + struct.pack("<II", 2, 999) + b"\0" * 8, "truncated"),
        (b"short", "too short"),
    ],
)
def test_rejects_files_that_are_not_glb_with_a_clear_message(glb, data, message):
    with pytest.raises(glb.GlbError, match=message):
        glb.parse_glb(data, name="x.glb")


def test_rejects_indices_outside_the_vertices(glb):
    data = bytearray(random_mesh(3, 4, 2).export(file_type="glb"))
    json_length = struct.unpack_from("<I", data, 12)[0]
    binary_start = 20 + json_length + 8
    # trimesh writes the indices first: make the first one point far outside the 4 vertices
    struct.pack_into("<I", data, binary_start, 1000)

    with pytest.raises(glb.GlbError, match="outside its 4 vertices"):
        glb.parse_glb(bytes(data), name="bad.glb")


def test_missing_file_names_the_file(glb, tmp_path):
    with pytest.raises(glb.GlbError, match="missing.glb"):
        glb.read_glb(tmp_path / "missing.glb")
