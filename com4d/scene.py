"""Writing a reconstruction to disk: one GLB per mesh, combined GLBs per frame, `scene.json`.

A frame's combined GLB can be written as soon as all of its meshes exist (`write_ready_frames`);
`write_combined_frames` writes the frames not written yet.

The manifest is rewritten atomically after every mesh, so an interrupted run leaves a valid
`scene.json` whose `status` says it is incomplete ("running", "cancelled", "failed"); only a
finished run says "complete". Format: docs/contracts.md.
"""

from __future__ import annotations

import colorsys
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trimesh

from com4d.meshing import write_glb
from com4d.plan import file_stems

SCENE_FORMAT = "com4d-scene"
SCENE_VERSION = 1


def object_color(index: int) -> list[float]:
    """A distinct, stable colour per object (golden-angle hues)."""
    r, g, b = colorsys.hsv_to_rgb((0.08 + index * 0.618034) % 1.0, 0.55, 0.9)
    return [round(r, 3), round(g, 3), round(b, 3)]


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def colored_mesh(vertices: np.ndarray, faces: np.ndarray, color: list[float]) -> trimesh.Trimesh:
    """A trimesh with one RGB (0..1) colour on every face, vertices and faces as given."""
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
    rgba = np.array([*(int(c * 255) for c in color), 255], dtype=np.uint8)
    mesh.visual.face_colors = np.tile(rgba, (len(faces), 1))
    return mesh


@dataclass
class SceneObject:
    name: str
    role: str
    index: int
    color: list[float]
    mesh: str | None = None
    stage_a_mesh: str | None = None  # a moving object's stage-A mesh (the official scene_XXX.glb)
    frames: list[dict[str, Any]] = field(default_factory=list)
    topology: str = "per_frame"
    extra: dict[str, Any] = field(default_factory=dict)
    stem: str = ""  # its files' name: the name made safe and distinct from the others' (plan.file_stems)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "role": self.role, "index": self.index, "color": self.color}
        if self.role == "static":
            d["mesh"] = self.mesh
        else:
            d["topology"] = self.topology
            d["frames"] = self.frames
            if self.stage_a_mesh is not None:
                d["stage_a_mesh"] = self.stage_a_mesh
            if self.mesh is not None:
                d["mesh"] = self.mesh
            d.update(self.extra)
        return d


class SceneWriter:
    """Collects meshes as they are produced and keeps `out/scene.json` current."""

    def __init__(
        self,
        out_dir: Path,
        static_names: list[str],
        dynamic_names: list[str],
        frames: list[int],
        stage_a_frame: int | None,
        source: dict[str, Any],
        params: dict[str, Any],
    ):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.frames = list(frames)
        self.stage_a_frame = stage_a_frame
        self.source = source
        self.params = params
        self.status = "running"
        self.stage_a_scene: str | None = None
        self.objects: list[SceneObject] = []
        for i, (n, stem) in enumerate(zip(static_names, file_stems(static_names))):
            self.objects.append(SceneObject(n, "static", i, object_color(i), stem=stem))
        for k, (n, stem) in enumerate(zip(dynamic_names, file_stems(dynamic_names))):
            self.objects.append(SceneObject(n, "dynamic", k, object_color(len(static_names) + k), stem=stem))
        self._geometry: dict[tuple[str, int | str], tuple[np.ndarray, np.ndarray]] = {}
        self._combined: set[int] = set()  # frames whose combined GLB is written
        self.save()

    def get(self, role: str, index: int) -> SceneObject:
        return next(o for o in self.objects if o.role == role and o.index == index)

    def _write_mesh(self, rel: str, obj: SceneObject, vertices: np.ndarray, faces: np.ndarray) -> None:
        write_glb(colored_mesh(vertices, faces, obj.color), self.out / rel)

    def add_static(self, index: int, vertices: np.ndarray, faces: np.ndarray) -> str:
        obj = self.get("static", index)
        rel = f"static/{obj.stem}.glb"
        self._write_mesh(rel, obj, vertices, faces)
        obj.mesh = rel
        self._geometry[(obj.name, -1)] = (vertices, faces)
        self.save()
        return rel

    def add_stage_a_dynamic(self, index: int, vertices: np.ndarray, faces: np.ndarray) -> str:
        """A moving object's mesh from stage A (at the stage-A frame)."""
        obj = self.get("dynamic", index)
        rel = f"dynamic/{obj.stem}/stage_a.glb"
        self._write_mesh(rel, obj, vertices, faces)
        obj.stage_a_mesh = rel
        self._geometry[(obj.name, "stage_a")] = (vertices, faces)
        self.save()
        return rel

    def add_dynamic_frame(self, index: int, frame: int, vertices: np.ndarray, faces: np.ndarray) -> str:
        obj = self.get("dynamic", index)
        rel = f"dynamic/{obj.stem}/frame_{frame:06d}.glb"
        self._write_mesh(rel, obj, vertices, faces)
        obj.frames = [f for f in obj.frames if f["frame"] != frame] + [{"frame": frame, "mesh": rel}]
        obj.frames.sort(key=lambda f: f["frame"])
        self._geometry[(obj.name, frame)] = (vertices, faces)
        self.save()
        return rel

    def set_tracked(
        self,
        index: int,
        frames: list[int],
        vertices: np.ndarray,
        faces: np.ndarray,
        fallback_frames: list[int],
    ) -> str:
        """Record a tracked topology: base mesh GLB (first frame) + (F, V, 3) vertex array."""
        obj = self.get("dynamic", index)
        base = f"dynamic/{obj.stem}/tracked.glb"
        self._write_mesh(base, obj, vertices[0], faces)
        verts_rel = f"dynamic/{obj.stem}/tracked_vertices.npy"
        tmp = self.out / (verts_rel + ".tmp.npy")
        np.save(tmp, vertices.astype(np.float32))
        os.replace(tmp, self.out / verts_rel)
        obj.topology = "tracked"
        obj.mesh = base
        per_frame = {f["frame"]: f.get("mesh") for f in obj.frames}
        obj.frames = [{"frame": f, **({"mesh": per_frame[f]} if per_frame.get(f) else {})} for f in frames]
        obj.extra = {"vertices": verts_rel, "fallback_frames": list(fallback_frames)}
        self.save()
        return base

    def write_stage_a_scene(self) -> None:
        """`stage_a_scene.glb`: every object of stage A in one file (the official scene_all.glb)."""
        meshes = [(o, self._geometry.get((o.name, -1 if o.role == "static" else "stage_a"))) for o in self.objects]
        scene = trimesh.Scene()
        for o, geom in meshes:
            if geom is not None and len(geom[1]):
                scene.add_geometry(colored_mesh(*geom, o.color), node_name=o.name, geom_name=o.name)
        if scene.geometry:
            (self.out / "stage_a_scene.glb").write_bytes(scene.export(file_type="glb"))
            self.stage_a_scene = "stage_a_scene.glb"
            self.save()

    def frame_meshes_done(self, frame: int) -> bool:
        """Whether every mesh of selected frame `frame` exists: each static's and each moving object's."""
        return all(
            (o.name, -1 if o.role == "static" else frame) in self._geometry for o in self.objects
        )

    def write_ready_frames(self) -> None:
        """The combined GLB of every selected frame whose meshes all exist and that is not written
        yet (each frame's meshes are final once made, so the file is the one the end would write)."""
        for frame in self.frames:
            if frame not in self._combined and self.frame_meshes_done(frame):
                self._write_combined_frame(frame)

    def write_combined_frames(self) -> None:
        """One GLB per selected frame with every object of that frame (statics included), for the
        frames not written yet."""
        for frame in self.frames:
            if frame not in self._combined:
                self._write_combined_frame(frame)

    def _write_combined_frame(self, frame: int) -> None:
        scene = trimesh.Scene()
        for o in self.objects:  # statics first (the objects' order), then each moving object's mesh of the frame
            geom = self._geometry.get((o.name, -1 if o.role == "static" else frame))
            if geom is not None and len(geom[1]):
                scene.add_geometry(colored_mesh(*geom, o.color), node_name=o.name, geom_name=o.name)
        path = self.out / "frames" / f"frame_{frame:06d}.glb"
        path.parent.mkdir(parents=True, exist_ok=True)
        if scene.geometry:
            path.write_bytes(scene.export(file_type="glb"))
        self._combined.add(frame)

    def geometry(self, name: str, frame: int | None) -> tuple[np.ndarray, np.ndarray] | None:
        return self._geometry.get((name, -1 if frame is None else frame))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCENE_FORMAT,
            "version": SCENE_VERSION,
            "status": self.status,
            "up_axis": "y",
            "source": self.source,
            "frames": self.frames,
            "stage_a_frame": self.stage_a_frame,
            "stage_a_scene": self.stage_a_scene,
            "params": self.params,
            "objects": [o.to_dict() for o in self.objects],
        }

    def save(self) -> None:
        write_json_atomic(self.out / "scene.json", self.to_dict())

    def finish(self, status: str = "complete") -> None:
        self.status = status
        self.save()


def load_scene(folder: str | Path) -> dict[str, Any]:
    """Read and check a scene.json (used by tests and tools)."""
    data = json.loads((Path(folder) / "scene.json").read_text())
    if data.get("format") != SCENE_FORMAT:
        raise ValueError(f"{folder}/scene.json is not a {SCENE_FORMAT} manifest")
    return data
