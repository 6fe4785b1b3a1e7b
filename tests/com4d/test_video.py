"""com4d.video: decoding clips from video files and frame folders, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from com4d.errors import InputError
from com4d.video import Clip, open_clip, probe_video, read_frames_folder, read_video


def numbered_frames(n: int, width: int = 48, height: int = 32) -> list[np.ndarray]:
    """Frames that differ from each other in every pixel (value depends on frame index)."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 200, size=(height, width, 3), dtype=np.uint8)
    return [(base + 5 * i).astype(np.uint8) for i in range(n)]


@pytest.fixture
def lossless_video(tmp_path, seg_write_video):
    frames = numbered_frames(10)
    return seg_write_video(tmp_path / "clip.mkv", frames, fps=15, codec="ffv1"), frames


def test_lossless_video_decodes_to_the_exact_frames(lossless_video):
    path, frames = lossless_video
    clip = read_video(path)
    assert isinstance(clip, Clip)
    assert clip.frame_numbers == list(range(10))
    assert (clip.width, clip.height) == (48, 32)
    assert clip.fps == pytest.approx(15.0)
    assert clip.source == str(path)
    for got, want in zip(clip.frames, frames):
        assert got.dtype == np.uint8 and got.shape == (32, 48, 3)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("start,end,stride", [(0, None, 1), (2, None, 3), (1, 7, 2), (9, None, 1), (0, 4, 5)])
def test_frame_range_is_a_python_slice_of_the_video(lossless_video, start, end, stride):
    path, frames = lossless_video
    clip = read_video(path, start=start, end=end, stride=stride)
    want = list(range(10))[start:end:stride]
    assert clip.frame_numbers == want
    for got, n in zip(clip.frames, want):
        np.testing.assert_array_equal(got, frames[n])


def test_lossy_mp4_decodes_close_to_the_source(tmp_path, seg_write_video):
    frames = [np.full((32, 48, 3), 40 + 20 * i, dtype=np.uint8) for i in range(5)]
    path = seg_write_video(tmp_path / "clip.mp4", frames, fps=24, codec="libx264")
    clip = open_clip(path)
    assert clip.frame_numbers == [0, 1, 2, 3, 4]
    assert clip.fps == pytest.approx(24.0)
    for got, want in zip(clip.frames, frames):
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 3


def test_probe_reports_count_size_and_fps_without_decoding(lossless_video):
    path, _ = lossless_video
    info = probe_video(path)
    assert (info.frame_count, info.width, info.height) == (10, 48, 32)
    assert info.fps == pytest.approx(15.0)


def test_frames_folder_is_read_in_name_order_and_ignores_other_files(tmp_path):
    frames = numbered_frames(4)
    folder = tmp_path / "frames"
    folder.mkdir()
    # Names sort as b < c < d < e; file order on disk must not matter.
    names = ["e.png", "b.png", "d.jpg", "c.png"]
    for name, frame in zip(names, [frames[3], frames[0], frames[2], frames[1]]):
        Image.fromarray(frame).save(folder / name, quality=100, subsampling=0)
    (folder / "notes.txt").write_text("not a frame")
    clip = open_clip(folder)
    assert clip.frame_numbers == [0, 1, 2, 3]
    np.testing.assert_array_equal(clip.frames[0], frames[0])
    np.testing.assert_array_equal(clip.frames[1], frames[1])
    assert np.abs(clip.frames[2].astype(int) - frames[2]).mean() < 4  # jpg
    np.testing.assert_array_equal(clip.frames[3], frames[3])
    sliced = read_frames_folder(folder, start=1, stride=2, fps=30)
    assert sliced.frame_numbers == [1, 3] and sliced.fps == 30
    info = probe_video(folder)
    assert (info.frame_count, info.width, info.height) == (4, 48, 32)


def test_frames_folder_converts_rgba_and_grey_to_rgb(tmp_path):
    Image.new("RGBA", (8, 6), (10, 20, 30, 128)).save(tmp_path / "000000.png")
    Image.new("L", (8, 6), 77).save(tmp_path / "000001.png")
    clip = read_frames_folder(tmp_path)
    assert clip.frames[0].shape == (6, 8, 3) and tuple(clip.frames[0][0, 0]) == (10, 20, 30)
    assert tuple(clip.frames[1][0, 0]) == (77, 77, 77)


def test_frames_of_different_sizes_are_refused_naming_the_file(tmp_path):
    Image.new("RGB", (8, 6)).save(tmp_path / "000000.png")
    Image.new("RGB", (9, 6)).save(tmp_path / "000001.png")
    with pytest.raises(InputError, match="000001.png is 9x6"):
        read_frames_folder(tmp_path)


def test_missing_and_corrupt_inputs_name_the_file(tmp_path):
    with pytest.raises(InputError, match="nope.mp4"):
        open_clip(tmp_path / "nope.mp4")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="broken.mp4"):
        open_clip(bad)
    with pytest.raises(InputError, match="broken.mp4"):
        probe_video(bad)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(InputError, match="no png/jpg frames"):
        open_clip(empty)
    odd = tmp_path / "clip.xyz"
    odd.write_bytes(b"x")
    with pytest.raises(InputError, match="unknown video type"):
        open_clip(odd)


def test_truncated_video_is_refused_or_reads_only_its_good_frames(tmp_path, seg_write_video):
    path = seg_write_video(tmp_path / "cut.mkv", numbered_frames(6), codec="ffv1")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 8])
    try:
        clip = read_video(path)
    except InputError as err:
        assert "cut.mkv" in str(err)
    else:
        assert 0 < len(clip) < 6


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(start=20), "no frames .* in the range start=20"),
        (dict(start=-1), "start frame must be 0 or more"),
        (dict(stride=0), "stride must be 1 or more"),
        (dict(start=5, end=5), "end frame 5 must be after start frame 5"),
    ],
)
def test_bad_frame_ranges_are_refused(lossless_video, tmp_path, kwargs, message):
    path, frames = lossless_video
    with pytest.raises(InputError, match=message):
        read_video(path, **kwargs)
    folder = tmp_path / "f"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:06d}.png")
    with pytest.raises(InputError, match=message):
        read_frames_folder(folder, **kwargs)


def test_index_of_a_frame_that_was_not_read_says_which_were(lossless_video):
    clip = read_video(lossless_video[0], stride=2)
    assert clip.index_of(4) == 2
    with pytest.raises(InputError, match="frame 3 is not among the frames"):
        clip.index_of(3)
