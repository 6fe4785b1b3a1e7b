"""Render the pictures in docs/blender.md with Blender itself (headless, Workbench).

    .venv/bin/python tests/addon/make_doc_images.py [--out docs/images] [--backend-job FOLDER]

A small reconstruction is written with the library's own SceneWriter (a static table and crate, a
ball bouncing with one mesh per frame, a waving flag with one deforming mesh), imported through the
add-on's "Import COM4D Reconstruction" operator exactly as an artist would, and rendered. With
`--backend-job` an output folder of a real backend run is rendered too (with the tiny test weights
its meshes are smooth random blobs). Needs the bpy module; not a test.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import trimesh

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

FRAMES = list(range(0, 17, 2))  # source frames 0, 2, ..., 16
CLIP_START = 1


def y_up(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    return mesh.vertices.astype(np.float32), mesh.faces.astype(np.int32)


def box(size, centre) -> trimesh.Trimesh:
    """A box with subdivided faces, so smooth shading keeps its faces flat (like our dense meshes)."""
    mesh = trimesh.creation.box(size, trimesh.transformations.translation_matrix(centre))
    for _ in range(3):
        mesh = mesh.subdivide()
    return mesh


def table() -> trimesh.Trimesh:
    top = box([0.9, 0.06, 0.6], [0, -0.35, 0])
    legs = [box([0.06, 0.45, 0.06], [x, -0.6, z]) for x in (-0.4, 0.4) for z in (-0.25, 0.25)]
    return trimesh.util.concatenate([top, *legs])


def crate() -> trimesh.Trimesh:
    return box([0.35, 0.35, 0.35], [-0.1, -0.145, -0.05])


def floor() -> trimesh.Trimesh:
    return box([3.0, 0.04, 2.0], [0, -0.845, 0])


def pole() -> trimesh.Trimesh:
    mesh = trimesh.creation.cylinder(radius=0.015, height=1.25, sections=24)
    mesh.apply_transform(trimesh.transformations.rotation_matrix(math.pi / 2, [1, 0, 0]))
    mesh.apply_translation([0.55, -0.2, -0.3])
    return mesh


def ball(frame: int) -> trimesh.Trimesh:
    t = frame / FRAMES[-1]
    height = abs(math.sin(t * 2.5 * math.pi)) * 0.5
    squash = 1.0 - 0.25 * max(0.0, 0.15 - height) / 0.15
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.13)
    sphere.apply_scale([1 / math.sqrt(squash), squash, 1 / math.sqrt(squash)])
    sphere.apply_translation([-0.8 + 1.6 * t, -0.32 + 0.13 * squash + height, 0.45])
    return sphere


def flag(frame: int) -> np.ndarray:
    n = 16
    u, v = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))
    x = 0.565 + 0.45 * u
    y = 0.1 + 0.3 * v
    z = -0.3 + 0.08 * u * np.sin(6 * u - frame * 0.6)
    return np.stack([x.ravel(), y.ravel(), z.ravel()], 1).astype(np.float32)


def flag_faces(n: int = 16) -> np.ndarray:
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a = r * n + c
            faces += [[a, a + 1, a + n], [a + 1, a + n + 1, a + n]]
    return np.asarray(faces, np.int32)


def write_demo_reconstruction(out: Path) -> Path:
    from com4d.scene import SceneWriter

    writer = SceneWriter(
        out,
        ["table", "crate", "floor", "pole"],
        ["ball", "flag"],
        FRAMES,
        0,
        {"input": "demo.mp4", "width": 1280, "height": 720, "fps": 24.0},
        {"num_tokens": 2048},
    )
    writer.add_static(0, *y_up(table()))
    writer.add_static(1, *y_up(crate()))
    writer.add_static(2, *y_up(floor()))
    writer.add_static(3, *y_up(pole()))
    for frame in FRAMES:
        writer.add_dynamic_frame(0, frame, *y_up(ball(frame)))
    cloth = np.stack([flag(f) for f in FRAMES])
    writer.set_tracked(1, FRAMES, cloth, flag_faces(), [])
    writer.finish()
    return out


def enable_addon(tmp: Path):
    import addon_utils

    sys.path.insert(0, str(ROOT / "tests" / "addon"))
    from conftest import load_build_addon

    load_build_addon().assemble(tmp)
    sys.path.insert(0, str(tmp))
    addon_utils.enable("com4d_blender", default_set=True)


def setup_render(scene, width: int, height: int) -> None:
    import bpy

    scene.render.engine = "BLENDER_WORKBENCH"
    scene.render.resolution_x, scene.render.resolution_y = width, height
    scene.render.resolution_percentage = 100
    shading = scene.display.shading
    shading.light = "STUDIO"
    shading.color_type = "OBJECT"
    shading.show_shadows = True
    shading.show_cavity = True
    shading.background_type = "VIEWPORT" if hasattr(shading, "background_type") else shading.background_type
    scene.display.shadow_shift = 0.1
    scene.render.film_transparent = False
    world = bpy.data.worlds.new("bg") if scene.world is None else scene.world
    scene.world = world
    world.color = (0.82, 0.84, 0.87)
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    scene.camera = camera
    aim(camera, location=(0.9, -3.0, 0.95), target=(0.1, 0.0, -0.25))
    camera.data.lens = 36


def aim(camera, location, target) -> None:
    from mathutils import Vector

    camera.location = location
    camera.rotation_euler = (Vector(target) - Vector(location)).to_track_quat("-Z", "Y").to_euler()


def frame_all(scene) -> None:
    """Aim the camera at the bounding box of every mesh, from the front and a little above."""
    from mathutils import Vector

    corners = [
        obj.matrix_world @ Vector(c) for obj in scene.objects if obj.type == "MESH" for c in obj.bound_box
    ]
    low = Vector([min(c[i] for c in corners) for i in range(3)])
    high = Vector([max(c[i] for c in corners) for i in range(3)])
    centre, radius = (low + high) / 2, (high - low).length / 2
    aim(scene.camera, location=centre + Vector((0.35, -1.0, 0.45)).normalized() * radius * 2.6, target=centre)


def render(scene, path: Path) -> Path:
    import bpy

    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    shrink(path)
    return path


def shrink(path: Path) -> None:
    """256 colours are plenty for a Workbench render and make the PNG a few times smaller."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def filmstrip(paths: list[Path], out: Path, labels: list[str]) -> None:
    from PIL import Image, ImageDraw

    tiles = [Image.open(p).convert("RGB") for p in paths]
    w, h = tiles[0].size
    strip = Image.new("RGB", (w * 2, h * 2), "white")
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        ImageDraw.Draw(tile).text((8, 6), label, fill=(20, 20, 20))
        strip.paste(tile, ((i % 2) * w, (i // 2) * h))
    strip.save(out, optimize=True)
    shrink(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--backend-job", type=Path, default=None, help="a backend run's out/ folder")
    args = parser.parse_args(argv)
    import bpy

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        enable_addon(tmp / "addon")
        bpy.ops.wm.read_homefile(use_empty=True, load_ui=False)
        folder = write_demo_reconstruction(tmp / "demo_out")
        bpy.ops.com4d.import_folder(directory=str(folder), clip_frame_start=CLIP_START)
        scene = bpy.context.scene
        setup_render(scene, 640, 360)
        scene.frame_set(CLIP_START + 6)
        render(scene, args.out / "blender_imported_scene.png")

        setup_render(scene, 320, 180)
        tiles, labels = [], []
        for i, frame in enumerate((0, 4, 10, 16)):
            scene.frame_set(CLIP_START + frame)
            tiles.append(render(scene, tmp / f"tile_{i}.png"))
            labels.append(f"frame {CLIP_START + frame}")
        filmstrip(tiles, args.out / "blender_timeline.png", labels)

        if args.backend_job is not None:
            bpy.ops.wm.read_homefile(use_empty=True, load_ui=False)
            bpy.ops.com4d.import_folder(directory=str(args.backend_job), clip_frame_start=1)
            scene = bpy.context.scene
            setup_render(scene, 640, 360)
            frame_all(scene)
            scene.frame_set(1)
            render(scene, args.out / "blender_tiny_weights_run.png")
    for png in sorted(args.out.glob("blender_*.png")):
        print(png, png.stat().st_size // 1024, "KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
