"""Property-based fuzzing of a live server: random bytes, random headers and random field values for
every message type. Each gets a well-formed reply (or is dropped when no reply is possible), and the
server still answers correctly and runs a job afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import pytest
import zmq
from backend_helpers import FAST_PARAMS, collect_job, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend import protocol
from backend.client import Client
from backend.server import Server

FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15,
)
# Field names the server looks at, so the fuzzer reaches past the schema checks.
known_fields = sorted(
    {name for schema in protocol.REQUESTS.values() for name in schema}
    | {"path", "filename", "objects", "num_tokens", "frame_end"}
)
request_types = st.sampled_from(sorted(protocol.REQUESTS)) | st.text(max_size=12)
field_values = st.dictionaries(st.sampled_from(known_fields) | st.text(max_size=8), plain, max_size=6)


@pytest.fixture(scope="module")
def fuzzed_server(tiny_pipeline, tmp_path_factory) -> Iterator[Server]:
    server = start_server(
        tiny_pipeline,
        tmp_path_factory.mktemp("fuzz") / "store",
        max_header_bytes=64 * 1024,
        max_video_bytes=1 << 20,
        max_files=16,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dealer(fuzzed_server) -> Iterator[zmq.Socket]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(fuzzed_server.address)
    yield sock
    sock.close()


def exchange(sock: zmq.Socket, frames: list[bytes]) -> protocol.Message:
    sock.send_multipart(frames)
    assert sock.poll(10_000), "the server did not answer"
    return protocol.decode(sock.recv_multipart(), direction="reply")


def check_reply(reply: protocol.Message, request_id) -> None:
    if reply.type == "error":
        assert reply["code"] in protocol.ERROR_CODES and reply["message"]
    if request_id is not None:
        assert reply.id == request_id


@FUZZ_SETTINGS
@given(frames=st.lists(st.binary(max_size=80), min_size=1, max_size=5))
def test_random_bytes_get_an_error_reply(dealer, frames):
    reply = exchange(dealer, frames)
    try:
        protocol.decode(frames)
    except protocol.ProtocolError:
        assert reply.type == "error"
        return
    # Bytes that happen to be a valid message get their normal answer.
    check_reply(reply, None)


@FUZZ_SETTINGS
@given(
    type_=request_types,
    id_=st.integers(0, 2**31) | st.text(max_size=20),
    fields=field_values,
    files=st.dictionaries(st.text(max_size=20), st.binary(max_size=40), max_size=3),
)
def test_random_requests_get_a_reply_of_the_protocol(dealer, type_, id_, fields, files):
    fields = {k: v for k, v in fields.items() if k not in protocol.RESERVED_KEYS}
    frames = [bytes(f) for f in protocol.encode(protocol.Message(type_, id_, fields, files=files))]
    reply = exchange(dealer, frames)
    check_reply(reply, id_)
    try:
        protocol.decode(frames)
    except protocol.ProtocolError as exc:
        assert (reply.type, reply["code"]) == ("error", exc.code)  # framing is judged before the type
        return
    if type_ not in protocol.REQUESTS:
        assert reply["code"] == "unknown_type"


@FUZZ_SETTINGS
@given(
    header=st.dictionaries(
        st.sampled_from(["v", "type", "id", "arrays", "files"]) | st.text(max_size=6), plain, max_size=6
    ),
    blobs=st.lists(st.binary(max_size=20), max_size=3),
)
def test_random_header_maps_get_an_error_or_a_normal_reply(dealer, header, blobs):
    frames = [msgpack.packb(header, use_bin_type=True), *blobs]
    reply = exchange(dealer, frames)
    check_reply(reply, None)


def test_after_fuzzing_the_server_answers_and_runs_a_job(fuzzed_server, dealer, tiny_masks):
    # Runs after the fuzz tests of this module, on the same server.
    with Client(fuzzed_server.address, timeout=10) as client:
        info = client.hello()
        assert info["protocol"] == protocol.PROTOCOL_VERSION and info["queue"]["length"] == 0
        assert client.list_jobs() == []  # no fuzzed submit was accepted
        job = client.submit(masks=tiny_masks, params=FAST_PARAMS)
        assert collect_job(client, job)[-1].type == "done"
