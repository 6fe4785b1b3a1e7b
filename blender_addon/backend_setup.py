"""Reaching a backend from the preferences: the local backend's command, the add-on's folders,
and whether Blender may go online for a remote one."""

from __future__ import annotations

from pathlib import Path

import bpy

from . import local_backend
from .protocol import is_loopback_address


def user_folder(*parts: str) -> Path:
    """A folder of this add-on's own (the extension's user folder, or Blender's user data folder)."""
    try:
        base = Path(bpy.utils.extension_path_user(__package__, create=True))
    except (ValueError, RuntimeError):
        base = Path(bpy.utils.user_resource("DATAFILES", path="com4d_blender", create=True))
    folder = base.joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def local_serve_command(prefs) -> list[str]:
    """The local backend's command line from the preferences (raises LocalBackendError)."""
    store = bpy.path.abspath(prefs.store) if prefs.store else str(user_folder("store"))
    return local_backend.serve_command(
        bpy.path.abspath(prefs.python),
        bpy.path.abspath(prefs.weights),
        prefs.address,
        store,
        prefs.device,
        bpy.path.abspath(prefs.sam_checkpoint) if prefs.sam_checkpoint else "",
    )


def local_starter(prefs):
    """A thread-safe callable that starts the configured local backend (read from prefs now)."""
    command = local_serve_command(prefs)
    log_path = user_folder("logs") / "backend.log"
    return lambda: local_backend.ensure_started(command, log_path)


def remote_access_problem(address: str) -> str | None:
    """Why Blender may not reach `address` (None if it may): remote backends need online access."""
    if is_loopback_address(address) or bpy.app.online_access:
        return None
    return (
        f"{address} is another machine and Blender's online access is off; allow it in "
        "Preferences > System > Network, or use a backend on this machine"
    )
