"""The real thing with a tiny SAM: video file -> checkpoint -> masks folder, through the CLI too.

The tiny model's weights are random, so its masks are arbitrary; these tests check the plumbing
(files, layout, shapes, progress, errors, lost-object reporting), not accuracy.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from com4d.errors import SegmentationError
from com4d.events import Progress
from com4d.segment import TrackingConfig, segment_clip_to_folder
from com4d.segment.cli import add_segment_parser, main


@pytest.fixture
def seg_video(tmp_path, seg_write_video):
    frames = []
    for t in range(5):
        frame = np.full((48, 64, 3), 220, dtype=np.uint8)
        frame[10:26, 8 + 4 * t : 24 + 4 * t] = (200, 30, 30)
        frame[30:44, 40:54] = (30, 30, 200)
        frames.append(frame)
    return seg_write_video(tmp_path / "clip.mp4", frames, fps=10, codec="libx264")


def write_prompts(path, frame=0):
    path.write_text(json.dumps({"version": 1, "objects": [
        {"name": "red", "role": "dynamic", "prompts": [{"frame": frame, "points": [[16, 18, 1]],
                                                         "box": [6, 8, 26, 28]}]},
        {"name": "blue", "role": "static", "prompts": [{"frame": frame, "box": [38, 28, 56, 46]}]},
    ]}))
    return path


def test_tiny_sam_writes_the_masks_folder_from_a_video(seg_video, seg_tiny_sam_checkpoint, tmp_path):
    events = []
    out = tmp_path / "out"
    prompts = write_prompts(tmp_path / "p.json")
    result = segment_clip_to_folder(seg_video, prompts, seg_tiny_sam_checkpoint, out,
                                    size=32, on_event=events.append, on_lost="warn")
    assert result.sam.startswith("custom") and result.frame_numbers == [0, 1, 2, 3, 4]
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert masks == [f"{t:06d}_object_000.png" for t in range(5)]
    for name in masks:
        with Image.open(out / "masks" / name) as im:
            assert im.mode == "L" and im.size == (32, 32)
            assert set(np.unique(np.asarray(im))) <= {0, 255}
    for t in range(5):
        with Image.open(out / "frames" / f"{t:06d}.png") as im:
            assert im.mode == "RGB" and im.size == (32, 32)
    objects = json.loads((out / "objects.json").read_text())
    assert objects["dynamic"] == [{"id": 0, "name": "red"}] and objects["scene_num_parts"] == 1
    assert objects["source"]["width"] == 64 and objects["source"]["fps"] == pytest.approx(10.0)
    assert objects["sam"] == result.sam
    # Whatever the random model found, lost frames are reported consistently in both places.
    assert {k: [d["frame"] for d in v] for k, v in objects["lost"].items()} == {
        k: [lf.frame for lf in v] for k, v in result.lost.items()}
    assert (out / "preview" / "contact_sheet.png").is_file()
    assert [e for e in events if isinstance(e, Progress)][-1].done == 10


def test_tiny_sam_lost_objects_stop_the_step_with_frames_named(seg_video, seg_tiny_sam_checkpoint, tmp_path):
    # A mask must cover the whole frame to count as found: every frame is lost for every object.
    strict = TrackingConfig(min_area_fraction=1.0)
    with pytest.raises(SegmentationError, match=r"'red' lost on frame\(s\) 0-4 \(empty\).*'blue' lost"):
        segment_clip_to_folder(seg_video, write_prompts(tmp_path / "p.json"), seg_tiny_sam_checkpoint,
                               tmp_path / "out", size=32, tracking=strict)
    assert (tmp_path / "out" / "segmentation_report.json").is_file()
    assert not (tmp_path / "out" / "masks").exists()


def test_cli_runs_segment_and_reports_errors_in_one_line(
    seg_video, seg_tiny_sam_checkpoint, tmp_path, capsys
):
    prompts = write_prompts(tmp_path / "p.json")
    out = tmp_path / "cli_out"
    sam = str(seg_tiny_sam_checkpoint)
    rc = main([str(seg_video), "--prompts", str(prompts), "--sam", sam, "--out", str(out),
               "--size", "32", "--device", "cpu", "--allow-lost", "--stride", "2", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "wrote 3 frames" in captured.out and "contact_sheet.png" in captured.out
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["000000.png", "000002.png", "000004.png"]

    rc = main([str(seg_video), "--prompts", str(write_prompts(tmp_path / "q.json", frame=1)),
               "--sam", str(seg_tiny_sam_checkpoint), "--out", str(out), "--stride", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: ") and "frame 1" in err and "not in the clip" in err

    missing = str(tmp_path / "none.pth")
    rc = main([str(seg_video), "--prompts", str(prompts), "--sam", missing, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "SAM checkpoint not found" in err and "none.pth" in err


def test_segment_subcommand_plugs_into_a_parent_parser_with_an_example(capsys):
    parser = argparse.ArgumentParser(prog="com4d")
    sub = parser.add_subparsers(dest="command")
    add_segment_parser(sub)
    args = parser.parse_args(["segment", "v.mp4", "--prompts", "p.json", "--sam", "s.pth", "--out", "o"])
    assert args.command == "segment" and args.size == 768 and args.device == "auto" and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "--help"])
    assert "example:" in capsys.readouterr().out
