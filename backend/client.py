"""A client for the COM4D backend: a DEALER socket that speaks backend/protocol.py.

Used by the Blender extension (copied there verbatim next to protocol.py), by the tests and by
`com4d-backend ping`. It imports only the standard library, pyzmq, msgpack and numpy.

Threading: a ZeroMQ socket belongs to one thread. A `Client` guards its socket with a lock, so one
background thread can run `messages()` / `job_events()` while another calls `cancel()`; each socket
operation is short (waits are sliced), so neither blocks the other for long. Every received message
goes into one inbox in arrival order; a `request()` takes its own reply out of it, `poll()` and
`job_events()` take the rest in order, so no event is lost or reordered, whichever thread read it.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import zmq

try:  # inside a package (backend.client, or the Blender extension's copy)
    from . import protocol
except ImportError:  # copied as a top-level module next to protocol.py
    import protocol  # type: ignore[no-redef]

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUBFOLDERS = ("frames", "frames_no_bg", "masks")
_POLL_SLICE_S = 0.05


class BackendError(Exception):
    """An `error` reply from the server (or a local failure), with the wire `code` and advice."""

    def __init__(self, code: str, message: str, advice: str | None = None, job: str | None = None):
        text = message if not advice else f"{message.rstrip('.')}. {advice}"
        super().__init__(text)
        self.code = code
        self.message = message
        self.advice = advice
        self.job = job

    @classmethod
    def from_message(cls, message: protocol.Message) -> BackendError:
        return cls(
            str(message.get("code", "internal")),
            str(message.get("message", "")),
            message.get("advice"),
            message.get("job"),
        )


class BackendTimeout(BackendError):
    """No reply in time: the backend is not running, not reachable, or the keys do not match."""

    def __init__(self, message: str):
        super().__init__("timeout", message)


def read_public_key(path: str | os.PathLike) -> bytes:
    """The z85 public key from a ZeroMQ certificate file (`server.key`) written by `com4d-backend keys`."""
    import zmq.auth

    public, _ = zmq.auth.load_certificate(os.fspath(path))
    return public


def read_key_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a `*.key_secret` certificate file."""
    import zmq.auth

    public, secret = zmq.auth.load_certificate(os.fspath(path))
    if secret is None:
        raise ValueError(f"{path} holds no secret key; pass the .key_secret file")
    return public, secret


def _as_key(key: str | bytes) -> bytes:
    key = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(key) != 40:
        raise ValueError("a CurveZMQ key is 40 z85 characters")
    return key


class Client:
    """Talks to one backend. `Client(address).hello()`; or `connect()` later; `close()` at the end.

    `server_public_key` (z85) switches on CurveZMQ encryption; `client_keys` is this client's
    (public, secret) pair, needed when the server only admits listed clients (an ephemeral pair is
    made otherwise). `timeout` is the default wait for a reply, in seconds.
    """

    def __init__(
        self,
        address: str | None = None,
        server_public_key: str | bytes | None = None,
        client_keys: tuple[str | bytes, str | bytes] | None = None,
        *,
        timeout: float = 10.0,
        limits: protocol.Limits | None = None,
        context: zmq.Context | None = None,
        name: str = "com4d-client",
    ):
        self.timeout = timeout
        self.limits = limits or protocol.Limits()
        self.name = name
        self.address: str | None = None
        self._context = context or zmq.Context.instance()
        self._server_key: bytes | None = None
        self._client_keys: tuple[bytes, bytes] | None = None
        self._socket: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._inbox: collections.deque[protocol.Message] = collections.deque()
        self._awaited: dict[Any, tuple[str, ...]] = {}  # request id -> the reply types a request() awaits
        self._lock = threading.RLock()
        if address is not None:
            self.connect(address, server_public_key, client_keys)

    # -- connection -----------------------------------------------------------------------------

    def connect(
        self,
        address: str = DEFAULT_ADDRESS,
        server_public_key: str | bytes | None = None,
        client_keys: tuple[str | bytes, str | bytes] | None = None,
    ) -> Client:
        """Open a DEALER socket to `address` (connecting is lazy: errors show up as timeouts)."""
        with self._lock:
            self.close()
            self.address = address
            self._server_key = _as_key(server_public_key) if server_public_key else None
            if client_keys is not None:
                self._client_keys = (_as_key(client_keys[0]), _as_key(client_keys[1]))
            elif self._server_key is not None and self._client_keys is None:
                self._client_keys = zmq.curve_keypair()
            self._open()
        return self

    def _open(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(
            zmq.MAXMSGSIZE, max(self.limits.max_array_bytes, self.limits.max_file_bytes, self.limits.max_header_bytes)
        )
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        if self._server_key is not None:
            assert self._client_keys is not None
            sock.curve_serverkey = self._server_key
            sock.curve_publickey, sock.curve_secretkey = self._client_keys
        sock.connect(self.address)
        self._socket = sock

    def reconnect(self) -> None:
        """Drop the socket and open a new one (a new identity: the server forgets subscriptions,
        so call `fetch(job)` afterwards for jobs you follow). Messages already received are kept."""
        with self._lock:
            if self.address is None:
                raise BackendError("not_connected", "call connect(address) first")
            if self._socket is not None:
                self._socket.close(linger=0)
            self._open()

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None

    @property
    def connected(self) -> bool:
        return self._socket is not None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- raw messages ---------------------------------------------------------------------------

    def send(
        self,
        type_: str,
        fields: Mapping[str, Any] | None = None,
        arrays: Mapping[str, Any] | None = None,
        files: Mapping[str, Any] | None = None,
    ) -> int:
        """Send one request; returns its id (replies and job events carry it back)."""
        rid = next(self._ids)
        self._send(rid, type_, fields, arrays, files)
        return rid

    def _send(
        self,
        rid: int,
        type_: str,
        fields: Mapping[str, Any] | None,
        arrays: Mapping[str, Any] | None,
        files: Mapping[str, Any] | None,
    ) -> None:
        message = protocol.Message(type_, rid, dict(fields or {}), dict(arrays or {}), dict(files or {}))
        frames = protocol.encode(message)
        with self._lock:
            if self._socket is None:
                raise BackendError("not_connected", "call connect(address) first")
            self._socket.send_multipart(frames, copy=False)

    def _pump(self, timeout: float) -> None:
        """Receive at most one message into the inbox, waiting at most `timeout` seconds."""
        with self._lock:
            if self._socket is None:
                raise BackendError("not_connected", "call connect(address) first")
            if not self._socket.poll(int(max(timeout, 0.0) * 1000), zmq.POLLIN):
                return
            frames = self._socket.recv_multipart(copy=False)
            try:
                message = protocol.decode(frames, self.limits, direction="reply")
            except protocol.ProtocolError as exc:  # a broken reply becomes an error the caller can show
                message = protocol.error(exc.code, f"an unreadable reply from the backend: {exc}", exc.request_id)
            self._inbox.append(message)

    def _take(self, wanted: Callable[[protocol.Message], bool], timeout: float) -> protocol.Message | None:
        """The first inbox message that `wanted` accepts, receiving for up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for i, message in enumerate(self._inbox):
                    if wanted(message):
                        del self._inbox[i]
                        return message
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._pump(min(left, _POLL_SLICE_S))

    def _not_awaited(self, message: protocol.Message) -> bool:
        """False for the reply a `request()` (maybe on another thread) is waiting for."""
        return message.type not in self._awaited.get(message.id, ())

    def poll(self, timeout: float = 0.0) -> protocol.Message | None:
        """The next message in arrival order, waiting at most `timeout` seconds; None if none came."""
        return self._take(self._not_awaited, timeout)

    def drain(self, max_messages: int = 1000) -> list[protocol.Message]:
        """Every message available right now, without waiting (for a UI timer tick)."""
        out = []
        while len(out) < max_messages:
            message = self.poll(0.0)
            if message is None:
                break
            out.append(message)
        return out

    def messages(
        self, idle_timeout: float | None = None, stop: threading.Event | None = None
    ) -> Iterator[protocol.Message]:
        """Yield messages as they arrive, until `stop` is set or nothing came for `idle_timeout` s."""
        last = time.monotonic()
        while stop is None or not stop.is_set():
            message = self.poll(_POLL_SLICE_S)
            if message is not None:
                last = time.monotonic()
                yield message
            elif idle_timeout is not None and time.monotonic() - last > idle_timeout:
                return

    def request(
        self,
        type_: str,
        fields: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        arrays: Mapping[str, Any] | None = None,
        files: Mapping[str, Any] | None = None,
    ) -> protocol.Message:
        """Send a request and wait for its first reply; an `error` reply raises BackendError."""
        timeout = self.timeout if timeout is None else timeout
        expected = ("error", *_REPLY_TYPES.get(type_, ()))
        rid = next(self._ids)
        self._awaited[rid] = expected
        try:
            self._send(rid, type_, fields, arrays, files)
            message = self._take(lambda m: m.id == rid and m.type in expected, timeout)
        finally:
            self._awaited.pop(rid, None)
        if message is None:
            raise BackendTimeout(
                f"no reply to {type_!r} from {self.address} within {timeout:g} s; is the "
                "backend running, and are the address and keys right?"
            )
        if message.type == "error":
            raise BackendError.from_message(message)
        return message

    # -- requests ---------------------------------------------------------------------------------

    def hello(self, timeout: float | None = None) -> dict[str, Any]:
        """Server facts: protocol, model, device, free GPU memory, queue, limits."""
        return self.request("hello", {"client": self.name}, timeout=timeout).fields

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        return self.request("ping", timeout=timeout).fields

    def status(self, job: str, timeout: float | None = None) -> dict[str, Any]:
        return self.request("status", {"job": job}, timeout=timeout).fields

    def list_jobs(self, limit: int | None = None, timeout: float | None = None) -> list[dict[str, Any]]:
        fields = {} if limit is None else {"limit": limit}
        return self.request("list_jobs", fields, timeout=timeout)["jobs"]

    def cancel(self, job: str, timeout: float | None = None) -> dict[str, Any]:
        """Ask the server to stop `job`; the job then ends with an `error` whose code is `cancelled`."""
        return self.request("cancel", {"job": job}, timeout=timeout).fields

    def list_files(self, job: str, timeout: float | None = None) -> list[dict[str, Any]]:
        """The result files of `job`: `{"path", "size"}`, paths relative to its output folder."""
        return self.request("list_files", {"job": job}, timeout=timeout)["results"]

    def download(self, job: str, path: str, timeout: float | None = None) -> bytes:
        """The bytes of one result file of `job` (a `path` from `list_files`), fetched in chunks."""
        parts: list[bytes] = []
        offset = 0
        while True:
            reply = self.request("get_file", {"job": job, "path": path, "offset": offset}, timeout=timeout)
            data = bytes(reply.files["data"])
            parts.append(data)
            offset += len(data)
            if reply["eof"] or not data:
                return b"".join(parts)

    def fetch(self, job: str, follow: bool = True) -> int:
        """Ask for everything `job` produced so far (its last progress, warnings, every mesh, then done
        or error); with `follow` the events of a still running job keep coming. Read them with
        `job_events(job)`. Returns the request id."""
        return self.send("fetch", {"job": job, "follow": follow})

    def submit(
        self,
        video: str | os.PathLike | bytes | None = None,
        prompts: Mapping[str, Any] | None = None,
        masks: str | os.PathLike | None = None,
        params: Mapping[str, Any] | None = None,
        label: str | None = None,
        *,
        video_filename: str = "video.mp4",
        same_machine: bool | None = None,
        resubmit: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Queue a reconstruction; returns the job id. Its events follow (see `job_events`).

        Give `video` (a video file, a frames folder, or a video file's bytes) with `prompts` (the
        prompts.json object), or `masks` (a masks folder in the official layout), or `resubmit` (a
        stored job's id). With `same_machine` (default: the address is loopback) paths are sent as
        paths; otherwise the files' bytes are uploaded.
        """
        if same_machine is None:
            same_machine = self.address is not None and protocol.is_loopback_address(self.address)
        fields: dict[str, Any] = {}
        files: dict[str, Any] = {}
        if resubmit is not None:
            fields["resubmit"] = resubmit
        if isinstance(video, (bytes, bytearray, memoryview)):
            fields["video"] = {"filename": video_filename}
            files["video"] = video
        elif video is not None:
            path = Path(video).expanduser().resolve()
            if same_machine:
                fields["video"] = {"path": str(path)}
            elif path.is_dir():
                fields["video"] = {"filename": path.name}
                for frame in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                    files[f"video/{frame.name}"] = frame.read_bytes()
            else:
                fields["video"] = {"filename": path.name}
                files["video"] = path.read_bytes()
        if masks is not None:
            path = Path(masks).expanduser().resolve()
            if same_machine:
                fields["masks"] = {"path": str(path)}
            else:
                fields["masks"] = {}
                files.update(masks_folder_files(path))
        if prompts is not None:
            fields["prompts"] = dict(prompts)
        if params is not None:
            fields["params"] = dict(params)
        if label is not None:
            fields["label"] = label
        return self.request("submit", fields, files=files, timeout=timeout)["job"]

    def job_events(self, job: str, timeout: float | None = None) -> Iterator[protocol.Message]:
        """Yield `job`'s messages until its `done` or `error` (included), or the `replay_end` of a
        `fetch` without follow; other jobs' messages are
        kept for `poll()`. Raises BackendTimeout after `timeout` seconds without a message for it."""
        timeout = self.timeout if timeout is None else timeout
        while True:
            message = self._take(lambda m: m.get("job") == job and self._not_awaited(m), timeout)
            if message is None:
                raise BackendTimeout(f"no event for job {job} within {timeout:g} s")
            yield message
            if message.type in protocol.FINAL_TYPES or message.type == "replay_end":
                return


# The reply types that answer each request (besides `error`).
_REPLY_TYPES: dict[str, tuple[str, ...]] = {
    "hello": ("hello",),
    "ping": ("pong",),
    "submit": ("accepted",),
    "cancel": ("job_status",),
    "status": ("job_status",),
    "list_jobs": ("jobs",),
    "fetch": ("job_status",),
    "list_files": ("file_list",),
    "get_file": ("file",),
}


def masks_folder_files(folder: Path) -> dict[str, bytes]:
    """The files of a masks folder (official layout) keyed by their wire names (`masks/x.png`...)."""
    if not (folder / "frames").is_dir() or not (folder / "masks").is_dir():
        raise BackendError("bad_input", f"{folder} is not a masks folder: it needs frames/ and masks/")
    files: dict[str, bytes] = {}
    for sub in MASK_SUBFOLDERS:
        if (folder / sub).is_dir():
            for item in sorted((folder / sub).iterdir()):
                if item.is_file() and item.suffix.lower() in IMAGE_SUFFIXES:
                    files[f"{sub}/{item.name}"] = item.read_bytes()
    if (folder / "objects.json").is_file():
        files["objects.json"] = (folder / "objects.json").read_bytes()
    return files
