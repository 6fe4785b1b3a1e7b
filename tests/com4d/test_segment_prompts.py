"""prompts.json parsing and checking (docs/contracts.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from com4d.errors import InputError
from com4d.segment.prompts import load_prompts, parse_prompts

CONTRACT_EXAMPLE = {
    "version": 1,
    "objects": [
        {"name": "dog", "role": "dynamic",
         "prompts": [{"frame": 0, "points": [[120.5, 88.0, 1], [30, 40, 0]], "box": [100, 60, 180, 140]}]},
        {"name": "table", "role": "static",
         "prompts": [{"frame": 0, "points": [[300, 200, 1]]}]},
    ],
}


def obj(name="dog", role="dynamic", prompts=None):
    return {"name": name, "role": role, "prompts": prompts or [{"frame": 0, "points": [[5, 5, 1]]}]}


def test_contract_example_parses_into_objects_points_and_boxes():
    p = parse_prompts(CONTRACT_EXAMPLE)
    assert p.names == ["dog", "table"]
    dog = p.object("dog")
    assert dog.role == "dynamic" and [o.name for o in p.static] == ["table"]
    fp = dog.prompt_at(0)
    np.testing.assert_allclose(fp.point_coords(), [[120.5, 88.0], [30, 40]])
    np.testing.assert_array_equal(fp.point_labels(), [1, 0])
    np.testing.assert_allclose(fp.box_array(), [100, 60, 180, 140])
    assert fp.has_positive and dog.first_frame == 0 and dog.prompt_at(3) is None


def test_load_prompts_reads_a_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(CONTRACT_EXAMPLE))
    assert load_prompts(path).names == ["dog", "table"]


def test_duplicate_names_get_blender_style_suffixes():
    p = parse_prompts({"version": 1, "objects": [obj("cup"), obj("cup"), obj("cup.001"), obj("cup")]})
    assert p.names == ["cup", "cup.001", "cup.001.001", "cup.002"]


def test_prompts_on_one_frame_are_merged_and_sorted_by_frame():
    p = parse_prompts({"version": 1, "objects": [obj(prompts=[
        {"frame": 7, "points": [[1, 1, 0]]},
        {"frame": 2, "points": [[3, 3, 1]]},
        {"frame": 7, "box": [0, 0, 4, 4]},
    ])]})
    dog = p.object("dog")
    assert [fp.frame for fp in dog.prompts] == [2, 7]
    assert dog.prompt_at(7).box == (0, 0, 4, 4) and dog.prompt_at(7).labels == (0,)


def test_a_box_alone_is_enough():
    p = parse_prompts({"objects": [obj(prompts=[{"frame": 0, "box": [1, 2, 3, 4]}])]})
    assert p.object("dog").prompts[0].has_positive


@pytest.mark.parametrize(
    "data,message",
    [
        ([], "must be a JSON object"),
        ({"version": 2, "objects": [obj()]}, "unsupported prompts version 2"),
        ({"version": 1}, "non-empty 'objects'"),
        ({"objects": [obj(name="")]}, r"objects\[0\] needs a non-empty 'name'"),
        ({"objects": [obj(role="moving")]}, "role must be 'static' or 'dynamic'"),
        ({"objects": [{"name": "a", "role": "static", "prompts": []}]}, "'a' has no prompts"),
        ({"objects": [{"name": "a", "role": "static", "prompt": []}]}, r"unknown field\(s\) \['prompt'\]"),
        ({"objects": [obj(prompts=[{"frame": 0, "points": [[1, 1, 0]]}])]},
         "first prompt .frame 0. has no positive point and no box"),
        ({"objects": [obj(prompts=[{"frame": -1, "points": [[1, 1, 1]]}])]},
         "'frame' must be a frame number"),
        ({"objects": [obj(prompts=[{"frame": 0}])]}, "needs 'points' or a 'box'"),
        ({"objects": [obj(prompts=[{"frame": 0, "points": [[1, 1]]}])]}, r"must be \[x, y, label\]"),
        ({"objects": [obj(prompts=[{"frame": 0, "points": [[1, 1, 2]]}])]}, "label must be 1"),
        ({"objects": [obj(prompts=[{"frame": 0, "points": [[float("nan"), 1, 1]]}])]}, "finite numbers"),
        ({"objects": [obj(prompts=[{"frame": 0, "box": [5, 5, 2, 9]}])]}, "box .* is empty"),
        ({"objects": [obj(prompts=[{"frame": 0, "box": [0, 0, 2, 2]}, {"frame": 0, "box": [0, 0, 3, 3]}])]},
         "two boxes on the same frame"),
        ({"objects": [obj(f"d{i}") for i in range(11)]},
         "11 dynamic objects given; the model takes at most 10"),
    ],
)
def test_bad_prompts_are_refused_with_a_message_naming_the_problem(data, message):
    with pytest.raises(InputError, match=message):
        parse_prompts(data)


def test_bad_prompts_file_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="prompts file not found"):
        load_prompts(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json is not valid JSON"):
        load_prompts(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"objects": [obj(role="x")]}))
    with pytest.raises(InputError, match="wrong.json: object 'dog': role"):
        load_prompts(wrong)


def test_unknown_object_lists_the_known_ones():
    p = parse_prompts(CONTRACT_EXAMPLE)
    with pytest.raises(InputError, match="unknown object 'cat'; the prompts define 'dog', 'table'"):
        p.object("cat")


@pytest.mark.parametrize(
    "prompt,message",
    [
        ({"frame": 0, "points": [[640.5, 10, 1]]}, r"point \(640.5, 10\) lies outside the 640x480 frame"),
        ({"frame": 0, "points": [[10, -1, 1]]}, "lies outside"),
        ({"frame": 0, "box": [700, 10, 800, 50]}, "box .* lies outside the 640x480 frame"),
        ({"frame": 3, "points": [[10, 10, 1]]}, "frame 3: the prompt is on a frame that is not in the clip"),
        ({"frame": 100, "points": [[10, 10, 1]]}, "not in the clip .frames read: 0, 2, 4, 6."),
    ],
)
def test_prompts_outside_the_clip_are_refused(prompt, message):
    p = parse_prompts({"objects": [obj(prompts=[prompt])]})
    with pytest.raises(InputError, match=message):
        p.check_against_clip(640, 480, [0, 2, 4, 6])


def test_prompts_on_the_frame_edges_are_accepted():
    p = parse_prompts({"objects": [obj(prompts=[{"frame": 6, "points": [[0, 0, 1], [640, 480, 0]],
                                                   "box": [-5, -5, 700, 500]}])]})
    p.check_against_clip(640, 480, [0, 2, 4, 6])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1000) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["version", "objects", "name", "role", "prompts", "frame", "points", "box", "x"]),
        children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_either_parses_or_raises_input_error(data):
    try:
        parsed = parse_prompts(data)
    except InputError:
        return
    assert len(set(parsed.names)) == len(parsed.names)
    for o in parsed.objects:
        assert o.name.strip() and o.role in ("static", "dynamic")
        assert o.prompts[0].has_positive
        frames = [fp.frame for fp in o.prompts]
        assert frames == sorted(set(frames))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-50, 700), st.floats(-50, 500), st.sampled_from([0, 1])), min_size=1, max_size=5
    ),
    st.integers(0, 10),
)
def test_check_against_clip_accepts_exactly_the_points_inside_the_frame(points, frame):
    data = {"objects": [obj(prompts=[{"frame": frame, "points": [[x, y, 1] for x, y, _ in points]}])]}
    p = parse_prompts(data)
    inside = all(0 <= x <= 640 and 0 <= y <= 480 for x, y, _ in points) and frame in (0, 2, 4, 6)
    if inside:
        p.check_against_clip(640, 480, [0, 2, 4, 6])
    else:
        with pytest.raises(InputError):
            p.check_against_clip(640, 480, [0, 2, 4, 6])
