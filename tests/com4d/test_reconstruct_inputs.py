"""`com4d reconstruct` from a video: with a masks folder (also square masks of the official padded frames),
and with clicks segmented by SAM first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_video
from PIL import Image

from com4d.cli import main as cli_main
from com4d.demo import demo_paths
from com4d.errors import InputError
from com4d.inputs import load_inputs
from com4d.scene import load_scene

TINY = ["--num-tokens", "16", "--scene-steps", "2", "--dynamic-steps", "2", "--dynamic-mix-cutoff", "0",
        "--dynamic-ar-block-size", "2", "--dynamic-max-memory-frames", "3", "--mesh-dense-depth", "4",
        "--mesh-final-depth", "5", "--device", "cpu", "--quiet", "--no-preview"]


@pytest.fixture()
def demo_video(tmp_path) -> tuple[Path, Path]:
    """The demo clip as a lossless video, and a folder with just its masks/ and objects.json."""
    clip = demo_paths()[1]
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((clip / "frames").glob("*.png"))]
    video = write_video(tmp_path / "clip.mkv", frames)
    masks = tmp_path / "masks_only"
    shutil.copytree(clip / "masks", masks / "masks")
    shutil.copy(clip / "objects.json", masks / "objects.json")
    return video, masks


def test_video_plus_masks_folder(tmp_path, demo_video):
    video, masks = demo_video
    out = tmp_path / "out"
    code = cli_main(["reconstruct", str(video), "--masks", str(masks), "--weights", str(demo_paths()[0]),
                     "--out", str(out), "--frame-end", "6", *TINY])
    assert code == 0
    scene = load_scene(out)
    assert scene["status"] == "complete" and scene["frames"] == [0, 2, 4]
    assert scene["source"]["input"] == str(video)


def test_unreadable_video_is_named(tmp_path, demo_video, capsys):
    _, masks = demo_video
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00 this is not a video" * 50)
    code = cli_main(["reconstruct", str(broken), "--masks", str(masks), "--weights", str(demo_paths()[0]),
                     "--out", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "broken.mp4" in err


def test_video_plus_prompts_segments_then_reconstructs(tmp_path, demo_video, seg_tiny_sam_checkpoint):
    video, _ = demo_video
    prompts = {"version": 1, "objects": [
        {"name": "ball", "role": "dynamic", "prompts": [{"frame": 0, "points": [[22, 58, 1]]}]},
        {"name": "box", "role": "static", "prompts": [{"frame": 0, "box": [55, 35, 80, 76]}]},
    ]}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "out"
    code = cli_main(["reconstruct", str(video), "--prompts", str(tmp_path / "prompts.json"),
                     "--sam", str(seg_tiny_sam_checkpoint), "--weights", str(demo_paths()[0]), "--out", str(out),
                     "--frame-end", "4", "--frame-stride", "1", "--allow-lost", *TINY])
    assert code == 0
    scene = load_scene(out)
    assert scene["status"] == "complete" and scene["frames"] == [0, 1, 2, 3]
    assert {o["name"]: o["role"] for o in scene["objects"]} == {"box": "static", "ball": "dynamic"}
    assert (out / "segmentation" / "masks").is_dir()
    assert scene["source"]["input"] == str(video)


def test_prompts_without_sam_checkpoint_is_refused(tmp_path, demo_video, capsys):
    video, _ = demo_video
    (tmp_path / "p.json").write_text("{}")
    code = cli_main(["reconstruct", str(video), "--prompts", str(tmp_path / "p.json"), "--weights",
                     str(demo_paths()[0]), "--out", str(tmp_path / "o"), *TINY])
    assert code == 2 and "--sam" in capsys.readouterr().err


def write_masks(folder: Path, count: int, width: int, height: int) -> Path:
    (folder / "masks").mkdir(parents=True)
    for n in range(count):
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4: height // 2, width // 4: width // 2] = 255
        Image.fromarray(mask).save(folder / "masks" / f"{n:06d}_object_000.png")
    return folder


@pytest.mark.parametrize("width, height", [(48, 29), (29, 48)])  # wide and tall; odd margins
def test_non_square_video_with_square_masks_is_padded_like_official_process_video(tmp_path, width, height):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 200, (height, width, 3), dtype=np.uint8) for _ in range(3)]
    video = write_video(tmp_path / "clip.mkv", frames)  # lossless
    side = max(width, height)
    inputs = load_inputs(write_masks(tmp_path / "m", 3, side, side), video=video)
    # pad_to_square.py: white margins, the left/top one the smaller half
    top, left = (side - height) // 2, (side - width) // 2
    for source, frame in zip(frames, inputs.frames):
        expected = np.full((side, side, 3), 255, np.uint8)
        expected[top:top + height, left:left + width] = source
        np.testing.assert_array_equal(frame, expected)


def test_square_masks_larger_than_the_padded_video_resize_it_with_lanczos(tmp_path):
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (20, 32, 3), dtype=np.uint8) for _ in range(2)]
    video = write_video(tmp_path / "clip.mkv", frames)
    inputs = load_inputs(write_masks(tmp_path / "m", 2, 64, 64), video=video)
    for source, frame in zip(frames, inputs.frames):
        padded = np.full((32, 32, 3), 255, np.uint8)
        padded[6:26] = source
        expected = np.asarray(Image.fromarray(padded).resize((64, 64), Image.Resampling.LANCZOS))  # resize_images.py
        np.testing.assert_array_equal(frame, expected)


def test_masks_of_another_non_square_size_are_refused_saying_what_to_do(tmp_path):
    frames = [np.zeros((20, 32, 3), np.uint8)] * 2
    video = write_video(tmp_path / "clip.mkv", frames)
    with pytest.raises(InputError, match=r"is 40x30 but the frames are 32x20.*square masks.*process_video\.sh"):
        load_inputs(write_masks(tmp_path / "m", 2, 40, 30), video=video)
