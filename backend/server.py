"""The backend service: a socket that answers clients, queues jobs and streams their events.

The socket is a ROUTER bound for clients (backend/listen.py). The worker that runs the jobs is a
constructor argument (by default the in-process `backend.worker.Worker`), so another kind of worker
with the same interface (`backend.worker.JobRunner`) slots in without touching the loop.

One thread owns the socket. It answers `hello`, `ping`, `status`, `cancel`... at once, also while
a job runs, because the GPU work happens on the worker's thread; the worker hands its events over
through a queue and wakes this loop through a socket pair. Every incoming message is decoded and
checked (backend/protocol.py) before anything is done with it; anything wrong gets an `error`
reply naming the problem, and no message can take the server down.

Security (docs/deploy.md): loopback binds only unless CurveZMQ keys are given; file paths in
`submit` only on a loopback bind; uploaded files land
inside the job's own folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

import com4d
from backend import protocol
from backend.listen import ListenConfig, bound_address, open_listener
from backend.listen import SecurityError as SecurityError  # re-exported: its home before listen.py
from backend.listen import check_security as check_security  # re-exported, as SecurityError
from backend.store import JobStore, StoreError, plain
from backend.worker import JobRunner, Pipeline, Publish, Worker, check_params, device_memory
from com4d.errors import COM4DError
from com4d.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, probe_video

log = logging.getLogger("com4d.backend.server")

MASK_FOLDERS = ("frames", "frames_no_bg", "masks")


class Rejected(Exception):
    """A request the server answers with an `error` (code + sentence)."""

    def __init__(self, code: str, message: str, advice: str | None = None):
        super().__init__(message)
        self.code = code
        self.advice = advice


@dataclass
class ServerConfig(ListenConfig):
    """How the server listens (backend/listen.py), what it accepts and where it runs. Sizes in bytes."""

    device: str = "cpu"
    memory_budget: int | None = None  # bytes; the worker's cap for every job
    max_queue: int = 16
    max_objects: int = 32
    max_frames: int = 1024


@dataclass
class _Subscriber:
    request_id: Any
    after_seq: int  # events up to this sequence number were already sent (by a fetch replay)


class Server:
    """The backend service. `serve_forever()` blocks; `start()` runs it on a thread (for tests)."""

    def __init__(
        self,
        pipeline: Pipeline,
        store: JobStore,
        config: ServerConfig | None = None,
        worker: Callable[[Publish], JobRunner] | None = None,
    ):
        """`worker` makes the job runner from the function it must hand every job event to (the
        default: `Worker(pipeline, store, publish, ...)`, jobs on a thread of this process)."""
        self.pipeline = pipeline
        self.store = store
        self.config = config or ServerConfig()
        if worker is None:
            cfg = self.config

            def worker(publish: Publish) -> JobRunner:
                return Worker(pipeline, store, publish, memory_budget=cfg.memory_budget, device=cfg.device)

        self.worker = worker(self._post)
        self.address: str | None = None
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None  # the clients' ROUTER
        self._auth: Any = None
        self._outbox: queue.SimpleQueue[tuple[str, int, protocol.Message]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._subs: dict[str, dict[bytes, _Subscriber]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handlers: dict[str, Callable[[bytes, protocol.Message], None]] = {
            "hello": self._on_hello,
            "ping": self._on_ping,
            "submit": self._on_submit,
            "cancel": self._on_cancel,
            "status": self._on_status,
            "list_jobs": self._on_list_jobs,
            "fetch": self._on_fetch,
        }

    # -- life cycle ------------------------------------------------------------------------------

    def bind(self) -> str:
        """Create the socket and bind; returns the endpoint (a bound `:*` port resolved)."""
        self._context = zmq.Context()
        try:
            self._socket, self._auth = open_listener(self._context, self.config)
        except BaseException:
            self._close_context()
            raise
        self.address = bound_address(self._socket)
        return self.address

    def serve_forever(self) -> None:
        """Recover the store, start the worker and answer messages until `stop()`."""
        if self._socket is None:
            self.bind()
        interrupted = self.store.recover()
        if interrupted:
            log.info("marked unfinished jobs as interrupted: %s", ", ".join(interrupted))
        self.worker.start()
        log.info("serving on %s (device %s)", self.address, self.config.device)
        try:
            self._loop()
        finally:
            self.worker.stop()
            self._flush_outbox()
            self._socket.close(0)
            self._socket = None
            self._close_context()
            self._wake_r.close()
            self._wake_w.close()

    def start(self, timeout: float = 30.0) -> str:
        """Bind and serve on a background thread; returns the bound address."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.bind()
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self.serve_forever()

        self._thread = threading.Thread(target=run, name="com4d-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("the server did not bind in time")
        if failure:
            raise failure[0]
        assert self.address is not None
        return self.address

    def request_stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or any thread)."""
        self._stop.set()
        self._wake()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop and wait for the server thread started by `start()`."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def _close_context(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._context is not None:
            self._context.term()
            self._context = None

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(200))
            if self._wake_r.fileno() in ready or self._wake_r in ready:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
            self._flush_outbox()
            if self._socket in ready:
                for _ in range(64):  # a bounded batch, then events get their turn again
                    try:
                        frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
                    self._flush_outbox()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the loop is already due to wake up (or shutting down)

    def _post(self, job: str, seq: int, message: protocol.Message) -> None:
        """Called by the worker (any thread): queue a job event for the subscribers."""
        self._outbox.put((job, seq, message))
        self._wake()

    def _send(self, identity: bytes, message: protocol.Message) -> bool:
        """Send to one peer; False (and its subscriptions dropped) if it is gone or not reading."""
        try:
            self._socket.send_multipart([identity, *protocol.encode(message)], copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            log.warning("client %s is not reading; its subscriptions are dropped", identity.hex())
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
        self._drop_client(identity)
        return False

    def _drop_client(self, identity: bytes) -> None:
        for subs in self._subs.values():
            subs.pop(identity, None)

    def _flush_outbox(self) -> None:
        while True:
            try:
                job, seq, message = self._outbox.get_nowait()
            except queue.Empty:
                break
            subs = self._subs.get(job, {})
            for identity, sub in list(subs.items()):
                if seq > sub.after_seq:
                    self._send(identity, dataclasses.replace(message, id=sub.request_id))
            if message.type in protocol.FINAL_TYPES:
                self._subs.pop(job, None)

    @property
    def paths_allowed(self) -> bool:
        """Whether `submit` may give file paths: the clients are on this machine."""
        return self.config.loopback

    def _handle(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        message: protocol.Message | None = None
        try:
            message = protocol.decode(frames[1:], self.config.limits, direction="request")
            self._handlers[message.type](identity, message)
        except protocol.ProtocolError as exc:
            self._send(identity, protocol.error(exc.code, str(exc), exc.request_id, request=exc.request_type))
        except Rejected as exc:
            assert message is not None
            job = message.get("job") if isinstance(message.get("job"), str) else None
            self._send(
                identity,
                protocol.error(exc.code, str(exc), message.id, job=job, advice=exc.advice, request=message.type),
            )
        except Exception as exc:  # a bug must not end the service: answer, log, carry on
            log.exception("error while handling a %s request", message.type if message else "(bad)")
            rid = message.id if message else None
            self._send(
                identity,
                protocol.error(
                    "internal",
                    f"the server failed on this request: {type(exc).__name__}: {exc}",
                    rid,
                    request=message.type if message else None,
                ),
            )

    # -- small requests ------------------------------------------------------------------------------

    def _on_hello(self, identity: bytes, msg: protocol.Message) -> None:
        free, total = device_memory(self.config.device)
        cfg = self.config
        limits = cfg.limits.to_dict()
        limits.update(
            max_video_bytes=cfg.max_video_bytes,
            max_objects=cfg.max_objects,
            max_frames=cfg.max_frames,
            max_queue=cfg.max_queue,
        )
        self._send(
            identity,
            protocol.make(
                "hello",
                msg.id,
                protocol=protocol.PROTOCOL_VERSION,
                server=f"com4d-backend {com4d.__version__}",
                model=plain(self.pipeline.describe()),
                device=cfg.device,
                gpu_free_bytes=free,
                gpu_total_bytes=total,
                queue=self.worker.snapshot(),
                limits=limits,
                paths_allowed=self.paths_allowed,
            ),
        )

    def _on_ping(self, identity: bytes, msg: protocol.Message) -> None:
        snap = self.worker.snapshot()
        free, _ = device_memory(self.config.device)
        self._send(
            identity,
            protocol.make(
                "pong",
                msg.id,
                busy=snap["running"] is not None,
                job=snap["running"],
                queued=len(snap["queued"]),
                gpu_free_bytes=free,
            ),
        )

    def _record(self, job: Any):
        record = self.store.get(job)
        if record is None:
            raise Rejected("unknown_job", f"no job {job!r:.80} in the store")
        return record

    def _status_message(self, job: str, request_id: Any) -> protocol.Message:
        fields = self._record(job).status_fields()
        fields["position"] = self.worker.position(job)
        return protocol.make("job_status", request_id, **fields)

    def _on_status(self, identity: bytes, msg: protocol.Message) -> None:
        self._send(identity, self._status_message(msg["job"], msg.id))

    def _on_list_jobs(self, identity: bytes, msg: protocol.Message) -> None:
        limit = min(max(msg.get("limit") or 100, 0), 1000)
        jobs = [r.status_fields() for r in self.store.list(limit)]
        self._send(identity, protocol.make("jobs", msg.id, jobs=jobs))

    def _on_cancel(self, identity: bytes, msg: protocol.Message) -> None:
        record = self._record(msg["job"])
        if record.state not in protocol.FINAL_STATES:
            self.worker.cancel(record.job)
        self._send(identity, self._status_message(record.job, msg.id))

    def _on_fetch(self, identity: bytes, msg: protocol.Message) -> None:
        job = self._record(msg["job"]).job
        self._send(identity, self._status_message(job, msg.id))
        events = self.store.read_events(job)
        last_progress = max((s for s, m in events if m.type == "progress"), default=None)
        finished = False
        for seq, event in events:
            if event.type == "progress" and seq != last_progress:
                continue
            finished = finished or event.type in protocol.FINAL_TYPES
            if not self._send(identity, dataclasses.replace(event, id=msg.id)):
                return
        record = self.store.get(job)
        if not finished and record.state in protocol.FINAL_STATES:  # a log cut short: say how it ended
            err = record.error or {"code": record.state, "message": f"the job is {record.state}"}
            final = (
                protocol.make(
                    "done", msg.id, job=job, scene=record.scene or "scene.json", out_dir=str(self.store.out_dir(job))
                )
                if record.state == "done"
                else protocol.error(
                    err.get("code", "internal"), err.get("message", ""), msg.id, job=job, advice=err.get("advice")
                )
            )
            self._send(identity, final)
        elif not finished and msg.get("follow", True) is not False:
            after = max((s for s, _ in events), default=0)
            self._subs.setdefault(job, {})[identity] = _Subscriber(msg.id, after)

    # -- submit ---------------------------------------------------------------------------------------

    def _on_submit(self, identity: bytes, msg: protocol.Message) -> None:
        cfg = self.config
        if self.worker.snapshot()["length"] >= cfg.max_queue:
            raise Rejected("queue_full", f"{cfg.max_queue} jobs are queued or running; try again later")
        if msg.get("resubmit") is not None:
            request, source = self._check_resubmit(msg), msg["resubmit"]
        else:
            request, source = self._check_submit(msg), None
        label = msg.get("label")
        record = self.store.new_job(label[:200] if label else None)
        try:
            if source is not None:
                self.store.copy_inputs(source, record.job)
            else:
                self._write_inputs(record.job, msg, request)
                self._check_stored_video(record.job, request)
        except Exception:
            shutil.rmtree(self.store.job_dir(record.job), ignore_errors=True)
            self.store.forget(record.job)
            raise
        self.store.update(record.job, request=request)
        self._subs.setdefault(record.job, {})[identity] = _Subscriber(msg.id, 0)
        position = self.worker.enqueue(record.job)
        self._send(identity, protocol.make("accepted", msg.id, job=record.job, position=position))

    def _check_resubmit(self, msg: protocol.Message) -> dict[str, Any]:
        source = self._record(msg["resubmit"])
        request = dict(source.request)
        if not request:
            raise Rejected("bad_input", f"job {source.job} has no stored request to run again")
        if any("path" in (request.get(k) or {}) for k in ("video", "masks")) and not self.paths_allowed:
            raise Rejected("forbidden", "that job reads a file path, which a non-loopback backend refuses")
        if msg.get("params") is not None:
            request["params"] = self._checked_params(msg["params"], request)
        request["resubmitted_from"] = source.job
        return request

    def _check_submit(self, msg: protocol.Message) -> dict[str, Any]:
        """Check everything about a submit that can be checked before writing a byte; returns the
        request description stored in job.json."""
        video, masks, prompts = msg.get("video"), msg.get("masks"), msg.get("prompts")
        if (video is None) == (masks is None):
            raise Rejected("bad_field", "give either `video` (with `prompts`) or `masks` (a masks folder)")
        if video is not None and prompts is None:
            raise Rejected("bad_field", "a video needs `prompts` (the prompts.json object)")
        if masks is not None and prompts is not None:
            raise Rejected("bad_field", "`prompts` go with a video; a masks folder already holds the masks")
        for name in msg.files:
            if not protocol.safe_file_name(name):
                raise Rejected(
                    "bad_field",
                    f"file name {name!r:.80} is not allowed (use e.g. 'video', "
                    "'video/000000.png', 'masks/000000_object_000.png')",
                )
        request: dict[str, Any] = {"video": None, "masks": None, "prompts": None}
        if video is not None:
            request["video"] = self._check_video(video, msg.files)
            request["prompts"] = self._check_prompts(prompts)
        else:
            request["masks"] = self._check_masks(masks, msg.files)
        request["params"] = self._checked_params(msg.get("params") or {}, request)
        return request

    def _check_path(self, given: Any, what: str) -> Path:
        if not self.paths_allowed:
            raise Rejected(
                "forbidden",
                f"this backend is not on a loopback address, so it takes no file paths; upload the {what} instead",
            )
        if not isinstance(given, str) or not given or "\0" in given:
            raise Rejected("bad_field", f"the {what} path must be a non-empty string")
        path = Path(given)
        if not path.is_absolute():
            raise Rejected("bad_field", f"the {what} path must be absolute, got {given!r:.200}")
        return path

    def _check_video(self, video: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
        if ("path" in video) == ("filename" in video):
            raise Rejected(
                "bad_field",
                "`video` needs exactly one of `path` (same machine) or `filename` "
                "(with the file uploaded as blob 'video' or frames as 'video/NAME')",
            )
        foreign = [n for n in files if n != "video" and not n.startswith("video/")]
        if foreign:
            raise Rejected("bad_field", f"unexpected files {foreign[:3]} for a video submit")
        if "path" in video:
            path = self._check_path(video["path"], "video")
            count = self._readable_clip(path)
            if files:
                raise Rejected("bad_field", "give the video as a path or as uploaded files, not both")
            return {"path": str(path), "frames": count}
        filename = video["filename"]
        if not isinstance(filename, str):
            raise Rejected("bad_field", "`video.filename` must be a string")
        frames = [n for n in files if n.startswith("video/")]
        if "video" in files and frames:
            raise Rejected("bad_field", "upload a video file ('video') or frames ('video/NAME'), not both")
        if "video" in files:
            suffix = Path(filename).suffix.lower()
            if suffix not in VIDEO_SUFFIXES:
                raise Rejected(
                    "bad_input", f"video {filename!r:.80} has an unknown type; use one of {', '.join(VIDEO_SUFFIXES)}"
                )
            return {"stored": f"inputs/video{suffix}"}
        if not frames:
            raise Rejected("bad_field", "`video.filename` needs a blob 'video' or frames 'video/NAME'")
        bad = [n for n in frames if Path(n).suffix.lower() not in IMAGE_SUFFIXES]
        if bad:
            raise Rejected("bad_input", f"frames must be png or jpg files, not {bad[0]!r:.80}")
        return {"stored": "inputs/video", "frames": len(frames)}

    def _readable_clip(self, path: Path) -> int:
        """The frame count of a readable video file or frames folder at `path` (Rejected if not)."""
        if path.is_file():
            if path.suffix.lower() not in VIDEO_SUFFIXES:
                raise Rejected("bad_input", f"{path} is not a video file ({', '.join(VIDEO_SUFFIXES)})")
            if path.stat().st_size > self.config.max_video_bytes:
                raise Rejected(
                    "too_large", f"{path} is {path.stat().st_size} bytes; the limit is {self.config.max_video_bytes}"
                )
        elif not path.is_dir():
            raise Rejected("bad_input", f"no readable video file or frames folder at {path}")
        if not os.access(path, os.R_OK):
            raise Rejected("bad_input", f"{path} is not readable by the server")
        try:
            info = probe_video(path)
        except COM4DError as exc:
            raise Rejected(exc.code, str(exc)) from None
        except OSError as exc:
            raise Rejected("bad_input", f"cannot read {path}: {exc.strerror or exc}") from None
        return info.frame_count

    def _check_masks(self, masks: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
        if "path" in masks:
            if files:
                raise Rejected("bad_field", "give the masks folder as a path or as uploaded files, not both")
            path = self._check_path(masks["path"], "masks folder")
            if not (path / "frames").is_dir() or not (path / "masks").is_dir():
                raise Rejected("bad_input", f"{path} is not a masks folder: it needs frames/ and masks/")
            names = [f"masks/{p.name}" for p in (path / "masks").iterdir()]
            frames = sum(1 for p in (path / "frames").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            self._check_objects_in_masks(names)
            return {"path": str(path), "frames": frames}
        allowed = tuple(f"{d}/" for d in MASK_FOLDERS)
        foreign = [n for n in files if n != "objects.json" and not n.startswith(allowed)]
        if foreign:
            raise Rejected(
                "bad_field",
                f"unexpected files {foreign[:3]} for a masks submit (allowed: "
                "frames/, frames_no_bg/, masks/, objects.json)",
            )
        frames = [n for n in files if n.startswith("frames/")]
        if not frames or not any(n.startswith("masks/") for n in files):
            raise Rejected(
                "bad_input",
                "a masks upload needs frames ('frames/NNNNNN.png') and masks ('masks/NNNNNN_object_XXX.png')",
            )
        self._check_objects_in_masks(list(files))
        return {"stored": "inputs/masks", "frames": len(frames)}

    def _check_objects_in_masks(self, names: list[str]) -> None:
        ids = {n.split("_object_", 1)[1] for n in names if n.startswith("masks/") and "_object_" in n}
        if len(ids) > self.config.max_objects:
            raise Rejected("too_large", f"{len(ids)} objects in the masks; limit {self.config.max_objects}")

    def _check_prompts(self, prompts: dict[str, Any]) -> dict[str, Any]:
        from com4d.segment.prompts import parse_prompts

        objects = prompts.get("objects")
        if isinstance(objects, list) and len(objects) > self.config.max_objects:
            raise Rejected(
                "too_large", f"{len(objects)} objects in the prompts; the limit is {self.config.max_objects}"
            )
        try:
            parse_prompts(prompts)
        except COM4DError as exc:
            raise Rejected(exc.code, f"prompts: {exc}") from None
        return prompts

    def _checked_params(self, params: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
        try:
            checked = check_params(params)
        except COM4DError as exc:
            raise Rejected(exc.code, str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise Rejected("bad_parameter", f"params: {exc}") from None
        source = request.get("video") or request.get("masks") or {}
        if source.get("frames") is not None:
            self._check_frame_count(source["frames"], checked)
        return plain(params)

    def _check_frame_count(self, available: int, params: Any) -> None:
        """Reject a job whose selected frames exceed the limit, before any frame is decoded."""
        # The pipeline selects frames[frame_start:frame_end:frame_stride].
        start, end = getattr(params, "frame_start", 0), getattr(params, "frame_end", None)
        selected = len(range(available)[start : end : getattr(params, "frame_stride", 1)])
        if selected > self.config.max_frames:
            raise Rejected(
                "too_large",
                f"{selected} frames selected; the limit is {self.config.max_frames}",
                "Use a shorter frame range (frame_start/frame_end) or a larger frame_stride.",
            )

    def _write_inputs(self, job: str, msg: protocol.Message, request: dict[str, Any]) -> None:
        try:
            for name, data in msg.files.items():
                if name == "video":
                    self.store.write_input(job, Path(request["video"]["stored"]).name, data)
                elif name.startswith("video/") or request.get("masks") is None:
                    self.store.write_input(job, name, data)
                else:
                    self.store.write_input(job, "masks/" + name, data)
            if request.get("prompts") is not None:
                self.store.write_input(job, "prompts.json", json.dumps(request["prompts"]).encode())
                request["prompts"] = "inputs/prompts.json"
        except StoreError as exc:
            raise Rejected("bad_field", str(exc)) from None

    def _check_stored_video(self, job: str, request: dict[str, Any]) -> None:
        """An uploaded video file is probed once it is on disk (its frame count is in its header)."""
        video = request.get("video") or {}
        if str(video.get("stored", "")).startswith("inputs/video."):
            count = self._readable_clip(self.store.job_path(job, video["stored"]))
            video["frames"] = count
            self._checked_params(request.get("params") or {}, request)
