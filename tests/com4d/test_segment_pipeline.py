"""segment_clip_to_folder: the official masks folder written from a clip and prompts.

SAM is replaced by the oracle here (true shapes), so the written masks can be compared with the
truth after the same square padding/resizing; test_segment_end_to_end.py runs the real tiny SAM.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from com4d.errors import Cancelled, InputError, ParameterError, SegmentationError
from com4d.events import CancelToken, Progress, WarningEvent
from com4d.segment import segment_clip_to_folder
from com4d.segment.preprocess import close_mask


def iou(a, b):
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def read_mask(path):
    with Image.open(path) as im:
        assert im.mode == "L"
        data = np.asarray(im)
    assert set(np.unique(data)) <= {0, 255}
    return data == 255


@pytest.fixture
def shapes_clip(seg_make_clip, seg_shape, tmp_path):
    """80x48 frames (wider than tall, so padding shows): a moving ball, a sliding box, a still lamp,
    all right of centre."""
    clip = seg_make_clip([
        seg_shape("lamp", "square", 5, (240, 200, 40), lambda t: (70, 10)),
        seg_shape("ball", "disc", 6, (200, 40, 40), lambda t: (30 + 3 * t, 30)),
        seg_shape("box", "square", 5, (40, 90, 200), lambda t: (60 - 2 * t, 36)),
    ], n_frames=8, width=80, height=48)
    folder = tmp_path / "frames_in"
    folder.mkdir()
    for t, frame in enumerate(clip.frames):
        Image.fromarray(frame).save(folder / f"img_{t:03d}.png")
    return clip, folder


PROMPTS = {"version": 1, "objects": [
    {"name": "ball", "role": "dynamic", "prompts": [{"frame": 0, "points": [[30, 30, 1]]}]},
    {"name": "box", "role": "dynamic", "prompts": [{"frame": 0, "box": [54, 30, 66, 42]}]},
    {"name": "lamp", "role": "static", "prompts": [{"frame": 0, "points": [[70, 10, 1], [20, 5, 0]]}]},
]}


def expected_square(mask, size, pad_top):
    """The truth mask padded (top/bottom) and resized by nearest-area reasoning of the test itself."""
    side = mask.shape[1]
    square = np.zeros((side, side), dtype=np.float32)
    square[pad_top : pad_top + mask.shape[0]] = mask
    factor = side // size
    return square.reshape(size, factor, size, factor).mean(axis=(1, 3)) >= 0.5


def test_writes_the_official_layout_with_masks_matching_the_truth(shapes_clip, seg_oracle, tmp_path):
    clip, folder = shapes_clip
    events = []
    out = tmp_path / "seg"
    result = segment_clip_to_folder(folder, PROMPTS, seg_oracle(clip.frames, clip.truth), out, size=40,
                                    on_event=events.append, center=False)
    names = sorted(p.name for p in (out / "masks").iterdir())
    assert names == sorted(f"{t:06d}_object_{k:03d}.png" for t in range(8) for k in (0, 1))
    assert sorted(p.name for p in (out / "frames").iterdir()) == [f"{t:06d}.png" for t in range(8)]
    assert sorted(p.name for p in (out / "frames_no_bg").iterdir()) == [f"{t:06d}.png" for t in range(8)]
    statics = sorted(p.name for p in (out / "masks_static").iterdir())
    assert statics == [f"{t:06d}_object_000.png" for t in range(8)]
    assert (out / "preview" / "contact_sheet.png").is_file() and (out / "preview" / "000007.png").is_file()

    # 80x48 -> padded to 80x80 (16 rows white above and below) -> 40x40: scale 1/2.
    objects = json.loads((out / "objects.json").read_text())
    assert objects["dynamic"] == [{"id": 0, "name": "ball"}, {"id": 1, "name": "box"}]
    assert objects["static"] == [{"name": "lamp"}] and objects["scene_num_parts"] == 1
    assert objects["frames"] == list(range(8)) and objects["lost"] == {}
    assert objects["preprocess"] == {"source_size": [80, 48], "size": 40, "pad": [0, 16, 0, 16], "scale": 0.5,
                                     "shift": [0, 0]}
    assert result.dynamic == ["ball", "box"] and result.scene_num_parts == 1 and result.masks_written

    for t in range(8):
        for k, name in enumerate(["ball", "box"]):
            got = read_mask(out / "masks" / f"{t:06d}_object_{k:03d}.png")
            assert got.shape == (40, 40)
            assert iou(got, expected_square(clip.truth[name][t], 40, 16)) > 0.8
        lamp = read_mask(out / "masks_static" / f"{t:06d}_object_000.png")
        assert iou(lamp, expected_square(clip.truth["lamp"][t], 40, 16)) > 0.8
        with Image.open(out / "frames" / f"{t:06d}.png") as im:
            frame = np.asarray(im)
        assert frame.shape == (40, 40, 3) and (frame[:7] == 255).all() and (frame[-7:] == 255).all()
        with Image.open(out / "frames_no_bg" / f"{t:06d}.png") as im:
            no_bg = np.asarray(im)
        union = np.zeros((40, 40), dtype=bool)
        for name in ("ball", "box"):
            union |= read_mask(out / "masks" / f"{t:06d}_object_{['ball', 'box'].index(name):03d}.png")
        union |= lamp
        keep = close_mask(union, 3)
        assert (no_bg[~keep] == 255).all()
        np.testing.assert_array_equal(no_bg[union], frame[union])

    progress = [e for e in events if isinstance(e, Progress)]
    assert all(e.stage == "segment" for e in progress)
    assert progress[-1].done == progress[-1].total == 16  # 8 frames segmented + 8 written
    assert [e.done for e in progress if e.total] == sorted(e.done for e in progress if e.total)
    assert not [e for e in events if isinstance(e, WarningEvent)]


def test_prompt_coordinates_map_onto_the_written_frames(shapes_clip, seg_oracle, tmp_path):
    clip, folder = shapes_clip
    result = segment_clip_to_folder(folder, PROMPTS, seg_oracle(clip.frames, clip.truth), tmp_path / "o",
                                    size=40)
    t = result.transform
    assert (t.shift_x, t.shift_y) != (0, 0), "these objects are off-centre, so centring moves them"
    x, y = t.map_point(30, 30)  # the click on the ball, frame 0
    ball = read_mask(tmp_path / "o" / "masks" / "000000_object_000.png")
    assert ball[int(y), int(x)]
    # The box around all masks of all frames is centred (official preprocessing).
    union = np.zeros((40, 40), dtype=bool)
    for p in (tmp_path / "o" / "masks").iterdir():
        union |= read_mask(p)
    for p in (tmp_path / "o" / "masks_static").iterdir():
        union |= read_mask(p)
    rows, cols = np.flatnonzero(union.any(1)), np.flatnonzero(union.any(0))
    assert abs((rows[0] + rows[-1] + 1) / 2 - 20) <= 1 and abs((cols[0] + cols[-1] + 1) / 2 - 20) <= 1


def test_lost_object_stops_before_masks_with_previews_and_a_report(
    seg_make_clip, seg_shape, seg_oracle, tmp_path
):
    clip = seg_make_clip([
        seg_shape("ghost", "disc", 6, (90, 90, 90), lambda t: (30, 30) if t < 3 else None),
        seg_shape("rock", "square", 5, (120, 70, 20), lambda t: (70, 30)),
    ], n_frames=5, width=96, height=64)
    prompts = {"objects": [
        {"name": "ghost", "role": "dynamic", "prompts": [{"frame": 0, "points": [[30, 30, 1]]}]},
        {"name": "rock", "role": "dynamic", "prompts": [{"frame": 0, "points": [[70, 30, 1]]}]},
    ]}
    folder = tmp_path / "in"
    folder.mkdir()
    for t, frame in enumerate(clip.frames):
        Image.fromarray(frame).save(folder / f"{t:04d}.png")
    out = tmp_path / "out"
    events = []
    with pytest.raises(SegmentationError, match=r"'ghost' lost on frame\(s\) 3-4 \(empty\)") as err:
        segment_clip_to_folder(folder, prompts, seg_oracle(clip.frames, clip.truth), out, size=32,
                               on_event=events.append)
    assert "contact_sheet.png" in str(err.value)
    warnings = [e for e in events if isinstance(e, WarningEvent)]
    assert [(w.code, w.frames) for w in warnings] == [("object_lost", [3, 4])]
    assert (out / "preview" / "contact_sheet.png").is_file()
    assert not (out / "masks").exists() and not (out / "objects.json").exists()
    report = json.loads((out / "segmentation_report.json").read_text())
    assert [d["frame"] for d in report["lost"]["ghost"]] == [3, 4]

    # Allowed: masks are written, the lost frames are empty, and objects.json lists them.
    result = segment_clip_to_folder(folder, prompts, seg_oracle(clip.frames, clip.truth), out, size=32,
                                    on_lost="warn")
    assert list(result.lost) == ["ghost"] and not (out / "segmentation_report.json").exists()
    assert not read_mask(out / "masks" / "000003_object_000.png").any()
    assert read_mask(out / "masks" / "000002_object_000.png").any()
    assert json.loads((out / "objects.json").read_text())["lost"]["ghost"][0]["frame"] == 3


def test_a_rerun_into_the_same_folder_leaves_no_stale_frames(shapes_clip, seg_oracle, tmp_path):
    clip, folder = shapes_clip
    out = tmp_path / "o"
    segment_clip_to_folder(folder, PROMPTS, seg_oracle(clip.frames, clip.truth), out, size=32)
    (out / "notes.txt").write_text("mine")
    segment_clip_to_folder(folder, PROMPTS, seg_oracle(clip.frames, clip.truth), out, size=32, start=0, end=4)
    assert sorted(p.name for p in (out / "frames").iterdir()) == [f"{t:06d}.png" for t in range(4)]
    assert len(list((out / "masks").iterdir())) == 8
    assert (out / "notes.txt").read_text() == "mine"


def test_bad_inputs_fail_before_any_segmentation(shapes_clip, seg_oracle, tmp_path):
    clip, folder = shapes_clip
    oracle = seg_oracle(clip.frames, clip.truth)
    outside = {"objects": [
        {"name": "a", "role": "dynamic", "prompts": [{"frame": 0, "points": [[500, 5, 1]]}]}]}
    with pytest.raises(InputError, match="outside the 80x48 frame"):
        segment_clip_to_folder(folder, outside, oracle, tmp_path / "o")
    late = {"objects": [{"name": "a", "role": "dynamic", "prompts": [{"frame": 30, "points": [[5, 5, 1]]}]}]}
    with pytest.raises(InputError, match="frame 30: the prompt is on a frame that is not in the clip"):
        segment_clip_to_folder(folder, late, oracle, tmp_path / "o")
    with pytest.raises(InputError, match="no positive point"):
        segment_clip_to_folder(folder, {"objects": [{"name": "a", "role": "static", "prompts": [
            {"frame": 0, "points": [[5, 5, 0]]}]}]}, oracle, tmp_path / "o")
    with pytest.raises(InputError, match="prompts file not found"):
        segment_clip_to_folder(folder, tmp_path / "nope.json", oracle, tmp_path / "o")
    with pytest.raises(ParameterError, match="on_lost"):
        segment_clip_to_folder(folder, PROMPTS, oracle, tmp_path / "o", on_lost="ignore")
    assert oracle.set_image_calls == 0 and not (tmp_path / "o").exists()


def test_cancel_stops_the_step(shapes_clip, seg_oracle, tmp_path):
    clip, folder = shapes_clip
    token = CancelToken()

    def on_event(event):
        if isinstance(event, Progress) and event.done == 3:
            token.cancel()

    oracle = seg_oracle(clip.frames, clip.truth)
    with pytest.raises(Cancelled):
        segment_clip_to_folder(folder, PROMPTS, oracle, tmp_path / "o", size=32, on_event=on_event,
                               cancel=token)
    assert oracle.set_image_calls == 3
    assert not (tmp_path / "o" / "objects.json").exists()
