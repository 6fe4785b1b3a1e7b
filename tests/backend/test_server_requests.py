"""A real server on loopback answering small requests, bad requests and requests over its limits."""

from __future__ import annotations

import json

import msgpack
import pytest
from backend_helpers import FAST_PARAMS, raw_request, start_server

from backend import protocol
from backend.client import BackendError, Client


def test_hello_reports_protocol_model_device_memory_and_queue(client, tiny_pipeline):
    info = client.hello()
    assert info["protocol"] == protocol.PROTOCOL_VERSION
    assert info["server"].startswith("com4d-backend ")
    assert info["model"]["model"] == "COM4D" and info["model"]["layers"] == tiny_pipeline.transformer.cfg.num_layers
    assert info["device"] == "cpu" and info["gpu_free_bytes"] is None and info["gpu_total_bytes"] is None
    assert info["queue"] == {"running": None, "queued": [], "length": 0}
    assert info["paths_allowed"] is True
    # The object limit is the lower of the server's (32) and the model's part table (8 in the tiny model).
    part_rows = tiny_pipeline.transformer.cfg.part_rows
    assert info["limits"]["max_frames"] == 1024 and info["limits"]["max_objects"] == min(32, part_rows)
    assert info["model"]["max_objects"] == part_rows


def test_ping_says_the_server_is_idle(client):
    assert client.ping() == {"busy": False, "job": None, "queued": 0, "gpu_free_bytes": None}


def test_list_jobs_of_an_empty_store_is_empty(client):
    assert client.list_jobs() == []


def test_unknown_job_gets_an_unknown_job_error(client):
    for call in (client.status, client.cancel):
        with pytest.raises(BackendError) as info:
            call("20260101-000000-abcdef")
        assert info.value.code == "unknown_job"


def test_an_unknown_type_is_answered_with_its_id_echoed(server):
    reply = raw_request(server.address, protocol.encode(protocol.make("launch", "req-9")))
    assert (reply.type, reply["code"], reply.id) == ("error", "unknown_type", "req-9")
    assert "launch" in reply["message"]


@pytest.mark.parametrize(
    "frames",
    [
        [b"garbage"],
        [b"\xc1"],
        [b""],
        [msgpack.packb([1, 2, 3])],
        [msgpack.packb({"v": 1, "type": "ping"}), b"blob"],
        [b"\x00" * 1000, b"x", b"y"],
    ],
)
def test_garbage_bytes_get_a_bad_message_error(server, frames):
    reply = raw_request(server.address, frames)
    assert reply.type == "error" and reply["code"] == "bad_message"


@pytest.mark.parametrize(
    "header, needle",
    [
        ({"type": "cancel", "job": 12}, "'job'"),
        ({"type": "status"}, "'job'"),
        ({"type": "list_jobs", "limit": "ten"}, "'limit'"),
        ({"type": "submit", "masks": "not a map"}, "'masks'"),
        ({"type": "submit", "params": 3}, "'params'"),
        ({"type": "fetch", "job": "x", "follow": 1}, "'follow'"),
    ],
)
def test_wrong_field_types_get_a_bad_field_error_naming_the_field(server, header, needle):
    reply = raw_request(server.address, [msgpack.packb({"v": 1, "id": 5, **header})])
    assert (reply.type, reply["code"], reply.id, reply["request"]) == ("error", "bad_field", 5, header["type"])
    assert needle in reply["message"]


def test_an_error_reply_never_echoes_a_job_field_of_the_wrong_type(server):
    reply = raw_request(server.address, [msgpack.packb({"v": 1, "type": "submit", "id": 3, "job": 12})])
    assert (reply.type, reply["code"], reply["job"]) == ("error", "bad_field", None)  # and it is a valid reply


def test_an_old_or_new_protocol_version_is_refused_by_name(server):
    reply = raw_request(server.address, [msgpack.packb({"v": 2, "type": "hello", "id": 1})])
    assert (reply["code"], reply.id) == ("unsupported_version", 1)


# -- submit checks: everything is refused before a job exists ----------------------------------------


def submit_error(client: Client, **kwargs) -> BackendError:
    with pytest.raises(BackendError) as info:
        client.submit(**kwargs)
    assert client.list_jobs() == []  # nothing was kept
    return info.value


PROMPTS = {
    "version": 1,
    "objects": [{"name": "dog", "role": "dynamic", "prompts": [{"frame": 0, "points": [[10, 10, 1]]}]}],
}


def test_submit_needs_exactly_one_input_form(client, tiny_masks):
    assert submit_error(client).code == "bad_field"
    assert submit_error(client, video=tiny_masks / "frames", prompts=PROMPTS, masks=tiny_masks).code == "bad_field"
    assert submit_error(client, video=tiny_masks / "frames").code == "bad_field"  # no prompts
    assert submit_error(client, masks=tiny_masks, prompts=PROMPTS).code == "bad_field"


def test_submit_paths_must_be_absolute_readable_videos_or_folders(client, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for fields, code in [
        ({"video": {"path": "relative/clip.mp4"}, "prompts": PROMPTS}, "bad_field"),
        ({"video": {"path": str(tmp_path / "missing.mp4")}, "prompts": PROMPTS}, "bad_input"),
        ({"video": {"path": str(notes)}, "prompts": PROMPTS}, "bad_input"),
        ({"video": {"path": str(tmp_path / "fake.mp4")}, "prompts": PROMPTS}, "bad_input"),
        ({"masks": {"path": str(tmp_path)}}, "bad_input"),
        ({"video": {"path": 3}, "prompts": PROMPTS}, "bad_field"),
    ]:
        (tmp_path / "fake.mp4").write_bytes(b"not a video at all")
        with pytest.raises(BackendError) as info:
            client.request("submit", fields)
        assert info.value.code == code, fields
    assert client.list_jobs() == []


def test_submit_checks_prompts_and_params_with_the_library(client, tiny_masks):
    bad_prompts = {"version": 1, "objects": [{"name": "dog", "role": "flying", "prompts": []}]}
    error = submit_error(client, video=tiny_masks / "frames", prompts=bad_prompts)
    assert error.code == "bad_input" and "prompts" in error.message
    error = submit_error(client, masks=tiny_masks, params={"num_tokenz": 16})
    assert error.code == "bad_parameter" and "num_tokenz" in error.message
    error = submit_error(client, masks=tiny_masks, params={"num_tokens": "many"})
    assert error.code == "bad_parameter"


@pytest.mark.parametrize(
    "name",
    [
        "../escape.png",
        "masks/../../escape.png",
        "/tmp/escape.png",
        ".hidden",
        "frames/a/b.png",
        "weights/x.safetensors",
    ],
)
def test_uploaded_files_with_unsafe_or_unexpected_names_are_refused(client, tmp_path, name):
    files = {"frames/000000.png": b"x", "masks/000000_object_000.png": b"y", name: b"z"}
    with pytest.raises(BackendError) as info:
        client.request("submit", {"masks": {}}, files=files)
    assert info.value.code == "bad_field"
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "store" / "escape.png").exists()
    assert client.list_jobs() == []


def test_too_many_objects_or_frames_are_refused_before_the_job_is_queued(tiny_pipeline, tmp_path, tiny_masks):
    server = start_server(tiny_pipeline, tmp_path / "store", max_objects=1, max_frames=2)
    try:
        with Client(server.address, timeout=10) as client:
            two = {"version": 1, "objects": PROMPTS["objects"] * 2}
            assert submit_error(client, video=tiny_masks / "frames", prompts=two).code == "too_large"
            error = submit_error(client, masks=tiny_masks, params={**FAST_PARAMS, "frame_end": None})
            assert error.code == "too_large" and "5 frames" in error.message and "frame_stride" in error.advice
            # A stride that selects 2 of the 5 frames fits.
            job = client.submit(masks=tiny_masks, params={**FAST_PARAMS, "frame_end": None, "frame_stride": 3})
            assert client.status(job)["state"] in ("queued", "running", "done")
    finally:
        server.stop()


def test_uploads_over_the_size_limits_are_refused(tiny_pipeline, tmp_path):
    server = start_server(tiny_pipeline, tmp_path / "store", max_video_bytes=10_000, max_header_bytes=2_000)
    try:
        with Client(server.address, timeout=10) as client:
            fields = {"video": {"filename": "clip.mp4"}, "prompts": PROMPTS}
            big_header = dict(fields, label="x" * 3_000)
            with pytest.raises(BackendError) as info:
                client.request("submit", big_header, files={"video": b"0" * 10})
            assert info.value.code == "too_large"
            # A frame over the limit is cut off by libzmq itself (MAXMSGSIZE): no reply, the client's
            # connection is dropped; the server keeps serving it once it reconnects and everyone else.
            with pytest.raises(BackendError) as info:
                client.request("submit", fields, files={"video": b"0" * 20_000}, timeout=1.5)
            assert info.value.code == "timeout"
            with Client(server.address, timeout=10) as other:
                assert other.ping()["busy"] is False
            assert client.ping(timeout=10)["busy"] is False
            assert client.list_jobs() == []
    finally:
        server.stop()


def test_a_full_queue_refuses_new_jobs(tiny_pipeline, tmp_path, tiny_masks):
    server = start_server(tiny_pipeline, tmp_path / "store", max_queue=0)
    try:
        with Client(server.address, timeout=10) as client:
            assert submit_error(client, masks=tiny_masks, params=FAST_PARAMS).code == "queue_full"
    finally:
        server.stop()


def test_a_failing_handler_answers_internal_and_the_server_serves_on(tiny_pipeline, tmp_path):
    class BrokenDescribe:
        """A pipeline whose describe() raises, as a bug in it would."""

        def describe(self):
            raise RuntimeError("describe is broken")

        def reconstruct(self, *args, **kwargs):
            raise AssertionError("not used")

    server = start_server(BrokenDescribe(), tmp_path / "store")
    try:
        with Client(server.address, timeout=10) as client:
            with pytest.raises(BackendError) as info:
                client.hello()
            # The type of the failure, not its text: a text can hold server paths (the log has it all).
            assert info.value.code == "internal" and "RuntimeError" in info.value.message
            assert "describe is broken" not in info.value.message
            assert client.ping()["busy"] is False
    finally:
        server.stop()


def test_the_hello_reply_is_plain_data_valid_for_its_schema(client):
    hello = client.request("hello")
    protocol.validate(hello, "reply")
    assert json.loads(json.dumps(hello.fields)) == hello.fields
