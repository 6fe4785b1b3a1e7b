"""Tracks in a real movie clip become the right prompts: source pixels (origin top-left) on source frames."""

from __future__ import annotations

import bpy
import numpy as np
import pytest


def same_prompts(actual: list[dict], expected: list[dict]) -> bool:
    """Frames equal, points equal up to the float32 precision Blender stores markers in."""
    if [p["frame"] for p in actual] != [p["frame"] for p in expected]:
        return False
    return all(
        np.allclose(np.asarray(a["points"], float), np.asarray(e["points"], float), atol=1e-4)
        and np.asarray(a["points"]).shape == np.asarray(e["points"]).shape
        for a, e in zip(actual, expected)
    )


def add_track(tracking_object, name, markers, muted=()):
    """A track with markers {clip_frame: (u, v)} in Blender's normalised coordinates."""
    frames = sorted(markers)
    track = tracking_object.tracks.new(name=name, frame=frames[0])
    track.markers.find_frame(frames[0]).co = markers[frames[0]]
    for frame in frames[1:]:
        track.markers.insert_frame(frame, co=markers[frame])
    for frame in muted:
        track.markers.find_frame(frame).mute = True
    return track


def test_tracking_object_markers_become_point_prompts_in_source_pixels(addon, clip):
    dog = clip.tracking.objects.new("dog")
    add_track(dog, "nose", {1: (0.25, 0.75), 3: (0.5, 0.5), 5: (0.75, 0.25)}, muted=[5])
    add_track(dog, "tail", {3: (0.1, 0.9)})
    clip.com4d.frame_stride = 1
    assert bpy.ops.com4d.object_add(clip_name=clip.name, tracking_object="dog", role="dynamic") == {
        "FINISHED"
    }

    document = addon.clip_input.clip_prompts(clip)

    width, height = 160, 120
    assert document["version"] == 1
    (dog_prompts,) = document["objects"]
    assert dog_prompts["name"] == "dog" and dog_prompts["role"] == "dynamic"
    # clip frame 1 is video frame 0; y flips (marker origin bottom-left, pixels top-left);
    # the muted marker on clip frame 5 is dropped
    assert same_prompts(
        dog_prompts["prompts"],
        [
            {"frame": 0, "points": [[0.25 * width, 0.25 * height, 1]]},
            {"frame": 2, "points": [[0.5 * width, 0.5 * height, 1], [0.1 * width, (1 - 0.9) * height, 1]]},
        ],
    )


def test_tracked_markers_give_prompts_on_every_reconstructed_frame(addon, clip):
    car = clip.tracking.objects.new("car")
    add_track(car, "wheel", {f: (0.1 + 0.05 * f, 0.5) for f in range(1, 13)})
    clip.com4d.frame_stride = 3
    bpy.ops.com4d.object_add(clip_name=clip.name, tracking_object="car")

    (car_prompts,) = addon.clip_input.clip_prompts(clip)["objects"]

    assert addon.clip_input.clip_frames(clip) == [0, 3, 6, 9]
    assert [p["frame"] for p in car_prompts["prompts"]] == [0, 3, 6, 9]
    assert same_prompts(
        car_prompts["prompts"][1:2], [{"frame": 3, "points": [[(0.1 + 0.05 * 4) * 160, 60, 1]]}]
    )


def test_selected_tracks_form_one_object_and_marked_tracks_are_negative(addon, clip):
    camera = clip.tracking.objects["Camera"]
    on = add_track(camera, "on_chair", {1: (0.5, 0.5)})
    also_on = add_track(camera, "chair_leg", {1: (0.5, 0.2)})
    off = add_track(camera, "wall", {1: (0.9, 0.9)})
    for track in camera.tracks:
        track.select = False
    on.select = also_on.select = True
    clip.com4d.frame_stride = 1
    assert bpy.ops.com4d.object_add_tracks(clip_name=clip.name, name="chair", role="static") == {"FINISHED"}
    on.select = also_on.select = False
    off.select = True
    space_free = bpy.context.copy()
    space_free["edit_movieclip"] = clip
    with bpy.context.temp_override(**space_free):
        assert bpy.ops.com4d.object_mark_negative() == {"FINISHED"}

    (chair,) = addon.clip_input.clip_prompts(clip)["objects"]

    assert chair["role"] == "static"
    assert same_prompts(chair["prompts"], [{"frame": 0, "points": [[80, 60, 1], [80, 96, 1], [144, 12, 0]]}])


def test_frames_before_the_first_positive_marker_are_dropped(addon, clip):
    ball = clip.tracking.objects.new("ball")
    add_track(ball, "ball", {3: (0.5, 0.5)})
    add_track(ball, "floor", {1: (0.5, 0.1), 3: (0.5, 0.1)})
    clip.com4d.frame_stride = 1
    bpy.ops.com4d.object_add(clip_name=clip.name, tracking_object="ball")
    item = clip.com4d.objects[0]
    ref = item.tracks.add()
    ref.name, ref.positive = "floor", False

    (ball_prompts,) = addon.clip_input.clip_prompts(clip)["objects"]

    assert same_prompts(ball_prompts["prompts"], [{"frame": 2, "points": [[80, 60, 1], [80, 108, 0]]}])


def test_clip_frame_offset_shifts_marker_frames_to_source_frames(addon, clip):
    box = clip.tracking.objects.new("box")
    add_track(box, "corner", {1: (0.5, 0.5)})
    clip.frame_offset = 2
    clip.frame_start = 40  # where the clip sits on the timeline does not change source frames
    clip.com4d.frame_stride = 1
    bpy.ops.com4d.object_add(clip_name=clip.name, tracking_object="box")

    (box_prompts,) = addon.clip_input.clip_prompts(clip)["objects"]

    assert box_prompts["prompts"][0]["frame"] == 2


def test_frame_range_limits_frames_and_prompts(addon, clip):
    toy = clip.tracking.objects.new("toy")
    add_track(toy, "toy", {f: (0.5, 0.5) for f in range(1, 13)})
    settings = clip.com4d
    settings.use_clip_range = False
    settings.frame_first, settings.frame_last, settings.frame_stride = 3, 9, 2
    bpy.ops.com4d.object_add(clip_name=clip.name, tracking_object="toy")

    assert addon.clip_input.clip_frames(clip) == [2, 4, 6, 8]
    (toy_prompts,) = addon.clip_input.clip_prompts(clip)["objects"]
    assert [p["frame"] for p in toy_prompts["prompts"]] == [2, 4, 6, 8]


@pytest.mark.parametrize(
    "setup, message",
    [
        ("no_objects", "no object to reconstruct"),
        ("no_tracks", "has no tracks"),
        ("off_stride", "no positive marker on the frames being reconstructed"),
        ("outside_range", "no positive marker on the frames being reconstructed"),
        ("missing_tracking_object", "has no tracking object 'gone'"),
    ],
)
def test_unusable_tracking_gives_an_error_naming_the_problem(addon, clip, setup, message):
    tracked = clip.tracking.objects.new("thing")
    clip.com4d.frame_stride = 2
    if setup != "no_objects":
        bpy.ops.com4d.object_add(clip_name=clip.name, tracking_object="thing")
    if setup == "off_stride":
        add_track(tracked, "t", {2: (0.5, 0.5)})  # video frame 1: not among 0, 2, 4, ...
    if setup == "outside_range":
        clip.com4d.use_clip_range = False
        clip.com4d.frame_first, clip.com4d.frame_last = 3, 12
        add_track(tracked, "t", {1: (0.5, 0.5)})  # clip frame 1 comes before the range
    if setup == "missing_tracking_object":
        add_track(tracked, "t", {1: (0.5, 0.5)})
        clip.com4d.objects[0].tracking_object = "gone"

    with pytest.raises(addon.tracking_prompts.PromptError, match=message):
        addon.clip_input.clip_prompts(clip)
