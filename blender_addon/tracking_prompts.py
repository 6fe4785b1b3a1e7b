"""Point prompts from Blender's own motion tracking.

An artist marks an object to reconstruct the way they already mark features for a camera solve:
with tracks in the Movie Clip Editor. One tracking object (or a chosen set of tracks) is one object
to reconstruct; every unmuted marker of its tracks is a point prompt on that marker's frame, so a
track followed through the clip gives prompts on many frames. This module turns tracks into the
`prompts.json` object of docs/contracts.md; it only reads the clip.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .frames import video_frame_from_clip_frame

ROLES = ("static", "dynamic")


class PromptError(ValueError):
    """The objects to reconstruct cannot be turned into prompts; the message says which and why."""


@dataclass(frozen=True)
class TrackRef:
    """One track of a tracking object and whether its markers are on the object (positive)."""

    name: str
    positive: bool = True


@dataclass(frozen=True)
class ObjectSpec:
    """One object to reconstruct. `tracks=None` means every track of the tracking object, positive."""

    name: str
    role: str
    tracking_object: str
    tracks: tuple[TrackRef, ...] | None = None
    negatives: tuple[str, ...] = field(default_factory=tuple)


def marker_to_pixels(co: Iterable[float], width: int, height: int) -> tuple[float, float]:
    """Blender marker coordinates (0..1, origin bottom-left) to source pixels (origin top-left, y down)."""
    u, v = co
    return float(u) * width, (1.0 - float(v)) * height


def track_points(track, label: int, width: int, height: int, frame_offset: int = 0):
    """Yield `(video_frame, [x, y, label])` for each unmuted marker of `track` inside the image."""
    for marker in track.markers:
        if marker.mute:
            continue
        u, v = marker.co
        if not (0.0 <= u <= 1.0 and 0.0 <= v <= 1.0):
            continue
        x, y = marker_to_pixels((u, v), width, height)
        yield video_frame_from_clip_frame(marker.frame, frame_offset), [x, y, int(label)]


def object_prompts(clip, spec: ObjectSpec, frames: Iterable[int] | None = None) -> dict:
    """The prompts.json entry of one object: its name, role and points grouped by frame.

    `frames`, when given, keeps only prompts on those source frames (the frames being reconstructed).
    Frames before the first one with a positive point are dropped: segmentation starts there.
    """
    if spec.role not in ROLES:
        raise PromptError(f"object '{spec.name}': role must be 'static' or 'dynamic', not '{spec.role}'")
    if not spec.name.strip():
        raise PromptError("an object to reconstruct has an empty name; give it a name")
    tracking_object = clip.tracking.objects.get(spec.tracking_object)
    if tracking_object is None:
        raise PromptError(
            f"object '{spec.name}': the clip '{clip.name}' has no tracking object '{spec.tracking_object}'"
        )
    width, height = int(clip.size[0]), int(clip.size[1])
    if width <= 0 or height <= 0:
        raise PromptError(f"the clip '{clip.name}' has no image size; is its file missing?")
    offset = int(getattr(clip, "frame_offset", 0))
    allowed = None if frames is None else set(int(f) for f in frames)

    refs = _track_refs(tracking_object, spec)
    by_frame: dict[int, list[list[float]]] = {}
    for ref in refs:
        track = tracking_object.tracks.get(ref.name)
        if track is None:
            raise PromptError(
                f"object '{spec.name}': the tracking object '{spec.tracking_object}' "
                f"has no track '{ref.name}'"
            )
        for frame, point in track_points(track, 1 if ref.positive else 0, width, height, offset):
            if frame < 0 or (allowed is not None and frame not in allowed):
                continue
            points = by_frame.setdefault(frame, [])
            if point not in points:
                points.append(point)

    prompts = [{"frame": frame, "points": by_frame[frame]} for frame in sorted(by_frame)]
    # Segmentation starts on the first prompted frame, so that frame needs a positive point:
    # negative-only frames before the first positive one cannot be used.
    while prompts and not any(p[2] == 1 for p in prompts[0]["points"]):
        prompts.pop(0)
    if not prompts:
        raise PromptError(
            f"object '{spec.name}' has no positive marker on the frames being reconstructed; "
            "add a track on the object (or widen the frame range)"
        )
    return {"name": spec.name, "role": spec.role, "prompts": prompts}


def prompts_document(clip, specs: Iterable[ObjectSpec], frames: Iterable[int] | None = None) -> dict:
    """The whole prompts.json object for the given objects, in order."""
    specs = list(specs)
    if not specs:
        raise PromptError("there is no object to reconstruct; add one from a tracking object or from tracks")
    frames = None if frames is None else list(frames)
    return {"version": 1, "objects": [object_prompts(clip, spec, frames) for spec in specs]}


def _track_refs(tracking_object, spec: ObjectSpec) -> list[TrackRef]:
    negatives = set(spec.negatives)
    if spec.tracks is None:
        refs = [TrackRef(t.name, t.name not in negatives) for t in tracking_object.tracks]
    else:
        refs = [TrackRef(r.name, r.positive and r.name not in negatives) for r in spec.tracks]
        listed = {r.name for r in refs}
        refs += [TrackRef(name, False) for name in spec.negatives if name not in listed]
    if not refs:
        raise PromptError(
            f"object '{spec.name}': the tracking object '{spec.tracking_object}' has no tracks; "
            "add markers first"
        )
    return refs
