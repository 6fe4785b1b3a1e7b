"""Object names stay distinct on disk after sanitising: 'a/b' and 'a?b' both clean to 'a_b', and
before this each object's GLB overwrote the other's (issue 12)."""

from __future__ import annotations

import json

import numpy as np

from com4d.plan import file_stems
from com4d.scene import SceneWriter

TRIANGLE = (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32), np.array([[0, 1, 2]], np.int32))


def test_names_that_sanitise_alike_get_distinct_stems():
    assert file_stems(["a/b", "a?b", "a_b", "A_B", "chair"]) == ["a_b", "a_b_2", "a_b_3", "A_B_4", "chair"]


def test_two_static_objects_that_sanitise_alike_keep_both_meshes(tmp_path):
    writer = SceneWriter(tmp_path, ["a/b", "a?b"], ["x:y", "x*y"], [0], 0, {}, {})
    first = writer.add_static(0, *TRIANGLE)
    second = writer.add_static(1, TRIANGLE[0] * 2, TRIANGLE[1])
    frames = [writer.add_dynamic_frame(k, 0, *TRIANGLE) for k in (0, 1)]
    assert first != second and frames[0] != frames[1]
    assert (tmp_path / first).is_file() and (tmp_path / second).is_file()
    manifest = json.loads((tmp_path / "scene.json").read_text())
    meshes = {o["name"]: o.get("mesh") or o["frames"][0]["mesh"] for o in manifest["objects"]}
    assert meshes == {"a/b": first, "a?b": second, "x:y": frames[0], "x*y": frames[1]}
