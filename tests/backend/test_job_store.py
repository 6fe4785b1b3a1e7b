"""The job store on disk: records, the event log with its arrays, recovery after a crash, and
confinement of every write to the job's own folder."""

from __future__ import annotations

import time

import numpy as np
import pytest

from backend import protocol
from backend.store import JobStore, StoreError


def mesh_message(job: str, frame: int, n: int = 5) -> protocol.Message:
    vertices = np.arange(n * 3, dtype=np.float32).reshape(n, 3) + frame
    faces = np.arange(6, dtype=np.int32).reshape(2, 3)
    return protocol.make(
        "mesh",
        arrays={"vertices": vertices, "faces": faces},
        job=job,
        name="dog",
        role="dynamic",
        object_index=0,
        frame=frame,
        frame_index=frame,
        path="x.glb",
    )


def test_a_new_job_has_its_folders_and_a_queued_record_that_survives_reopening(tmp_path):
    store = JobStore(tmp_path)
    record = store.new_job("walk")
    for sub in ("inputs", "out", "stream"):
        assert (tmp_path / "jobs" / record.job / sub).is_dir()
    store.update(record.job, state="running", request={"params": {"num_tokens": np.int64(16)}})
    again = JobStore(tmp_path).get(record.job)
    assert (again.state, again.label, again.request) == ("running", "walk", {"params": {"num_tokens": 16}})


def test_events_are_logged_in_order_with_their_arrays_and_read_back_equal(tmp_path):
    store = JobStore(tmp_path)
    job = store.new_job().job
    sent = [
        protocol.make("progress", job=job, stage="stage_a", done=1, total=4),
        mesh_message(job, 0),
        mesh_message(job, 2, n=0),
    ]
    seqs = [store.append_event(job, m) for m in sent]
    assert seqs == [1, 2, 3]
    read = JobStore(tmp_path).read_events(job)
    assert [s for s, _ in read] == [1, 2, 3]
    for (_, got), want in zip(read, sent):
        assert (got.type, got.fields) == (want.type, want.fields)
        assert set(got.arrays) == set(want.arrays)
        for name in want.arrays:
            np.testing.assert_array_equal(got.arrays[name], want.arrays[name])
            assert got.arrays[name].dtype == want.arrays[name].dtype


def test_sequence_numbers_continue_after_a_restart(tmp_path):
    job = JobStore(tmp_path).new_job().job
    JobStore(tmp_path).append_event(job, protocol.make("warning", job=job, code="a", message="b"))
    assert JobStore(tmp_path).append_event(job, protocol.make("warning", job=job, code="c", message="d")) == 2


def test_a_log_line_cut_short_by_a_crash_is_skipped(tmp_path):
    store = JobStore(tmp_path)
    job = store.new_job().job
    store.append_event(job, mesh_message(job, 0))
    with open(tmp_path / "jobs" / job / "events.jsonl", "a") as fh:
        fh.write('{"seq": 2, "type": "mesh", "fie')
    assert [m.type for _, m in JobStore(tmp_path).read_events(job)] == ["mesh"]


def test_recover_marks_unfinished_jobs_interrupted_and_logs_why(tmp_path):
    store = JobStore(tmp_path)
    queued, running, done = (store.new_job().job for _ in range(3))
    store.update(running, state="running")
    store.update(done, state="done", scene="scene.json")
    reopened = JobStore(tmp_path)
    assert sorted(reopened.recover()) == sorted([queued, running])
    for job in (queued, running):
        record = reopened.get(job)
        assert record.state == "interrupted" and record.error["code"] == "interrupted"
        last = reopened.read_events(job)[-1][1]
        assert (last.type, last["code"], last["job"]) == ("error", "interrupted", job)
    assert reopened.get(done).state == "done"
    assert reopened.recover() == []


@pytest.mark.parametrize("relative", ["../other", "inputs/../../x", "/etc/passwd", "", "inputs//x", "./x"])
def test_paths_leaving_the_job_folder_are_refused(tmp_path, relative):
    store = JobStore(tmp_path)
    job = store.new_job().job
    with pytest.raises(StoreError):
        store.job_path(job, relative)


def test_a_symlink_inside_a_job_cannot_lead_writes_outside_it(tmp_path):
    store = JobStore(tmp_path / "store")
    job = store.new_job().job
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "store" / "jobs" / job / "inputs" / "masks").symlink_to(outside)
    with pytest.raises(StoreError, match="outside"):
        store.write_input(job, "masks/000000_object_000.png", b"x")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("job", ["../jobs", "a/b", "", "x" * 65, 5])
def test_job_ids_that_are_not_plain_names_are_unknown(tmp_path, job):
    store = JobStore(tmp_path)
    assert store.get(job) is None
    with pytest.raises(StoreError):
        store.job_dir(job)


def test_a_pickled_array_planted_in_the_stream_is_not_loaded(tmp_path):
    store = JobStore(tmp_path)
    job = store.new_job().job
    store.append_event(job, mesh_message(job, 0))
    # Replace the stored vertices by an object array, whose .npy needs pickle to load.
    np.save(
        tmp_path / "jobs" / job / "stream" / "000001_vertices.npy",
        np.array([{"evil": 1}], dtype=object),
        allow_pickle=True,
    )
    assert store.read_events(job) == []  # the event is dropped, nothing is unpickled


def test_retention_deletes_old_finished_jobs_then_the_oldest_over_quota_never_unfinished_ones(tmp_path):
    store = JobStore(tmp_path / "store")
    jobs = {}
    for name, age_days in (("old", 40), ("older_ok", 3), ("newer_ok", 1)):
        job = store.new_job(name).job
        store.finish(job, protocol.make("done", job=job, scene="scene.json"), state="done")
        store.update(job, finished=time.time() - age_days * 86400)
        (store.out_dir(job) / "mesh.glb").write_bytes(b"\1" * (1 << 20))
        jobs[name] = job
    running = store.new_job("running").job
    store.update(running, state="running")
    (store.inputs_dir(running) / "video.mp4").write_bytes(b"\1" * (3 << 20))

    used = store.enforce_retention(keep_days=30, max_bytes=6 << 20)  # 'old' goes by age; the rest fits
    assert store.get(jobs["old"]) is None and not store.job_dir(jobs["old"]).exists()
    assert store.get(jobs["older_ok"]) is not None and (5 << 20) < used < (6 << 20)

    used = store.enforce_retention(keep_days=30, max_bytes=(4 << 20) + (1 << 19))  # room for one finished job
    assert {r.job for r in store.list()} == {running, jobs["newer_ok"]}  # the oldest finished one went
    used = store.enforce_retention(keep_days=30, max_bytes=1)  # never the running job
    assert [r.job for r in store.list()] == [running] and used >= 3 << 20
