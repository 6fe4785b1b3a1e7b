"""The reconstruction parameters the add-on sends, named as in the library's ReconstructionParams.

Only what the panel exposes is sent; the backend fills in the official defaults for the rest.
"""

from __future__ import annotations

OFFICIAL_SCENE_MIX_CUTOFF = 50  # the library refuses a cutoff below the number of scene steps


def reconstruction_params(
    frames: list[int], num_tokens: int, steps: int, mesh_detail: int = 9, topology: str = "per_frame"
) -> dict:
    """Parameters for reconstructing source `frames` (evenly spaced) at the given quality."""
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
        "mesh_final_depth": int(mesh_detail),
        "mesh_dense_depth": min(8, int(mesh_detail)),
        "topology": topology,
    }
    if steps > OFFICIAL_SCENE_MIX_CUTOFF:
        params["scene_mix_cutoff"] = int(steps)
    return params
