"""The reconstruction parameters the add-on sends, read from the library's own schema.

`_params.py` is the library's `com4d/params.py` (standard library only), copied into the extension by
build_addon.py: the defaults, ranges and help the panel shows are the ones the backend checks. Every
schema field is either set from a clip setting (`CLIP_SETTING`) or left to the backend's default, for
the reason given in `LEFT_TO_THE_BACKEND`; the tests check that the two together name every field.
"""

from __future__ import annotations

from . import _params as schema

# Schema field -> the clip setting (COM4D_PG_clip) it comes from.
CLIP_SETTING = {
    "frame_start": "frame_first",
    "frame_end": "frame_last",
    "frame_stride": "frame_stride",
    "num_tokens": "num_tokens",
    "scene_steps": "steps",
    "dynamic_steps": "steps",
    "scene_mix_cutoff": "steps",  # must not be below scene_steps
    "scene_guidance": "guidance",
    "dynamic_guidance": "guidance",
    "seed": "seed",
    "mesh_final_depth": "mesh_detail",
    "mesh_dense_depth": "mesh_detail",
    "topology": "topology",
    "allow_lost": "allow_lost",
}

# Schema fields the panel does not show, and why.
LEFT_TO_THE_BACKEND = {
    "scene_full_image_from_step": "a setting of the trained model (the official value)",
    "scene_num_parts": "follows the static objects listed for the clip",
    "stage_a_frame": "the first reconstructed frame",
    "dynamic_ar_block_size": "a setting of the trained model (the official value)",
    "dynamic_max_memory_frames": "a setting of the trained model (the official value)",
    "dynamic_mix_cutoff": "a setting of the trained model (the official value)",
    "spatial_block_ids": "the trained model's attention routing",
    "temporal_block_ids": "the trained model's attention routing",
    "noise_mode": "CPU noise, the same on every machine",
    "image_size": "the trained model's conditioning size",
    "attention_backend": "the backend picks the fastest exact kernels of its GPU",
    "use_frames_no_bg": "the add-on sends a video, not folders of frames",
    "tracking_threshold": "the library's threshold for deforming meshes",
    "memory_budget": "the backend knows its own memory",
    "mesh_workers": "the backend knows its own cores",
    "combined_frames": "extra files on the backend's disk that the add-on does not import",
    "preview": "an extra file on the backend's disk that the add-on does not import",
}

BLENDER_INT_MAX = 2**31 - 1  # Blender's IntProperty is 32-bit


def spec(name: str):
    """The schema's entry for `name` (type, default, min, max, choices, help)."""
    return schema.SPEC_BY_NAME[name]


def default(name: str):
    return spec(name).default


def description(name: str) -> str:
    text = spec(name).help
    return text[:1].upper() + text[1:]


def limits(name: str) -> dict:
    """`min`/`max` keyword arguments for a Blender number property, from the schema's range."""
    entry = spec(name)
    bounds = {}
    if entry.min is not None:
        bounds["min"] = entry.min if entry.type == "float" else int(entry.min)
    if entry.max is not None:
        bounds["max"] = entry.max if entry.type == "float" else min(int(entry.max), BLENDER_INT_MAX)
    elif entry.type == "int":
        bounds["max"] = BLENDER_INT_MAX
    return bounds


def reconstruction_params(
    frames: list[int],
    num_tokens: int,
    steps: int,
    mesh_detail: int = default("mesh_final_depth"),
    topology: str = default("topology"),
    guidance: float = default("scene_guidance"),
    seed: int = default("seed"),
    allow_lost: bool = default("allow_lost"),
) -> dict:
    """Parameters for reconstructing source `frames` (evenly spaced) with the clip's settings."""
    if not frames:
        raise ValueError("no frames to reconstruct")
    strides = {b - a for a, b in zip(frames, frames[1:])}
    if len(strides) > 1:
        raise ValueError(f"the frames must be evenly spaced, got {frames}")
    params = {
        "frame_start": int(frames[0]),
        "frame_end": int(frames[-1]) + 1,
        "frame_stride": int(strides.pop()) if strides else 1,
        "num_tokens": int(num_tokens),
        "scene_steps": int(steps),
        "dynamic_steps": int(steps),
        "scene_mix_cutoff": max(int(default("scene_mix_cutoff")), int(steps)),
        "scene_guidance": float(guidance),
        "dynamic_guidance": float(guidance),
        "seed": int(seed),
        "mesh_final_depth": int(mesh_detail),
        "mesh_dense_depth": min(int(default("mesh_dense_depth")), int(mesh_detail)),
        "topology": topology,
        "allow_lost": bool(allow_lost),
    }
    try:
        schema.ReconstructionParams.from_dict(params)  # the backend's own checks, before anything is sent
    except schema.ParameterError as err:
        raise ValueError(str(err)) from err
    return params
