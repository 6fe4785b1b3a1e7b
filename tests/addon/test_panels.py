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


def test_the_panels_set_every_schema_field_a_user_should_set(addon, clip):
    """Every field of the library's schema is drawn in a panel, or left to the backend for a stated reason."""
    from com4d.params import SPECS

    params = addon.params
    fields = {spec.name for spec in SPECS}
    assert set(params.CLIP_SETTING) | set(params.LEFT_TO_THE_BACKEND) == fields
    assert not set(params.CLIP_SETTING) & set(params.LEFT_TO_THE_BACKEND)
    drawn = {
        name
        for cls in (bpy.types.COM4D_PT_objects, bpy.types.COM4D_PT_reconstruct)
        for kind, name in draw(cls, clip)
        if kind == "prop"
    }
    assert set(params.CLIP_SETTING.values()) <= drawn
    sent = params.reconstruction_params([0, 2], 2048, 50)
    assert set(sent) == set(params.CLIP_SETTING)  # nothing is sent that no setting controls


def test_the_clip_settings_take_their_defaults_and_ranges_from_the_schema(addon, clip):
    from com4d.params import SPEC_BY_NAME

    settings = clip.com4d.bl_rna.properties
    for setting, field in [
        ("frame_stride", "frame_stride"),
        ("steps", "scene_steps"),
        ("guidance", "scene_guidance"),
        ("seed", "seed"),
        ("mesh_detail", "mesh_final_depth"),
    ]:
        spec = SPEC_BY_NAME[field]
        prop = settings[setting]
        assert prop.default == pytest.approx(spec.default), setting
        assert prop.hard_min == pytest.approx(spec.min), setting
        assert prop.hard_max == pytest.approx(min(spec.max or 2**31 - 1, 2**31 - 1)), setting
    assert settings["num_tokens"].default == str(SPEC_BY_NAME["num_tokens"].default)
    tokens = [int(item.identifier) for item in settings["num_tokens"].enum_items]
    assert all(SPEC_BY_NAME["num_tokens"].min <= n <= SPEC_BY_NAME["num_tokens"].max for n in tokens)
    assert settings["topology"].default == SPEC_BY_NAME["topology"].default
    assert {item.identifier for item in settings["topology"].enum_items} == set(SPEC_BY_NAME["topology"].choices)
    assert settings["allow_lost"].default == SPEC_BY_NAME["allow_lost"].default
