"""The failures of issue 12 that need a running server, each reproduced on loopback with real sockets:
a slow probe does not block other clients, jobs have owners, result files download in chunks, a mesh
far over the request array limit arrives intact, list_jobs honours limit 0, errors name their request,
old jobs are removed and disk pressure is reported. (Store write failures: test_store_failures.py;
the submit checks without sockets: test_submit_checks.py.)"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from backend_helpers import (
    SLOW_PARAMS,
    collect_job,
    many_packet_video,
    png_header_only,
    raw_request,
    start_server,
    wait_for,
)

from backend import protocol
from backend.client import BackendError, Client, read_key_pair, read_public_key
from backend.keys import make_keys
from backend.server import MAX_CHUNK_BYTES


def test_ping_answers_at_once_while_an_upload_is_probed(server, tmp_path):
    video = many_packet_video(tmp_path / "many.mkv").read_bytes()
    prompts = {"objects": [{"name": "a", "role": "dynamic", "prompts": [{"frame": 0, "points": [[8, 8, 1]]}]}]}
    latencies: list[float] = []
    done = threading.Event()

    def ping_all_the_time() -> None:
        with Client(server.address, timeout=10) as other:
            while not done.is_set():
                start = time.monotonic()
                other.ping()
                latencies.append(time.monotonic() - start)
                time.sleep(0.02)

    pinger = threading.Thread(target=ping_all_the_time)
    pinger.start()
    try:
        with Client(server.address, timeout=60) as client:
            start = time.monotonic()
            with pytest.raises(BackendError) as refused:  # 300000 frames: over the frame limit, once probed
                client.submit(video=video, video_filename="many.mkv", prompts=prompts, params={"frame_stride": 1})
            probe_s = time.monotonic() - start
    finally:
        done.set()
        pinger.join(30)
    assert refused.value.code == "too_large" and "frames selected" in refused.value.message
    assert probe_s > 1.0, f"the probe took {probe_s:.2f} s: too fast to show anything"
    assert len(latencies) >= 5 and max(latencies) < 0.5, (probe_s, max(latencies))


def test_with_keys_a_job_is_its_owners_and_an_admins_only(tiny_pipeline, tiny_masks, tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys, client="alice")
    make_keys(keys, client="bob")
    make_keys(tmp_path / "admin-keys", client="root")
    admin_public = read_key_pair(tmp_path / "admin-keys" / "clients" / "root.key_secret")[0].decode()
    from backend.keys import load_server_keys

    server = start_server(
        tiny_pipeline,
        tmp_path / "store",
        server_keys=load_server_keys(keys),
        allow_any_client=True,
        admin_keys=frozenset({admin_public}),
    )
    server_key = read_public_key(keys / "server.key")

    def connect(folder: Path, name: str) -> Client:
        return Client(server.address, server_key, read_key_pair(folder / "clients" / f"{name}.key_secret"), timeout=10)

    try:
        with (
            connect(keys, "alice") as alice,
            connect(keys, "bob") as bob,
            connect(tmp_path / "admin-keys", "root") as root,
        ):
            job = alice.submit(masks=tiny_masks, params=SLOW_PARAMS)
            wait_for(alice, job, lambda m: m.type == "progress")
            assert alice.hello()["owner"] == "key:" + read_key_pair(keys / "clients" / "alice.key_secret")[0].decode()
            assert [j["job"] for j in bob.list_jobs()] == []
            for request in (lambda: bob.status(job), lambda: bob.cancel(job), lambda: bob.list_files(job)):
                with pytest.raises(BackendError) as refused:
                    request()
                assert refused.value.code == "unknown_job"
            with pytest.raises(BackendError) as refused:
                bob.submit(resubmit=job)
            assert refused.value.code == "unknown_job"
            bob.fetch(job)
            assert [(m.type, m["code"]) for m in bob.job_events(job, timeout=5)] == [("error", "unknown_job")]
            assert alice.status(job)["state"] == "running"  # bob's cancel did nothing
            assert [j["job"] for j in root.list_jobs()] == [job] and root.hello()["admin"] is True
            root.cancel(job)
            last = collect_job(alice, job, timeout=30)[-1]
            assert (last.type, last["code"]) == ("error", "cancelled")
    finally:
        server.stop()


def test_list_jobs_limit_zero_lists_nothing_and_a_negative_limit_is_refused(client, server, tiny_masks):
    server.store.new_job("one", owner="local")
    assert client.list_jobs(limit=0) == []
    assert len(client.list_jobs(limit=1)) == 1
    with pytest.raises(BackendError) as refused:
        client.list_jobs(limit=-1)
    assert refused.value.code == "bad_field"


def test_an_unknown_type_error_names_the_request(server):
    header = protocol.encode(protocol.make("frobnicate", 5))
    reply = raw_request(server.address, header)
    assert (reply.type, reply["code"], reply["request"], reply.id) == ("error", "unknown_type", "frobnicate", 5)


def finished_job(server, owner: str = "local") -> str:
    """A job in the store that is `done`, as the worker leaves one (its record, event log and out/)."""
    record = server.store.new_job("made by the test", owner=owner)
    server.store.finish(record.job, protocol.make("done", job=record.job, scene="scene.json"), state="done")
    return record.job


def test_a_mesh_far_over_the_request_array_limit_arrives_intact(server, client):
    job = finished_job(server)
    rng = np.random.default_rng(0)
    vertices = rng.random((1_500_000, 3), dtype=np.float32)  # 18 MB
    faces = rng.integers(0, 1_500_000, (3_000_000, 3), dtype=np.int32)  # 36 MB
    assert vertices.nbytes > server.config.limits.max_array_bytes
    mesh = protocol.make(
        "mesh",
        arrays={"vertices": vertices, "faces": faces},
        job=job,
        name="big",
        role="dynamic",
        object_index=0,
        frame=0,
        frame_index=0,
    )
    with server.store._lock:  # slot the mesh in before the final event, as the worker logs it
        events = server.store.job_dir(job) / "events.jsonl"
        final = events.read_text()
        events.write_text("")
        server.store._seq.pop(job)
        server.store.append_event(job, mesh)
        events.write_text(events.read_text() + final.replace('"seq": 1', '"seq": 2'))
    client.fetch(job, follow=False)
    got = [m for m in client.job_events(job, timeout=30) if m.type == "mesh"]
    assert len(got) == 1
    assert np.array_equal(got[0].arrays["vertices"], vertices) and np.array_equal(got[0].arrays["faces"], faces)


def test_any_result_file_downloads_in_chunks_and_nothing_outside_the_results(server, client):
    job = finished_job(server)
    out = server.store.out_dir(job)
    big = np.random.default_rng(1).bytes(2 * MAX_CHUNK_BYTES + 12345)
    (out / "static").mkdir()
    (out / "static" / "table.glb").write_bytes(big)
    (out / "scene.json").write_text('{"objects": []}')
    listed = client.list_files(job)
    assert listed == [
        {"path": "scene.json", "size": len('{"objects": []}')},
        {"path": "static/table.glb", "size": len(big)},
    ]
    assert client.download(job, "static/table.glb") == big
    assert client.download(job, "scene.json") == b'{"objects": []}'
    first = client.request("get_file", {"job": job, "path": "static/table.glb", "max_bytes": 1000})
    assert (first["offset"], first["size"], first["eof"]) == (0, len(big), False)
    assert bytes(first.files["data"]) == big[:1000]
    for path in ("../job.json", "../inputs", "/etc/passwd", "nope.glb", "static"):
        with pytest.raises(BackendError) as refused:
            client.download(job, path)
        assert refused.value.code == "bad_field" and str(server.store.root) not in refused.value.message


def test_old_finished_jobs_are_removed_and_disk_pressure_is_in_hello(tiny_pipeline, tmp_path):
    server = start_server(tiny_pipeline, tmp_path / "store", keep_days=1.0, max_store_bytes=10 << 20)
    try:
        old, recent, newest = finished_job(server), finished_job(server), finished_job(server)
        server.store.update(old, finished=time.time() - 2 * 86400)  # two days ago
        server.store.update(recent, finished=time.time() - 3600)
        (server.store.out_dir(recent) / "big.bin").write_bytes(b"\1" * (12 << 20))  # over the quota
        server._schedule_housekeeping()
        deadline = time.monotonic() + 10
        with Client(server.address, timeout=10) as client:
            while time.monotonic() < deadline and server.store.get(recent) is not None:
                time.sleep(0.05)
            store = client.hello()["store"]
            assert [j["job"] for j in client.list_jobs()] == [newest]  # age took `old`, the quota `recent`
        assert not server.store.job_dir(old).exists() and not server.store.job_dir(recent).exists()
        assert store["quota_bytes"] == 10 << 20 and store["keep_days"] == 1.0 and store["jobs"] == 1
        assert 0 < store["used_bytes"] < 1 << 20 and store["pressure"] == round(store["used_bytes"] / (10 << 20), 4)
        assert store["disk_free_bytes"] > 0
    finally:
        server.stop()


def test_a_resubmit_links_the_inputs_instead_of_copying_them(server, tiny_masks, client):
    job = client.submit(masks=tiny_masks, params=SLOW_PARAMS, same_machine=False)
    wait_for(client, job, lambda m: m.type == "progress")
    again = client.submit(resubmit=job)
    client.cancel(again)
    client.cancel(job)
    original = server.store.inputs_dir(job) / "masks" / "frames" / "000000.png"
    linked = server.store.inputs_dir(again) / "masks" / "frames" / "000000.png"
    assert linked.stat().st_ino == original.stat().st_ino  # one file on disk, two names
    collect_job(client, job, timeout=30)


def test_the_secret_key_file_is_created_0600_without_a_chmod(tmp_path):
    chmods: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "os.chmod" and str(args[0]).startswith(str(tmp_path)):
            chmods.append(str(args[0]))

    sys.addaudithook(audit)  # hooks stay for the process; this one only looks at tmp_path
    import os

    old_umask = os.umask(0)  # the most permissive umask: only the mode given at creation counts
    try:
        make_keys(tmp_path / "keys")
    finally:
        os.umask(old_umask)
    for secret in ("server.key_secret", "clients/client.key_secret"):
        assert (tmp_path / "keys" / secret).stat().st_mode & 0o777 == 0o600
    assert chmods == []
    public, secret = read_key_pair(tmp_path / "keys" / "clients" / "client.key_secret")
    assert len(public) == 40 and len(secret) == 40 and zmq.curve_public(secret) == public


def test_an_upload_of_huge_frames_is_refused_from_the_headers_and_nothing_is_kept(server, client, tiny_masks):
    files = {f"frames/{i:06d}.png": png_header_only(9000, 9000) for i in range(10)}
    files.update({f"masks/{i:06d}_object_000.png": png_header_only(9000, 9000) for i in range(10)})
    with pytest.raises(BackendError) as refused:
        client.request("submit", {"masks": {}, "params": {"frame_stride": 1}}, files=files)
    assert refused.value.code == "bad_input" and "9000x9000" in refused.value.message
    assert client.list_jobs() == [] and list((server.store.root / "jobs").iterdir()) == []
