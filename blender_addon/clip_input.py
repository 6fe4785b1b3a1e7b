"""The clip being reconstructed: which clip, which file, which frames, which prompts.

Plain functions over a MovieClip and its COM4D settings, used by the operators and the panels.
"""

from __future__ import annotations

from pathlib import Path

import bpy

from .frames import selected_frames, video_frame_from_clip_frame
from .tracking_prompts import PromptError, prompts_document


def clip_from_context(context, clip_name: str = "") -> bpy.types.MovieClip | None:
    """The clip an operator works on: named, the Clip Editor's, or the only clip in the file."""
    if clip_name:
        return bpy.data.movieclips.get(clip_name)
    space = getattr(context, "space_data", None)
    if space is not None and getattr(space, "type", "") == "CLIP_EDITOR" and space.clip is not None:
        return space.clip
    clip = getattr(context, "edit_movieclip", None)
    if clip is not None:
        return clip
    return bpy.data.movieclips[0] if len(bpy.data.movieclips) == 1 else None


def clip_video_path(clip: bpy.types.MovieClip) -> str:
    """The file (a movie) or folder (an image sequence) the backend reads."""
    path = Path(bpy.path.abspath(clip.filepath)).resolve()
    if clip.source == "SEQUENCE":
        path = path.parent
    if not path.exists():
        raise PromptError(f"the clip's file {path} does not exist; relink the clip")
    return str(path)


def clip_frames(clip: bpy.types.MovieClip) -> list[int]:
    """The source frames to reconstruct, from the clip's settings (whole clip or a range, stride)."""
    settings = clip.com4d
    offset = int(clip.frame_offset)
    if settings.use_clip_range:
        first, last = 1, int(clip.frame_duration)
    else:
        first, last = int(settings.frame_first), int(settings.frame_last)
    last = min(last, int(clip.frame_duration))
    return selected_frames(
        video_frame_from_clip_frame(first, offset),
        video_frame_from_clip_frame(last, offset),
        int(settings.frame_stride),
    )


def prompt_frames(frames: list[int]) -> list[int]:
    """The frames whose markers become prompts: the reconstructed ones.

    Prompts on these frames are valid whichever frames segmentation reads (the whole clip, the
    range, or only the strided frames); a tracked marker gives a prompt on each of them.
    """
    return list(frames)


def clip_prompts(clip: bpy.types.MovieClip) -> dict:
    """The prompts.json object for the clip's objects to reconstruct."""
    return prompts_document(clip, clip.com4d.specs(), prompt_frames(clip_frames(clip)))
