"""Reading a clip: a video file (via PyAV) or a folder of frame images, as RGB uint8 arrays.

Every part of the pipeline that needs frames (segmentation, conditioning) reads them here, so that
frame numbers mean the same thing everywhere: 0-based indices into the decoded video, or into the
frame files of a folder sorted by name (docs/contracts.md, "Conventions").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from com4d.errors import InputError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_FOLDER_FPS = 24.0


@dataclass
class Clip:
    """Decoded frames of one clip. `frame_numbers[i]` is the source index of `frames[i]`."""

    frames: list[np.ndarray]  # each (H, W, 3) uint8 RGB
    frame_numbers: list[int]
    fps: float
    width: int
    height: int
    source: str

    def __len__(self) -> int:
        return len(self.frames)

    def index_of(self, frame_number: int) -> int:
        """Position of a source frame number in this clip; InputError if it was not read."""
        try:
            return self.frame_numbers.index(frame_number)
        except ValueError:
            raise InputError(
                f"frame {frame_number} is not among the frames read from {self.source} "
                f"({_describe_numbers(self.frame_numbers)})"
            ) from None


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` learns from the container header. `frame_count` may be an estimate."""

    frame_count: int
    width: int
    height: int
    fps: float
    exact_count: bool
    source: str


def open_clip(
    path: str | os.PathLike, start: int = 0, end: int | None = None, stride: int = 1
) -> Clip:
    """Read a video file or a folder of frames, whichever `path` is."""
    p = Path(path)
    if p.is_dir():
        return read_frames_folder(p, start=start, end=end, stride=stride)
    if not p.exists():
        raise InputError(f"no video or frames folder at {p}")
    if p.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"{p} is a single image; give a video file or a folder of frames")
    if p.suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(
            f"{p} has an unknown video type {p.suffix!r}; use one of {', '.join(VIDEO_SUFFIXES)} "
            "or a folder of png/jpg frames"
        )
    return read_video(p, start=start, end=end, stride=stride)


def read_video(
    path: str | os.PathLike, start: int = 0, end: int | None = None, stride: int = 1
) -> Clip:
    """Decode frames `start, start+stride, ...` up to `end` (exclusive, like a Python slice)."""
    import av  # local: importing PyAV is slow and only this path needs it

    p = Path(path)
    _check_range(start, end, stride)
    if not p.is_file():
        raise InputError(f"video file not found: {p}")
    frames: list[np.ndarray] = []
    numbers: list[int] = []
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise InputError(f"{p} holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = _stream_fps(stream)
            index = -1
            for index, frame in enumerate(container.decode(stream)):
                if end is not None and index >= end:
                    break
                if index >= start and (index - start) % stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    numbers.append(index)
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as err:
        raise InputError(f"cannot decode video {p}: {err}") from err
    if not frames:
        if index < 0:
            raise InputError(f"{p} has no decodable frames (corrupt or empty video)")
        raise InputError(
            f"no frames of {p} in the range start={start}, end={end}, stride={stride} "
            f"(the video has {index + 1} frames)"
        )
    height, width = frames[0].shape[:2]
    return Clip(frames, numbers, fps, width, height, str(p))


def read_frames_folder(
    path: str | os.PathLike,
    start: int = 0,
    end: int | None = None,
    stride: int = 1,
    fps: float = DEFAULT_FOLDER_FPS,
) -> Clip:
    """Read the png/jpg files of a folder, sorted by name; frame number = position in that order."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    _check_range(start, end, stride)
    if not p.is_dir():
        raise InputError(f"frames folder not found: {p}")
    files = list_frame_files(p)
    if not files:
        raise InputError(f"{p} holds no png/jpg frames")
    chosen = list(range(len(files)))[start:end:stride]
    if not chosen:
        raise InputError(
            f"no frames of {p} in the range start={start}, end={end}, stride={stride} "
            f"(the folder has {len(files)} frames)"
        )
    frames: list[np.ndarray] = []
    for i in chosen:
        try:
            with Image.open(files[i]) as im:
                frames.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"cannot read frame image {files[i]}: {err}") from err
        if frames[-1].shape != frames[0].shape:
            raise InputError(
                f"frame {files[i].name} is {frames[-1].shape[1]}x{frames[-1].shape[0]} but "
                f"{files[chosen[0]].name} is {frames[0].shape[1]}x{frames[0].shape[0]}; "
                "all frames of a folder must have one size"
            )
    height, width = frames[0].shape[:2]
    return Clip(frames, chosen, float(fps), width, height, str(p))


def list_frame_files(folder: Path) -> list[Path]:
    """The frame images of a folder in frame order (sorted by file name)."""
    return sorted(
        (f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda f: f.name,
    )


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, size and fps from the header; counts by demuxing (no decoding) if it must."""
    import av

    p = Path(path)
    if p.is_dir():
        files = list_frame_files(p)
        if not files:
            raise InputError(f"{p} holds no png/jpg frames")
        from PIL import Image

        with Image.open(files[0]) as im:
            width, height = im.size
        return VideoInfo(len(files), width, height, DEFAULT_FOLDER_FPS, True, str(p))
    if not p.is_file():
        raise InputError(f"video file not found: {p}")
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise InputError(f"{p} holds no video stream")
            stream = container.streams.video[0]
            fps = _stream_fps(stream)
            width, height = stream.codec_context.width, stream.codec_context.height
            count = int(stream.frames or 0)
            exact = count > 0
            if not exact:
                # No count in the header: count packets, which is cheap next to decoding.
                count = sum(1 for packet in container.demux(stream) if packet.size > 0)
                exact = True
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as err:
        raise InputError(f"cannot read video {p}: {err}") from err
    if count <= 0 or width <= 0 or height <= 0:
        raise InputError(f"{p} has no readable video frames")
    return VideoInfo(count, width, height, fps, exact, str(p))


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else DEFAULT_FOLDER_FPS


def _check_range(start: int, end: int | None, stride: int) -> None:
    if start < 0:
        raise InputError(f"start frame must be 0 or more, got {start}")
    if stride < 1:
        raise InputError(f"frame stride must be 1 or more, got {stride}")
    if end is not None and end <= start:
        raise InputError(f"end frame {end} must be after start frame {start} (end is exclusive)")


def _describe_numbers(numbers: list[int]) -> str:
    if len(numbers) <= 6:
        return "frames " + ", ".join(str(n) for n in numbers)
    step = numbers[1] - numbers[0]
    return f"frames {numbers[0]}..{numbers[-1]} every {step}"
