"""The main-thread side of a running job: drains the worker's queue and applies it to Blender.

`poll_session()` is a plain function: a `bpy.app.timers` callback calls it about ten times a second
while a job runs, and the tests call it in a loop (timers never fire in background mode). Each call
works for at most a small time budget, so importing many meshes never freezes the UI.
"""

from __future__ import annotations

import queue
import time
import traceback
from dataclasses import dataclass, field

import bpy

from .job import BackendJob, JobEvent
from .scene_builder import ReconstructionBuilder

TICK_SECONDS = 0.1
BUDGET_SECONDS = 0.05


@dataclass
class JobSession:
    """A BackendJob plus where its results go."""

    job: BackendJob
    scene_name: str
    title: str
    clip_frame_start: int = 1
    frame_offset: int = 0
    known_frames: list[int] = field(default_factory=list)
    static_count: int = 1  # static parts the backend will make (for object colours)
    builder: ReconstructionBuilder | None = None
    connection_text: str = ""
    finished: bool = False
    notices: list[tuple[str, str]] = field(default_factory=list)  # (level, text) not yet reported
    reported: list[tuple[str, str]] = field(default_factory=list)  # everything reported so far

    def ensure_builder(self) -> ReconstructionBuilder:
        if self.builder is None:
            scene = bpy.data.scenes[self.scene_name]
            self.builder = ReconstructionBuilder(
                scene,
                self.title,
                self.clip_frame_start,
                self.frame_offset,
                self.known_frames,
                self.static_count,
            )
            job_state().reconstruction = self.builder.collection_name
        return self.builder


_session: JobSession | None = None


def job_state():
    """The WindowManager's job state (what the panel draws)."""
    return bpy.data.window_managers[0].com4d_job


def current() -> JobSession | None:
    return _session


def start(session: JobSession) -> JobSession:
    """Make `session` the running one, start its worker and the timer that polls it."""
    global _session
    if _session is not None and not _session.finished:
        raise RuntimeError("a reconstruction is already running; cancel it or wait for it to finish")
    state = job_state()
    state.reset()
    state.state = "CONNECTING"
    state.message = f"connecting to {session.job.address}"
    _session = session
    session.job.start()
    if not bpy.app.timers.is_registered(_tick):
        bpy.app.timers.register(_tick, first_interval=TICK_SECONDS, persistent=True)
    return session


def cancel() -> bool:
    """Ask the running job to stop; True if there was one."""
    session = _session
    if session is None or session.finished:
        return False
    session.job.cancel()
    state = job_state()
    state.state = "CANCELLING"
    state.message = "cancelling..."
    _redraw()
    return True


def shutdown() -> None:
    """Stop following any job and stop the timer (unregister, loading another file)."""
    global _session
    if bpy.app.timers.is_registered(_tick):
        bpy.app.timers.unregister(_tick)
    session, _session = _session, None
    if session is not None:
        session.job.close()


def poll_session(session: JobSession, budget: float = BUDGET_SECONDS) -> bool:
    """Apply what the worker reported since the last call. Returns True while more may come."""
    deadline = time.monotonic() + budget
    while not session.finished:
        try:
            event = session.job.events.get_nowait()
        except queue.Empty:
            break
        try:
            _apply(session, event)
        except Exception as err:  # one bad result must not stop the others
            traceback.print_exc()
            _notice(session, "WARNING", f"could not import a result: {type(err).__name__}: {err}")
        if time.monotonic() > deadline:
            break
    _report(session)
    _redraw()
    return not session.finished


def _tick():
    session = _session
    if session is None:
        return None
    try:
        more = poll_session(session)
    except Exception:
        traceback.print_exc()
        more = False
    return TICK_SECONDS if more else None


# -- applying one event -------------------------------------------------------------------------
def _apply(session: JobSession, event: JobEvent) -> None:
    state = job_state()
    kind, data = event.kind, event.data
    if kind == "connected":
        device = data.get("device", "?")
        session.connection_text = f"connected: {data.get('server', 'backend')} on {device}"
        state.connection = session.connection_text
        state.message = "submitting..."
    elif kind == "accepted":
        state.job_id = data["job"]
        if state.state != "CANCELLING":
            state.state = "RUNNING"
        state.message = "queued"
    elif kind == "connection":
        back = data.get("state") == "connected" and session.connection_text
        state.connection = session.connection_text if back else data.get("text", "")
    elif kind == "cancelled":
        state.state = "CANCELLED"
        state.message = "cancelled before the backend started it"
    elif kind == "failed":
        _fail(session, data.get("message", "the job failed"))
    elif kind == "finished":
        session.finished = True
        if state.active:
            _fail(session, "the connection to the backend ended before the job finished")
    elif kind == "message":
        _apply_message(session, data)


def _apply_message(session: JobSession, message) -> None:
    state = job_state()
    kind = message.type
    if kind == "progress":
        state.stage = str(message.get("stage", ""))
        for name in ("step", "steps", "window", "windows"):
            setattr(state, name, int(message.get(name) or 0))
        done, total = int(message.get("done") or 0), int(message.get("total") or 0)
        state.progress = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
        state.message = str(message.get("message") or "")
        if state.state == "CONNECTING":
            state.state = "RUNNING"
    elif kind == "mesh":
        builder = session.ensure_builder()
        vertices, faces = message.arrays["vertices"], message.arrays["faces"]
        index = int(message.get("object_index", 0))
        if message["role"] == "static":
            builder.add_static(message["name"], vertices, faces, index=index, color=message.get("color"))
        else:
            builder.add_frame_mesh(
                message["name"],
                int(message["frame"]),
                vertices,
                faces,
                index=index,
                color=message.get("color"),
            )
        state.meshes += 1
    elif kind == "tracked_mesh":
        builder = session.ensure_builder()
        builder.add_tracked(
            message["name"],
            message["frames"],
            message.arrays["vertices"],
            message.arrays["faces"],
            index=int(message.get("object_index", 0)),
            color=message.get("color"),
            fallback_frames=message.get("fallback_frames") or [],
        )
        state.meshes += 1
    elif kind == "warning":
        text = str(message.get("message", ""))
        state.warnings = "\n".join(filter(None, [state.warnings, text]))
        _notice(session, "WARNING", text)
    elif kind == "done":
        state.state = "DONE"
        state.progress = 1.0
        state.message = f"done: {state.meshes} meshes"
        _notice(session, "INFO", f"COM4D: reconstruction done ({state.meshes} meshes)")
    elif kind == "error":
        if message.get("code") == "cancelled":
            state.state = "CANCELLED"
            state.message = "cancelled; the meshes that arrived are kept"
            _notice(session, "INFO", "COM4D: reconstruction cancelled")
        else:
            text = str(message.get("message", "the backend reported an error"))
            if message.get("advice"):
                text = f"{text} {message['advice']}"
            _fail(session, text)


def _fail(session: JobSession, text: str) -> None:
    state = job_state()
    state.state = "FAILED"
    state.error = text
    state.message = "failed"
    _notice(session, "ERROR", f"COM4D: {text}")


def _notice(session: JobSession, level: str, text: str) -> None:
    session.notices.append((level, text))


def _report(session: JobSession) -> None:
    """Show new notices in Blender's report area (through an operator, which may report)."""
    while session.notices:
        level, text = session.notices.pop(0)
        session.reported.append((level, text))
        try:
            bpy.ops.com4d.notify(level=level, message=text)
        except (RuntimeError, AttributeError):
            print(f"COM4D {level}: {text}")


def _redraw() -> None:
    for window_manager in bpy.data.window_managers:
        for window in window_manager.windows:
            for area in window.screen.areas:
                if area.type in {"CLIP_EDITOR", "VIEW_3D", "OUTLINER"}:
                    area.tag_redraw()
