"""Tracking objects through a clip: moving shapes with known masks, SAM replaced by an oracle that
answers from those shapes (a test double of SAM only; the tracking code is the real one)."""

from __future__ import annotations

import numpy as np
import pytest

from com4d.errors import Cancelled, InputError
from com4d.events import CancelToken
from com4d.segment.prompts import parse_prompts
from com4d.segment.propagate import TrackingConfig, describe_lost, track_objects


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def click(name, x, y, frame=0, role="dynamic", extra=None):
    prompts = [{"frame": frame, "points": [[x, y, 1]]}] + (extra or [])
    return {"name": name, "role": role, "prompts": prompts}


def run(clip, oracle_cls, objects, config=None, **kwargs):
    oracle = oracle_cls(clip.frames, clip.truth)
    prompts = parse_prompts({"version": 1, "objects": objects})
    config = config or TrackingConfig()
    result = track_objects(oracle, clip.frames, clip.frame_numbers, prompts, config, **kwargs)
    return result, oracle


def assert_follows_truth(result, clip, name, frames=None, min_iou=0.95):
    track = result.track(name)
    for t in frames if frames is not None else clip.frame_numbers:
        got = track.get(t)
        assert got is not None and got.shape == (clip.height, clip.width)
        score = iou(got, clip.truth[name][t])
        assert score >= min_iou, f"{name} frame {t}: IoU {score:.3f}"


def test_two_moving_objects_are_followed_from_one_click_each(seg_make_clip, seg_shape, seg_oracle):
    clip = seg_make_clip([
        seg_shape("ball", "disc", 8, (200, 40, 40), lambda t: (14 + 4 * t, 20 + t)),
        seg_shape("crate", "square", 7, (40, 90, 200), lambda t: (80 - 3 * t, 46)),
    ], n_frames=12)
    result, oracle = run(clip, seg_oracle, [click("ball", 14, 20), click("crate", 80, 46, role="static")])
    assert_follows_truth(result, clip, "ball")
    assert_follows_truth(result, clip, "crate")
    assert result.lost == {}
    # One image embedding per frame, shared by both objects.
    assert oracle.set_image_calls == 12 and oracle.predict_calls == 24
    assert result.steps == 12


def test_crossing_objects_keep_their_identities(seg_make_clip, seg_shape, seg_oracle):
    # The square passes fast in front of the disc, hiding up to 63 % of it, so the click carried
    # over from the disc's last mask would land on the square if taken naively.
    clip = seg_make_clip([
        seg_shape("disc", "disc", 10, (30, 160, 60), lambda t: (70 - 2 * t, 30)),
        seg_shape("square", "square", 8, (180, 60, 160), lambda t: (10 + 7 * t, 33)),
    ], n_frames=13)
    visible = [clip.truth["disc"][t].sum() / clip.truth["disc"][0].sum() for t in range(13)]
    assert min(visible) < 0.4, "the clip must contain a strong occlusion"
    result, _ = run(clip, seg_oracle, [click("disc", 70, 30), click("square", 10, 33)])
    assert result.lost == {}
    assert_follows_truth(result, clip, "disc", min_iou=0.9)
    assert_follows_truth(result, clip, "square", min_iou=0.9)
    for t in clip.frame_numbers:
        assert iou(result.track("disc").get(t), clip.truth["square"][t]) < 0.1
        assert not (result.track("disc").get(t) & result.track("square").get(t)).any()


def test_object_that_disappears_is_reported_lost_with_its_frames(seg_make_clip, seg_shape, seg_oracle):
    clip = seg_make_clip([
        seg_shape("ghost", "disc", 8, (90, 90, 90), lambda t: (30 + 2 * t, 30) if t < 5 else None),
        seg_shape("rock", "square", 6, (120, 70, 20), lambda t: (75, 40)),
    ], n_frames=9)
    result, _ = run(clip, seg_oracle, [click("ghost", 30, 30), click("rock", 75, 40)])
    assert list(result.lost) == ["ghost"]
    assert [lf.frame for lf in result.lost["ghost"]] == [5, 6, 7, 8]
    assert {lf.reason for lf in result.lost["ghost"]} == {"empty"}
    assert_follows_truth(result, clip, "ghost", frames=range(5))
    for t in range(5, 9):
        assert not result.track("ghost").get(t).any()  # lost frames stay empty, never garbage
    assert_follows_truth(result, clip, "rock")
    assert describe_lost(result.lost, clip.frame_numbers) == "'ghost' lost on frame(s) 5-8 (empty)"


def test_object_that_comes_back_is_picked_up_again(seg_make_clip, seg_shape, seg_oracle):
    clip = seg_make_clip([
        seg_shape("blinker", "disc", 9, (200, 150, 0), lambda t: None if t in (3, 4) else (40, 32)),
    ], n_frames=8)
    result, _ = run(clip, seg_oracle, [click("blinker", 40, 32)])
    assert [lf.frame for lf in result.lost["blinker"]] == [3, 4]
    assert_follows_truth(result, clip, "blinker", frames=[0, 1, 2, 5, 6, 7])


def test_a_sudden_jump_in_size_is_reported_not_kept(seg_make_clip, seg_shape, seg_oracle):
    clip = seg_make_clip([
        seg_shape("balloon", "disc", 5, (220, 30, 30), lambda t: (48, 32),
                  radius_at=lambda t: 5 if t < 4 else 16),
    ], n_frames=6)
    result, _ = run(clip, seg_oracle, [click("balloon", 48, 32)])
    assert [(lf.frame, lf.reason) for lf in result.lost["balloon"]] == [(4, "jump"), (5, "jump")]
    assert "area changed" in result.lost["balloon"][0].detail


def test_a_teleport_is_lost_unless_the_user_clicks_the_new_place(seg_make_clip, seg_shape, seg_oracle):
    clip = seg_make_clip([
        seg_shape("puck", "square", 6, (0, 0, 0), lambda t: (20 + t, 20) if t < 5 else (75 + t, 45)),
    ], n_frames=9)
    result, _ = run(clip, seg_oracle, [click("puck", 20, 20)])
    assert [lf.frame for lf in result.lost["puck"]] == [5, 6, 7, 8]

    corrected = click("puck", 20, 20, extra=[{"frame": 5, "points": [[80, 45, 1]]}])
    result, _ = run(clip, seg_oracle, [corrected])
    assert result.lost == {}
    assert_follows_truth(result, clip, "puck")


def test_user_box_on_a_later_frame_takes_over_from_propagation(seg_make_clip, seg_shape, seg_oracle):
    # Two identical squares; after frame 3 the user says "from here on, the right one".
    clip = seg_make_clip([
        seg_shape("left", "square", 6, (50, 50, 50), lambda t: (25, 32)),
        seg_shape("right", "square", 6, (50, 50, 50), lambda t: (70, 32)),
    ], n_frames=6)
    target = {"name": "target", "role": "dynamic", "prompts": [
        {"frame": 0, "points": [[25, 32, 1]]}, {"frame": 3, "box": [62, 24, 78, 40]}]}
    oracle = seg_oracle(clip.frames, {"left": clip.truth["left"], "right": clip.truth["right"]})
    result = track_objects(oracle, clip.frames, clip.frame_numbers, parse_prompts({"objects": [target]}))
    got = result.track("target")
    for t in range(3):
        assert iou(got.get(t), clip.truth["left"][t]) > 0.95
    for t in range(3, 6):
        assert iou(got.get(t), clip.truth["right"][t]) > 0.95
    assert result.lost == {}  # the user's prompt is trusted even though the mask jumped


def test_object_first_marked_late_is_followed_backwards_too(seg_make_clip, seg_shape, seg_oracle):
    clip = seg_make_clip([
        seg_shape("early", "disc", 7, (0, 120, 200), lambda t: (15 + 3 * t, 20)),
        seg_shape("late", "square", 6, (200, 0, 120), lambda t: (80 - 2 * t, 44)),
    ], n_frames=10)
    result, oracle = run(clip, seg_oracle, [click("early", 15, 20), click("late", 80 - 12, 44, frame=6)])
    assert result.lost == {}
    assert_follows_truth(result, clip, "early")
    assert_follows_truth(result, clip, "late")
    # Forward over all 10 frames, then back over frames 5..0 for the late object only.
    assert oracle.set_image_calls == 16 and result.steps == 16


def test_negative_clicks_on_a_later_frame_add_to_the_carried_prompts(seg_make_clip, seg_shape, seg_oracle):
    cube = seg_shape("cube", "square", 6, (10, 10, 10), lambda t: (30 + 2 * t, 30))
    clip = seg_make_clip([cube], n_frames=5)
    obj = click("cube", 30, 30, extra=[{"frame": 2, "points": [[5, 5, 0]]}])
    result, _ = run(clip, seg_oracle, [obj])
    assert result.lost == {}
    assert_follows_truth(result, clip, "cube")


def test_propagation_works_with_strided_frame_numbers(seg_make_clip, seg_shape, seg_oracle):
    cube = seg_shape("cube", "square", 6, (10, 10, 10), lambda t: (20 + 2 * t, 30))
    clip = seg_make_clip([cube], n_frames=12)
    frames = clip.frames[::3]
    numbers = clip.frame_numbers[::3]
    oracle = seg_oracle(clip.frames, clip.truth)
    prompts = parse_prompts({"objects": [click("cube", 20, 30)]})
    result = track_objects(oracle, frames, numbers, prompts)
    assert result.track("cube").frames == [0, 3, 6, 9]
    for t in numbers:
        assert iou(result.track("cube").get(t), clip.truth["cube"][t]) > 0.95
    bad = parse_prompts({"objects": [click("cube", 20, 30, frame=4)]})
    with pytest.raises(InputError, match="frame 4: the prompt is on a frame that is not in the clip"):
        track_objects(oracle, frames, numbers, bad)


def test_progress_is_reported_per_frame_and_cancel_stops_between_frames(seg_make_clip, seg_shape, seg_oracle):
    clip = seg_make_clip([seg_shape("cube", "square", 6, (10, 10, 10), lambda t: (30, 30))], n_frames=8)
    seen, token = [], CancelToken()

    def on_progress(done, total, frame):
        seen.append((done, total, frame))
        if frame == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        run(clip, seg_oracle, [click("cube", 30, 30)], on_progress=on_progress, cancel=token)
    assert seen == [(1, 8, 0), (2, 8, 1), (3, 8, 2)]


def test_unknown_track_name_is_refused(seg_make_clip, seg_shape, seg_oracle):
    clip = seg_make_clip([seg_shape("cube", "square", 6, (10, 10, 10), lambda t: (30, 30))], n_frames=2)
    result, _ = run(clip, seg_oracle, [click("cube", 30, 30)])
    with pytest.raises(InputError, match="unknown object 'sphere'"):
        result.track("sphere")


def test_object_hidden_behind_another_is_lost_not_swapped_and_picked_up_after(
    seg_make_clip, seg_shape, seg_oracle
):
    # A square as large as the disc crosses right over it: for a moment the click carried over from
    # the disc lands on the square, which must be reported (swap/jump), not kept as the disc's mask.
    clip = seg_make_clip([
        seg_shape("disc", "disc", 10, (30, 160, 60), lambda t: (70 - 4 * t, 30)),
        seg_shape("square", "square", 10, (180, 60, 160), lambda t: (10 + 7 * t, 30)),
    ], n_frames=12)
    result, _ = run(clip, seg_oracle, [click("disc", 70, 30), click("square", 10, 30)])
    lost = {lf.frame: lf.reason for lf in result.lost.get("disc", [])}
    assert "swap" in lost.values()
    visible = [clip.truth["disc"][t].sum() / clip.truth["disc"][0].sum() for t in range(12)]
    assert all(visible[t] < 0.5 for t in lost), "only frames where the disc is mostly hidden may be lost"
    assert max(lost) < 11, "the disc must be picked up again once it is visible"
    for t in range(12):
        disc = result.track("disc").get(t)
        assert iou(disc, clip.truth["square"][t]) == 0.0
        if t not in lost:
            assert iou(disc, clip.truth["disc"][t]) > 0.9
    assert "square" not in result.lost
    assert_follows_truth(result, clip, "square")
