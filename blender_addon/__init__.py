"""COM4D for Blender: mark objects in a movie clip with tracks, get back a 4D scene of meshes.

The extension talks to a COM4D backend (this machine or another) over ZeroMQ; see docs/blender.md.
It needs only Blender's own Python, numpy and the bundled pyzmq and msgpack wheels.
"""

from __future__ import annotations

import atexit

import bpy

from . import job_session, local_backend, operators, panels, preferences, properties, zmq_context

_CLASSES = (*preferences.CLASSES, *operators.CLASSES, *panels.CLASSES)


@bpy.app.handlers.persistent
def _on_load_pre(*_args) -> None:
    """A new file replaces the scene the job imports into: stop following the job (it keeps running
    on the backend, and its results stay in the backend's job store)."""
    job_session.shutdown()


def register() -> None:
    properties.register()
    for cls in _CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.TOPBAR_MT_file_import.append(operators.menu_import)
    bpy.app.handlers.load_pre.append(_on_load_pre)
    atexit.register(local_backend.stop_current)  # Blender quits without unregistering add-ons


def unregister() -> None:
    atexit.unregister(local_backend.stop_current)
    job_session.shutdown()
    if bpy.app.timers.is_registered(operators.apply_connection_checks):
        bpy.app.timers.unregister(operators.apply_connection_checks)
    local_backend.stop_current()
    zmq_context.close()
    if _on_load_pre in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_on_load_pre)
    bpy.types.TOPBAR_MT_file_import.remove(operators.menu_import)
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
    properties.unregister()
