"""Events a reconstruction reports while it runs, and the token that cancels it.

The pipeline calls `on_event(event)` with one of the dataclasses below. They hold plain Python
values and numpy arrays only, so a caller can forward them anywhere (the backend sends them over
ZeroMQ; the CLI drives a progress bar from them). See docs/contracts.md.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from com4d.errors import Cancelled


@dataclass(frozen=True)
class Event:
    kind = "event"

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind}
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        return out


@dataclass(frozen=True)
class Progress(Event):
    """Where the run is. `done/total` count all work units of the job (denoising steps + meshes)."""

    stage: str
    step: int = 0
    steps: int = 0
    window: int = 0
    windows: int = 0
    done: int = 0
    total: int = 0
    message: str = ""
    kind = "progress"


@dataclass(frozen=True)
class MeshReady(Event):
    """One finished mesh. `frame` is the source frame number; `frame_index` is None for statics."""

    name: str
    role: str
    object_index: int
    frame: int
    frame_index: int | None
    vertices: np.ndarray  # (V, 3) float32, canonical y-up cube
    faces: np.ndarray  # (F, 3) int32
    path: str = ""
    color: list[float] = field(default_factory=list)  # RGB 0..1, the object's colour in the manifest
    kind = "mesh"


@dataclass(frozen=True)
class TrackedMeshReady(Event):
    """One dynamic object as a single topology: shared faces, one vertex array per frame."""

    name: str
    object_index: int
    frames: list[int]
    vertices: np.ndarray  # (F, V, 3) float32
    faces: np.ndarray  # (Fc, 3) int32
    path: str = ""
    fallback_frames: list[int] = field(default_factory=list)
    color: list[float] = field(default_factory=list)
    kind = "tracked_mesh"


@dataclass(frozen=True)
class WarningEvent(Event):
    """Something the user should know about that did not stop the run."""

    code: str
    message: str
    frames: list[int] = field(default_factory=list)
    kind = "warning"


@dataclass(frozen=True)
class Done(Event):
    """The run finished; `scene_path` is the manifest relative to the output folder."""

    scene_path: str
    kind = "done"


EventCallback = Callable[[Event], None]


def ignore_events(event: Event) -> None:
    """The default callback."""


class CancelToken:
    """Thread-safe cancellation flag, checked by the pipeline once per denoising step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("the reconstruction was cancelled")
