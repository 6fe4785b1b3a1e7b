"""A `com4d reconstruct` output folder (written by the library's own SceneWriter) imports into the
right collections, objects, keyframes and timeline frames."""

from __future__ import annotations

import json
import shutil
import warnings

import bpy
import numpy as np
import pytest

from .library_outputs import FRAMES, garden_cat_vertices, grid_mesh

CLIP_START = 10  # the clip sits at timeline frame 10: source frame f shows at 10 + f


@pytest.fixture
def output_folder(library, tmp_path):
    """A complete reconstruction: a static table, a per-frame dog, a tracked cat (a copy to change)."""
    out = tmp_path / "out"
    shutil.copytree(library / "garden", out)
    return out, garden_cat_vertices()


def z_up(vertices):
    vertices = np.asarray(vertices)
    return np.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], axis=1)


def mesh_positions(obj, evaluated: bool = False) -> np.ndarray:
    if evaluated:
        depsgraph = bpy.context.evaluated_depsgraph_get()
        mesh = obj.evaluated_get(depsgraph).to_mesh()
    else:
        mesh = obj.data
    out = np.empty(len(mesh.vertices) * 3, np.float32)
    mesh.vertices.foreach_get("co", out)
    return out.reshape(-1, 3)


def shown(obj) -> bool:
    return not obj.hide_viewport and not obj.hide_render


def test_import_builds_collections_under_one_parent(scene, output_folder):
    out, _ = output_folder

    assert bpy.ops.com4d.import_folder(directory=str(out), clip_frame_start=CLIP_START) == {"FINISHED"}

    (root,) = scene.collection.children
    assert root.name == "COM4D garden"
    assert sorted(c.name for c in root.children) == ["Dynamic", "Static"]
    static, dynamic = root.children["Static"], root.children["Dynamic"]
    assert [o.name for o in static.objects] == ["table"]
    assert [o.name for o in dynamic.objects] == ["cat"]
    assert [c.name for c in dynamic.children] == ["dog"]
    assert sorted(o.name for o in dynamic.children["dog"].objects) == [
        "dog_f000000",
        "dog_f000002",
        "dog_f000004",
    ]
    (empty,) = [o for o in root.objects if o.type == "EMPTY"]
    meshes = [o for o in bpy.data.objects if o.type == "MESH"]
    assert len(meshes) == 5 and all(o.parent == empty for o in meshes)

    empty.location = (1.0, 2.0, 3.0)
    empty.scale = (2.0, 2.0, 2.0)
    bpy.context.view_layer.update()
    table = bpy.data.objects["table"]
    world = np.array([table.matrix_world @ v.co for v in table.data.vertices])
    np.testing.assert_allclose(world, mesh_positions(table) * 2 + [1, 2, 3], atol=1e-5)


def test_static_mesh_is_the_written_mesh_turned_z_up_with_its_colour(scene, output_folder):
    out, _ = output_folder
    bpy.ops.com4d.import_folder(directory=str(out), clip_frame_start=CLIP_START)
    table = bpy.data.objects["table"]
    vertices, faces = grid_mesh(1)
    manifest = json.loads((out / "scene.json").read_text())

    np.testing.assert_allclose(mesh_positions(table), z_up(vertices), atol=1e-6)
    assert [tuple(p.vertices) for p in table.data.polygons] == [tuple(f) for f in faces]
    table_colour = next(o["color"] for o in manifest["objects"] if o["name"] == "table")
    np.testing.assert_allclose(table.color[:3], table_colour, atol=1e-6)
    np.testing.assert_allclose(table.active_material.diffuse_color[:3], table_colour, atol=1e-6)


def test_materials_get_the_object_colour_through_nodes_without_deprecated_api(scene, output_folder):
    out, _ = output_folder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bpy.ops.com4d.import_folder(directory=str(out), clip_frame_start=CLIP_START)

    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []
    table = bpy.data.objects["table"]
    bsdf = table.active_material.node_tree.nodes["Principled BSDF"]
    np.testing.assert_allclose(bsdf.inputs["Base Color"].default_value[:3], table.color[:3], atol=1e-6)
    assert table.active_material.node_tree.nodes["Material Output"].inputs["Surface"].is_linked


@pytest.mark.parametrize(
    "scene_frame, visible",
    [(9, None), (10, 0), (11, 0), (12, 2), (13, 2), (14, 4), (15, 4), (16, None)],
)
def test_per_frame_objects_show_from_their_frame_until_the_next(scene, output_folder, scene_frame, visible):
    out, _ = output_folder
    bpy.ops.com4d.import_folder(directory=str(out), clip_frame_start=CLIP_START)

    scene.frame_set(scene_frame)

    showing = [f for f in FRAMES if shown(bpy.data.objects[f"dog_f{f:06d}"])]
    assert showing == ([] if visible is None else [visible])


def test_tracked_object_has_a_shape_key_per_frame_keyed_on_its_timeline_frame(scene, output_folder):
    out, cat_vertices = output_folder
    bpy.ops.com4d.import_folder(directory=str(out), clip_frame_start=CLIP_START)
    cat = bpy.data.objects["cat"]

    names = [k.name for k in cat.data.shape_keys.key_blocks]
    assert names == ["Basis", "frame_000000", "frame_000002", "frame_000004"]
    for k, frame in enumerate(FRAMES):
        scene.frame_set(CLIP_START + frame)
        values = [b.value for b in cat.data.shape_keys.key_blocks[1:]]
        assert values == [1.0 if j == k else 0.0 for j in range(len(FRAMES))]
        np.testing.assert_allclose(mesh_positions(cat, evaluated=True), z_up(cat_vertices[k]), atol=1e-5)
    scene.frame_set(CLIP_START + 1)  # between two keys: halfway between their shapes
    halfway = (z_up(cat_vertices[0]) + z_up(cat_vertices[1])) / 2
    np.testing.assert_allclose(mesh_positions(cat, evaluated=True), halfway, atol=1e-5)


def test_incomplete_run_and_missing_meshes_import_the_rest_with_warnings(addon, scene, output_folder):
    out, _ = output_folder
    manifest = json.loads((out / "scene.json").read_text())
    manifest["status"] = "cancelled"
    (out / "scene.json").write_text(json.dumps(manifest))
    (out / "dynamic" / "dog" / "frame_000002.glb").unlink()

    result = addon.scene_folder.import_folder(out, scene, clip_frame_start=CLIP_START)

    assert any("'cancelled'" in w for w in result.warnings)
    assert any("frame_000002.glb is missing" in w for w in result.warnings)
    assert result.meshes == 4
    assert "dog_f000002" not in bpy.data.objects and "dog_f000004" in bpy.data.objects


def test_a_folder_without_scene_json_is_refused_by_name(addon, scene, tmp_path):
    with pytest.raises(addon.scene_folder.SceneFolderError, match="has no scene.json"):
        addon.scene_folder.import_folder(tmp_path, scene)
    (tmp_path / "scene.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(addon.scene_folder.SceneFolderError, match="not a COM4D scene"):
        addon.scene_folder.import_folder(tmp_path, scene)
    with pytest.raises(RuntimeError, match="not a COM4D scene"):  # the operator's error report
        bpy.ops.com4d.import_folder(directory=str(tmp_path))
    assert len(bpy.data.objects) == 0


def test_a_result_that_arrives_twice_replaces_the_first(addon, scene):
    builder = addon.scene_builder.ReconstructionBuilder(scene, "COM4D replay", clip_frame_start=1)
    first, faces = grid_mesh(1)
    builder.add_frame_mesh("dog", 3, first, faces)
    builder.add_frame_mesh("dog", 3, first + 1.0, faces)
    builder.add_static("table", first, faces)
    builder.add_static("table", first + 2.0, faces)

    assert sorted(o.name for o in bpy.data.objects if o.type == "MESH") == ["dog_f000003", "table"]
    np.testing.assert_allclose(mesh_positions(bpy.data.objects["table"]), z_up(first + 2.0), atol=1e-6)
    assert len(bpy.data.meshes) == 2  # the replaced meshes are gone


def test_tracked_object_gives_way_to_per_frame_meshes_where_tracking_fell_back(scene, library):
    out = library / "fallback_cat"  # per-frame meshes on every frame, tracking fell back on frame 2
    assert bpy.ops.com4d.import_folder(directory=str(out), clip_frame_start=CLIP_START) == {"FINISHED"}

    assert sorted(o.name for o in bpy.data.objects if o.type == "MESH") == ["cat", "cat_f000002"]
    cat, fallback = bpy.data.objects["cat"], bpy.data.objects["cat_f000002"]
    for scene_frame, cat_shown in [
        (9, False),
        (10, True),
        (11, True),
        (12, False),
        (13, False),
        (14, True),
        (15, True),
        (16, False),
    ]:
        scene.frame_set(scene_frame)
        assert shown(cat) == cat_shown, scene_frame
        assert shown(fallback) == (scene_frame in (12, 13)), scene_frame
