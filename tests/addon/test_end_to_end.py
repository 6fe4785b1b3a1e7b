"""End to end: the add-on starts the real backend (tiny weights, CPU, loopback), submits a clip whose
tracks mark an object, and the meshes stream into the scene; a second job is cancelled.

The backend is started by the add-on itself (Preferences > Start a Local Backend), as an artist
would, with the preferences' Python for the backend: the backend's own environment with torch, not
Blender's Python. Without the backend or the library these tests fail; they never skip.
SAM is a tiny random model: its masks are arbitrary, so the object is marked on every frame (a track
followed through the clip), which keeps segmentation from losing it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import bpy
import pytest

from .conftest import backend_python, write_video

pytestmark = pytest.mark.slow

TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_backend_prefs(addon, prefs, library, library_facts, tmp_path):
    """A local backend in the backend's Python (which need not be Blender's), tiny weights, on the CPU."""
    prefs.address = f"tcp://127.0.0.1:{free_port()}"
    prefs.use_local_backend = True
    prefs.python = backend_python()
    prefs.weights = library_facts["weights"]
    prefs.sam_checkpoint = str(library / "tiny_sam.pth")
    prefs.store = str(tmp_path / "store")
    prefs.device = "cpu"
    prefs.connect_timeout = 1.0
    prefs.start_timeout = 120.0
    yield prefs
    addon.local_backend.stop_current()


@pytest.fixture
def square_clip(scene, tmp_path):
    """A 6-frame clip of a square moving right 4 px per frame."""
    return bpy.data.movieclips.load(str(write_video(tmp_path / "square.mp4", frames=6)))


def marked_clip(clip, frame_start: int):
    """The clip with a track following the square on every frame, all frames to be reconstructed.

    (The tiny SAM is random: on an unprompted frame it may lose the object, so every frame of the
    clip gets a marker, as a track followed through the clip gives.)
    """
    square = clip.tracking.objects.new("square")
    track = square.tracks.new(name="centre", frame=1)
    for clip_frame in range(1, clip.frame_duration + 1):
        x, y = 25 + 4 * (clip_frame - 1), 60  # pixels, origin top-left
        marker = track.markers.insert_frame(clip_frame, co=(x / 160, 1 - y / 120))
        marker.mute = False
    bpy.ops.com4d.object_add(clip_name=clip.name, tracking_object="square", role="dynamic")
    settings = clip.com4d
    settings.use_clip_range = True
    settings.frame_stride = 1
    settings.num_tokens = "512"
    settings.mesh_detail = 5
    clip.frame_start = frame_start
    return clip


def poll_until(addon, condition, timeout=TIMEOUT_S):
    session = addon.job_session.current()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        more = addon.job_session.poll_session(session)
        if condition() or not more:
            return session
        time.sleep(0.05)
    raise AssertionError(f"timed out; state {bpy.data.window_managers[0].com4d_job.state}")


def test_reconstruct_starts_the_backend_and_streams_meshes_into_the_scene(
    addon, square_clip, local_backend_prefs
):
    clip = marked_clip(square_clip, frame_start=101)
    clip.com4d.steps = 2
    state = bpy.data.window_managers[0].com4d_job
    assert addon.local_backend.current() is None

    assert bpy.ops.com4d.reconstruct(clip_name=clip.name) == {"FINISHED"}
    stages = set()
    meshes_before_done = 0

    def finished():
        nonlocal meshes_before_done
        stages.add(state.stage)
        if state.state != "DONE":
            meshes_before_done = state.meshes
        return state.state not in ("CONNECTING", "RUNNING")

    session = poll_until(addon, finished)
    poll_until(addon, lambda: session.finished)

    assert state.state == "DONE", state.error
    assert addon.local_backend.current() is not None  # the add-on started it
    assert state.connection.startswith("connected:") and state.connection.endswith("on cpu")
    assert {"stage_a", "stage_b", "meshing"} <= stages
    assert state.progress == 1.0 and state.meshes == 7  # one static part + the square on 6 frames
    assert meshes_before_done >= 1  # meshes arrived while the job ran
    root = bpy.data.collections[state.reconstruction]
    assert root.name == "COM4D square.mp4"
    assert [c.name for c in root.children["Dynamic"].children] == ["square"]
    frame_objects = sorted(o.name for o in root.children["Dynamic"].children["square"].objects)
    assert frame_objects == [f"square_f{frame:06d}" for frame in range(6)]
    assert len(root.children["Static"].objects) == 1
    for frame in range(6):  # the clip starts at 101: source frame f is on the timeline at 101 + f
        bpy.context.scene.frame_set(101 + frame)
        visible = [o.name for o in root.children["Dynamic"].children["square"].objects if not o.hide_viewport]
        assert visible == [f"square_f{frame:06d}"]
        assert len(bpy.data.objects[f"square_f{frame:06d}"].data.polygons) > 0


def test_cancel_stops_a_running_job_and_keeps_the_backend_serving(addon, square_clip, local_backend_prefs):
    clip = marked_clip(square_clip, frame_start=1)
    clip.com4d.steps = 200  # long enough to be cancelled in the middle
    state = bpy.data.window_managers[0].com4d_job
    assert bpy.ops.com4d.reconstruct(clip_name=clip.name) == {"FINISHED"}
    poll_until(
        addon, lambda: state.stage in ("stage_a", "stage_b") or state.state not in ("CONNECTING", "RUNNING")
    )
    assert state.state == "RUNNING", state.error

    cancelled_at = time.monotonic()
    assert bpy.ops.com4d.cancel() == {"FINISHED"}
    assert state.state == "CANCELLING"
    session = poll_until(addon, lambda: state.state != "CANCELLING", timeout=30)
    took = time.monotonic() - cancelled_at

    assert state.state == "CANCELLED", state.error
    assert took < 10.0
    poll_until(addon, lambda: session.finished, timeout=10)
    assert not session.job.alive
    facts = addon.job.check_connection(local_backend_prefs.address, timeout=5.0)
    assert facts["device"] == "cpu"  # still serving after the cancel
    assert bpy.ops.com4d.stop_backend() == {"FINISHED"}
    assert addon.local_backend.current() is None


def test_deforming_mesh_mode_imports_one_object_with_shape_keys(addon, square_clip, local_backend_prefs):
    clip = marked_clip(square_clip, frame_start=1)
    clip.com4d.steps = 2
    clip.com4d.topology = "tracked"
    state = bpy.data.window_managers[0].com4d_job
    assert bpy.ops.com4d.reconstruct(clip_name=clip.name) == {"FINISHED"}
    session = poll_until(addon, lambda: state.state not in ("CONNECTING", "RUNNING"))
    poll_until(addon, lambda: session.finished)

    assert state.state == "DONE", state.error
    dynamic = bpy.data.collections[state.reconstruction].children["Dynamic"]
    square = dynamic.objects["square"]
    keys = [k.name for k in square.data.shape_keys.key_blocks]
    assert keys == ["Basis"] + [f"frame_{frame:06d}" for frame in range(6)]
    fallback = set(square["com4d_fallback_frames"])
    kept = (
        {o["com4d_frame"] for o in dynamic.children["square"].objects}
        if "square" in dynamic.children
        else set()
    )
    assert kept == fallback  # per-frame meshes stay only where tracking fell back
    for frame in range(6):  # on every frame exactly one square shows: the deforming one or its fallback
        bpy.context.scene.frame_set(1 + frame)
        showing = [
            o.name for o in bpy.data.objects if o.get("com4d_name") == "square" and not o.hide_viewport
        ]
        assert showing == ([f"square_f{frame:06d}"] if frame in fallback else ["square"])


def test_a_job_can_upload_the_clip_bytes_as_for_a_remote_backend(
    addon, scene, square_clip, local_backend_prefs
):
    clip = marked_clip(square_clip, frame_start=1)
    clip.com4d.steps = 2
    frames = addon.clip_input.clip_frames(clip)
    request = addon.job.JobRequest(
        video=addon.clip_input.clip_video_path(clip),
        prompts=addon.clip_input.clip_prompts(clip),
        params=addon.params.reconstruction_params(frames, 512, 2, 5),
        label="upload",
        upload=True,  # what a non-loopback address does: send the file's bytes, not its path
    )
    prefs = local_backend_prefs
    job = addon.job.BackendJob(
        prefs.address,
        request,
        timeouts=prefs.timeouts(),
        context=addon.zmq_context.context(),
        ensure_backend=addon.backend_setup.local_starter(prefs),
    )
    session = addon.job_session.start(
        addon.job_session.JobSession(job, scene.name, "COM4D upload", known_frames=frames)
    )
    state = bpy.data.window_managers[0].com4d_job
    poll_until(addon, lambda: session.finished)

    assert state.state == "DONE", state.error
    store = Path(prefs.store) / "jobs" / job.job_id
    uploaded = [p for p in (store / "inputs").rglob("*") if p.is_file() and p.suffix == ".mp4"]
    assert len(uploaded) == 1 and uploaded[0].read_bytes() == Path(request.video).read_bytes()
    assert len([o for o in bpy.data.objects if o.get("com4d_name") == "square"]) == 6
