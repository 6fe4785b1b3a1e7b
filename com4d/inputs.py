"""Reconstruction inputs: frames, per-object masks and object names, validated.

The official input layout (reference §4.1; docs/contracts.md):

    <dir>/frames/NNNNNN.png|jpg          RGB frames, sorted by name
    <dir>/frames_no_bg/NNNNNN.png        optional, background painted white
    <dir>/masks/NNNNNN_object_XXX.png    8-bit masks of the dynamic objects (255 = object)
    <dir>/objects.json                   optional names/roles (written by `com4d segment`)

Frames may instead come from a video file (`com4d.video`), with the masks from a masks folder.
Every problem is an `InputError` naming the file and what is wrong with it; nothing is guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from com4d.errors import InputError
from com4d.video import open_clip

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_NAME = re.compile(r"^(\d+)_object_(\d{3})\.png$")


@dataclass
class DynamicObject:
    """One moving object: its name, official id (000..) and a mask per frame (H, W) uint8 (255 = object)."""

    name: str
    object_id: int
    masks: list[np.ndarray]


@dataclass
class SceneInputs:
    """Everything the reconstruction consumes, frames not yet strided.

    `frames` are all usable frames in order (uint8 (H, W, 3) RGB), `frame_numbers` their source
    numbers. `frames_no_bg` (optional) replaces `frames` as conditioning images when present.
    """

    frames: list[np.ndarray]
    frame_numbers: list[int]
    dynamic: list[DynamicObject]
    static_names: list[str] = field(default_factory=list)
    frames_no_bg: list[np.ndarray] | None = None
    fps: float = 24.0
    source: str = ""

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.frames[0].shape[:2]
        return w, h


def _read_image(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"cannot read image {path}: {err}") from err


def _frame_files(folder: Path) -> list[tuple[int, Path]]:
    files = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.isdigit():
            files.append((int(p.stem), p))
    return files


def read_mask_sets(masks_dir: Path) -> dict[int, dict[int, Path]]:
    """{object id: {frame number: mask path}} from `NNNNNN_object_XXX.png` files."""
    if not masks_dir.is_dir():
        raise InputError(f"no masks folder {masks_dir} (expected masks/NNNNNN_object_XXX.png)")
    sets: dict[int, dict[int, Path]] = {}
    for p in sorted(masks_dir.iterdir()):
        m = MASK_NAME.match(p.name)
        if m:
            sets.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not sets:
        raise InputError(f"{masks_dir} holds no masks named NNNNNN_object_XXX.png")
    return sets


def _object_names(folder: Path, ids: list[int]) -> tuple[dict[int, str], list[str]]:
    """Names from objects.json when present, else object_XXX; and the static names."""
    names = {i: f"object_{i:03d}" for i in ids}
    statics: list[str] = []
    path = folder / "objects.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            for d in data.get("dynamic", []):
                if int(d["id"]) in names:
                    names[int(d["id"])] = str(d["name"])
            statics = [str(s["name"]) for s in data.get("static", [])]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InputError(f"{path} is not a valid objects.json: {err}") from err
    return names, statics


def load_inputs(folder: str | Path, video: str | Path | None = None) -> SceneInputs:
    """Load an official input folder, or a video file plus a folder that holds `masks/`.

    Masks must exist for the same frame numbers for every object, each frame must have a mask of
    every object, and masks must have the frame size.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input folder {folder} does not exist")
    mask_sets = read_mask_sets(folder / "masks")
    ids = sorted(mask_sets)
    frame_numbers = sorted(mask_sets[ids[0]])
    for i in ids[1:]:
        if sorted(mask_sets[i]) != frame_numbers:
            missing = sorted(set(frame_numbers) ^ set(mask_sets[i]))
            raise InputError(
                f"object {i:03d} has masks for other frames than object {ids[0]:03d} "
                f"(frames {missing[:5]} differ); every object needs one mask per frame"
            )

    frames_no_bg = None
    if video is not None:
        clip = open_clip(video)
        by_number = dict(zip(clip.frame_numbers, clip.frames))
        absent = [n for n in frame_numbers if n not in by_number]
        if absent:
            raise InputError(f"masks refer to frames {absent[:5]} that {video} does not have")
        frames = [by_number[n] for n in frame_numbers]
        fps, source = clip.fps, str(video)
    else:
        frames_dir = folder / "frames"
        if not frames_dir.is_dir():
            raise InputError(f"no frames folder {frames_dir} (expected frames/NNNNNN.png)")
        files = dict(_frame_files(frames_dir))
        if not files:
            raise InputError(f"{frames_dir} holds no frames named NNNNNN.png or .jpg")
        if sorted(files) != frame_numbers:
            missing = sorted(set(files) ^ set(frame_numbers))
            raise InputError(
                f"frames and masks do not match: frame numbers {missing[:5]} have a frame but no mask "
                f"or a mask but no frame in {folder}"
            )
        frames = [_read_image(files[n], "RGB") for n in frame_numbers]
        fps, source = 24.0, str(folder)
        no_bg_dir = folder / "frames_no_bg"
        if no_bg_dir.is_dir():
            no_bg = dict(_frame_files(no_bg_dir))
            if sorted(no_bg) != frame_numbers:
                raise InputError(f"{no_bg_dir} must hold one image per frame ({len(frame_numbers)})")
            frames_no_bg = [_read_image(no_bg[n], "RGB") for n in frame_numbers]

    h, w = frames[0].shape[:2]
    for n, f in zip(frame_numbers, frames):
        if f.shape[:2] != (h, w):
            raise InputError(f"frame {n} is {f.shape[1]}x{f.shape[0]}, the first frame {w}x{h}")
    names, statics = _object_names(folder, ids)
    dynamic = []
    for i in ids:
        masks = []
        for n in frame_numbers:
            m = _read_image(mask_sets[i][n], "L")
            if m.shape != (h, w):
                raise InputError(
                    f"mask {mask_sets[i][n]} is {m.shape[1]}x{m.shape[0]} but the frames are {w}x{h}"
                )
            masks.append(m)  # 8-bit: the conditioning blends with mask/255 like the official code
        dynamic.append(DynamicObject(name=names[i], object_id=i, masks=masks))
    return SceneInputs(
        frames=frames,
        frame_numbers=frame_numbers,
        dynamic=dynamic,
        static_names=statics,
        frames_no_bg=frames_no_bg,
        fps=fps,
        source=source,
    )
