"""Enabling the add-on adds its parts to Blender; disabling it removes every one of them, stops
its job thread, its timer and a backend it started, and closes its sockets."""

from __future__ import annotations

import sys
import threading
import time

import addon_utils
import bpy

PACKAGE = "com4d_blender"


def blender_state() -> dict:
    """Everything an add-on can leave behind in Blender's Python API."""
    return {
        "types": {name for name in dir(bpy.types) if "COM4D" in name.upper()},
        "operators": set(dir(bpy.ops.com4d)),
        "clip_props": set(bpy.types.MovieClip.bl_rna.properties.keys()),
        "wm_props": set(bpy.types.WindowManager.bl_rna.properties.keys()),
        "load_pre": list(bpy.app.handlers.load_pre),
        "import_menu": list(bpy.types.TOPBAR_MT_file_import._dyn_ui_initialize()),
        "threads": {t.name for t in threading.enumerate() if t.name.startswith("com4d")},
    }


def test_register_adds_the_parts_and_unregister_leaves_nothing_behind(addon, scene, tmp_path):
    addon_utils.disable(PACKAGE, default_set=True)
    before = blender_state()
    assert before["types"] == set() and before["operators"] == set()

    addon_utils.enable(PACKAGE, default_set=True)
    module = sys.modules[PACKAGE]
    enabled = blender_state()
    assert {
        "COM4D_PT_reconstruct",
        "COM4D_PT_objects",
        "COM4D_PT_backend",
        "COM4D_OT_reconstruct",
    } <= enabled["types"]
    assert {"reconstruct", "cancel", "import_folder", "object_add", "start_backend"} <= enabled["operators"]
    assert "com4d" in enabled["clip_props"] and "com4d_job" in enabled["wm_props"]
    assert len(enabled["load_pre"]) == len(before["load_pre"]) + 1
    assert len(enabled["import_menu"]) == len(before["import_menu"]) + 1

    # leave things running: a job following a backend that never answers, and a local "backend" process
    assert bpy.context.preferences.addons[PACKAGE].preferences.address  # the preferences exist
    job = module.job.BackendJob(
        "tcp://127.0.0.1:9",
        module.job.JobRequest("clip.mp4", {}),
        timeouts=module.job.Timeouts(connect=30.0),
        context=module.zmq_context.context(),
    )
    module.job_session.start(module.job_session.JobSession(job, scene.name, "COM4D left running"))
    backend = module.local_backend.ensure_started(
        [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "backend.log"
    )
    assert job.alive and backend.running and bpy.app.timers.is_registered(module.job_session._tick)
    context = module.zmq_context.context()

    started = time.monotonic()
    addon_utils.disable(PACKAGE, default_set=True)
    took = time.monotonic() - started

    assert blender_state() == before
    assert not job.alive and not backend.running
    assert context.closed
    assert not bpy.app.timers.is_registered(module.job_session._tick)
    assert took < 5.0

    addon_utils.enable(PACKAGE, default_set=True)  # for the other tests
