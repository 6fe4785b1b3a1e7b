"""Video + prompts -> the official masks folder (docs/contracts.md), with previews.

One call does the whole segmentation step: read the clip, check the prompts against it, load SAM,
follow every object through the clip, then write square, resized frames, dynamic masks, the
background-removed frames for the static scene, objects.json and the preview pictures.

If an object is lost on some frames, the previews and `segmentation_report.json` are still written so
the user can see where, but (unless `on_lost="warn"`) no masks are, and a SegmentationError names the
object and the frames: a reconstruction from wrong masks would only waste GPU time.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from com4d.errors import InputError, ParameterError, SegmentationError
from com4d.events import CancelToken, EventCallback, Progress, WarningEvent, ignore_events
from com4d.segment.preprocess import (
    SquareTransform,
    centring_shift,
    pad_and_resize_frame,
    pad_and_resize_mask,
    remove_background,
    shift_image,
    square_transform,
)
from com4d.segment.preview import ContactSheet, MaskLayer, object_color, overlay
from com4d.segment.prompts import SegmentationPrompts, load_prompts, parse_prompts
from com4d.segment.propagate import LostFrame, MaskPredictor, TrackingConfig, describe_lost, track_objects
from com4d.video import Clip, open_clip

STAGE = "segment"
OBJECTS_FILE = "objects.json"
REPORT_FILE = "segmentation_report.json"
CONTACT_SHEET = "preview/contact_sheet.png"
_OUTPUT_FILES = {
    "frames": re.compile(r"^\d{6}\.png$"),
    "frames_no_bg": re.compile(r"^\d{6}\.png$"),
    "masks": re.compile(r"^\d{6}_object_\d{3}\.png$"),
    "masks_static": re.compile(r"^\d{6}_object_\d{3}\.png$"),
    "preview": re.compile(r"^(\d{6}|contact_sheet)\.png$"),
}


@dataclass
class SegmentationResult:
    """What `segment_clip_to_folder` wrote. `dynamic[i]` is the name of mask set object_{i:03d}."""

    out_dir: Path
    frame_numbers: list[int]
    dynamic: list[str]
    static: list[str]
    transform: SquareTransform
    sam: str
    lost: dict[str, list[LostFrame]] = field(default_factory=dict)
    masks_written: bool = True

    @property
    def scene_num_parts(self) -> int:
        """Static parts for stage A: one per static object the user marked."""
        return len(self.static)

    @property
    def contact_sheet(self) -> Path:
        return self.out_dir / CONTACT_SHEET


def segment_clip_to_folder(
    video_or_frames_path: str | os.PathLike,
    prompts: SegmentationPrompts | dict | str | os.PathLike,
    sam_checkpoint: str | os.PathLike | MaskPredictor,
    out_dir: str | os.PathLike,
    size: int = 768,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
    device: str = "cpu",
    *,
    start: int = 0,
    end: int | None = None,
    stride: int = 1,
    center: bool = True,
    on_lost: str = "error",
    tracking: TrackingConfig | None = None,
    previews: bool = True,
) -> SegmentationResult:
    """Segment a clip from user prompts into the official masks folder layout at `out_dir`.

    `sam_checkpoint` is a SAM v1 checkpoint file (vit_h/l/b, detected from its tensors) or any
    `MaskPredictor`. `on_lost` is "error" (default: raise SegmentationError after writing previews)
    or "warn" (write masks anyway, lost frames empty, and report them as WarningEvent events).
    """
    emit = on_event or ignore_events
    if on_lost not in ("error", "warn"):
        raise ParameterError(f"on_lost must be 'error' or 'warn', got {on_lost!r}")
    if not 16 <= size <= 8192:
        raise ParameterError(f"output size must be between 16 and 8192 pixels, got {size}")
    parsed = _as_prompts(prompts)
    emit(Progress(stage=STAGE, message="reading the clip"))
    clip = open_clip(video_or_frames_path, start=start, end=end, stride=stride)
    parsed.check_against_clip(clip.width, clip.height, clip.frame_numbers)
    if cancel is not None:
        cancel.raise_if_cancelled()

    emit(Progress(stage=STAGE, message="loading SAM"))
    predictor, sam_name = _as_predictor(sam_checkpoint, device)
    n = len(clip)

    def on_progress(done: int, total: int, frame: int) -> None:
        emit(Progress(stage=STAGE, step=done, steps=total, done=done, total=total + n,
                      message=f"segmenting frame {frame}"))

    result = track_objects(
        predictor, clip.frames, clip.frame_numbers, parsed, tracking or TrackingConfig(), on_progress, cancel
    )
    lost = result.lost
    for name, frames in lost.items():
        message = describe_lost({name: frames}, clip.frame_numbers)
        emit(WarningEvent("object_lost", message, [f.frame for f in frames]))

    out = Path(out_dir)
    write_masks = not lost or on_lost == "warn"
    transform = _transform(clip, result, parsed, size, center)
    _clear_previous_outputs(out)
    _write_frames(out, clip, result, parsed, transform, write_masks, previews, emit, cancel,
                  done0=result.steps)
    seg = SegmentationResult(
        out, list(clip.frame_numbers), [o.name for o in parsed.dynamic], [o.name for o in parsed.static],
        transform, sam_name, lost, write_masks,
    )
    if lost and on_lost == "error":
        _write_json(out / REPORT_FILE, _report(seg, clip))
        hint = f"see {out / CONTACT_SHEET}; " if previews else ""
        raise SegmentationError(
            f"segmentation lost {describe_lost(lost, clip.frame_numbers)}; {hint}add a click on the "
            "object on those frames, or allow lost frames (--allow-lost) to keep them empty"
        )
    _write_json(out / OBJECTS_FILE, _objects_json(seg, clip))
    total = result.steps + n
    emit(Progress(stage=STAGE, step=n, steps=n, done=total, total=total, message="segmentation written"))
    return seg


def _as_prompts(prompts: Any) -> SegmentationPrompts:
    if isinstance(prompts, SegmentationPrompts):
        return prompts
    if isinstance(prompts, dict):
        return parse_prompts(prompts)
    if isinstance(prompts, str | os.PathLike):
        return load_prompts(prompts)
    raise InputError(f"prompts must be a prompts.json path, dict or SegmentationPrompts, not {type(prompts)}")


def _as_predictor(sam_checkpoint: Any, device: str) -> tuple[MaskPredictor, str]:
    if hasattr(sam_checkpoint, "predict") and hasattr(sam_checkpoint, "set_image"):
        return sam_checkpoint, type(sam_checkpoint).__name__
    from com4d.segment.sam import SamFramePredictor, load_sam

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config = load_sam(sam_checkpoint, device=device)
    return SamFramePredictor(model), config.name


def _transform(clip: Clip, result, prompts: SegmentationPrompts, size: int, center: bool) -> SquareTransform:
    """Square pad + resize, and (official) the shift that centres the box around all masks."""
    t = square_transform(clip.width, clip.height, size)
    if not center:
        return t
    union = np.zeros((clip.height, clip.width), dtype=bool)
    for track in result.tracks:
        for f in clip.frame_numbers:
            m = track.get(f)
            if m is not None:
                union |= m
    return t.with_shift(*centring_shift(pad_and_resize_mask(union, t)))


def _clear_previous_outputs(out: Path) -> None:
    """Remove what an earlier run wrote here (only our own file names), so no stale frame survives."""
    for folder, pattern in _OUTPUT_FILES.items():
        d = out / folder
        if d.is_dir():
            for f in d.iterdir():
                if f.is_file() and pattern.match(f.name):
                    f.unlink()
    for name in (OBJECTS_FILE, REPORT_FILE):
        (out / name).unlink(missing_ok=True)


def _write_frames(out, clip, result, prompts, t, write_masks, previews, emit, cancel, done0) -> None:
    folders = ["preview"] if previews else []
    if write_masks:
        folders += ["frames", "frames_no_bg", "masks"] + (["masks_static"] if prompts.static else [])
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    dyn_ids = {o.name: k for k, o in enumerate(prompts.dynamic)}
    static_ids = {o.name: k for k, o in enumerate(prompts.static)}
    colors = {o.name: object_color(k) for k, o in enumerate(prompts.objects)}
    lost_at = {(lf.frame, name) for name, lfs in result.lost.items() for lf in lfs}
    sheet = ContactSheet()
    n = len(clip)
    for i, (frame, f) in enumerate(zip(clip.frames, clip.frame_numbers)):
        if cancel is not None:
            cancel.raise_if_cancelled()
        image = shift_image(pad_and_resize_frame(frame, t), t.shift_x, t.shift_y, 255)
        masks = {}
        for track in result.tracks:
            m = track.get(f)
            masks[track.name] = shift_image(pad_and_resize_mask(m, t), t.shift_x, t.shift_y, 0)
        stem = f"{f:06d}"
        if write_masks:
            _save(image, out / "frames" / f"{stem}.png")
            union = np.logical_or.reduce(list(masks.values()))
            _save(remove_background(image, union), out / "frames_no_bg" / f"{stem}.png")
            for name, m in masks.items():
                if name in dyn_ids:
                    _save_mask(m, out / "masks" / f"{stem}_object_{dyn_ids[name]:03d}.png")
                else:
                    _save_mask(m, out / "masks_static" / f"{stem}_object_{static_ids[name]:03d}.png")
        if previews:
            layers = [MaskLayer(name, m, colors[name], (f, name) in lost_at) for name, m in masks.items()]
            picture = overlay(image, layers, title=f"frame {f}")
            _save(picture, out / "preview" / f"{stem}.png")
            sheet.add(f, picture, any(layer.lost for layer in layers))
        emit(Progress(stage=STAGE, step=i + 1, steps=n, done=done0 + i + 1, total=done0 + n,
                      message=f"writing frame {f}"))
    if previews:
        legend = [(o.name, o.role, colors[o.name]) for o in prompts.objects]
        _save(sheet.render(legend), out / CONTACT_SHEET)


def _objects_json(seg: SegmentationResult, clip: Clip) -> dict:
    return {
        "version": 1,
        "dynamic": [{"id": k, "name": name} for k, name in enumerate(seg.dynamic)],
        "static": [{"name": name} for name in seg.static],
        "scene_num_parts": seg.scene_num_parts,
        "frames": seg.frame_numbers,
        "source": {"input": clip.source, "width": clip.width, "height": clip.height, "fps": clip.fps},
        "preprocess": seg.transform.to_dict(),
        "sam": seg.sam,
        "lost": _lost_json(seg.lost),
    }


def _report(seg: SegmentationResult, clip: Clip) -> dict:
    return {
        "version": 1,
        "status": "lost_objects",
        "message": describe_lost(seg.lost, clip.frame_numbers),
        "lost": _lost_json(seg.lost),
        "frames": seg.frame_numbers,
        "preprocess": seg.transform.to_dict(),
    }


def _lost_json(lost: dict[str, list[LostFrame]]) -> dict:
    return {
        name: [{"frame": lf.frame, "reason": lf.reason, "detail": lf.detail} for lf in frames]
        for name, frames in lost.items()
    }


def _save(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, compress_level=3)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, compress_level=3)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
