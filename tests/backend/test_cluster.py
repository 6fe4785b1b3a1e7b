"""Cluster mode (backend/cluster.py) on a real Ray cluster on this machine: two nodes of one logical GPU
each (the second joins while the server runs), CPU devices, the tiny weights. Jobs go through a real
server and client on loopback; the in-process worker is the reference. One Ray cluster serves the
whole module and is shut down at its end; `serve --ray auto` runs first, on a Ray of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from backend_helpers import FAST_PARAMS, REPO, collect_job, start_server, weights_dir

from backend.client import Client
from backend.cluster import ClusterConfig, ClusterWorker, fan_out_meshes
from backend.cluster_actor import pack_files, unpack_files
from backend.server import Server, ServerConfig
from backend.store import JobStore

ray = pytest.importorskip("ray", reason="cluster mode needs the `cluster` extra (ray)")
from ray.cluster_utils import Cluster  # noqa: E402

# Stage B long enough to act on a running job after its first (static) mesh has been sent.
LONG_STAGE_B = {**FAST_PARAMS, "dynamic_steps": 150}
# Stage A long enough to see two jobs running at once, or to cancel one.
LONG_STAGE_A = {**FAST_PARAMS, "scene_steps": 150, "scene_mix_cutoff": 150}


def out_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mesh_events(events: list) -> dict[tuple, tuple[bytes, bytes]]:
    """(name, role, frame) -> the bytes of the streamed vertices and faces, for every mesh event."""
    return {
        (m["name"], m["role"], m["frame"]): (m.arrays["vertices"].tobytes(), m.arrays["faces"].tobytes())
        for m in events
        if m.type == "mesh"
    }


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_serve_with_ray_auto_runs_a_job_end_to_end(tmp_path, tiny_masks_dir, reference):
    # A fresh machine without a Ray cluster or GPUs: `--ray auto` starts a local Ray and one CPU worker.
    # (First in this module: the runtime of the other tests is not up yet, so this one cannot join it.)
    cmd = [sys.executable, "-m", "backend.cli", "serve", "--weights", str(weights_dir()), "--store",
           str(tmp_path / "store"), "--device", "cpu", "--bind", "tcp://127.0.0.1:*", "--ray", "auto"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the worker has its weights, or empty if it failed
        assert line.startswith("com4d-backend serving on "), (tmp_path / "serve.log").read_text()[-3000:]
        with Client(line.split()[-1], timeout=60) as client:
            hello = client.hello()
            assert hello["device"] == "ray:cpu" and hello["model"]["workers"] == 1
            job = client.submit(masks=tiny_masks_dir, params=FAST_PARAMS)
            events = collect_job(client, job)
        assert events[-1].type == "done", events[-1].fields
        ref_files, ref_meshes = reference
        assert mesh_events(events) == ref_meshes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0  # the server stops its workers and the Ray it started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """A Ray cluster of one node with one logical GPU; `two_nodes` adds a second such node."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 1, "object_store_memory": 100 * 1024**2},
    )
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def cluster_server(ray_cluster, tmp_path_factory) -> Iterator[Server]:
    """A server whose jobs run on the cluster's worker actors (one per GPU, the cluster polled often)."""
    store = JobStore(tmp_path_factory.mktemp("cluster") / "store")
    workers = ClusterWorker(store, ClusterConfig(weights=str(weights_dir()), device="cpu", dtype="float32", poll_s=0.2))
    workers.connect()  # Ray's workers load their weights before the server answers anyone
    server = Server(workers, store, ServerConfig(bind="tcp://127.0.0.1:*"), worker=workers.serving)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two_nodes(ray_cluster, cluster_server) -> Server:
    """The cluster once a second node (one more GPU) has joined it and its worker is loaded."""
    if len(ray_cluster.list_all_nodes()) == 1:
        assert cluster_server.worker.snapshot()["workers"] == 1
        ray_cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 * 1024**2)
    wait_for(lambda: cluster_server.worker.snapshot()["workers"] == 2, 120, "a worker on the new node")
    return cluster_server


@pytest.fixture(scope="module")
def reference(tiny_pipeline, tiny_masks_dir, tmp_path_factory) -> tuple[dict[str, bytes], dict]:
    """The in-process worker's output files and streamed meshes of the FAST_PARAMS job."""
    server = start_server(tiny_pipeline, tmp_path_factory.mktemp("in_process") / "store")
    try:
        with Client(server.address, timeout=30) as client:
            job = client.submit(masks=tiny_masks_dir, params=FAST_PARAMS)
            events = collect_job(client, job)
        assert events[-1].type == "done"
        return out_files(server.store.out_dir(job)), mesh_events(events)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny_masks_dir() -> Path:
    from backend_helpers import masks_dir

    return masks_dir()


@pytest.fixture
def cluster_client(cluster_server) -> Iterator[Client]:
    with Client(cluster_server.address, timeout=30, name="pytest-cluster") as client:
        yield client


@pytest.mark.parametrize("files", ["auto", "stream"])
def test_a_cluster_job_gives_the_in_process_files_and_meshes_byte_for_byte(
    cluster_server, cluster_client, tiny_masks_dir, reference, files
):
    # "auto": the worker is on the server's machine and writes into the store; "stream": as a worker
    # on another machine would, it gets the inputs as bytes and sends every output file back.
    cluster_server.worker.config.files = files
    try:
        job = cluster_client.submit(masks=tiny_masks_dir, params=FAST_PARAMS, same_machine=False)
        events = collect_job(cluster_client, job)
    finally:
        cluster_server.worker.config.files = "auto"
    assert events[-1].type == "done", events[-1].fields
    ref_files, ref_meshes = reference
    files_now = out_files(cluster_server.store.out_dir(job))
    assert sorted(files_now) == sorted(ref_files) and len(ref_files) >= 5
    for name, data in ref_files.items():
        if name == "scene.json":  # the manifest names the job's own input folder
            continue
        assert files_now[name] == data, name
    assert mesh_events(events) == ref_meshes
    assert cluster_client.status(job)["state"] == "done"


def test_a_node_that_joins_takes_the_next_job_and_streams_its_files_back(
    two_nodes, cluster_client, tiny_masks_dir, reference
):
    # The second node joined after the server started: it got a worker, and two jobs now run at once,
    # one on each node. The new node's worker is not on the server's node: its job's inputs and
    # files travel as bytes ("auto").
    head = ray.get_runtime_context().get_node_id()
    assert sorted(m.node == head for m in two_nodes.worker._members) == [False, True]
    jobs = [cluster_client.submit(masks=tiny_masks_dir, params=LONG_STAGE_A) for _ in range(2)]
    wait_for(lambda: set(two_nodes.worker.snapshot()["running_jobs"]) == set(jobs), 60, "both jobs running at once")
    assert two_nodes.worker.snapshot()["queued"] == []
    for job in jobs:
        events = collect_job(cluster_client, job)
        assert events[-1].type == "done", events[-1].fields
        assert [m["job"] for m in events] == [job] * len(events)  # no event of the other job
    a, b = (out_files(two_nodes.store.out_dir(job)) for job in jobs)
    assert a.pop("scene.json") and b.pop("scene.json")
    assert a == b and sorted(a) == sorted(name for name in reference[0] if name != "scene.json")


def test_cancel_reaches_the_running_step_on_the_worker(cluster_server, cluster_client, tiny_masks_dir):
    job = cluster_client.submit(masks=tiny_masks_dir, params=LONG_STAGE_A)
    events = cluster_client.job_events(job, timeout=60)
    for message in events:
        if message.type == "progress" and message["stage"] == "stage_a":
            break
    started = time.monotonic()
    assert cluster_client.cancel(job)["state"] == "running"
    rest = list(events)
    assert rest[-1].type == "error" and rest[-1]["code"] == "cancelled"
    assert time.monotonic() - started < 10
    stage_a = [m["step"] for m in rest if m.type == "progress" and m["stage"] == "stage_a"]
    assert not stage_a or stage_a[-1] < LONG_STAGE_A["scene_steps"]
    assert cluster_client.status(job)["state"] == "cancelled"
    wait_for(lambda: cluster_server.worker.snapshot()["length"] == 0, 30, "the worker to be free again")


def _kill_after_first_mesh(server: Server, client: Client, job: str) -> tuple[list, bytes, str]:
    """Read the job's events until its first mesh, then kill the worker actor running it (Ray restarts
    it). Returns the events so far, the mesh file's bytes at that moment and its path."""
    events = []
    stream = client.job_events(job, timeout=60)
    for message in stream:
        events.append(message)
        if message.type == "mesh":
            break
    path = events[-1]["path"]
    data = (server.store.out_dir(job) / path).read_bytes()
    member = server.worker._member_of(job)
    ray.kill(member.actor, no_restart=False)
    events.extend(stream)
    return events, data, path


def test_a_job_whose_worker_is_killed_runs_again_and_keeps_what_was_finished(
    two_nodes, cluster_client, tiny_masks_dir, reference
):
    cluster_server = two_nodes
    job = cluster_client.submit(masks=tiny_masks_dir, params=LONG_STAGE_B)
    events, static_glb, path = _kill_after_first_mesh(cluster_server, cluster_client, job)
    assert events[-1].type == "done", events[-1].fields
    lost = [m for m in events if m.type == "warning" and m["code"] == "worker_lost"]
    assert len(lost) == 1 and "attempt 2 of 2" in lost[0]["message"]
    keys = [(m["name"], m["role"], m["frame"]) for m in events if m.type == "mesh"]
    assert len(keys) == len(set(keys)) == len(reference[1])  # the retry did not send the first mesh again
    assert (cluster_server.store.out_dir(job) / path).read_bytes() == static_glb
    assert cluster_client.status(job)["state"] == "done"


def test_without_retries_a_killed_workers_job_is_interrupted_and_keeps_its_meshes(
    two_nodes, cluster_client, tiny_masks_dir
):
    cluster_server = two_nodes
    cluster_server.worker.config.job_retries = 0
    try:
        job = cluster_client.submit(masks=tiny_masks_dir, params=LONG_STAGE_B)
        events, static_glb, path = _kill_after_first_mesh(cluster_server, cluster_client, job)
    finally:
        cluster_server.worker.config.job_retries = 1
    assert events[-1].type == "error" and events[-1]["code"] == "interrupted"
    assert "finished meshes are kept" in events[-1]["message"]
    assert (cluster_server.store.out_dir(job) / path).read_bytes() == static_glb
    cluster_client.fetch(job)  # a client that comes back later still gets the finished mesh
    replay = collect_job(cluster_client, job)
    assert [m["path"] for m in replay if m.type == "mesh"] == [path] and replay[-1]["code"] == "interrupted"
    assert cluster_client.status(job)["state"] == "failed"
    # Ray restarted both killed actors (max_restarts): both workers take jobs again.
    wait_for(lambda: cluster_server.worker.snapshot()["workers"] == 2, 90, "the killed workers to be back")


def test_meshing_fanned_out_over_two_workers_gives_the_jobs_own_meshes(
    two_nodes, tiny_pipeline, tiny_masks_dir, reference, tmp_path
):
    from com4d.pipeline import ReconstructionParams, ReconstructionRequest

    params = ReconstructionParams.from_dict(FAST_PARAMS)
    request = ReconstructionRequest(frames_dir=tiny_masks_dir)
    inputs, preselected = tiny_pipeline.prepare_inputs(request, params, tmp_path, lambda event: None, None)
    latents = []  # every final latent the job meshes: stage A's, then each frame's dynamic ones
    tiny_pipeline.sample(
        inputs,
        params,
        plan=tiny_pipeline.plan(inputs, params, preselected),
        on_stage_a=lambda static, dynamic: latents.extend(x.clone() for x in [*static, *dynamic]),
        on_frame=lambda f, frame_latents: latents.extend(x.clone() for x in frame_latents),
    )
    actors = two_nodes.worker.idle_actors()
    assert len(actors) == 2
    meshes = fan_out_meshes(actors, latents, params.mesh_dense_depth, params.mesh_final_depth)
    _, ref_meshes = reference
    fanned = {(v.tobytes(), f.tobytes()) for v, f in meshes}
    assert set(ref_meshes.values()) <= fanned
    assert len(meshes) == len(ref_meshes) + 1  # and the moving object's stage-A mesh (a file, not streamed)


def test_a_job_fans_its_meshes_out_to_the_idle_worker_and_gives_the_in_process_files(
    two_nodes, cluster_client, tiny_masks_dir, reference
):
    # One job, two workers: the idle one is lent to the job and makes some of its meshes from their
    # final latents (its `mesh` counter goes up); the files and streamed meshes are still the
    # in-process ones, byte for byte.
    assert two_nodes.worker.config.fan_out
    wait_for(lambda: two_nodes.worker.snapshot()["workers"] == 2, 90, "both workers")
    members = list(two_nodes.worker._members)
    before = ray.get([m.actor.meshes_made.remote() for m in members])
    job = cluster_client.submit(masks=tiny_masks_dir, params=FAST_PARAMS)
    events = collect_job(cluster_client, job)
    assert events[-1].type == "done", events[-1].fields
    after = ray.get([m.actor.meshes_made.remote() for m in members])
    assert sum(after) > sum(before)
    ref_files, ref_meshes = reference
    files_now = out_files(two_nodes.store.out_dir(job))
    assert sorted(files_now) == sorted(ref_files)
    for name, data in ref_files.items():
        if name != "scene.json":  # the manifest names the job's own input folder
            assert files_now[name] == data, name
    assert mesh_events(events) == ref_meshes


def test_bad_cluster_settings_are_refused_with_what_is_wrong(tmp_path):
    store = JobStore(tmp_path / "store")
    with pytest.raises(ValueError, match="files must be one of"):
        ClusterWorker(store, ClusterConfig(weights="w", files="nfs"))
    with pytest.raises(ValueError, match="workers must be at least 1"):
        ClusterWorker(store, ClusterConfig(weights="w", workers=0))
    with pytest.raises(ValueError, match="cuda or cpu, not 'cuda:1'"):
        ClusterWorker(store, ClusterConfig(weights="w", device="cuda:1"))


def test_shipped_files_cannot_leave_their_folder(tmp_path):
    (tmp_path / "src" / "masks").mkdir(parents=True)
    (tmp_path / "src" / "masks" / "a.png").write_bytes(b"\x89PNG")
    is_file, files = pack_files(tmp_path / "src")
    assert not is_file and files == {"masks/a.png": b"\x89PNG"}
    unpack_files(files, tmp_path / "dst")
    assert (tmp_path / "dst" / "masks" / "a.png").read_bytes() == b"\x89PNG"
    with pytest.raises(ValueError, match="leaves its folder"):
        unpack_files({"../escape.glb": b"x"}, tmp_path / "dst")
    assert not (tmp_path / "escape.glb").exists()
    np.testing.assert_equal(pack_files(tmp_path / "src" / "masks" / "a.png"), (True, {"a.png": b"\x89PNG"}))
