"""Operators: mark objects from tracking, reconstruct, cancel, import a folder, manage the backend.

Each operator returns at once; the work that waits (network, a starting backend) runs in worker
threads, and `poll()` says, through `poll_message_set`, why a button is greyed out.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from . import job_session, local_backend, zmq_context
from .backend_setup import local_starter, remote_access_problem
from .clip_input import clip_frames, clip_from_context, clip_prompts, clip_video_path, prompt_frames
from .credentials import CredentialsError
from .job import BackendJob, JobRequest, check_connection
from .params import reconstruction_params
from .preferences import preferences
from .scene_folder import SceneFolderError, import_folder
from .tracking_prompts import PromptError, prompts_document


# -- objects to reconstruct ------------------------------------------------------------------------
class COM4D_OT_object_add(bpy.types.Operator):
    """Reconstruct the active tracking object: all its tracks' markers become prompts"""

    bl_idname = "com4d.object_add"
    bl_label = "Add Tracking Object"
    bl_options = {"REGISTER", "UNDO"}

    clip_name: StringProperty(options={"SKIP_SAVE", "HIDDEN"})
    tracking_object: StringProperty(
        name="Tracking Object",
        options={"SKIP_SAVE"},
        description="Default: the clip's active tracking object",
    )
    role: EnumProperty(
        name="Role", items=[("dynamic", "Dynamic", ""), ("static", "Static", "")], default="dynamic"
    )

    @classmethod
    def poll(cls, context):
        if clip_from_context(context) is None:
            cls.poll_message_set("Open a movie clip in the Clip Editor first")
            return False
        return True

    def execute(self, context):
        clip = clip_from_context(context, self.clip_name)
        if clip is None:
            self.report({"ERROR"}, "No movie clip to take tracks from")
            return {"CANCELLED"}
        name = self.tracking_object or clip.tracking.objects.active.name
        tracking_object = clip.tracking.objects.get(name)
        if tracking_object is None:
            self.report({"ERROR"}, f"The clip has no tracking object '{name}'")
            return {"CANCELLED"}
        settings = clip.com4d
        item = settings.objects.add()
        item.name = "object" if tracking_object.is_camera else tracking_object.name
        item.role = self.role
        item.tracking_object = tracking_object.name
        item.use_all_tracks = True
        settings.active_object = len(settings.objects) - 1
        return {"FINISHED"}


class COM4D_OT_object_add_tracks(bpy.types.Operator):
    """Reconstruct one object marked by the selected tracks of the active tracking object"""

    bl_idname = "com4d.object_add_tracks"
    bl_label = "Add Selected Tracks"
    bl_options = {"REGISTER", "UNDO"}

    clip_name: StringProperty(options={"SKIP_SAVE", "HIDDEN"})
    name: StringProperty(name="Name", default="object")
    role: EnumProperty(
        name="Role", items=[("dynamic", "Dynamic", ""), ("static", "Static", "")], default="dynamic"
    )

    @classmethod
    def poll(cls, context):
        clip = clip_from_context(context)
        if clip is None:
            cls.poll_message_set("Open a movie clip in the Clip Editor first")
            return False
        if not any(t.select for t in clip.tracking.objects.active.tracks):
            cls.poll_message_set("Select the tracks that mark the object")
            return False
        return True

    def execute(self, context):
        clip = clip_from_context(context, self.clip_name)
        tracking_object = clip.tracking.objects.active
        selected = [t.name for t in tracking_object.tracks if t.select]
        if not selected:
            self.report({"ERROR"}, "Select the tracks that mark the object")
            return {"CANCELLED"}
        settings = clip.com4d
        item = settings.objects.add()
        item.name = self.name
        item.role = self.role
        item.tracking_object = tracking_object.name
        item.use_all_tracks = False
        for track_name in selected:
            item.tracks.add().name = track_name
        settings.active_object = len(settings.objects) - 1
        return {"FINISHED"}


class COM4D_OT_object_mark_negative(bpy.types.Operator):
    """The selected tracks mark what is NOT the active object (negative prompts)"""

    bl_idname = "com4d.object_mark_negative"
    bl_label = "Selected Tracks Are Not This Object"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        clip = clip_from_context(context)
        if clip is None or not clip.com4d.objects:
            cls.poll_message_set("Add an object to reconstruct first")
            return False
        return True

    def execute(self, context):
        clip = clip_from_context(context)
        settings = clip.com4d
        item = settings.objects[settings.active_object]
        tracking_object = clip.tracking.objects.get(item.tracking_object)
        if tracking_object is None:
            self.report({"ERROR"}, f"The clip has no tracking object '{item.tracking_object}'")
            return {"CANCELLED"}
        selected = [t.name for t in tracking_object.tracks if t.select]
        known = {t.name: t for t in item.tracks}
        for track_name in selected:
            ref = known.get(track_name) or item.tracks.add()
            ref.name = track_name
            ref.positive = False
        return {"FINISHED"}


class COM4D_OT_object_remove(bpy.types.Operator):
    """Stop reconstructing the active object"""

    bl_idname = "com4d.object_remove"
    bl_label = "Remove Object"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        clip = clip_from_context(context)
        return clip is not None and len(clip.com4d.objects) > 0

    def execute(self, context):
        settings = clip_from_context(context).com4d
        settings.objects.remove(settings.active_object)
        settings.active_object = max(0, min(settings.active_object, len(settings.objects) - 1))
        return {"FINISHED"}


class COM4D_OT_export_prompts(bpy.types.Operator):
    """Write the objects to reconstruct as prompts.json (for `com4d segment` / `com4d reconstruct`)"""

    bl_idname = "com4d.export_prompts"
    bl_label = "Export prompts.json"

    filepath: StringProperty(subtype="FILE_PATH", default="prompts.json")
    clip_name: StringProperty(options={"SKIP_SAVE", "HIDDEN"})

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        clip = clip_from_context(context, self.clip_name)
        if clip is None:
            self.report({"ERROR"}, "No movie clip")
            return {"CANCELLED"}
        try:
            document = clip_prompts(clip)
        except (PromptError, ValueError) as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        Path(bpy.path.abspath(self.filepath)).write_text(json.dumps(document, indent=1), encoding="utf-8")
        return {"FINISHED"}


# -- running a reconstruction -----------------------------------------------------------------------
class COM4D_OT_reconstruct(bpy.types.Operator):
    """Send the clip and its marked objects to the backend; meshes appear in the scene as they finish"""

    bl_idname = "com4d.reconstruct"
    bl_label = "Reconstruct"

    clip_name: StringProperty(options={"SKIP_SAVE", "HIDDEN"})

    @classmethod
    def poll(cls, context):
        session = job_session.current()
        if session is not None and not session.finished:
            cls.poll_message_set("A reconstruction is running; cancel it or wait")
            return False
        clip = clip_from_context(context)
        if clip is None:
            cls.poll_message_set("Open a movie clip in the Clip Editor first")
            return False
        if not any(item.enabled for item in clip.com4d.objects):
            cls.poll_message_set("Add an object to reconstruct (from a tracking object or tracks)")
            return False
        return True

    def execute(self, context):
        clip = clip_from_context(context, self.clip_name)
        if clip is None:
            self.report({"ERROR"}, "No movie clip to reconstruct")
            return {"CANCELLED"}
        prefs = preferences(context)
        problem = remote_access_problem(prefs.address)
        if problem:
            self.report({"ERROR"}, problem)
            return {"CANCELLED"}
        try:
            frames = clip_frames(clip)
            prompts = prompts_document(clip, clip.com4d.specs(), prompt_frames(frames))
            video = clip_video_path(clip)
            starter = local_starter(prefs) if prefs.use_local_backend else None
            credentials = prefs.credentials()
            settings = clip.com4d
            params = reconstruction_params(
                frames,
                int(settings.num_tokens),
                settings.steps,
                settings.mesh_detail,
                settings.topology,
                settings.guidance,
                settings.seed,
                settings.allow_lost,
            )
        except (PromptError, ValueError, local_backend.LocalBackendError) as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        request = JobRequest(video=video, prompts=prompts, params=params, label=clip.name)
        job = BackendJob(
            prefs.address,
            request,
            credentials,
            prefs.timeouts(),
            context=zmq_context.context(),
            ensure_backend=starter,
        )
        session = job_session.JobSession(
            job,
            scene_name=context.scene.name,
            title=f"COM4D {clip.name}",
            clip_frame_start=int(clip.frame_start),
            frame_offset=int(clip.frame_offset),
            known_frames=frames,
            static_count=max(1, sum(1 for o in prompts["objects"] if o["role"] == "static")),
        )
        try:
            job_session.start(session)
        except RuntimeError as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        self.report(
            {"INFO"}, f"COM4D: reconstructing {len(prompts['objects'])} objects on {len(frames)} frames"
        )
        return {"FINISHED"}


class COM4D_OT_cancel(bpy.types.Operator):
    """Stop the running reconstruction (meshes that already arrived stay in the scene)"""

    bl_idname = "com4d.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        session = job_session.current()
        if session is None or session.finished:
            cls.poll_message_set("No reconstruction is running")
            return False
        return True

    def execute(self, context):
        job_session.cancel()
        return {"FINISHED"}


class COM4D_OT_notify(bpy.types.Operator):
    """Show a message from the running job in Blender's report area"""

    bl_idname = "com4d.notify"
    bl_label = "COM4D Message"
    bl_options = {"INTERNAL"}

    level: EnumProperty(items=[("INFO", "Info", ""), ("WARNING", "Warning", ""), ("ERROR", "Error", "")])
    message: StringProperty()

    def execute(self, context):
        self.report({self.level}, self.message)
        return {"FINISHED"}


# -- importing a folder -------------------------------------------------------------------------------
class COM4D_OT_import_folder(bpy.types.Operator):
    """Import a folder written by `com4d reconstruct` (scene.json and GLB meshes)"""

    bl_idname = "com4d.import_folder"
    bl_label = "Import COM4D Reconstruction"
    bl_options = {"REGISTER", "UNDO"}

    directory: StringProperty(subtype="DIR_PATH")
    filter_folder: BoolProperty(default=True, options={"HIDDEN"})
    clip_frame_start: IntProperty(
        name="Clip Start Frame",
        default=1,
        description="Timeline frame of the video's first frame (the clip's Start Frame)",
    )
    frame_offset: IntProperty(
        name="Clip Frame Offset",
        default=0,
        description="The clip's Frame Offset, if the clip skips frames of its file",
    )

    def invoke(self, context, event):
        clip = clip_from_context(context)
        if clip is not None:
            self.clip_frame_start = clip.frame_start
            self.frame_offset = clip.frame_offset
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        folder = Path(bpy.path.abspath(self.directory))
        if folder.name == "scene.json":
            folder = folder.parent
        try:
            result = import_folder(folder, context.scene, self.clip_frame_start, self.frame_offset)
        except SceneFolderError as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        for text in result.warnings:
            self.report({"WARNING"}, text)
        self.report(
            {"INFO"}, f"COM4D: imported {result.meshes} meshes into '{result.builder.collection_name}'"
        )
        return {"FINISHED"}


def menu_import(self, context):
    self.layout.operator(COM4D_OT_import_folder.bl_idname, text="COM4D Reconstruction (folder)")


# -- the backend ------------------------------------------------------------------------------------------
_checks: queue.Queue = queue.Queue()


def connection_summary(facts: dict) -> str:
    """The panel's line for a backend's hello: who it is, its device, how many jobs wait in its queue."""
    text = f"connected: {facts.get('server', 'backend')} on {facts.get('device', '?')}"
    queue_info = facts.get("queue") or {}
    if queue_info:
        text += f", {len(queue_info.get('queued') or [])} queued"  # the protocol lists the queued jobs
    return text


def _check_worker(address: str, credentials, timeout: float) -> None:
    try:
        facts = check_connection(address, credentials, timeout, context=zmq_context.context())
        _checks.put(("INFO", connection_summary(facts)))
    except Exception as err:  # shown to the user as is
        _checks.put(("ERROR", f"no backend at {address}: {err}"))


def apply_connection_checks() -> float | None:
    """Main thread: show finished connection checks in the panel (a timer calls it)."""
    try:
        while True:
            level, text = _checks.get_nowait()
            bpy.data.window_managers[0].com4d_job.connection = text
            try:
                bpy.ops.com4d.notify(level=level, message=f"COM4D: {text}")
            except RuntimeError:
                print(f"COM4D {level}: {text}")
            job_session._redraw()
            return None
    except queue.Empty:
        return 0.2


class COM4D_OT_check_connection(bpy.types.Operator):
    """Ask the backend who it is (in the background; the answer shows in the panel)"""

    bl_idname = "com4d.check_connection"
    bl_label = "Check Connection"

    def execute(self, context):
        prefs = preferences(context)
        problem = remote_access_problem(prefs.address)
        if problem:
            self.report({"ERROR"}, problem)
            return {"CANCELLED"}
        try:
            credentials = prefs.credentials()
        except CredentialsError as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        context.window_manager.com4d_job.connection = f"checking {prefs.address}..."
        threading.Thread(
            target=_check_worker,
            args=(prefs.address, credentials, prefs.connect_timeout),
            daemon=True,
            name="com4d-check",
        ).start()
        if not bpy.app.timers.is_registered(apply_connection_checks):
            bpy.app.timers.register(apply_connection_checks, first_interval=0.2)
        return {"FINISHED"}


class COM4D_OT_start_backend(bpy.types.Operator):
    """Start the backend on this machine with the Python, weights and device from the preferences"""

    bl_idname = "com4d.start_backend"
    bl_label = "Start Local Backend"

    @classmethod
    def poll(cls, context):
        if local_backend.current() is not None:
            cls.poll_message_set("The local backend is running")
            return False
        return True

    def execute(self, context):
        prefs = preferences(context)
        try:
            backend = local_starter(prefs)()
        except local_backend.LocalBackendError as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        context.window_manager.com4d_job.connection = f"local backend starting (pid {backend.process.pid})"
        self.report({"INFO"}, f"COM4D: starting the local backend; its log is {backend.log_path}")
        return {"FINISHED"}


class COM4D_OT_stop_backend(bpy.types.Operator):
    """Stop the backend this Blender session started"""

    bl_idname = "com4d.stop_backend"
    bl_label = "Stop Local Backend"

    @classmethod
    def poll(cls, context):
        if local_backend.current() is None:
            cls.poll_message_set("This Blender session has not started a backend")
            return False
        return True

    def execute(self, context):
        local_backend.stop_current()
        context.window_manager.com4d_job.connection = "local backend stopped"
        return {"FINISHED"}


CLASSES = (
    COM4D_OT_object_add,
    COM4D_OT_object_add_tracks,
    COM4D_OT_object_mark_negative,
    COM4D_OT_object_remove,
    COM4D_OT_export_prompts,
    COM4D_OT_reconstruct,
    COM4D_OT_cancel,
    COM4D_OT_notify,
    COM4D_OT_import_folder,
    COM4D_OT_check_connection,
    COM4D_OT_start_backend,
    COM4D_OT_stop_backend,
)
