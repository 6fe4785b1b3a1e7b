"""Puts a reconstruction into the Blender scene, one mesh at a time, as results arrive.

Layout (DESIGN.md, "Blender import"): one collection per reconstruction with `Static` and `Dynamic`
children, every object parented to one empty so the whole scene moves and scales together. Static
objects are plain meshes. A dynamic object with one mesh per frame gets a sub-collection of
per-frame objects whose visibility is keyed, so each shows from its frame until the next one; a
dynamic object with one topology (`tracked_mesh`) is one object with a shape key per frame, keyed 1
on its frame and 0 on the neighbouring ones. Source frames go to the timeline through the clip
(frames.py). Only the main thread may call this module.
"""

from __future__ import annotations

import bpy
import numpy as np

from .axes import y_up_to_z_up
from .colors import object_color, palette_index
from .frames import scene_frame_from_video_frame, visibility_windows

STATIC_COLLECTION = "Static"
DYNAMIC_COLLECTION = "Dynamic"


def new_mesh(name: str, vertices: np.ndarray, faces: np.ndarray) -> bpy.types.Mesh:
    """A triangle mesh from y-up arrays (converted to Blender's z up), smooth shaded."""
    vertices = y_up_to_z_up(vertices).reshape(-1, 3)
    faces = np.ascontiguousarray(faces, dtype=np.int32).reshape(-1, 3)
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"mesh '{name}': face indices point outside its {len(vertices)} vertices")
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(vertices))
    mesh.vertices.foreach_set("co", vertices.ravel())
    mesh.loops.add(faces.size)
    mesh.loops.foreach_set("vertex_index", faces.ravel())
    mesh.polygons.add(len(faces))
    mesh.polygons.foreach_set("loop_start", np.arange(0, faces.size, 3, dtype=np.int32))
    mesh.update(calc_edges=True)
    mesh.shade_smooth()
    return mesh


def id_fcurves(id_data) -> list:
    """The F-curves animating `id_data`, on Blender 4.2-4.5 (legacy API) and 5.x (slotted actions)."""
    animation = id_data.animation_data
    if animation is None or animation.action is None:
        return []
    action = animation.action
    if hasattr(action, "fcurves"):
        return list(action.fcurves)
    from bpy_extras import anim_utils

    channelbag = anim_utils.action_get_channelbag_for_slot(action, animation.action_slot)
    return [] if channelbag is None else list(channelbag.fcurves)


class ReconstructionBuilder:
    """Builds one reconstruction in one scene and keeps adding to it (results stream in)."""

    def __init__(
        self,
        scene: bpy.types.Scene,
        title: str,
        clip_frame_start: int = 1,
        frame_offset: int = 0,
        known_frames: list[int] | None = None,
        static_count: int = 1,
    ):
        self.scene_name = scene.name
        self.clip_frame_start = int(clip_frame_start)
        self.frame_offset = int(frame_offset)
        self.known_frames = [int(f) for f in (known_frames or [])]
        self.static_count = int(static_count)  # for the colour of results that come without one
        root = bpy.data.collections.new(title)
        scene.collection.children.link(root)
        static = bpy.data.collections.new(STATIC_COLLECTION)
        dynamic = bpy.data.collections.new(DYNAMIC_COLLECTION)
        root.children.link(static)
        root.children.link(dynamic)
        empty = bpy.data.objects.new(title, None)
        empty.empty_display_type = "PLAIN_AXES"
        empty["com4d_reconstruction"] = title
        root.objects.link(empty)
        root["com4d_reconstruction"] = title
        self.collection_name = root.name
        self.static_name = static.name
        self.dynamic_name = dynamic.name
        self.root_name = empty.name
        self._objects: dict[tuple[str, str], str] = {}  # (role, name) -> Blender object name
        self._frame_objects: dict[str, dict[int, str]] = {}  # dynamic name -> frame -> object name
        self._frame_collections: dict[str, str] = {}
        self._materials: dict[str, str] = {}

    # -- what exists ----------------------------------------------------------------------------
    @property
    def collection(self) -> bpy.types.Collection:
        return bpy.data.collections[self.collection_name]

    @property
    def root(self) -> bpy.types.Object:
        return bpy.data.objects[self.root_name]

    def scene_frame(self, frame: int) -> int:
        """The timeline frame showing source frame `frame`."""
        return scene_frame_from_video_frame(frame, self.clip_frame_start, self.frame_offset)

    def frame_objects(self, name: str) -> dict[int, bpy.types.Object]:
        """The per-frame objects of dynamic object `name`, by source frame."""
        return {f: bpy.data.objects[n] for f, n in self._frame_objects.get(name, {}).items()}

    def object(self, role: str, name: str) -> bpy.types.Object | None:
        """The static or tracked object called `name` (None until it arrived)."""
        found = self._objects.get((role, name))
        return None if found is None else bpy.data.objects.get(found)

    # -- adding results -----------------------------------------------------------------------
    def add_static(self, name: str, vertices, faces, index: int = 0, color=None) -> bpy.types.Object:
        """A static object: one mesh for the whole clip (a repeated arrival replaces the mesh)."""
        obj = self._place(("static", name), name, new_mesh(name, vertices, faces), self.static_name)
        self._describe(obj, name, "static", index, color)
        return obj

    def add_frame_mesh(self, name: str, frame: int, vertices, faces, index: int = 0, color=None):
        """One frame of a dynamic object with per-frame topology; re-keys the visibility of its siblings."""
        frame = int(frame)
        collection = self._frame_collection(name)
        label = f"{name}_f{frame:06d}"
        mesh = new_mesh(label, vertices, faces)
        known = self._frame_objects.setdefault(name, {})
        obj = bpy.data.objects.get(known.get(frame, ""))
        if obj is None:
            obj = bpy.data.objects.new(label, mesh)
            bpy.data.collections[collection].objects.link(obj)
            obj.parent = self.root
        else:
            old = obj.data
            obj.data = mesh
            if old.users == 0:
                bpy.data.meshes.remove(old)
        known[frame] = obj.name
        self._describe(obj, name, "dynamic", index, color)
        obj["com4d_frame"] = frame
        obj["com4d_scene_frame"] = self.scene_frame(frame)
        self._key_frame_visibility(name)
        return obj

    def add_tracked(
        self, name: str, frames, vertices, faces, index: int = 0, color=None, base=None, fallback_frames=()
    ):
        """A dynamic object with one topology: shape key per frame, value 1 on its frame, 0 next door.

        `vertices` is (F, V, 3) y-up, one row per entry of `frames`; `base` (V, 3) is the rest shape
        (the first frame when not given). On `fallback_frames` the tracked shape drifted, so the
        object is hidden there and that frame's own mesh (add_frame_mesh) shows instead; the
        per-frame objects of every other frame are removed, the tracked object replaces them.
        """
        frames = [int(f) for f in frames]
        fallback = {int(f) for f in fallback_frames}
        vertices = np.asarray(vertices, dtype=np.float32)
        if vertices.ndim != 3 or vertices.shape[0] != len(frames) or vertices.shape[2] != 3:
            raise ValueError(
                f"tracked mesh '{name}': vertices of shape {vertices.shape} do not match {len(frames)} frames"
            )
        base = vertices[0] if base is None else np.asarray(base, dtype=np.float32)
        if base.shape != vertices.shape[1:]:
            raise ValueError(
                f"tracked mesh '{name}': the base mesh has {base.shape[0]} vertices, "
                f"the frames {vertices.shape[1]}"
            )
        obj = self._place(("tracked", name), name, new_mesh(name, base, faces), self.dynamic_name)
        self._describe(obj, name, "dynamic", index, color)
        obj["com4d_topology"] = "tracked"
        obj["com4d_fallback_frames"] = sorted(fallback)
        self._add_shape_keys(obj, frames, y_up_to_z_up(vertices))
        self._key_tracked_visibility(obj, frames, fallback)
        self._remove_frame_objects(name, keep=fallback)
        self._evaluate_now()
        return obj

    def _add_shape_keys(self, obj, frames: list[int], z_up: np.ndarray) -> None:
        obj.shape_key_add(name="Basis", from_mix=False)
        order = np.argsort(frames, kind="stable")
        scene_frames = [self.scene_frame(frames[i]) for i in order]
        blocks = []
        for i in order:
            block = obj.shape_key_add(name=f"frame_{frames[i]:06d}", from_mix=False)
            block.data.foreach_set("co", z_up[i].ravel())
            blocks.append(block)
        for position, block in enumerate(blocks):
            keys = {scene_frames[position]: 1.0}
            if position > 0:
                keys[scene_frames[position - 1]] = 0.0
            if position + 1 < len(blocks):
                keys[scene_frames[position + 1]] = 0.0
            for scene_frame, value in sorted(keys.items()):
                block.value = value
                block.keyframe_insert("value", frame=scene_frame)
        for fcurve in id_fcurves(obj.data.shape_keys):
            for point in fcurve.keyframe_points:
                point.interpolation = "LINEAR"

    def _key_tracked_visibility(self, obj, frames: list[int], fallback: set[int]) -> None:
        """Shown over the frames' windows except the fallback ones; hidden before and after."""
        windows = visibility_windows(frames, self.known_frames)
        ordered = sorted(windows)
        keys = {self.scene_frame(windows[ordered[0]][0]) - 1: True}
        keys.update({self.scene_frame(windows[frame][1]): True for frame in ordered})  # hidden after...
        for frame in ordered:  # ...unless the next window starts there
            keys[self.scene_frame(windows[frame][0])] = frame in fallback
        obj.animation_data_clear()
        for scene_frame, hidden in sorted(keys.items()):
            obj.hide_viewport = hidden
            obj.hide_render = hidden
            obj.keyframe_insert("hide_viewport", frame=scene_frame)
            obj.keyframe_insert("hide_render", frame=scene_frame)

    def _remove_frame_objects(self, name: str, keep: set[int]) -> None:
        known = self._frame_objects.get(name, {})
        for frame in [f for f in known if f not in keep]:
            obj = bpy.data.objects.get(known.pop(frame))
            if obj is not None:
                mesh = obj.data
                bpy.data.objects.remove(obj)
                if mesh is not None and mesh.users == 0:
                    bpy.data.meshes.remove(mesh)
        if known:
            self._key_frame_visibility(name)
        else:
            collection = bpy.data.collections.get(self._frame_collections.pop(name, ""))
            if collection is not None and not collection.objects:
                bpy.data.collections.remove(collection)

    # -- helpers ------------------------------------------------------------------------------
    def _place(self, key, name, mesh, collection_name) -> bpy.types.Object:
        obj = bpy.data.objects.get(self._objects.get(key, ""))
        if obj is None:
            obj = bpy.data.objects.new(name, mesh)
            bpy.data.collections[collection_name].objects.link(obj)
            obj.parent = self.root
        else:
            old = obj.data
            if obj.data.shape_keys is not None:
                obj.shape_key_clear()
            obj.data = mesh
            if old.users == 0:
                bpy.data.meshes.remove(old)
        self._objects[key] = obj.name
        return obj

    def _frame_collection(self, name: str) -> str:
        found = self._frame_collections.get(name)
        if found is None or found not in bpy.data.collections:
            collection = bpy.data.collections.new(name)
            bpy.data.collections[self.dynamic_name].children.link(collection)
            found = self._frame_collections[name] = collection.name
        return found

    def _describe(self, obj, name: str, role: str, index: int, color) -> None:
        if color is None:
            color = object_color(palette_index(role, index, self.static_count))
        rgb = tuple(float(c) for c in color)[:3]
        obj["com4d_name"] = name
        obj["com4d_role"] = role
        obj["com4d_index"] = int(index)
        obj.color = (*rgb, 1.0)
        obj.data.materials.clear()
        obj.data.materials.append(self._material(f"{role}:{name}", name, rgb))

    def _material(self, key: str, name: str, rgb) -> bpy.types.Material:
        material = bpy.data.materials.get(self._materials.get(key, ""))
        if material is None:
            material = bpy.data.materials.new(f"COM4D {name}")
            self._materials[key] = material.name
        material.diffuse_color = (*rgb, 1.0)
        if bpy.app.version < (5, 0, 0) and not material.use_nodes:
            material.use_nodes = True  # Blender 5 gives every material its nodes; `use_nodes` goes in 6.0
        bsdf = material.node_tree.nodes.get("Principled BSDF") if material.node_tree else None
        if bsdf is not None:
            bsdf.inputs["Base Color"].default_value = (*rgb, 1.0)
            bsdf.inputs["Roughness"].default_value = 0.6
        return material

    def _key_frame_visibility(self, name: str) -> None:
        """Key every per-frame object of `name` visible on [its frame, next frame) and hidden elsewhere."""
        objects = self.frame_objects(name)
        windows = visibility_windows(list(objects), self.known_frames)
        current = self.scene.frame_current
        for frame, obj in objects.items():
            start, end = (self.scene_frame(f) for f in windows[frame])
            obj.animation_data_clear()
            for scene_frame, hidden in ((start - 1, True), (start, False), (end, True)):
                obj.hide_viewport = hidden
                obj.hide_render = hidden
                obj.keyframe_insert("hide_viewport", frame=scene_frame)
                obj.keyframe_insert("hide_render", frame=scene_frame)
            shown = start <= current < end
            obj.hide_viewport = not shown
            obj.hide_render = not shown

    def _evaluate_now(self) -> None:
        """Show the keyed state of the current frame without waiting for the next frame change."""
        scene = self.scene
        scene.frame_set(scene.frame_current)

    @property
    def scene(self) -> bpy.types.Scene:
        return bpy.data.scenes[self.scene_name]
