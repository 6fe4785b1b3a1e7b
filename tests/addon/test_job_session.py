"""The main-thread polling function turns a job's messages into scene objects, progress and reports.

Messages go through the real wire encoding (backend/protocol.py encode -> decode) before the add-on
sees them. Timers never fire in background Blender, so the tests call `poll_session` themselves,
exactly as the timer does.
"""

from __future__ import annotations

import socket
import time

import bpy
import numpy as np
import pytest
import zmq


def wire(protocol, type_, arrays=None, **fields):
    """A message as the add-on receives it: encoded to frames and decoded back, checked as a reply."""
    frames = protocol.encode(protocol.make(type_, 1, arrays=arrays, **fields))
    return protocol.decode([bytes(f) for f in frames], direction="reply")


def tetrahedron(shift=0.0):
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32) + shift
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
    return vertices, faces


@pytest.fixture
def session(addon, scene):
    """A session whose worker is not started: the test feeds its queue as the worker would."""
    job = addon.job.BackendJob("tcp://127.0.0.1:9", addon.job.JobRequest("clip.mp4", {}))
    return addon.job_session.JobSession(
        job, scene.name, "COM4D test", clip_frame_start=5, known_frames=[0, 2]
    )


def feed(addon, session, kind, data=None):
    session.job.events.put(addon.job.JobEvent(kind, data))


def poll_all(addon, session):
    while addon.job_session.poll_session(session, budget=1.0) and not session.job.events.empty():
        pass


def test_streamed_messages_become_progress_objects_and_a_done_report(addon, session, library_facts):
    colours = library_facts["colours"]  # the library's object colours, by object index
    protocol = addon.protocol
    state = bpy.data.window_managers[0].com4d_job
    feed(addon, session, "connected", {"server": "com4d-backend 0.1", "device": "cuda:0"})
    feed(addon, session, "accepted", {"job": "j1"})
    feed(
        addon,
        session,
        "message",
        wire(
            protocol,
            "progress",
            job="j1",
            stage="stage_b",
            step=5,
            steps=50,
            window=1,
            windows=3,
            done=30,
            total=120,
            message="denoising",
        ),
    )
    poll_all(addon, session)

    assert state.state == "RUNNING" and state.job_id == "j1"
    assert state.connection == "connected: com4d-backend 0.1 on cuda:0"
    assert (state.stage, state.step, state.steps, state.window, state.windows) == ("stage_b", 5, 50, 1, 3)
    assert state.progress == pytest.approx(0.25)

    vertices, faces = tetrahedron()
    feed(
        addon,
        session,
        "message",
        wire(
            protocol,
            "mesh",
            {"vertices": vertices, "faces": faces},
            job="j1",
            name="table",
            role="static",
            object_index=0,
            frame=0,
            frame_index=None,
        ),
    )
    for frame_index, frame in enumerate([0, 2]):
        v, f = tetrahedron(shift=frame)
        feed(
            addon,
            session,
            "message",
            wire(
                protocol,
                "mesh",
                {"vertices": v, "faces": f},
                job="j1",
                name="dog",
                role="dynamic",
                object_index=0,
                frame=frame,
                frame_index=frame_index,
            ),
        )
    tracked = np.stack([tetrahedron(shift=s)[0] for s in (0.0, 0.5)])
    feed(
        addon,
        session,
        "message",
        wire(
            protocol,
            "tracked_mesh",
            {"vertices": tracked, "faces": faces},
            job="j1",
            name="cat",
            object_index=1,
            frames=[0, 2],
        ),
    )
    feed(
        addon,
        session,
        "message",
        wire(
            protocol, "warning", job="j1", code="object_lost", message="dog was lost on frame 2", frames=[2]
        ),
    )
    feed(addon, session, "message", wire(protocol, "done", job="j1", scene="scene.json"))
    feed(addon, session, "finished")
    poll_all(addon, session)

    assert session.finished
    assert state.state == "DONE" and state.progress == 1.0 and state.meshes == 4
    assert state.warnings == "dog was lost on frame 2"
    names = sorted(o.name for o in bpy.data.objects if o.type == "MESH")
    assert names == ["cat", "dog_f000000", "dog_f000002", "table"]
    assert bpy.data.collections[state.reconstruction].name == "COM4D test"
    cat = bpy.data.objects["cat"]
    assert [k.name for k in cat.data.shape_keys.key_blocks] == ["Basis", "frame_000000", "frame_000002"]
    assert bpy.data.objects["dog_f000002"]["com4d_scene_frame"] == 7  # clip starts at 5: frame 2 -> 7
    # colours as the library writes them into scene.json: statics first (1 here), then dynamics
    assert bpy.data.objects["table"].color[:3] == pytest.approx(colours[0], abs=1e-6)
    assert bpy.data.objects["dog_f000002"].color[:3] == pytest.approx(colours[1 + 0], abs=1e-6)
    assert cat.color[:3] == pytest.approx(colours[1 + 1], abs=1e-6)
    assert ("WARNING", "dog was lost on frame 2") in session.reported
    assert session.reported[-1] == ("INFO", "COM4D: reconstruction done (4 meshes)")


def test_an_error_fails_the_job_with_the_backends_advice(addon, session):
    state = bpy.data.window_managers[0].com4d_job
    feed(addon, session, "accepted", {"job": "j2"})
    feed(
        addon,
        session,
        "message",
        wire(
            addon.protocol,
            "error",
            job="j2",
            code="out_of_memory",
            message="the job needs 30 GiB.",
            advice="Try num_tokens 1024.",
        ),
    )
    feed(addon, session, "finished")
    poll_all(addon, session)

    assert state.state == "FAILED"
    assert state.error == "the job needs 30 GiB. Try num_tokens 1024."
    assert session.reported == [("ERROR", "COM4D: the job needs 30 GiB. Try num_tokens 1024.")]


def test_cancelled_is_an_outcome_not_a_failure(addon, session):
    state = bpy.data.window_managers[0].com4d_job
    feed(addon, session, "accepted", {"job": "j3"})
    feed(
        addon,
        session,
        "message",
        wire(addon.protocol, "error", job="j3", code="cancelled", message="cancelled"),
    )
    feed(addon, session, "finished")
    poll_all(addon, session)

    assert state.state == "CANCELLED" and state.error == ""


def test_a_worker_that_ends_without_an_outcome_is_reported(addon, session):
    state = bpy.data.window_managers[0].com4d_job
    state.state = "RUNNING"
    feed(addon, session, "finished")
    poll_all(addon, session)

    assert state.state == "FAILED" and "ended before the job finished" in state.error


def test_a_bad_mesh_is_a_warning_and_the_rest_still_imports(addon, session):
    vertices, faces = tetrahedron()
    bad_faces = faces + 100  # indices outside the 4 vertices
    feed(
        addon,
        session,
        "message",
        wire(
            addon.protocol,
            "mesh",
            {"vertices": vertices, "faces": bad_faces},
            job="j",
            name="broken",
            role="static",
            object_index=0,
            frame=0,
            frame_index=None,
        ),
    )
    feed(
        addon,
        session,
        "message",
        wire(
            addon.protocol,
            "mesh",
            {"vertices": vertices, "faces": faces},
            job="j",
            name="fine",
            role="static",
            object_index=1,
            frame=0,
            frame_index=None,
        ),
    )
    poll_all(addon, session)

    assert "fine" in bpy.data.objects and "broken" not in bpy.data.objects
    assert any(level == "WARNING" and "outside its 4 vertices" in text for level, text in session.reported)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reconstruct_without_a_backend_fails_soon_and_names_the_address(addon, clip, prefs):
    tracked = clip.tracking.objects.new("dog")
    track = tracked.tracks.new(name="nose", frame=1)
    track.markers.find_frame(1).co = (0.5, 0.5)
    bpy.ops.com4d.object_add(clip_name=clip.name, tracking_object="dog")
    prefs.address = f"tcp://127.0.0.1:{free_port()}"
    prefs.connect_timeout = 0.5
    prefs.use_local_backend = False
    state = bpy.data.window_managers[0].com4d_job

    started = time.monotonic()
    assert bpy.ops.com4d.reconstruct(clip_name=clip.name) == {"FINISHED"}  # returns at once
    assert time.monotonic() - started < 0.5
    assert state.state == "CONNECTING"
    session = addon.job_session.current()
    while addon.job_session.poll_session(session) and time.monotonic() - started < 10:
        time.sleep(0.05)

    assert state.state == "FAILED"
    assert prefs.address in state.error and "is the backend running" in state.error
    assert not session.job.alive


def test_cancel_before_the_backend_answers_ends_as_cancelled(addon, scene):
    port = free_port()
    job = addon.job.BackendJob(
        f"tcp://127.0.0.1:{port}",
        addon.job.JobRequest("clip.mp4", {}),
        timeouts=addon.job.Timeouts(connect=30.0),
        context=addon.zmq_context.context(),
    )
    session = addon.job_session.start(addon.job_session.JobSession(job, scene.name, "COM4D cancelled"))
    state = bpy.data.window_managers[0].com4d_job
    assert state.state == "CONNECTING"

    # a backend comes up while the job waits; the user cancels before it answers
    assert bpy.ops.com4d.cancel() == {"FINISHED"} and state.state == "CANCELLING"
    server = addon.zmq_context.context().socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    server.bind(f"tcp://127.0.0.1:{port}")
    try:
        identity, *frames = server.recv_multipart()  # the worker's hello
        hello = addon.protocol.decode(frames, direction="request")
        reply = addon.protocol.make(
            "hello", hello.id, protocol=1, server="test", model={}, device="cpu", queue={}
        )
        server.send_multipart([identity, *addon.protocol.encode(reply)])
        deadline = time.monotonic() + 10
        while addon.job_session.poll_session(session) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.poll(200) == 0  # nothing was submitted
    finally:
        server.close()

    assert state.state == "CANCELLED" and state.error == ""
