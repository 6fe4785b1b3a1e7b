"""The sidebar panels and the preferences draw without errors, in every job state.

Background Blender has no UI to draw into, so each `draw()` gets a layout that records what it is
asked for and checks it against Blender's real data: every drawn property exists on its data, every
button is a registered operator.
"""

from __future__ import annotations

from types import SimpleNamespace

import bpy
import pytest


class CheckedLayout:
    """Stands in for bpy.types.UILayout: records the widgets and checks their targets exist."""

    def __init__(self, log: list):
        self.log = log
        self.active = True
        self.alert = False
        self.enabled = True
        self.use_property_split = False

    def _child(self, *args, **kwargs):
        return CheckedLayout(self.log)

    row = column = box = split = _child

    def separator(self, **kwargs):
        pass

    def label(self, text="", **kwargs):
        self.log.append(("label", text))

    def prop(self, data, name, **kwargs):
        assert name in data.bl_rna.properties, f"{type(data).__name__} has no property {name!r}"
        self.log.append(("prop", name))

    def prop_search(self, data, name, search_data, search_name, **kwargs):
        assert name in data.bl_rna.properties and search_name in search_data.bl_rna.properties
        self.log.append(("prop", name))

    def operator(self, idname, **kwargs):
        module, name = idname.split(".")
        assert name in dir(getattr(bpy.ops, module)), f"no operator {idname}"
        self.log.append(("operator", idname))
        return SimpleNamespace()

    def progress(self, factor=0.0, type="BAR", text=""):
        assert 0.0 <= factor <= 1.0
        self.log.append(("progress", text))

    def template_list(self, list_type, list_id, data, name, active_data, active_name, **kwargs):
        assert hasattr(bpy.types, list_type), f"UIList {list_type} is not registered"
        assert name in data.bl_rna.properties and active_name in active_data.bl_rna.properties
        self.log.append(("list", name))


class WithLayout:
    """`target` (e.g. the real add-on preferences) with a layout to draw into."""

    def __init__(self, target, layout):
        self._target = target
        self.layout = layout

    def __getattr__(self, name):
        return getattr(self._target, name)


def draw(cls, clip, target=None):
    log: list = []
    context = SimpleNamespace(
        window_manager=bpy.context.window_manager,
        preferences=bpy.context.preferences,
        space_data=None,
        edit_movieclip=clip,
        scene=bpy.context.scene,
    )
    cls.draw(WithLayout(target, CheckedLayout(log)), context)
    return log


@pytest.mark.parametrize("job_state", ["IDLE", "RUNNING", "FAILED", "DONE"])
def test_panels_draw_in_every_state(addon, clip, job_state):
    tracking_object = clip.tracking.objects.new("dog")
    tracking_object.tracks.new(name="nose", frame=1)
    bpy.ops.com4d.object_add(clip_name=clip.name, tracking_object="dog")
    clip.com4d.objects[0].tracks.add().name = "nose"
    state = bpy.context.window_manager.com4d_job
    state.state = job_state
    state.stage, state.windows, state.window, state.steps, state.step = "stage_b", 3, 1, 50, 7
    state.error = "the backend ran out of memory. " * 4 if job_state == "FAILED" else ""
    state.warnings = "dog was lost on frame 3" if job_state == "DONE" else ""

    logs = {
        cls.__name__: draw(cls, clip)
        for cls in (bpy.types.COM4D_PT_backend, bpy.types.COM4D_PT_objects, bpy.types.COM4D_PT_reconstruct)
    }
    prefs = bpy.context.preferences.addons["com4d_blender"].preferences
    logs["prefs"] = draw(type(prefs), clip, target=prefs)

    reconstruct = logs["COM4D_PT_reconstruct"]
    assert ("operator", "com4d.import_folder") in reconstruct
    assert ("operator", "com4d.reconstruct") in reconstruct  # no session runs, so no Cancel
    progress = [text for kind, text in reconstruct if kind == "progress"]
    assert progress == ([] if job_state == "IDLE" else ["stage_b  window 2/3  step 7/50"])
    if job_state == "FAILED":
        assert any(kind == "label" and "ran out of memory" in text for kind, text in reconstruct)
    assert ("list", "objects") in logs["COM4D_PT_objects"]
    assert ("prop", "address") in logs["prefs"] and ("operator", "com4d.start_backend") in logs["prefs"]
