"""Whole jobs through a real server and the real COM4D pipeline (tiny weights, CPU): streaming,
uploads, two clients, cancel, disconnect and reconnect, and replay with `fetch`."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from backend_helpers import FAST_PARAMS, SLOW_PARAMS, collect_job, wait_for

from backend.client import BackendError, Client

STEP_STAGES = ("stage_a", "stage_b")


def meshes_by_key(messages) -> dict[tuple[str, int], object]:
    return {(m["name"], m["frame"]): m for m in messages if m.type == "mesh"}


def test_a_job_streams_progress_and_meshes_then_done_matching_its_output_folder(client, tiny_masks, server):
    job = client.submit(masks=tiny_masks, params=FAST_PARAMS, label="e2e")
    events = collect_job(client, job)
    types = [m.type for m in events]
    assert types[-1] == "done" and types.count("done") == 1 and "error" not in types
    assert all(m["job"] == job for m in events)

    progress = [m for m in events if m.type == "progress"]
    dones = [m["done"] for m in progress]
    assert dones == sorted(dones) and dones[-1] == progress[-1]["total"] > 0
    assert {"load", "stage_a", "stage_b", "meshing"} <= {m["stage"] for m in progress}

    done = events[-1]
    out_dir = Path(done["out_dir"])
    assert out_dir == server.store.out_dir(job)
    manifest = json.loads((out_dir / done["scene"]).read_text())
    assert manifest == done["manifest"] and manifest["status"] == "complete"
    meshes = meshes_by_key(events)
    expected = {(o["name"], manifest["stage_a_frame"]) for o in manifest["objects"] if o["role"] == "static"}
    expected |= {(o["name"], f["frame"]) for o in manifest["objects"] if o["role"] == "dynamic" for f in o["frames"]}
    assert set(meshes) == expected and len(expected) == 1 + 3  # a static object + 3 frames of a dynamic one
    for mesh in meshes.values():
        vertices, faces = mesh.arrays["vertices"], mesh.arrays["faces"]
        assert vertices.dtype == np.float32 and faces.dtype == np.int32 and vertices.shape[1:] == (3,)
        if len(faces):  # the streamed mesh is the mesh written to the GLB file
            glb = trimesh.load(out_dir / mesh["path"], force="mesh", process=False)
            np.testing.assert_allclose(np.unique(glb.vertices, axis=0), np.unique(vertices, axis=0), atol=1e-6)
            assert len(glb.faces) == len(faces)

    status = client.status(job)
    assert (status["state"], status["scene"], status["error"]) == ("done", "scene.json", None)
    assert status["progress"]["done"] == dones[-1]
    assert [j["job"] for j in client.list_jobs()] == [job] and client.list_jobs()[0]["label"] == "e2e"


def test_an_uploaded_masks_folder_gives_the_same_meshes_as_its_path(client, tiny_masks):
    by_path = collect_job(client, client.submit(masks=tiny_masks, params=FAST_PARAMS))
    uploaded = collect_job(client, client.submit(masks=tiny_masks, params=FAST_PARAMS, same_machine=False))
    assert uploaded[-1].type == "done"
    a, b = meshes_by_key(by_path), meshes_by_key(uploaded)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key].arrays["vertices"], b[key].arrays["vertices"])
        np.testing.assert_array_equal(a[key].arrays["faces"], b[key].arrays["faces"])


def test_an_uploaded_frames_folder_with_prompts_reaches_the_pipeline(client, tiny_masks, server):
    """Without a SAM checkpoint the pipeline refuses prompts; that refusal must come back as the job's
    error, after the frames were uploaded into the job's own inputs."""
    prompts = {
        "version": 1,
        "objects": [{"name": "ball", "role": "dynamic", "prompts": [{"frame": 0, "points": [[32, 32, 1]]}]}],
    }
    job = client.submit(video=tiny_masks / "frames", prompts=prompts, params=FAST_PARAMS, same_machine=False)
    last = collect_job(client, job)[-1]
    assert (last.type, last["code"]) == ("error", "bad_parameter") and "SAM" in last["message"]
    inputs = server.store.inputs_dir(job)
    assert sorted(p.name for p in (inputs / "video").iterdir()) == sorted(
        p.name for p in (tiny_masks / "frames").iterdir()
    )
    assert json.loads((inputs / "prompts.json").read_text()) == prompts
    assert client.status(job)["state"] == "failed"


def test_two_clients_at_once_each_get_their_own_jobs_events_only(server, tiny_masks):
    with Client(server.address, timeout=10) as a, Client(server.address, timeout=10) as b:
        results: dict[str, list] = {}
        jobs = {}

        def run(name: str, client: Client) -> None:
            jobs[name] = client.submit(masks=tiny_masks, params=FAST_PARAMS, label=name)
            results[name] = collect_job(client, jobs[name])

        threads = [threading.Thread(target=run, args=(n, c)) for n, c in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert set(results) == {"a", "b"}
        for name, client in (("a", a), ("b", b)):
            assert results[name][-1].type == "done"
            assert {m["job"] for m in results[name]} == {jobs[name]}
            assert client.drain() == []  # nothing of the other client's job arrived here
        assert set(meshes_by_key(results["a"])) == set(meshes_by_key(results["b"]))


def test_the_second_job_waits_in_the_queue_and_status_says_where(server, tiny_masks):
    with Client(server.address, timeout=10) as client:
        slow = client.submit(masks=tiny_masks, params=SLOW_PARAMS)
        wait_for(client, slow, lambda m: m.type == "progress" and m["stage"] == "stage_a")
        fast = client.submit(masks=tiny_masks, params=FAST_PARAMS)
        assert client.status(fast)["position"] == 1 and client.status(fast)["state"] == "queued"
        pong = client.ping()
        assert (pong["busy"], pong["job"], pong["queued"]) == (True, slow, 1)
        assert client.hello()["queue"] == {"running": slow, "queued": [fast], "length": 2}
        client.cancel(slow)
        assert collect_job(client, fast)[-1].type == "done"


def test_cancel_stops_a_running_job_within_one_denoising_step(server, client, tiny_masks):
    job = client.submit(masks=tiny_masks, params=SLOW_PARAMS)
    wait_for(client, job, lambda m: m.type == "progress" and m["stage"] == "stage_a" and m["step"] >= 2)
    reply = client.cancel(job)
    assert reply["state"] in ("running", "cancelled")
    rest = collect_job(client, job, timeout=30)
    assert (rest[-1].type, rest[-1]["code"]) == ("error", "cancelled")

    log = [m for _, m in server.store.read_events(job, markers=True)]
    marker = [i for i, m in enumerate(log) if m.type == "_cancel_requested"]
    assert len(marker) == 1
    steps_after = [m for m in log[marker[0] :] if m.type == "progress" and m["stage"] in STEP_STAGES]
    assert len(steps_after) <= 1  # at most the step that was running when the cancel came
    status = client.status(job)
    assert status["state"] == "cancelled" and status["error"]["code"] == "cancelled"
    manifest = json.loads((server.store.out_dir(job) / "scene.json").read_text())
    assert manifest["status"] == "cancelled"
    # The worker serves on.
    assert collect_job(client, client.submit(masks=tiny_masks, params=FAST_PARAMS))[-1].type == "done"


def test_cancelling_a_queued_job_ends_it_before_it_starts(client, tiny_masks, server):
    running = client.submit(masks=tiny_masks, params=SLOW_PARAMS)
    queued = client.submit(masks=tiny_masks, params=FAST_PARAMS)
    assert client.cancel(queued)["state"] == "cancelled"
    events = collect_job(client, queued, timeout=10)
    assert [m.type for m in events] == ["error"] and events[0]["code"] == "cancelled"
    assert not list(server.store.out_dir(queued).iterdir())  # it never ran
    client.cancel(running)
    assert collect_job(client, running, timeout=30)[-1]["code"] == "cancelled"
    with pytest.raises(BackendError):
        client.cancel("not-a-job")


def test_a_client_that_disconnects_mid_job_gets_everything_after_reconnecting(server, tiny_masks):
    params = {**FAST_PARAMS, "scene_steps": 150, "scene_mix_cutoff": 150}  # a few seconds of stage A
    with Client(server.address, timeout=10) as client:
        job = client.submit(masks=tiny_masks, params=params)
        wait_for(client, job, lambda m: m.type == "progress" and m["stage"] == "stage_a")
        client.close()
        time.sleep(0.3)  # events go out while nobody listens
        client.connect(server.address)  # a new socket, a new identity
        client.fetch(job)
        events = collect_job(client, job)
    assert events[0].type == "job_status" and events[0]["state"] == "running" and events[-1].type == "done"
    assert [m.type for m in events].count("done") == 1
    meshes = [m for m in events if m.type == "mesh"]
    keys = [(m["name"], m["frame"]) for m in meshes]
    assert len(keys) == len(set(keys)) == 4  # every mesh once: no gap, no duplicate
    progress = [m["done"] for m in events if m.type == "progress"]
    assert progress == sorted(progress)

    # A late fetch of the finished job replays the same meshes, the last progress, and done.
    with Client(server.address, timeout=10) as late:
        late.fetch(job)
        replay = collect_job(late, job)
    assert [m.type for m in replay].count("progress") == 1
    assert replay[0]["state"] == "done" and replay[-1].type == "done"
    again = meshes_by_key(replay)
    assert set(again) == set(keys)
    for m in meshes:
        np.testing.assert_array_equal(again[(m["name"], m["frame"])].arrays["vertices"], m.arrays["vertices"])


def test_fetch_without_follow_returns_what_exists_and_stops(server, client, tiny_masks):
    job = client.submit(masks=tiny_masks, params=SLOW_PARAMS)
    wait_for(client, job, lambda m: m.type == "progress" and m["stage"] == "stage_a")
    with Client(server.address, timeout=10) as other:
        other.fetch(job, follow=False)
        got = list(other.messages(idle_timeout=1.0))
        assert got[0].type == "job_status" and got[0]["state"] == "running"
        # The replay ends with a marker, so a client knows it has everything without waiting on silence.
        assert [m.type for m in got[1:]] == ["progress", "replay_end"]
        assert (got[-1]["job"], got[-1]["state"]) == (job, "running")
    client.cancel(job)
    collect_job(client, job, timeout=30)


def test_one_client_shared_by_two_threads_loses_and_reorders_nothing(client, tiny_masks):
    """The add-on reads events on a background thread while its UI thread asks for status."""
    job = client.submit(masks=tiny_masks, params={**FAST_PARAMS, "scene_steps": 60, "scene_mix_cutoff": 60})
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(collect_job(client, job)))
    reader.start()
    statuses = []
    while reader.is_alive() and len(statuses) < 200:
        statuses.append(client.status(job)["state"])  # replies must not be taken by the reader
    reader.join(60)
    assert statuses and set(statuses) <= {"queued", "running", "done"}
    assert events[-1].type == "done" and all(m.type != "job_status" for m in events)
    seqs = [m["done"] for m in events if m.type == "progress"]
    assert seqs == sorted(seqs)
    steps = [m["step"] for m in events if m.type == "progress" and m["stage"] == "stage_a"]
    assert steps == list(range(1, 61))  # every denoising step of stage A, once, in order


def test_tracked_topology_streams_one_tracked_mesh_after_the_objects_frames(client, tiny_masks):
    params = {**FAST_PARAMS, "topology": "tracked", "mesh_dense_depth": 4, "mesh_final_depth": 5}
    job = client.submit(masks=tiny_masks, params=params)
    events = collect_job(client, job)
    assert events[-1].type == "done"
    tracked = [m for m in events if m.type == "tracked_mesh"]
    assert len(tracked) == 1 and tracked[0]["name"] == "object_000"
    t = tracked[0]
    assert t.arrays["vertices"].dtype == np.float32 and t.arrays["faces"].dtype == np.int32
    assert t.arrays["vertices"].shape[0] == len(t["frames"]) == 3 and t.arrays["vertices"].shape[2] == 3
    assert set(t["fallback_frames"]) <= set(t["frames"])
    last_frame_mesh = max(i for i, m in enumerate(events) if m.type == "mesh" and m["name"] == "object_000")
    assert events.index(t) > last_frame_mesh
    client.fetch(job)
    replayed = [m for m in collect_job(client, job) if m.type == "tracked_mesh"]
    np.testing.assert_array_equal(replayed[0].arrays["vertices"], t.arrays["vertices"])


def test_an_uploaded_video_file_is_probed_stored_in_the_job_and_handed_to_the_pipeline(
    client, tiny_masks, server, tmp_path
):
    from backend_helpers import write_mp4

    video = write_mp4(tiny_masks / "frames", tmp_path / "clip.mp4").read_bytes()
    prompts = {
        "version": 1,
        "objects": [{"name": "ball", "role": "dynamic", "prompts": [{"frame": 0, "points": [[32, 32, 1]]}]}],
    }
    job = client.submit(video=video, video_filename="clip.mp4", prompts=prompts, params=FAST_PARAMS)
    last = collect_job(client, job)[-1]
    assert (last["code"], "SAM" in last["message"]) == ("bad_parameter", True)  # no SAM on this server
    assert (server.store.inputs_dir(job) / "video.mp4").read_bytes() == video
    assert server.store.get(job).request["video"] == {"stored": "inputs/video.mp4", "frames": 5}

    with pytest.raises(BackendError) as info:  # bytes that are no video are refused at submit
        client.submit(video=b"\x00" * 5000, video_filename="clip.mp4", prompts=prompts, params=FAST_PARAMS)
    assert info.value.code == "bad_input" and "inputs/video.mp4" in info.value.message
    assert str(server.store.root) not in info.value.message  # the file by its name in the job, no server path
    assert [j["job"] for j in client.list_jobs()] == [job]
    assert sorted(p.name for p in (server.store.root / "jobs").iterdir()) == [job]
