"""What the add-on tests need from the library, made in the backend's Python (the one with torch).

Blender's own Python has no torch (Blender 5.1+ runs Python 3.13, where this project installs only
`bpy`), just as an artist's Blender has none: the library and the backend run in another Python. The
add-on tests run this file once with that Python (`conftest.backend_python()`) and read what it
writes. Numpy is the only import at module level, so the tests can share `grid_mesh` and `FRAMES`.

Usage: python tests/addon/library_outputs.py OUT_DIR
  OUT_DIR/garden/        a reconstruction folder: a static table, a per-frame dog, a tracked cat
  OUT_DIR/fallback_cat/  a tracked cat with per-frame meshes where tracking fell back (frame 2)
  OUT_DIR/facts.json     the library's object colours and the tiny weights folder
  OUT_DIR/tiny_sam.pth   a tiny random SAM checkpoint (the library tests' own builder)
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

FRAMES = [0, 2, 4]
COLOURS = 8  # how many of the library's object colours the tests may compare with
TESTS = Path(__file__).resolve().parents[1]


def grid_mesh(seed: int, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """An (n x n) grid of vertices, triangulated, jittered: a recognisable small mesh."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(-0.5, 0.5, n), np.linspace(-0.5, 0.5, n))
    vertices = np.stack([u.ravel(), v.ravel(), rng.uniform(-0.1, 0.1, n * n)], axis=1).astype(np.float32)
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a = r * n + c
            faces += [[a, a + 1, a + n], [a + 1, a + n + 1, a + n]]
    return vertices, np.asarray(faces, np.int32)


def garden_cat_vertices() -> np.ndarray:
    """The tracked cat's vertices on each of FRAMES (F, V, 3): one topology, moving along y."""
    base, _ = grid_mesh(20)
    return np.stack([base + [0, 0.2 * k, 0] for k in range(len(FRAMES))]).astype(np.float32)


def write_garden(out: Path) -> None:
    from com4d.scene import SceneWriter

    video = {"input": "garden.mp4", "width": 160, "height": 120, "fps": 24.0}
    writer = SceneWriter(out, ["table"], ["dog", "cat"], FRAMES, 0, video, {"num_tokens": 1024})
    writer.add_static(0, *grid_mesh(1))
    for k, frame in enumerate(FRAMES):
        vertices, faces = grid_mesh(10 + k, n=3 + k)  # a different topology on every frame
        writer.add_dynamic_frame(0, frame, vertices + [0.1 * k, 0, 0], faces)
    writer.set_tracked(1, FRAMES, garden_cat_vertices(), grid_mesh(20)[1], [])
    writer.finish()


def write_fallback_cat(out: Path) -> None:
    from com4d.scene import SceneWriter

    writer = SceneWriter(out, [], ["cat"], FRAMES, 0, {"input": "cat.mp4"}, {})
    base, faces = grid_mesh(20)
    for frame in FRAMES:  # the pipeline writes per-frame meshes first, then the tracked topology
        writer.add_dynamic_frame(0, frame, *grid_mesh(30 + frame, n=5))
    writer.set_tracked(0, FRAMES, np.stack([base] * len(FRAMES)), faces, fallback_frames=[2])
    writer.finish()


def write_tiny_sam(path: Path) -> None:
    import torch

    spec = importlib.util.spec_from_file_location("com4d_tests_conftest", TESTS / "com4d" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    torch.save(module.build_tiny_sam().state_dict(), path)


def main(out: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from parity_utils import parity_dir

    from com4d.scene import object_color

    out.mkdir(parents=True, exist_ok=True)
    write_garden(out / "garden")
    write_fallback_cat(out / "fallback_cat")
    write_tiny_sam(out / "tiny_sam.pth")
    facts = {
        "colours": [list(map(float, object_color(i))) for i in range(COLOURS)],
        "weights": str(parity_dir() / "weights"),
    }
    (out / "facts.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
