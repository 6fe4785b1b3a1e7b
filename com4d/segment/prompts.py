"""prompts.json: the user's clicks and boxes per object, parsed and checked before any model runs.

The format is fixed in docs/contracts.md. Everything a user can get wrong (a point outside the frame,
an object with no positive click, a frame that is not in the clip) is caught here with an InputError
that names the object and the frame, so SAM never sees a prompt that cannot work.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from com4d.errors import InputError

PROMPTS_VERSION = 1
ROLES = ("static", "dynamic")
MAX_DYNAMIC_OBJECTS = 10  # the official masks layout names them object_000..object_009
_OBJECT_KEYS = {"name", "role", "prompts"}
_PROMPT_KEYS = {"frame", "points", "box"}


@dataclass(frozen=True)
class FramePrompt:
    """What the user marked on one frame: points `(x, y)` with labels (1 on, 0 off) and a box."""

    frame: int
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None

    @property
    def has_positive(self) -> bool:
        """True if this prompt alone says where the object is (a positive point or a box)."""
        return self.box is not None or any(label == 1 for label in self.labels)

    def point_coords(self) -> np.ndarray | None:
        return np.asarray(self.points, dtype=np.float32).reshape(-1, 2) if self.points else None

    def point_labels(self) -> np.ndarray | None:
        return np.asarray(self.labels, dtype=np.int32) if self.labels else None

    def box_array(self) -> np.ndarray | None:
        return None if self.box is None else np.asarray(self.box, dtype=np.float32)


@dataclass(frozen=True)
class ObjectPrompts:
    """One object: its unique name, its role and its prompts sorted by frame (one per frame)."""

    name: str
    role: str
    prompts: tuple[FramePrompt, ...]

    @property
    def first_frame(self) -> int:
        return self.prompts[0].frame

    def prompt_at(self, frame: int) -> FramePrompt | None:
        for prompt in self.prompts:
            if prompt.frame == frame:
                return prompt
        return None


@dataclass(frozen=True)
class SegmentationPrompts:
    """All objects of one clip, in the order the user listed them."""

    objects: tuple[ObjectPrompts, ...]

    @property
    def dynamic(self) -> tuple[ObjectPrompts, ...]:
        return tuple(o for o in self.objects if o.role == "dynamic")

    @property
    def static(self) -> tuple[ObjectPrompts, ...]:
        return tuple(o for o in self.objects if o.role == "static")

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]

    def object(self, name: str) -> ObjectPrompts:
        """The object called `name`; InputError listing the known names if there is none."""
        for obj in self.objects:
            if obj.name == name:
                return obj
        raise InputError(f"unknown object {name!r}; the prompts define {', '.join(map(repr, self.names))}")

    def check_against_clip(self, width: int, height: int, frame_numbers: Sequence[int]) -> None:
        """InputError unless every prompt lies inside a `width` x `height` frame that was read."""
        available = set(frame_numbers)
        for obj in self.objects:
            for prompt in obj.prompts:
                where = f"object {obj.name!r}, frame {prompt.frame}"
                if prompt.frame not in available:
                    raise InputError(
                        f"{where}: the prompt is on a frame that is not in the clip "
                        f"(frames read: {_frame_summary(frame_numbers)})"
                    )
                for x, y in prompt.points:
                    if not (0 <= x <= width and 0 <= y <= height):
                        raise InputError(
                            f"{where}: point ({x:g}, {y:g}) lies outside the {width}x{height} frame "
                            "(coordinates are source-video pixels, origin top-left)"
                        )
                if prompt.box is not None:
                    x0, y0, x1, y1 = prompt.box
                    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                        raise InputError(
                            f"{where}: box {list(prompt.box)} lies outside the {width}x{height} frame"
                        )


def load_prompts(path: str | os.PathLike) -> SegmentationPrompts:
    """Read and check a prompts.json file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"prompts file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read prompts file {p}: {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"prompts file {p} is not valid JSON: {err}") from err
    try:
        return parse_prompts(data)
    except InputError as err:
        raise InputError(f"{p}: {err}") from err


def parse_prompts(data: Any) -> SegmentationPrompts:
    """Check the prompts.json structure (docs/contracts.md) and turn it into dataclasses."""
    if not isinstance(data, dict):
        raise InputError("prompts must be a JSON object with 'version' and 'objects'")
    version = data.get("version", PROMPTS_VERSION)
    if version != PROMPTS_VERSION or isinstance(version, bool):
        raise InputError(f"unsupported prompts version {version!r}; this version reads {PROMPTS_VERSION}")
    raw_objects = data.get("objects")
    if not isinstance(raw_objects, list) or not raw_objects:
        raise InputError("prompts need a non-empty 'objects' list")
    objects: list[ObjectPrompts] = []
    used_names: set[str] = set()
    for i, raw in enumerate(raw_objects):
        obj = _parse_object(raw, i)
        objects.append(ObjectPrompts(_unique_name(obj.name, used_names), obj.role, obj.prompts))
    dynamic = sum(o.role == "dynamic" for o in objects)
    if dynamic > MAX_DYNAMIC_OBJECTS:
        raise InputError(
            f"{dynamic} dynamic objects given; the model takes at most {MAX_DYNAMIC_OBJECTS} "
            "(mark the rest static or leave them out)"
        )
    return SegmentationPrompts(tuple(objects))


def _parse_object(raw: Any, index: int) -> ObjectPrompts:
    if not isinstance(raw, dict):
        raise InputError(f"objects[{index}] must be an object with 'name', 'role' and 'prompts'")
    unknown = set(raw) - _OBJECT_KEYS
    if unknown:
        raise InputError(
            f"objects[{index}] has unknown field(s) {sorted(unknown)}; allowed: {sorted(_OBJECT_KEYS)}"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"objects[{index}] needs a non-empty 'name'")
    role = raw.get("role")
    if role not in ROLES:
        raise InputError(f"object {name!r}: role must be 'static' or 'dynamic', got {role!r}")
    raw_prompts = raw.get("prompts")
    if not isinstance(raw_prompts, list) or not raw_prompts:
        raise InputError(f"object {name!r} has no prompts; mark it with a click or a box")
    by_frame: dict[int, FramePrompt] = {}
    for j, raw_prompt in enumerate(raw_prompts):
        prompt = _parse_prompt(raw_prompt, f"object {name!r}, prompts[{j}]")
        if prompt.frame in by_frame:
            prompt = _merge(by_frame[prompt.frame], prompt, f"object {name!r}, frame {prompt.frame}")
        by_frame[prompt.frame] = prompt
    prompts = tuple(by_frame[f] for f in sorted(by_frame))
    if not prompts[0].has_positive:
        raise InputError(
            f"object {name!r}: its first prompt (frame {prompts[0].frame}) has no positive point and no "
            "box, so there is nothing to start from; add a click on the object (label 1) or a box"
        )
    return ObjectPrompts(name, role, prompts)


def _parse_prompt(raw: Any, where: str) -> FramePrompt:
    if not isinstance(raw, dict):
        raise InputError(f"{where} must be an object with 'frame' and 'points' and/or 'box'")
    unknown = set(raw) - _PROMPT_KEYS
    if unknown:
        raise InputError(f"{where} has unknown field(s) {sorted(unknown)}; allowed: {sorted(_PROMPT_KEYS)}")
    frame = raw.get("frame")
    if isinstance(frame, float) and frame.is_integer():
        frame = int(frame)
    if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
        raise InputError(f"{where}: 'frame' must be a frame number (0 or more), got {frame!r}")
    where = f"{where} (frame {frame})"
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    raw_points = raw.get("points", [])
    if not isinstance(raw_points, list):
        raise InputError(f"{where}: 'points' must be a list of [x, y, label]")
    for raw_point in raw_points:
        if not isinstance(raw_point, list | tuple) or len(raw_point) != 3:
            raise InputError(f"{where}: each point must be [x, y, label], got {raw_point!r}")
        x, y = _number(raw_point[0], where), _number(raw_point[1], where)
        label = raw_point[2]
        if label not in (0, 1) or isinstance(label, bool):
            raise InputError(f"{where}: point label must be 1 (on the object) or 0 (off it), got {label!r}")
        points.append((x, y))
        labels.append(int(label))
    box = None
    if raw.get("box") is not None:
        raw_box = raw["box"]
        if not isinstance(raw_box, list | tuple) or len(raw_box) != 4:
            raise InputError(f"{where}: 'box' must be [x0, y0, x1, y1], got {raw_box!r}")
        x0, y0, x1, y1 = (_number(v, where) for v in raw_box)
        if not (x1 > x0 and y1 > y0):
            raise InputError(f"{where}: box {list(raw_box)} is empty; it needs x0 < x1 and y0 < y1")
        box = (x0, y0, x1, y1)
    if not points and box is None:
        raise InputError(f"{where}: a prompt needs 'points' or a 'box'")
    return FramePrompt(frame, tuple(points), tuple(labels), box)


def _merge(a: FramePrompt, b: FramePrompt, where: str) -> FramePrompt:
    if a.box is not None and b.box is not None:
        raise InputError(f"{where}: two boxes on the same frame; give one box per object and frame")
    return FramePrompt(a.frame, a.points + b.points, a.labels + b.labels, a.box or b.box)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{where}: coordinates must be finite numbers, got {value!r}")
    return float(value)


def _unique_name(name: str, used: set[str]) -> str:
    """Blender-style de-duplication: 'dog', 'dog.001', 'dog.002', ..."""
    candidate, n = name, 0
    while candidate in used:
        n += 1
        candidate = f"{name}.{n:03d}"
    used.add(candidate)
    return candidate


def _frame_summary(numbers: Sequence[int]) -> str:
    numbers = list(numbers)
    if len(numbers) <= 6:
        return ", ".join(str(n) for n in numbers)
    return f"{numbers[0]}..{numbers[-1]} ({len(numbers)} frames)"
