"""The COM4D wire protocol: one definition for the backend and every client.

A message is a ZeroMQ multipart `[header, blob_0, blob_1, ...]`. The header is a msgpack map with
`v` (protocol version), `type` and `id` (the client's request id, echoed in replies). Arrays and
file bytes never go through msgpack: `header["arrays"]` and `header["files"]` describe them and
their raw bytes follow as blobs, arrays first, then files. docs/protocol.md is the full text.

This module is copied verbatim into the Blender extension, so it imports only the standard
library, msgpack and numpy (no torch, no com4d, no pyzmq, no relative imports). Everything that
comes off the wire is checked here before anything is allocated for it: frame counts, header
size, nesting, declared array and file sizes; a bad message becomes a `ProtocolError` with a code
and a sentence, never a crash.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

# dtype names allowed on the wire -> explicit little-endian numpy dtype strings.
WIRE_DTYPES: dict[str, str] = {"float32": "<f4", "int32": "<i4", "uint8": "|u1", "int64": "<i8"}

RESERVED_KEYS = frozenset({"v", "type", "id", "arrays", "files"})

MAX_DEPTH = 32  # nesting of maps/lists in a header
MAX_NAME_LEN = 256  # array and file names
MAX_ID_LEN = 128
MAX_TYPE_LEN = 64
MAX_NDIM = 4

# A file name on the wire: one or two path parts of safe characters, no leading dot, no "..".
SAFE_FILE_NAME = re.compile(r"^(?!\.)[A-Za-z0-9_.-]{1,128}(/(?!\.)[A-Za-z0-9_.-]{1,128})?$")


@dataclass(frozen=True)
class Limits:
    """Upper bounds a receiver enforces before it allocates anything for a message.

    The defaults suit a client receiving meshes; the server passes tighter ones for requests.
    """

    max_header_bytes: int = 4 * 2**20
    max_blobs: int = 8192
    max_array_bytes: int = 2**31  # one array
    max_file_bytes: int = 2**31  # one file (a video)
    max_message_bytes: int = 2**32  # all blobs of one message together


class ProtocolError(Exception):
    """A message that breaks the protocol. `code` goes on the wire; `str(err)` says what was wrong.

    `request_id` and `request_type` are filled in when they could be read, so the error reply can
    still be matched to the request that caused it.
    """

    def __init__(self, code: str, message: str, request_id: Any = None, request_type: str | None = None):
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.request_type = request_type


# ---------------------------------------------------------------------------------------------
# Error codes (the `code` of an `error` message). Library errors (com4d.errors) keep their codes.
ERROR_CODES: dict[str, str] = {
    "bad_message": "the bytes are not a valid message (not msgpack, wrong framing, blob sizes differ)",
    "unsupported_version": "the header's `v` is not a protocol version this server speaks",
    "unknown_type": "the message type is not one the receiver knows",
    "bad_field": "a field is missing or has the wrong type or value",
    "too_large": "a header, array, file, video, object or frame count is over the server's limit",
    "forbidden": "not allowed on this server (e.g. a file path on a non-loopback bind)",
    "unknown_job": "no job with that id in the store",
    "queue_full": "the job queue is full; wait for a job to finish",
    "store_full": "the job store is at its quota even after removing old finished jobs",
    "bad_input": "the video, frames, masks or prompts cannot be used",
    "bad_parameter": "a reconstruction parameter is unknown or out of range",
    "bad_weights": "the server's weights are missing or wrong",
    "segmentation_failed": "segmentation could not follow an object",
    "out_of_memory": "the job needs more (GPU) memory than available; see `advice`",
    "cancelled": "the job was cancelled by a client",
    "storage": "the server's disk refused a write (full or read-only); the job ended, see `advice`",
    "interrupted": "the server stopped while the job was queued or running; resubmit it",
    "internal": "an unexpected server error; the server keeps serving",
}


# ---------------------------------------------------------------------------------------------
# Message schemas


@dataclass(frozen=True)
class FieldSpec:
    """One header field: its kind, whether it must be present and whether null is allowed."""

    kind: str  # "str" | "int" | "number" | "bool" | "map" | "list" | "any"
    required: bool = False
    nullable: bool = False
    doc: str = ""


@dataclass(frozen=True)
class ArraySpec:
    """One array a message carries: its dtype and shape (None = any length on that axis)."""

    dtype: str
    shape: tuple[int | None, ...]
    required: bool = True


def _f(kind: str, required: bool = False, nullable: bool = False, doc: str = "") -> FieldSpec:
    return FieldSpec(kind, required, nullable, doc)


# Client -> server.
REQUESTS: dict[str, dict[str, FieldSpec]] = {
    "hello": {"client": _f("str", doc="the client's name and version, for the server log")},
    "ping": {},
    "submit": {
        "video": _f("map", doc='{"path": abs path} (loopback only) or {"filename": "clip.mp4"} with blob(s)'),
        "masks": _f("map", doc='{"path": abs path of a masks folder} (loopback only) or {} with blobs'),
        "prompts": _f("map", doc="the prompts.json object (with a video)"),
        "params": _f("map", doc="reconstruction parameters, names as in ReconstructionParams"),
        "label": _f("str", doc="a human name for the job"),
        "resubmit": _f("str", doc="id of a stored job whose inputs and params to run again"),
    },
    "cancel": {"job": _f("str", True)},
    "status": {"job": _f("str", True)},
    "list_jobs": {"limit": _f("int", doc="at most this many, newest first")},
    "fetch": {
        "job": _f("str", True),
        "follow": _f("bool", doc="keep streaming a running job's events (default true)"),
    },
    "list_files": {"job": _f("str", True)},
    "get_file": {
        "job": _f("str", True),
        "path": _f("str", True, doc="a path from `files`, relative to the job's output folder"),
        "offset": _f("int", doc="first byte (default 0)"),
        "max_bytes": _f("int", doc="at most this many bytes (default and limit: hello's limits.max_chunk_bytes)"),
    },
}

_PROGRESS_FIELDS = {
    "job": _f("str", True),
    "stage": _f("str", True),
    "step": _f("int"),
    "steps": _f("int"),
    "window": _f("int"),
    "windows": _f("int"),
    "done": _f("int"),
    "total": _f("int"),
    "message": _f("str"),
}

# Server -> client.
REPLIES: dict[str, dict[str, FieldSpec]] = {
    "hello": {
        "protocol": _f("int", True),
        "server": _f("str", True),
        "model": _f("map", True),
        "device": _f("str", True),
        "gpu_free_bytes": _f("int", nullable=True),
        "gpu_total_bytes": _f("int", nullable=True),
        "queue": _f("map", True),
        "limits": _f("map"),
        "store": _f("map", doc="disk pressure: used_bytes, quota_bytes, disk_free_bytes, jobs, keep_days, pressure"),
        "params": _f("list", doc="the parameter schema, one map per parameter (com4d.params.param_specs)"),
        "paths_allowed": _f("bool"),
        "owner": _f("str", doc="whose jobs this client sees: 'local' without keys, else 'key:' + its public key"),
        "admin": _f("bool", doc="whether this client sees every job"),
    },
    "pong": {
        "busy": _f("bool", True),
        "job": _f("str", nullable=True),
        "queued": _f("int"),
        "gpu_free_bytes": _f("int", nullable=True),
    },
    "accepted": {"job": _f("str", True), "position": _f("int")},
    "progress": _PROGRESS_FIELDS,
    "mesh": {
        "job": _f("str", True),
        "name": _f("str", True),
        "role": _f("str", True),
        "object_index": _f("int", True),
        "frame": _f("int", True),
        "frame_index": _f("int", True, nullable=True),
        "path": _f("str"),
        "color": _f("list", doc="the object's RGB, 0..1, as in the manifest"),
    },
    "tracked_mesh": {
        "job": _f("str", True),
        "name": _f("str", True),
        "object_index": _f("int", True),
        "frames": _f("list", True),
        "fallback_frames": _f("list"),
        "path": _f("str"),
        "color": _f("list"),
    },
    "warning": {
        "job": _f("str", True),
        "code": _f("str", True),
        "message": _f("str", True),
        "frames": _f("list"),
    },
    "done": {
        "job": _f("str", True),
        "scene": _f("str", True),
        "out_dir": _f("str"),
        "manifest": _f("map", nullable=True),
    },
    "error": {
        "code": _f("str", True),
        "message": _f("str", True),
        "job": _f("str", nullable=True),
        "advice": _f("str", nullable=True),
        "request": _f("str", nullable=True),
    },
    "job_status": {
        "job": _f("str", True),
        "state": _f("str", True),
        "label": _f("str", nullable=True),
        "created": _f("number"),
        "started": _f("number", nullable=True),
        "finished": _f("number", nullable=True),
        "position": _f("int", nullable=True),
        "progress": _f("map", nullable=True),
        "error": _f("map", nullable=True),
        "scene": _f("str", nullable=True),
    },
    "jobs": {"jobs": _f("list", True)},
    "replay_end": {"job": _f("str", True), "state": _f("str", True)},
    "file_list": {
        "job": _f("str", True),
        "state": _f("str", True),
        "results": _f("list", True, doc='[{"path": relative to the output folder, "size": bytes}]'),
    },
    "file": {
        "job": _f("str", True),
        "path": _f("str", True),
        "offset": _f("int", True),
        "size": _f("int", True),
        "eof": _f("bool", True),
    },
}

REPLY_ARRAYS: dict[str, dict[str, ArraySpec]] = {
    "mesh": {"vertices": ArraySpec("float32", (None, 3)), "faces": ArraySpec("int32", (None, 3))},
    "tracked_mesh": {
        "vertices": ArraySpec("float32", (None, None, 3)),
        "faces": ArraySpec("int32", (None, 3)),
    },
}

JOB_STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL_STATES = frozenset({"done", "failed", "cancelled", "interrupted"})
# Messages after which a job sends nothing more.
FINAL_TYPES = frozenset({"done", "error"})


# ---------------------------------------------------------------------------------------------
# The message


@dataclass
class Message:
    """One decoded (or to-be-encoded) message: header fields plus named arrays and files."""

    type: str
    id: Any = None
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)  # name -> bytes-like (bytes, memoryview)
    v: int = PROTOCOL_VERSION

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    @property
    def job(self) -> str | None:
        return self.fields.get("job")

    def __repr__(self) -> str:
        arrays = {k: f"{a.dtype}{list(a.shape)}" for k, a in self.arrays.items()}
        files = {k: len(memoryview(b)) for k, b in self.files.items()}
        return f"Message({self.type!r}, id={self.id!r}, fields={self.fields!r}, arrays={arrays}, files={files})"


def _to_plain(obj: Any) -> Any:
    """msgpack `default` hook: numpy scalars and small numpy arrays become plain values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) and obj.size <= 1024:
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot put a {type(obj).__name__} into a message header")


def wire_array(array: Any, name: str = "array") -> np.ndarray:
    """The array as it goes on the wire: a C-contiguous little-endian array of an allowed dtype."""
    array = np.asarray(array)
    kind = array.dtype.name
    if kind not in WIRE_DTYPES:
        raise ValueError(f"array {name!r} has dtype {kind}; the wire allows {sorted(WIRE_DTYPES)}")
    return np.asarray(array, dtype=np.dtype(WIRE_DTYPES[kind]), order="C")  # keeps 0-d arrays 0-d


def encode(message: Message) -> list[Any]:
    """Frames for `message`: the packed header, then each array's and each file's raw bytes.

    The blobs are the arrays' own buffers (no copy here); pass the list to
    `socket.send_multipart(frames, copy=False)` for large data.
    """
    clash = RESERVED_KEYS.intersection(message.fields)
    if clash:
        raise ValueError(f"fields may not use the reserved header keys {sorted(clash)}")
    arrays = []
    blobs: list[Any] = []
    for name, value in message.arrays.items():
        arr = wire_array(value, name)
        arrays.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape)})
        blobs.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
    files = []
    for name, data in message.files.items():
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        files.append({"name": name, "size": len(view)})
        blobs.append(view)
    header: dict[str, Any] = {"v": message.v, "type": message.type, "id": message.id}
    header.update(message.fields)
    if arrays:
        header["arrays"] = arrays
    if files:
        header["files"] = files
    return [msgpack.packb(header, use_bin_type=True, default=_to_plain), *blobs]


def make(
    type_: str,
    id_: Any = None,
    arrays: Mapping[str, Any] | None = None,
    files: Mapping[str, Any] | None = None,
    **fields: Any,
) -> Message:
    """A message from keyword fields: `make("cancel", 7, job="j-1")`."""
    return Message(type_, id_, dict(fields), dict(arrays or {}), dict(files or {}))


def error(
    code: str,
    message: str,
    id_: Any = None,
    job: str | None = None,
    advice: str | None = None,
    request: str | None = None,
) -> Message:
    """An `error` message; `request` names the request type that failed, when known."""
    return make("error", id_, code=code, message=message, job=job, advice=advice, request=request)


# ---------------------------------------------------------------------------------------------
# Decoding


def _bytes_of(frame: Any) -> memoryview:
    """A byte view of a frame: bytes, bytearray, memoryview or a zmq.Frame (its `.buffer`)."""
    buf = getattr(frame, "buffer", frame)
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _check_plain(value: Any, depth: int = 0, where: str = "header") -> None:
    """Allow only msgpack's plain types (maps with string keys), nested at most MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise ProtocolError("bad_message", f"the header is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return
    if isinstance(value, list):
        for item in value:
            _check_plain(item, depth + 1, where)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError("bad_message", f"a map in the {where} has a non-string key {key!r:.40}")
            _check_plain(item, depth + 1, where)
        return
    raise ProtocolError("bad_message", f"the {where} holds a {type(value).__name__}, which is not allowed")


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _peek_id_and_type(raw: memoryview) -> tuple[Any, str | None]:
    """The `id` and `type` of an oversized header, read without building its other values, so that
    even a `too_large` error can be matched to its request."""
    rid, rtype = None, None
    try:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, timestamp=0, max_buffer_size=len(raw))
        unpacker.feed(raw)
        for _ in range(min(unpacker.read_map_header(), 64)):
            key = unpacker.unpack()
            if key in ("id", "type"):
                value = unpacker.unpack()
                if key == "id":
                    rid = value
                elif isinstance(value, str) and len(value) <= MAX_TYPE_LEN:
                    rtype = value
            else:
                unpacker.skip()
    except Exception:  # whatever the bytes are, peeking only helps the error reply
        pass
    return _request_id({"id": rid}), rtype


def _unpack_header(raw: memoryview, limits: Limits) -> dict[str, Any]:
    if len(raw) > limits.max_header_bytes:
        rid, rtype = _peek_id_and_type(raw)
        raise ProtocolError("too_large", f"the header is {len(raw)} bytes; limit {limits.max_header_bytes}", rid, rtype)
    if len(raw) == 0:
        raise ProtocolError("bad_message", "the header frame is empty")

    def no_ext(code: int, data: bytes) -> Any:
        raise ProtocolError("bad_message", f"the header holds a msgpack extension type {code}")

    try:
        # The frame is already bounded by max_header_bytes; msgpack bounds every length by it too.
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False, ext_hook=no_ext, timestamp=0)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many kinds (ExtraData, StackError, ValueError, ...)
        name = type(exc).__name__
        raise ProtocolError("bad_message", f"the header is not one valid msgpack map ({name})") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_message", f"the header is a msgpack {type(header).__name__}, not a map")
    return header


def _request_id(header: dict[str, Any]) -> Any:
    rid = header.get("id")
    if rid is None or (isinstance(rid, int) and not isinstance(rid, bool) and abs(rid) < 2**63):
        return rid
    if isinstance(rid, str) and len(rid) <= MAX_ID_LEN:
        return rid
    return None


def _parse_blob_specs(header: dict[str, Any], limits: Limits, rid: Any, rtype: str) -> tuple[list, list]:
    def fail(code: str, text: str) -> ProtocolError:
        return ProtocolError(code, text, rid, rtype)

    arrays = header.get("arrays", [])
    files = header.get("files", [])
    if not isinstance(arrays, list) or not isinstance(files, list):
        raise fail("bad_message", "`arrays` and `files` must be lists")
    if len(arrays) + len(files) > limits.max_blobs:
        raise fail("too_large", f"{len(arrays) + len(files)} blobs; the limit is {limits.max_blobs}")
    parsed_arrays = []
    seen: set[str] = set()
    for spec in arrays:
        if not isinstance(spec, dict):
            raise fail("bad_message", "each entry of `arrays` must be a map {name, dtype, shape}")
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN or name in seen:
            raise fail("bad_message", f"array name {name!r:.60} is missing, too long or repeated")
        seen.add(name)
        if dtype not in WIRE_DTYPES:
            raise fail("bad_message", f"array {name!r} has dtype {dtype!r:.40}, not in {sorted(WIRE_DTYPES)}")
        shape_ok = isinstance(shape, list) and len(shape) <= MAX_NDIM
        if not shape_ok or not all(_non_negative_int(n) for n in shape):
            raise fail("bad_message", f"array {name!r} needs a shape of at most {MAX_NDIM} non-negative ints")
        itemsize = np.dtype(WIRE_DTYPES[dtype]).itemsize
        nbytes = math.prod(shape) * itemsize
        if nbytes > limits.max_array_bytes:
            raise fail("too_large", f"array {name!r} is {nbytes} bytes; limit {limits.max_array_bytes}")
        parsed_arrays.append((name, dtype, tuple(shape), nbytes))
    parsed_files = []
    seen = set()
    for spec in files:
        if not isinstance(spec, dict):
            raise fail("bad_message", "each entry of `files` must be a map {name, size}")
        name, size = spec.get("name"), spec.get("size")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN or name in seen:
            raise fail("bad_message", f"file name {name!r:.60} is missing, too long or repeated")
        seen.add(name)
        if not _non_negative_int(size):
            raise fail("bad_message", f"file {name!r} needs a non-negative integer size")
        if size > limits.max_file_bytes:
            raise fail("too_large", f"file {name!r} is {size} bytes; the limit is {limits.max_file_bytes}")
        parsed_files.append((name, size))
    total = sum(a[3] for a in parsed_arrays) + sum(f[1] for f in parsed_files)
    if total > limits.max_message_bytes:
        raise fail("too_large", f"the message carries {total} bytes; the limit is {limits.max_message_bytes}")
    return parsed_arrays, parsed_files


def decode(frames: Sequence[Any], limits: Limits | None = None, direction: str | None = None) -> Message:
    """Check and decode a multipart message. Raises ProtocolError for anything malformed.

    `frames` are bytes or zmq.Frame objects (received with copy=False: arrays then view the frames'
    memory without a copy; they are read-only). With `direction` "request" or "reply" the fields are
    also checked against that side's schema (`validate`).
    """
    limits = limits or Limits()
    if len(frames) == 0:
        raise ProtocolError("bad_message", "an empty message (no header frame)")
    if len(frames) - 1 > limits.max_blobs:
        raise ProtocolError("too_large", f"{len(frames) - 1} blobs; the limit is {limits.max_blobs}")
    header = _unpack_header(_bytes_of(frames[0]), limits)
    rid = _request_id(header)
    rtype = header.get("type") if isinstance(header.get("type"), str) else None
    if rtype is not None and len(rtype) > MAX_TYPE_LEN:
        rtype = None
    try:
        _check_plain(header)
    except ProtocolError as exc:
        exc.request_id, exc.request_type = rid, rtype
        raise
    version = header.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("bad_message", "the header needs an integer `v` (protocol version)", rid, rtype)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {version} is not supported; this side speaks {PROTOCOL_VERSION}",
            rid,
            rtype,
        )
    if rtype is None:
        raise ProtocolError("bad_message", f"the header needs a string `type` (<= {MAX_TYPE_LEN} chars)", rid)
    if header.get("id") is not None and rid is None:
        raise ProtocolError(
            "bad_message", f"`id` must be an int or a string of at most {MAX_ID_LEN} chars", None, rtype
        )
    array_specs, file_specs = _parse_blob_specs(header, limits, rid, rtype)
    blobs = frames[1:]
    if len(blobs) != len(array_specs) + len(file_specs):
        raise ProtocolError(
            "bad_message",
            f"the header declares {len(array_specs)} arrays and {len(file_specs)} files but {len(blobs)} blobs follow",
            rid,
            rtype,
        )
    arrays: dict[str, np.ndarray] = {}
    files: dict[str, memoryview] = {}
    for (name, dtype, shape, nbytes), blob in zip(array_specs, blobs):
        view = _bytes_of(blob)
        if len(view) != nbytes:
            raise ProtocolError(
                "bad_message", f"array {name!r} declares {nbytes} bytes, its blob {len(view)}", rid, rtype
            )
        arrays[name] = np.frombuffer(view, dtype=np.dtype(WIRE_DTYPES[dtype])).reshape(shape)
    for (name, size), blob in zip(file_specs, blobs[len(array_specs) :]):
        view = _bytes_of(blob)
        if len(view) != size:
            raise ProtocolError(
                "bad_message", f"file {name!r} declares {size} bytes, its blob has {len(view)}", rid, rtype
            )
        files[name] = view
    fields = {k: v for k, v in header.items() if k not in RESERVED_KEYS}
    message = Message(rtype, rid, fields, arrays, files, version)
    if direction is not None:
        validate(message, direction)
    return message


# ---------------------------------------------------------------------------------------------
# Schema checks


def _kind_ok(value: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "map":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    raise ValueError(f"unknown field kind {kind!r}")


def validate(message: Message, direction: str) -> None:
    """Check `message` against the schema of its type ("request": client->server, "reply": back).

    Unknown fields are ignored (a newer peer may add some); missing required fields, wrong types
    and unknown message types raise ProtocolError naming the field.
    """
    schemas = REQUESTS if direction == "request" else REPLIES
    if direction not in ("request", "reply"):
        raise ValueError("direction must be 'request' or 'reply'")
    schema = schemas.get(message.type)
    if schema is None:
        raise ProtocolError(
            "unknown_type",
            f"unknown message type {message.type!r:.64}; known: {', '.join(schemas)}",
            message.id,
            message.type,
        )
    for name, spec in schema.items():
        if name not in message.fields:
            if spec.required:
                raise ProtocolError("bad_field", f"{message.type!r} needs the field {name!r}", message.id, message.type)
            continue
        value = message.fields[name]
        if value is None:
            if spec.nullable or not spec.required:
                continue
            raise ProtocolError(
                "bad_field", f"field {name!r} of {message.type!r} may not be null", message.id, message.type
            )
        if not _kind_ok(value, spec.kind):
            raise ProtocolError(
                "bad_field",
                f"field {name!r} of {message.type!r} must be a {spec.kind}, got {type(value).__name__}",
                message.id,
                message.type,
            )
    if direction == "reply":
        for name, aspec in REPLY_ARRAYS.get(message.type, {}).items():
            arr = message.arrays.get(name)
            if arr is None:
                if aspec.required:
                    raise ProtocolError(
                        "bad_field", f"{message.type!r} needs the array {name!r}", message.id, message.type
                    )
                continue
            shape_ok = arr.ndim == len(aspec.shape) and all(
                want is None or want == got for want, got in zip(aspec.shape, arr.shape)
            )
            if arr.dtype.name != aspec.dtype or not shape_ok:
                want = "x".join("N" if n is None else str(n) for n in aspec.shape)
                raise ProtocolError(
                    "bad_field",
                    f"array {name!r} of {message.type!r} must be {aspec.dtype} ({want}), got "
                    f"{arr.dtype.name} {tuple(arr.shape)}",
                    message.id,
                    message.type,
                )


# ---------------------------------------------------------------------------------------------
# Addresses


_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def is_loopback_address(address: str) -> bool:
    """True if a ZeroMQ endpoint only reaches this machine (tcp on loopback, ipc, inproc)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host_port = address[len("tcp://") :]
    if ";" in host_port:  # "source;destination" form: judge the destination
        host_port = host_port.split(";", 1)[1]
    if host_port.startswith("["):
        host = host_port[: host_port.find("]") + 1]
    else:
        host = host_port.rsplit(":", 1)[0]
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def safe_file_name(name: str) -> bool:
    """True if `name` may be used as a path inside a job folder (no '..', no absolute, 1-2 parts)."""
    return bool(SAFE_FILE_NAME.match(name)) and ".." not in name.split("/")
