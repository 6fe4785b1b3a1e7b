"""The one schema of a reconstruction's parameters: names, types, defaults, ranges and help.

Pure standard library (no torch, numpy or PIL): the backend validates submits with it, the
Blender add-on ships a copy of this file, and the CLI builds its flags from it. Every field is
declared once, in `SPECS`; the wire name is the field name and the CLI flag is `--` + the name
with dashes.

Defaults follow the official code as `sh/infer.sh` runs it with the teaser entries of
`infer.json` (docs/algorithm.md lists every difference). Two teaser settings depend on the clip
and are not defaults here: its stage-A frame (5; ours defaults to the first selected frame) and
its 4 static parts (ours defaults to the static objects named in the input, else 1).

    params = ReconstructionParams.from_dict({"num_tokens": 1024})   # untrusted input
    params.validate(ModelLimits(part_rows=32, frame_rows=64))       # against a loaded model
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

try:
    from com4d.errors import ParameterError
except ImportError:  # pragma: no cover - the Blender add-on's copy of this file, outside the com4d package

    class ParameterError(ValueError):  # type: ignore[no-redef]
        """A parameter out of range (the add-on's stand-in for com4d.errors.ParameterError)."""

        code = "bad_parameter"


# The attention routing `sh/infer.sh` always passes (--scene_attn_ids / --dynamic_attn_ids).
OFFICIAL_SPATIAL_BLOCK_IDS = (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20)
OFFICIAL_TEMPORAL_BLOCK_IDS = (0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21)

# The model learns no per-token table, so nothing in the weights bounds the token count; this bound
# (twice the released 2048) keeps a request from asking for memory no single GPU has.
MAX_TOKENS = 4096
MAX_STEPS = 1000
NOISE_MODES = ("cpu", "cuda_fp16")
# The attention seam's backends (com4d.attention.BACKENDS; a test keeps the two equal).
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
TOPOLOGIES = ("per_frame", "tracked")


@dataclass(frozen=True)
class Spec:
    """One parameter: its type ('int', 'float', 'bool', 'str', 'int_list'), default and limits."""

    name: str
    type: str
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    unit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["default"] = list(self.default) if isinstance(self.default, tuple) else self.default
        d["choices"] = list(self.choices) if self.choices else None
        return d


SPECS: tuple[Spec, ...] = (
    Spec("num_tokens", "int", 2048, "latent tokens per object (1024 is faster, coarser)", 1, MAX_TOKENS),
    Spec("scene_steps", "int", 50, "denoising steps of stage A (the scene at one frame)", 1, MAX_STEPS),
    Spec("dynamic_steps", "int", 50, "denoising steps per stage-B window", 1, MAX_STEPS),
    Spec(
        "scene_guidance",
        "float",
        7.0,
        "classifier-free guidance of stage A; <= 1 uses the conditional prediction alone (one pass)",
        0.0,
        100.0,
    ),
    Spec(
        "dynamic_guidance",
        "float",
        7.0,
        "classifier-free guidance of stage B; <= 1 uses the conditional prediction alone (one pass)",
        0.0,
        100.0,
    ),
    Spec(
        "scene_full_image_from_step",
        "int",
        5,
        "stage-A step from which the spatial blocks see the full frame (official: 5)",
        0,
        MAX_STEPS,
        unit="step",
    ),
    Spec(
        "scene_num_parts",
        "int",
        None,
        "static latents of stage A, at most the model's part-table rows minus the moving objects; 0 skips stage A; "
        "default: the static objects named in the input, else 1",
        0,
        None,
        nullable=True,
    ),
    Spec("frame_start", "int", 0, "first frame to reconstruct (index into the input's frames)", 0, None, unit="frame"),
    Spec(
        "frame_end",
        "int",
        None,
        "end of the frame range, exclusive (default: the last frame)",
        1,
        None,
        nullable=True,
        unit="frame",
    ),
    Spec("frame_stride", "int", 2, "use every n-th frame of the range", 1, None, unit="frames"),
    Spec(
        "stage_a_frame",
        "int",
        None,
        "frame of the stage-A scene, an index into the input's frames (default: frame_start)",
        0,
        None,
        nullable=True,
        unit="frame",
    ),
    Spec("dynamic_ar_block_size", "int", 6, "new frames per stage-B window", 1, None, unit="frames"),
    Spec("dynamic_max_memory_frames", "int", 8, "frames per stage-B window, history included", 1, None, unit="frames"),
    Spec(
        "dynamic_mix_cutoff",
        "int",
        20,
        "stage-B step after which (strictly) objects stop attending to each other",
        0,
        None,
        unit="step",
    ),
    Spec(
        "scene_mix_cutoff",
        "int",
        50,
        "stage-A mixing cutoff; must be >= scene_steps (every released setting mixes on every step)",
        0,
        None,
        unit="step",
    ),
    Spec(
        "spatial_block_ids",
        "int_list",
        OFFICIAL_SPATIAL_BLOCK_IDS,
        "DiT blocks that attend across the objects of one frame (official --scene_attn_ids)",
        0,
        None,
    ),
    Spec(
        "temporal_block_ids",
        "int_list",
        OFFICIAL_TEMPORAL_BLOCK_IDS,
        "DiT blocks that attend across the frames of one object (official --dynamic_attn_ids)",
        0,
        None,
    ),
    Spec("seed", "int", 0, "noise seed", 0, 2**63 - 1),
    Spec(
        "noise_mode",
        "str",
        "cpu",
        "how the seed becomes noise: 'cpu' (fp32 CPU generator, the same on every machine) or 'cuda_fp16' "
        "(fp16 from a CUDA generator, as the official script draws on a GPU; needs CUDA)",
        choices=NOISE_MODES,
    ),
    Spec(
        "image_size",
        "int",
        518,
        "conditioning image size (square), a multiple of the DINOv2 patch 14",
        14,
        2044,
        unit="px",
    ),
    Spec(
        "use_frames_no_bg",
        "bool",
        False,
        "condition on frames_no_bg/ instead of frames/ when the input has it (official --load_frames_no_bg)",
    ),
    Spec(
        "attention_backend",
        "str",
        "auto",
        "attention kernels of the DiT and the VAE: auto (PyTorch's choice), cudnn, flash, efficient or math "
        "(the reference); a backend the device lacks is refused",
        choices=ATTENTION_BACKENDS,
    ),
    Spec("mesh_dense_depth", "int", 8, "octree depth of the dense field pass (8 = 256^3)", 1, 10),
    Spec("mesh_final_depth", "int", 9, "octree depth of the refined mesh (9 = 512^3)", 1, 10),
    Spec(
        "topology",
        "str",
        "per_frame",
        "per_frame: a mesh per frame (official); tracked: one deforming mesh per moving object",
        choices=TOPOLOGIES,
    ),
    Spec(
        "tracking_threshold",
        "float",
        None,
        "tracked topology: chamfer distance above which a frame keeps its own mesh (default 0.02)",
        0.0,
        1.0,
        nullable=True,
        unit="canonical units",
    ),
    Spec("allow_lost", "bool", False, "segmentation: keep going when an object is lost on some frames"),
    Spec(
        "memory_budget",
        "int",
        None,
        "refuse jobs estimated to need more memory than this (default: free GPU)",
        1,
        None,
        nullable=True,
        unit="bytes",
    ),
    Spec(
        "mesh_workers",
        "int",
        None,
        "marching-cubes processes (default: 0 below 512^3 or under 4 cores, else up to 4)",
        0,
        64,
        nullable=True,
    ),
    Spec("combined_frames", "bool", True, "also write one GLB per frame with every object"),
    Spec("preview", "bool", True, "write preview.png"),
)
SPEC_BY_NAME = {s.name: s for s in SPECS}


@dataclass(frozen=True)
class ModelLimits:
    """What a loaded model bounds: its part table (objects per grid) and frame table (window columns)."""

    part_rows: int
    frame_rows: int


def _check_value(spec: Spec, value: Any) -> Any:
    """The value, type-checked and range-checked (lists become tuples); ParameterError otherwise."""
    name = spec.name
    if value is None:
        if spec.nullable:
            return None
        raise ParameterError(f"parameter {name} may not be null")
    if spec.type == "bool":
        if not isinstance(value, bool):
            raise ParameterError(f"parameter {name} must be true or false, got {value!r}")
        return value
    if spec.type == "str":
        if not isinstance(value, str):
            raise ParameterError(f"parameter {name} must be a string, got {value!r}")
        if spec.choices and value not in spec.choices:
            raise ParameterError(f"parameter {name} must be one of {', '.join(spec.choices)}, got {value!r}")
        return value
    if spec.type == "int_list":
        if not isinstance(value, (list, tuple)):
            raise ParameterError(f"parameter {name} must be a list of integers, got {value!r}")
        item = dataclasses.replace(spec, type="int", nullable=False)
        ids = tuple(_check_value(item, v) for v in value)
        if len(set(ids)) != len(ids):
            raise ParameterError(f"parameter {name} lists a block twice: {list(ids)}")
        return tuple(sorted(ids))
    if spec.type == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParameterError(f"parameter {name} must be an integer, got {value!r}")
    elif spec.type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParameterError(f"parameter {name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ParameterError(f"parameter {name} must be a finite number, got {value!r}")
    else:  # pragma: no cover - a schema error, caught by the tests
        raise TypeError(f"unknown parameter type {spec.type!r}")
    if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
        raise ParameterError(f"parameter {name} must be in {_range_text(spec)}, got {value!r}")
    return value


def _range_text(spec: Spec) -> str:
    lo = "-inf" if spec.min is None else spec.min
    hi = "inf" if spec.max is None else spec.max
    return f"[{lo}, {hi}]"


@dataclass(frozen=True)
class ReconstructionParams:
    """Every knob of a reconstruction; `SPECS` holds each one's type, default, range and help.

    Frames are selected as `frames[frame_start:frame_end:frame_stride]` (indices into the input's
    frame list); the stage-A frame is `stage_a_frame` (an index into the same, un-strided list;
    default: `frame_start`).
    """

    num_tokens: int = 2048
    scene_steps: int = 50
    dynamic_steps: int = 50
    scene_guidance: float = 7.0
    dynamic_guidance: float = 7.0
    scene_full_image_from_step: int = 5
    scene_num_parts: int | None = None
    frame_start: int = 0
    frame_end: int | None = None
    frame_stride: int = 2
    stage_a_frame: int | None = None
    dynamic_ar_block_size: int = 6
    dynamic_max_memory_frames: int = 8
    dynamic_mix_cutoff: int = 20
    scene_mix_cutoff: int = 50
    spatial_block_ids: tuple[int, ...] = OFFICIAL_SPATIAL_BLOCK_IDS
    temporal_block_ids: tuple[int, ...] = OFFICIAL_TEMPORAL_BLOCK_IDS
    seed: int = 0
    noise_mode: str = "cpu"
    image_size: int = 518
    use_frames_no_bg: bool = False
    attention_backend: str = "auto"
    mesh_dense_depth: int = 8
    mesh_final_depth: int = 9
    topology: str = "per_frame"
    tracking_threshold: float | None = None
    allow_lost: bool = False
    memory_budget: int | None = None
    mesh_workers: int | None = None
    combined_frames: bool = True
    preview: bool = True

    def __post_init__(self) -> None:
        # Accept lists for the id fields (Python callers) while keeping the object hashable and frozen.
        for name in ("spatial_block_ids", "temporal_block_ids"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def from_dict(cls, values: dict[str, Any], limits: ModelLimits | None = None) -> ReconstructionParams:
        """Build from untrusted names/values (CLI, wire), with a clear error for each problem."""
        if not isinstance(values, dict):
            raise ParameterError("parameters must be a mapping of names to values")
        kwargs = {}
        for name, value in values.items():
            spec = SPEC_BY_NAME.get(name) if isinstance(name, str) else None
            if spec is None:
                raise ParameterError(f"unknown parameter {name!r} (known: {', '.join(SPEC_BY_NAME)})")
            kwargs[name] = _check_value(spec, value)
        params = cls(**kwargs)
        params.validate(limits)
        return params

    def validate(self, limits: ModelLimits | None = None) -> None:
        """Check every field and the rules between fields; with `limits`, also against a model."""
        for spec in SPECS:
            _check_value(spec, getattr(self, spec.name))
        if self.scene_mix_cutoff < self.scene_steps:
            raise ParameterError(
                "scene_mix_cutoff below scene_steps is not supported: the official refinement branch it "
                "selects crashes with more than one static part; every released setting uses all steps"
            )
        if self.mesh_dense_depth > self.mesh_final_depth:
            raise ParameterError(
                f"mesh_dense_depth ({self.mesh_dense_depth}) must not exceed mesh_final_depth ({self.mesh_final_depth})"
            )
        if self.image_size % 14:
            raise ParameterError(f"image_size must be a multiple of the DINOv2 patch (14), got {self.image_size}")
        if self.frame_end is not None and self.frame_end <= self.frame_start:
            raise ParameterError(f"frame_end ({self.frame_end}) must be greater than frame_start ({self.frame_start})")
        if limits is not None:
            self.check_limits(limits)

    def check_limits(self, limits: ModelLimits) -> None:
        """The rules that depend on the model alone (the plan checks the rest against the input)."""
        if self.scene_num_parts is not None and self.scene_num_parts > limits.part_rows:
            raise ParameterError(
                f"parameter scene_num_parts must be in [0, {limits.part_rows}] for this model (its part table "
                f"has {limits.part_rows} rows), got {self.scene_num_parts}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/msgpack-ready values, keyed by wire name."""
        return {s.name: (list(v) if isinstance(v := getattr(self, s.name), tuple) else v) for s in SPECS}

    def replace(self, **changes: Any) -> ReconstructionParams:
        """A validated copy with some fields changed."""
        return ReconstructionParams.from_dict({**self.to_dict(), **changes})


def param_specs() -> list[dict[str, Any]]:
    """Every parameter as a plain dict (name, type, default, min, max, choices, nullable, unit, help)."""
    return [s.to_dict() for s in SPECS]


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _int_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(" ", ",").split(",") if p]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated block ids such as 0,2,4, got {text!r}") from err


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """One flag per parameter (`--` + name with dashes); unset flags stay None so defaults apply."""
    for s in SPECS:
        default_text = ",".join(map(str, s.default)) if isinstance(s.default, tuple) else s.default
        help_text = f"{s.help} (default {default_text})" if s.default is not None else s.help
        help_text = help_text.replace("%", "%%")
        if s.type == "bool":
            parser.add_argument(
                cli_flag(s.name), dest=s.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif s.type == "int_list":
            parser.add_argument(
                cli_flag(s.name), dest=s.name, type=_int_list, default=None, metavar="IDS", help=help_text
            )
        else:
            kind = {"int": int, "float": float, "str": str}[s.type]
            parser.add_argument(
                cli_flag(s.name),
                dest=s.name,
                type=kind,
                default=None,
                choices=s.choices,
                metavar=None if s.choices else s.name.upper(),
                help=help_text,
            )


def from_namespace(ns: argparse.Namespace, base: dict[str, Any] | None = None) -> ReconstructionParams:
    """The params of parsed flags (those given) over `base` over the defaults."""
    values = dict(base or {})
    values.update({s.name: getattr(ns, s.name) for s in SPECS if getattr(ns, s.name, None) is not None})
    return ReconstructionParams.from_dict(values)


__all__ = [
    "MAX_TOKENS",
    "OFFICIAL_SPATIAL_BLOCK_IDS",
    "OFFICIAL_TEMPORAL_BLOCK_IDS",
    "SPECS",
    "ModelLimits",
    "ReconstructionParams",
    "Spec",
    "add_arguments",
    "from_namespace",
    "param_specs",
]
