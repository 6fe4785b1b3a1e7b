"""The plan of a reconstruction: which frames, objects, windows and output files, computed once.

Pure standard library (no torch, numpy or PIL), so the backend can check a submit against its
inputs before any model is loaded:

    plan = plan_reconstruction(InputSummary(frame_numbers=[0, 1, 2], dynamic_names=["ball"]), params)

Everything the run needs to know up front is here; the run (`com4d.pipeline`) only executes it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from com4d.errors import InputError, ParameterError
from com4d.params import ModelLimits, ReconstructionParams


@dataclass(frozen=True)
class InputSummary:
    """What the plan needs of an input: its frame numbers (in order) and object names.

    preselected: the input holds only the frames the params select, as source frame numbers (a
    segmentation that read just those); the plan then uses all of them and finds the stage-A frame
    by its number.
    """

    frame_numbers: Sequence[int]
    dynamic_names: Sequence[str]
    static_names: Sequence[str] = ()
    preselected: bool = False


@dataclass(frozen=True)
class Window:
    """One stage-B window: which selected frames are history (clean) and which are new."""

    history: list[int]  # indices into the selected frames
    new: list[int]
    initial_history: bool  # the first window also carries the stage-A latent as column 0

    @property
    def columns(self) -> int:
        return len(self.history) + len(self.new) + int(self.initial_history)


def plan_windows(num_frames: int, block_size: int, max_memory: int, initial_history: bool = True) -> list[Window]:
    """Autoregressive windows as the official `_run_dynamic_stage` builds them.

    Blocks of `block_size` new frames; history = the block before, trimmed from its oldest side so
    that history + new <= max_memory. The first window carries the stage-A latent as one extra
    column (when there is a stage A). A block larger than `max_memory` keeps no history at all,
    not even the stage-A column (the official code trims both, then only warns).
    """
    if num_frames < 1 or block_size < 1:
        raise ValueError("need at least one frame and a block size of at least 1")
    if max_memory < 1:
        raise ValueError("max_memory must be at least 1")
    windows = []
    for start in range(0, num_frames, block_size):
        new = list(range(start, min(start + block_size, num_frames)))
        history = list(range(max(0, start - block_size), start))
        keep = max(0, max_memory - len(new))
        history = history[len(history) - keep :] if keep > 0 else []
        first = initial_history and start == 0 and len(new) <= max_memory
        windows.append(Window(history=history, new=new, initial_history=first))
    return windows


def safe_name(name: str) -> str:
    """A file-system-safe version of an object name (the manifest keeps the real name)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "object"


def file_stems(names: Sequence[str]) -> list[str]:
    """A distinct file-system-safe stem per name, in order: names that sanitise alike ('a/b' and 'a?b'
    both give 'a_b') get '_2', '_3'... Distinct ignoring case too, for case-insensitive disks."""
    taken: set[str] = set()
    stems = []
    for name in names:
        base = stem = safe_name(name)
        n = 1
        while stem.lower() in taken:
            n += 1
            stem = f"{base}_{n}"
        taken.add(stem.lower())
        stems.append(stem)
    return stems


def unique_names(names: Sequence[str]) -> list[str]:
    """Make names unique the way Blender does: 'chair', 'chair.001', ..."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        base = n.strip() or "object"
        if base not in seen:
            seen[base] = 0
            out.append(base)
            continue
        while True:
            seen[base] += 1
            candidate = f"{base}.{seen[base]:03d}"
            if candidate not in seen:
                seen[candidate] = 0
                out.append(candidate)
                break
    return out


@dataclass(frozen=True)
class Plan:
    """One reconstruction, decided up front.

    frames: indices into the input's frames (the selected frames, in order); frame_numbers: their
    source numbers. stage_a: index of the stage-A frame, None when scene_num_parts = 0 (the
    official code then skips stage A: no static objects, no stage-A history column).
    """

    frames: list[int]
    frame_numbers: list[int]
    stage_a: int | None
    stage_a_frame_number: int | None
    static_names: list[str]
    dynamic_names: list[str]
    windows: list[Window] = field(default_factory=list)
    steps_a: int = 0
    steps_b: int = 0

    @property
    def num_static(self) -> int:
        return len(self.static_names)

    @property
    def num_dynamic(self) -> int:
        return len(self.dynamic_names)

    @property
    def num_objects(self) -> int:
        return self.num_static + self.num_dynamic

    @property
    def has_stage_a(self) -> bool:
        return self.stage_a is not None

    @property
    def max_columns(self) -> int:
        return max((w.columns for w in self.windows), default=1)

    @property
    def meshes(self) -> int:
        """Meshes the run writes: statics and stage-A dynamics once, every dynamic object per frame."""
        stage_a = self.num_objects if self.has_stage_a else 0
        return stage_a + self.num_dynamic * len(self.frames)

    @property
    def total_units(self) -> int:
        """Progress units of the whole job: denoising steps plus meshes."""
        return (self.steps_a if self.has_stage_a else 0) + len(self.windows) * self.steps_b + self.meshes

    def outputs(self) -> list[str]:
        """Every mesh file the run writes, relative to the output folder (docs/contracts.md)."""
        files = []
        if self.has_stage_a:
            files += [f"static/{s}.glb" for s in file_stems(self.static_names)]
            files += [f"dynamic/{s}/stage_a.glb" for s in file_stems(self.dynamic_names)]
        for s in file_stems(self.dynamic_names):
            files += [f"dynamic/{s}/frame_{f:06d}.glb" for f in self.frame_numbers]
        return files


def plan_reconstruction(inputs: InputSummary, params: ReconstructionParams, limits: ModelLimits | None = None) -> Plan:
    """The plan of `params` on `inputs`; InputError/ParameterError name what does not fit.

    With `limits` (a loaded model's tables) the object count and window size are checked too.
    """
    params.validate(limits)
    n = len(inputs.frame_numbers)
    frames = (
        list(range(n))
        if inputs.preselected
        else list(range(n))[params.frame_start : params.frame_end : params.frame_stride]
    )
    if not frames:
        raise InputError(
            f"the frame range start={params.frame_start} end={params.frame_end} stride={params.frame_stride} "
            f"selects no frame of the {n} available"
        )
    if params.scene_num_parts is None:
        S = max(1, len(inputs.static_names))
    else:
        S = params.scene_num_parts
    K = len(inputs.dynamic_names)
    if S + K == 0:
        raise InputError("nothing to reconstruct: no moving object and scene_num_parts = 0")
    stage_a = None
    if S > 0:
        stage_a = params.frame_start if params.stage_a_frame is None else params.stage_a_frame
        if inputs.preselected:
            if stage_a not in inputs.frame_numbers:
                raise ParameterError(
                    f"stage_a_frame {stage_a} is not among the segmented frames {list(inputs.frame_numbers)[:6]}...; "
                    "pick one of the selected frames"
                )
            stage_a = list(inputs.frame_numbers).index(stage_a)
        elif not 0 <= stage_a < n:
            raise InputError(f"stage_a_frame {stage_a} is outside the {n} available frames")
    static = (list(inputs.static_names) + [f"static_{i:03d}" for i in range(len(inputs.static_names), S)])[:S]
    names = unique_names(static + list(inputs.dynamic_names))
    windows = (
        plan_windows(len(frames), params.dynamic_ar_block_size, params.dynamic_max_memory_frames, S > 0) if K else []
    )
    plan = Plan(
        frames=frames,
        frame_numbers=[inputs.frame_numbers[i] for i in frames],
        stage_a=stage_a,
        stage_a_frame_number=None if stage_a is None else inputs.frame_numbers[stage_a],
        static_names=names[:S],
        dynamic_names=names[S:],
        windows=windows,
        steps_a=params.scene_steps,
        steps_b=params.dynamic_steps,
    )
    if limits is not None:
        if plan.num_objects > limits.part_rows:
            raise ParameterError(
                f"{S} static parts + {K} dynamic objects exceed the model's {limits.part_rows} objects; "
                "lower scene_num_parts or segment fewer objects"
            )
        if plan.max_columns > limits.frame_rows:
            raise ParameterError(
                f"a stage-B window of {plan.max_columns} frames exceeds the model's {limits.frame_rows}; "
                "lower dynamic_ar_block_size or dynamic_max_memory_frames"
            )
    return plan


__all__ = [
    "InputSummary",
    "Plan",
    "Window",
    "file_stems",
    "plan_reconstruction",
    "plan_windows",
    "safe_name",
    "unique_names",
]
