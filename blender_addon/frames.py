"""How frame numbers move between the source video, the movie clip and the scene timeline.

The contract (docs/contracts.md) numbers frames 0-based in the decoded video. Blender numbers the
frames of a movie clip from 1 (`clip frame 1` is the first decoded frame, shifted by the clip's
`frame_offset`) and shows clip frame 1 at scene frame `clip.frame_start`. Marker `frame` values are
clip frames. With the default offset of 0 this gives the contract's
`scene_frame = clip.frame_start + frame`.
"""

from __future__ import annotations


def video_frame_from_clip_frame(clip_frame: int, frame_offset: int = 0) -> int:
    """The 0-based source-video frame shown at `clip_frame` (a marker's frame)."""
    return int(clip_frame) - 1 + int(frame_offset)


def scene_frame_from_video_frame(frame: int, clip_frame_start: int = 1, frame_offset: int = 0) -> int:
    """The scene (timeline) frame at which the clip shows source-video frame `frame`."""
    return int(clip_frame_start) + int(frame) - int(frame_offset)


def selected_frames(first: int, last: int, stride: int) -> list[int]:
    """The source frames a reconstruction uses: `first`, `first + stride`, ... up to `last` inclusive."""
    if stride < 1:
        raise ValueError(f"the frame stride must be at least 1, got {stride}")
    if last < first:
        raise ValueError(f"the last frame ({last}) comes before the first frame ({first})")
    if first < 0:
        raise ValueError(f"the first frame must be 0 or later, got {first}")
    return list(range(int(first), int(last) + 1, int(stride)))


def visibility_windows(
    frames: list[int], known_frames: list[int] | None = None
) -> dict[int, tuple[int, int]]:
    """For each frame of a per-frame mesh sequence, the half-open frame span `[start, end)` it is shown.

    A mesh made for frame `f` stays on screen until the next frame that has (or will have) a mesh,
    so that a reconstruction with a stride > 1 shows something on every frame. `known_frames` are all
    frames the reconstruction will produce, when known; the meshes that arrived so far are `frames`.
    The last one is shown for as long as the spacing before it (1 frame when alone).
    """
    ordered = sorted(set(int(f) for f in frames))
    timeline = sorted(set(int(f) for f in (known_frames or [])) | set(ordered))
    windows: dict[int, tuple[int, int]] = {}
    for frame in ordered:
        position = timeline.index(frame)
        if position + 1 < len(timeline):
            end = timeline[position + 1]
        elif position > 0:
            end = frame + (frame - timeline[position - 1])
        else:
            end = frame + 1
        windows[frame] = (frame, end)
    return windows
