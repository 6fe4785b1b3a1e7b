"""The wire format on its own: framing, zero-copy arrays, schemas, limits, and a fuzzed decoder."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend import protocol
from backend.protocol import Limits, Message, ProtocolError, decode, encode, validate


def packed(header: dict, *blobs: bytes) -> list[bytes]:
    return [msgpack.packb(header, use_bin_type=True), *blobs]


def as_bytes(frames: list) -> list[bytes]:
    return [bytes(f) for f in frames]


@pytest.mark.parametrize("dtype", ["float32", "int32", "uint8", "int64"])
def test_arrays_of_every_wire_dtype_round_trip_bit_exactly(dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((7, 5, 3)) * 100).astype(dtype)
    message = protocol.make("mesh", 3, arrays={"a": array, "empty": np.zeros((0, 3), dtype)}, job="j")
    decoded = decode(as_bytes(encode(message)))
    assert decoded.type == "mesh" and decoded.id == 3 and decoded.fields == {"job": "j"}
    assert decoded.arrays["a"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded.arrays["a"], array)
    assert decoded.arrays["empty"].shape == (0, 3)


def test_arrays_travel_as_separate_blobs_not_inside_msgpack():
    vertices = np.arange(3000, dtype=np.float32).reshape(1000, 3)
    frames = encode(protocol.make("x", arrays={"vertices": vertices}))
    assert len(frames[0]) < 200  # the header only describes the array
    assert bytes(frames[1]) == vertices.tobytes()


def test_decoded_arrays_view_the_received_buffer_without_a_copy():
    blob = bytearray(np.arange(6, dtype="<f4").tobytes())
    header = {"v": 1, "type": "x", "id": None, "arrays": [{"name": "a", "dtype": "float32", "shape": [2, 3]}]}
    decoded = decode([msgpack.packb(header), blob])
    blob[0:4] = np.float32(42).tobytes()
    assert decoded.arrays["a"][0, 0] == 42.0


def test_non_contiguous_and_big_endian_arrays_are_sent_as_little_endian_c_order():
    base = np.arange(24, dtype=">f4").reshape(4, 6)
    view = base[:, ::2]
    decoded = decode(as_bytes(encode(protocol.make("x", arrays={"a": view}))))
    np.testing.assert_array_equal(decoded.arrays["a"], view.astype("<f4"))


def test_float64_arrays_are_refused_by_the_encoder_with_the_allowed_list():
    with pytest.raises(ValueError, match="float64.*float32"):
        encode(protocol.make("x", arrays={"a": np.zeros(3)}))


def test_files_keep_names_and_bytes():
    decoded = decode(as_bytes(encode(protocol.make("submit", 1, files={"video": b"\x00\x01abc"}))))
    assert bytes(decoded.files["video"]) == b"\x00\x01abc"


def test_reserved_header_keys_cannot_be_used_as_fields():
    with pytest.raises(ValueError, match="reserved"):
        encode(Message("x", 1, {"arrays": []}))


def test_numpy_scalars_in_fields_are_sent_as_plain_numbers():
    decoded = decode(as_bytes(encode(protocol.make("x", frame=np.int64(4), scale=np.float32(0.5)))))
    assert decoded.fields == {"frame": 4, "scale": 0.5}
    assert type(decoded.fields["frame"]) is int


def nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


BAD_FRAMES = [
    ("no frames", [], "bad_message"),
    ("empty header", [b""], "bad_message"),
    ("not msgpack", [b"\xc1garbage"], "bad_message"),
    ("trailing bytes", [msgpack.packb({"v": 1, "type": "ping"}) + b"\x00"], "bad_message"),
    ("header is a list", [msgpack.packb([1, 2])], "bad_message"),
    ("no version", [msgpack.packb({"type": "ping"})], "bad_message"),
    ("version 2", [msgpack.packb({"v": 2, "type": "ping"})], "unsupported_version"),
    ("bool version", [msgpack.packb({"v": True, "type": "ping"})], "bad_message"),
    ("no type", [msgpack.packb({"v": 1})], "bad_message"),
    ("long type", [msgpack.packb({"v": 1, "type": "x" * 65})], "bad_message"),
    ("float id", [msgpack.packb({"v": 1, "type": "ping", "id": 1.5})], "bad_message"),
    ("int key", [msgpack.packb({"v": 1, "type": "ping", 3: 4})], "bad_message"),
    ("ext type", [msgpack.packb({"v": 1, "type": "ping", "x": msgpack.ExtType(3, b"a")})], "bad_message"),
    ("timestamp", [msgpack.packb({"v": 1, "type": "ping", "x": msgpack.Timestamp(1, 0)})], "bad_message"),
    ("deep nesting", [msgpack.packb({"v": 1, "type": "ping", "x": nested(40)})], "bad_message"),
    ("missing blob", packed({"v": 1, "type": "x", "files": [{"name": "f", "size": 1}]}), "bad_message"),
    ("extra blob", packed({"v": 1, "type": "x"}, b"abc"), "bad_message"),
    ("short blob", packed({"v": 1, "type": "x", "files": [{"name": "f", "size": 4}]}, b"abc"), "bad_message"),
    (
        "array size mismatch",
        packed({"v": 1, "type": "x", "arrays": [{"name": "a", "dtype": "float32", "shape": [2]}]}, b"1234"),
        "bad_message",
    ),
    (
        "unknown dtype",
        packed({"v": 1, "type": "x", "arrays": [{"name": "a", "dtype": "object", "shape": [1]}]}, b"1234"),
        "bad_message",
    ),
    (
        "negative shape",
        packed({"v": 1, "type": "x", "arrays": [{"name": "a", "dtype": "uint8", "shape": [-1]}]}, b""),
        "bad_message",
    ),
    (
        "repeated names",
        packed({"v": 1, "type": "x", "files": [{"name": "f", "size": 0}, {"name": "f", "size": 0}]}, b"", b""),
        "bad_message",
    ),
    ("arrays not a list", packed({"v": 1, "type": "x", "arrays": {"a": 1}}), "bad_message"),
]


@pytest.mark.parametrize("frames, code", [(f, c) for _, f, c in BAD_FRAMES], ids=[n for n, _, _ in BAD_FRAMES])
def test_malformed_messages_raise_protocol_errors_with_a_code(frames, code):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code == code
    assert str(info.value)  # a sentence for the user


def test_the_request_id_is_recovered_from_a_message_that_fails_later():
    frames = packed({"v": 1, "type": "submit", "id": 77, "files": [{"name": "f", "size": 9}]}, b"abc")
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert (info.value.request_id, info.value.request_type) == (77, "submit")


def test_declared_sizes_over_the_limits_are_refused_before_any_blob_is_read():
    limits = Limits(max_array_bytes=1000, max_file_bytes=100, max_message_bytes=150, max_header_bytes=64)
    huge_shape = {"v": 1, "type": "x", "arrays": [{"name": "a", "dtype": "float32", "shape": [2**40, 2**20]}]}
    with pytest.raises(ProtocolError, match="array 'a'") as info:
        decode(packed(huge_shape), Limits(max_array_bytes=1000))
    assert info.value.code == "too_large"
    with pytest.raises(ProtocolError) as info:
        decode(packed({"v": 1, "type": "x", "files": [{"name": "f", "size": 101}]}), limits)
    assert info.value.code == "too_large"
    two_files = {"v": 1, "type": "x", "files": [{"name": "f", "size": 80}, {"name": "g", "size": 80}]}
    with pytest.raises(ProtocolError) as info:
        decode(packed(two_files), Limits(max_file_bytes=100, max_message_bytes=150))
    assert info.value.code == "too_large"
    with pytest.raises(ProtocolError) as info:
        decode(packed({"v": 1, "type": "x", "pad": "z" * 100}), limits)
    assert info.value.code == "too_large"
    with pytest.raises(ProtocolError) as info:
        decode([msgpack.packb({"v": 1, "type": "x"})] + [b""] * 5, Limits(max_blobs=4))
    assert info.value.code == "too_large"


@pytest.mark.parametrize(
    "message, code, needle",
    [
        (Message("launch_missiles", 1), "unknown_type", "launch_missiles"),
        (Message("cancel", 1), "bad_field", "'job'"),
        (Message("cancel", 1, {"job": 5}), "bad_field", "must be a str"),
        (Message("list_jobs", 1, {"limit": True}), "bad_field", "must be a int"),
        (Message("fetch", 1, {"job": "a", "follow": "yes"}), "bad_field", "'follow'"),
        (Message("submit", 1, {"params": [1, 2]}), "bad_field", "'params'"),
    ],
)
def test_request_schemas_name_the_bad_field(message, code, needle):
    with pytest.raises(ProtocolError, match=needle) as info:
        validate(message, "request")
    assert info.value.code == code and info.value.request_id == 1


def test_unknown_fields_are_ignored_for_forward_compatibility():
    validate(Message("cancel", 1, {"job": "a", "from_the_future": [1, 2]}), "request")


def test_reply_schemas_check_mesh_array_dtypes_and_shapes():
    good = protocol.make(
        "mesh",
        1,
        arrays={"vertices": np.zeros((4, 3), np.float32), "faces": np.zeros((2, 3), np.int32)},
        job="j",
        name="dog",
        role="dynamic",
        object_index=0,
        frame=2,
        frame_index=1,
    )
    validate(good, "reply")
    bad = protocol.make(
        "mesh",
        1,
        arrays={"vertices": np.zeros((4, 2), np.float32), "faces": np.zeros((2, 3), np.int32)},
        job="j",
        name="dog",
        role="dynamic",
        object_index=0,
        frame=2,
        frame_index=None,
    )
    with pytest.raises(ProtocolError, match="vertices"):
        validate(bad, "reply")


def test_every_message_type_has_a_schema_on_its_side():
    assert set(protocol.REQUESTS) == {
        "hello",
        "ping",
        "submit",
        "cancel",
        "status",
        "list_jobs",
        "fetch",
        "list_files",
        "get_file",
    }
    assert set(protocol.REPLIES) == {
        "hello",
        "pong",
        "accepted",
        "progress",
        "mesh",
        "tracked_mesh",
        "warning",
        "done",
        "error",
        "job_status",
        "jobs",
        "replay_end",
        "file_list",
        "file",
    }


@pytest.mark.parametrize(
    "address, loopback",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.1:*", True),
        ("tcp://[::1]:5555", True),
        ("tcp://localhost:5555", True),
        ("ipc:///tmp/com4d.sock", True),
        ("inproc://x", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://192.168.1.10:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://127.0.0.1:1;10.0.0.2:5555", False),
    ],
)
def test_loopback_addresses_are_told_apart_from_public_ones(address, loopback):
    assert protocol.is_loopback_address(address) is loopback


@pytest.mark.parametrize(
    "name, ok",
    [
        ("video", True),
        ("video/000001.png", True),
        ("masks/000000_object_000.png", True),
        ("objects.json", True),
        ("../x", False),
        ("/etc/passwd", False),
        ("masks/../../x", False),
        (".hidden", False),
        ("a/.b", False),
        ("a/b/c", False),
        ("", False),
        ("a//b", False),
        ("a\\b", False),
        ("x" * 129, False),
        ("a/", False),
    ],
)
def test_only_plain_relative_file_names_are_safe(name, ok):
    assert protocol.safe_file_name(name) is ok


# -- property-based fuzzing ---------------------------------------------------------------------------

plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_arbitrary_bytes_decode_or_raise_protocol_error_only(frames):
    try:
        message = decode(frames, Limits(max_header_bytes=4096))
    except ProtocolError as exc:
        assert exc.code in protocol.ERROR_CODES
        return
    assert isinstance(message.type, str)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=10), plain_values, max_size=8), st.lists(st.binary(max_size=16), max_size=3))
def test_arbitrary_msgpack_headers_decode_or_raise_protocol_error_only(header, blobs):
    for candidate in (header, {"v": 1, "type": "submit", **header}, {**header, "v": 1, "type": "cancel"}):
        frames = [msgpack.packb(candidate, use_bin_type=True), *blobs]
        for direction in (None, "request", "reply"):
            try:
                decode(frames, direction=direction)
            except ProtocolError as exc:
                assert exc.code in protocol.ERROR_CODES


wire_arrays = st.sampled_from(sorted(protocol.WIRE_DTYPES)).flatmap(
    lambda dtype: st.lists(st.integers(0, 4), min_size=0, max_size=3).flatmap(
        lambda shape: st.binary(
            min_size=int(np.prod(shape)) * np.dtype(protocol.WIRE_DTYPES[dtype]).itemsize,
            max_size=int(np.prod(shape)) * np.dtype(protocol.WIRE_DTYPES[dtype]).itemsize,
        ).map(lambda raw: np.frombuffer(raw, dtype=protocol.WIRE_DTYPES[dtype]).reshape(shape))
    )
)


@settings(max_examples=200, deadline=None)
@given(
    type_=st.text(min_size=1, max_size=64),
    id_=st.none() | st.integers(-(2**62), 2**62) | st.text(max_size=128),
    fields=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in protocol.RESERVED_KEYS), plain_values, max_size=5
    ),
    arrays=st.dictionaries(st.text(min_size=1, max_size=10), wire_arrays, max_size=3),
    files=st.dictionaries(st.text(min_size=1, max_size=10), st.binary(max_size=50), max_size=3),
)
def test_any_encodable_message_decodes_to_the_same_message(type_, id_, fields, arrays, files):
    decoded = decode(as_bytes(encode(Message(type_, id_, fields, arrays, files))))
    assert (decoded.type, decoded.id, decoded.fields) == (type_, id_, fields)
    assert set(decoded.arrays) == set(arrays)
    for name, array in arrays.items():
        assert decoded.arrays[name].dtype == array.dtype and decoded.arrays[name].shape == array.shape
        assert decoded.arrays[name].tobytes() == array.tobytes()
    assert {k: bytes(v) for k, v in decoded.files.items()} == files


def test_an_oversized_header_still_names_its_request_in_the_error():
    header = msgpack.packb({"v": 1, "label": "x" * 5000, "type": "submit", "id": "r-1"})
    with pytest.raises(ProtocolError) as info:
        decode([header], Limits(max_header_bytes=1000))
    assert (info.value.code, info.value.request_id, info.value.request_type) == ("too_large", "r-1", "submit")
