"""Imports a `com4d reconstruct` output folder (scene.json + GLBs, docs/contracts.md) into Blender.

It goes through the same ReconstructionBuilder as streamed results, so a folder opened later looks
exactly like a reconstruction watched live.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .glb import GlbError, read_glb

SCENE_FORMAT = "com4d-scene"
SCENE_VERSION = 1


class SceneFolderError(ValueError):
    """The folder is not a reconstruction this add-on can read; the message says what is wrong."""


@dataclass
class FolderImport:
    """What an import made, and what the user should hear about."""

    builder: object
    warnings: list[str] = field(default_factory=list)
    meshes: int = 0


def load_manifest(folder: str | Path) -> dict:
    """Read and check `<folder>/scene.json`."""
    path = Path(folder) / "scene.json"
    if not path.is_file():
        raise SceneFolderError(f"{folder} has no scene.json; choose the folder `com4d reconstruct` wrote")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SceneFolderError(f"{path} cannot be read as JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != SCENE_FORMAT:
        raise SceneFolderError(f"{path} is not a COM4D scene (its 'format' is not '{SCENE_FORMAT}')")
    if manifest.get("version") != SCENE_VERSION:
        raise SceneFolderError(
            f"{path} has scene version {manifest.get('version')!r}; this add-on reads version {SCENE_VERSION}"
        )
    if manifest.get("up_axis", "y") != "y":
        raise SceneFolderError(f"{path} says up_axis {manifest.get('up_axis')!r}; only 'y' is defined")
    if not isinstance(manifest.get("objects", []), list):
        raise SceneFolderError(f"{path}: 'objects' must be a list")
    return manifest


def default_title(folder: str | Path, manifest: dict) -> str:
    source = manifest.get("source") or {}
    stem = Path(str(source.get("input") or "")).stem or Path(folder).resolve().name
    return f"COM4D {stem}"


def import_folder(folder, scene, clip_frame_start: int = 1, frame_offset: int = 0, title: str | None = None):
    """Build the folder's reconstruction in `scene`; returns a FolderImport (missing files are warnings)."""
    from .scene_builder import ReconstructionBuilder

    folder = Path(folder)
    manifest = load_manifest(folder)
    builder = ReconstructionBuilder(
        scene,
        title or default_title(folder, manifest),
        clip_frame_start=clip_frame_start,
        frame_offset=frame_offset,
        known_frames=[int(f) for f in manifest.get("frames", [])],
    )
    result = FolderImport(builder)
    status = manifest.get("status", "complete")
    if status != "complete":
        result.warnings.append(f"the reconstruction is '{status}', not complete: imported what it finished")
    for entry in manifest.get("objects", []):
        try:
            result.meshes += _import_object(folder, entry, builder, result.warnings)
        except GlbError as err:
            result.warnings.append(str(err))
        except (KeyError, TypeError, ValueError) as err:
            raise SceneFolderError(
                f"scene.json object {entry.get('name', '?')!r} is malformed: {err}"
            ) from err
    return result


def _import_object(folder: Path, entry: dict, builder, warnings: list[str]) -> int:
    name = str(entry["name"])
    role = entry["role"]
    index = int(entry.get("index", 0))
    color = entry.get("color")
    if role == "static":
        mesh = _read_mesh(folder, entry.get("mesh"), name, warnings)
        if mesh is None:
            return 0
        builder.add_static(name, mesh.vertices, mesh.faces, index=index, color=color)
        return 1
    if role != "dynamic":
        raise ValueError(f"role must be 'static' or 'dynamic', not {role!r}")
    if entry.get("topology", "per_frame") == "tracked":
        return _import_tracked(folder, entry, builder, warnings)
    count = 0
    for item in entry.get("frames", []):
        mesh = _read_mesh(folder, item.get("mesh"), f"{name} frame {item.get('frame')}", warnings)
        if mesh is None:
            continue
        builder.add_frame_mesh(name, int(item["frame"]), mesh.vertices, mesh.faces, index=index, color=color)
        count += 1
    return count


def _import_tracked(folder: Path, entry: dict, builder, warnings: list[str]) -> int:
    """One topology for the object; frames where tracking fell back keep their own meshes."""
    name = str(entry["name"])
    index = int(entry.get("index", 0))
    base = _read_mesh(folder, entry.get("mesh"), name, warnings)
    vertices_path = folder / str(entry.get("vertices", ""))
    if base is None:
        return 0
    if not entry.get("vertices") or not vertices_path.is_file():
        warnings.append(f"{name}: the per-frame vertices file {entry.get('vertices')!r} is missing; skipped")
        return 0
    vertices = np.load(vertices_path, allow_pickle=False)
    frames = [int(item["frame"]) for item in entry.get("frames", [])]
    if vertices.ndim != 3 or len(frames) != vertices.shape[0]:
        raise ValueError(f"{vertices_path.name} has shape {vertices.shape} for {len(frames)} frames")
    fallback = [int(f) for f in entry.get("fallback_frames") or []]
    count = 0
    for item in entry.get("frames", []):
        if int(item["frame"]) in fallback and item.get("mesh"):
            mesh = _read_mesh(folder, item["mesh"], f"{name} frame {item['frame']}", warnings)
            if mesh is not None:
                builder.add_frame_mesh(
                    name, int(item["frame"]), mesh.vertices, mesh.faces, index=index, color=entry.get("color")
                )
                count += 1
    builder.add_tracked(
        name,
        frames,
        vertices,
        base.faces,
        index=index,
        color=entry.get("color"),
        base=base.vertices,
        fallback_frames=fallback,
    )
    return count + 1


def _read_mesh(folder: Path, relative, label: str, warnings: list[str]):
    if not relative:
        warnings.append(f"{label}: no mesh file listed; skipped")
        return None
    path = folder / str(relative)
    if not path.is_file():
        warnings.append(f"{label}: {relative} is missing; skipped")
        return None
    return read_glb(path)
