"""The Movie Clip Editor sidebar (tab "COM4D"): backend, objects to reconstruct, the run itself."""

from __future__ import annotations

import bpy

from . import job_session, local_backend
from .clip_input import clip_from_context
from .preferences import preferences


class COM4D_UL_objects(bpy.types.UIList):
    bl_idname = "COM4D_UL_objects"

    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index):
        row = layout.row(align=True)
        row.prop(item, "enabled", text="")
        row.prop(
            item, "name", text="", emboss=False, icon="MESH_DATA" if item.role == "static" else "MOD_WAVE"
        )
        row.label(text=item.role.capitalize())


class COM4D_PT_base:
    bl_space_type = "CLIP_EDITOR"
    bl_region_type = "UI"
    bl_category = "COM4D"


class COM4D_PT_backend(COM4D_PT_base, bpy.types.Panel):
    bl_idname = "COM4D_PT_backend"
    bl_label = "Backend"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        prefs = preferences(context)
        state = context.window_manager.com4d_job
        layout.prop(prefs, "address", text="")
        layout.label(text=state.connection or "not connected", icon="LINKED")
        layout.operator("com4d.check_connection", icon="FILE_REFRESH")
        if prefs.use_local_backend:
            row = layout.row(align=True)
            if local_backend.current() is None:
                row.operator("com4d.start_backend", icon="PLAY")
            else:
                row.operator("com4d.stop_backend", icon="PAUSE")


class COM4D_PT_objects(COM4D_PT_base, bpy.types.Panel):
    bl_idname = "COM4D_PT_objects"
    bl_label = "Objects to Reconstruct"

    @classmethod
    def poll(cls, context):
        return clip_from_context(context) is not None

    def draw(self, context):
        layout = self.layout
        clip = clip_from_context(context)
        settings = clip.com4d
        row = layout.row()
        row.template_list("COM4D_UL_objects", "", settings, "objects", settings, "active_object", rows=3)
        col = row.column(align=True)
        col.operator("com4d.object_add", icon="ADD", text="")
        col.operator("com4d.object_remove", icon="REMOVE", text="")
        layout.operator("com4d.object_add_tracks", icon="TRACKER")
        if settings.objects and 0 <= settings.active_object < len(settings.objects):
            item = settings.objects[settings.active_object]
            box = layout.box()
            box.prop(item, "name")
            box.prop(item, "role", expand=True)
            box.prop_search(item, "tracking_object", clip.tracking, "objects", icon="OBJECT_DATA")
            box.prop(item, "use_all_tracks")
            for ref in item.tracks:
                line = box.row()
                line.label(text=ref.name, icon="TRACKER")
                line.prop(ref, "positive", text="On Object")
            box.operator("com4d.object_mark_negative", icon="CANCEL")
        col = layout.column(align=True)
        col.prop(settings, "use_clip_range")
        sub = col.row(align=True)
        sub.active = not settings.use_clip_range
        sub.prop(settings, "frame_first")
        sub.prop(settings, "frame_last")
        col.prop(settings, "frame_stride")


class COM4D_PT_reconstruct(COM4D_PT_base, bpy.types.Panel):
    bl_idname = "COM4D_PT_reconstruct"
    bl_label = "Reconstruct"

    def draw(self, context):
        layout = self.layout
        clip = clip_from_context(context)
        state = context.window_manager.com4d_job
        if clip is not None:
            row = layout.row(align=True)
            row.prop(clip.com4d, "num_tokens", expand=True)
            layout.prop(clip.com4d, "steps")
            layout.prop(clip.com4d, "guidance")
            layout.prop(clip.com4d, "seed")
            layout.prop(clip.com4d, "mesh_detail")
            layout.prop(clip.com4d, "topology", text="")
            layout.prop(clip.com4d, "allow_lost")
        session = job_session.current()
        running = session is not None and not session.finished
        if running:
            layout.operator("com4d.cancel", icon="CANCEL")
        else:
            layout.operator("com4d.reconstruct", icon="RENDER_ANIMATION")
        if state.state != "IDLE":
            text = state.stage or state.state.capitalize()
            if state.windows:
                text += f"  window {state.window + 1}/{state.windows}"
            if state.steps:
                text += f"  step {state.step}/{state.steps}"
            layout.progress(factor=state.progress, type="BAR", text=text)
            if state.message:
                layout.label(text=state.message)
            if state.meshes:
                layout.label(text=f"{state.meshes} meshes imported", icon="MESH_DATA")
        if state.error:
            box = layout.box()
            box.alert = True
            for number, line in enumerate(_wrap(state.error)):
                box.label(text=line, icon="ERROR" if number == 0 else "BLANK1")
        if state.warnings:
            box = layout.box()
            for line in state.warnings.splitlines()[-3:]:
                box.label(text=line, icon="INFO")
        layout.separator()
        layout.operator("com4d.import_folder", icon="IMPORT")


def _wrap(text: str, width: int = 48) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


CLASSES = (COM4D_UL_objects, COM4D_PT_backend, COM4D_PT_objects, COM4D_PT_reconstruct)
