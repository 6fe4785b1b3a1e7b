"""The embedded default: a synthetic clip and tiny seeded weights shipped inside the package.

`com4d demo` runs the complete method on them — stage A, stage B, meshing, export, preview — on
a CPU in well under a minute, with nothing to download. The weights are random (never trained),
so the meshes are smooth blobs: the demo shows the machinery and the output format, not quality.
Regenerate the assets with `scripts/make_demo_assets.py`.
"""

from __future__ import annotations

from pathlib import Path

from com4d.errors import InputError

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"

# Small enough for a 2-core CPU: 32 tokens, 16 + 2 x 8 steps, 8 frames in 2 windows, 64^3 meshing.
DEMO_PARAMS = {
    "num_tokens": 32,
    "scene_steps": 16,
    "dynamic_steps": 8,
    "dynamic_mix_cutoff": 3,
    "frame_start": 0,
    "frame_stride": 1,
    "dynamic_ar_block_size": 4,
    "dynamic_max_memory_frames": 5,
    "mesh_dense_depth": 5,
    "mesh_final_depth": 6,
}


def demo_paths() -> tuple[Path, Path]:
    """(weights folder, clip folder) of the bundled demo."""
    weights, clip = DEMO_DIR / "weights", DEMO_DIR / "clip"
    if not (weights / "TripoSG").is_dir() or not (clip / "masks").is_dir():
        raise InputError(f"the bundled demo assets are missing from {DEMO_DIR} (reinstall com4d)")
    return weights, clip
