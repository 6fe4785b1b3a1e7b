"""The backend service: a socket that answers clients, queues jobs and streams their events.

The socket is a ROUTER bound for clients (backend/listen.py). The worker that runs the jobs is a
constructor argument (by default the in-process `backend.worker.Worker`), so another kind of worker
with the same interface (`backend.worker.JobRunner`) slots in without touching the loop.

Three kinds of thread, so that nothing slow runs where it would block everyone:
- the socket thread (`_loop`) owns the socket: it decodes and checks every message
  (backend/protocol.py, backend/submit.py step 1), answers `hello`, `ping`, `status`, `cancel`...
  at once, and sends the job events it is handed;
- the intake thread stores a submit's uploads, reads their headers (backend/submit.py step 2) and
  keeps the store within its retention and quota; it hands its result back to the socket thread;
- the worker runs the jobs (GPU work) and hands their events over.
Hand-overs go through one queue of actions, run in order on the socket thread, which a socket pair
wakes. Anything wrong gets an `error` reply naming the problem; no message takes the server down.

Security (docs/deploy.md): loopback binds only unless CurveZMQ keys are given; file paths in
`submit` only on a loopback bind; uploaded files land inside the job's own folder. With keys, a job
belongs to the key that submitted it: only that key (or an admin key) sees, cancels or fetches it.
Without keys the server is single-user: every local client owns every job.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import queue
import shutil
import socket
import threading
import time
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
from backend.store import JobRecord, JobStore, StoreError, StoreWriteError, plain
from backend.submit import Rejected, SubmitLimits, check_resubmit, check_submit, inspect_inputs
from backend.worker import JobRunner, Pipeline, Publish, Worker, device_memory
from com4d.params import ModelLimits, param_specs

log = logging.getLogger("com4d.backend.server")

LOCAL_OWNER = "local"  # the owner of every job of a server without keys
MAX_CHUNK_BYTES = 4 << 20  # one `file` reply
HOUSEKEEPING_S = 60.0  # retention and quota: at start and this often
HOUSEKEEPING_AFTER_SUBMIT_S = 10.0  # and after a submit, if the last run is older than this


@dataclass
class ServerConfig(ListenConfig):
    """How the server listens (backend/listen.py), what it accepts and where it runs. Sizes in bytes."""

    device: str = "cpu"
    memory_budget: int | None = None  # bytes; the worker's cap for every job
    max_queue: int = 16
    max_objects: int = 32
    max_frames: int = 1024
    max_frame_pixels: int = 4096 * 4096
    max_job_pixels: int = 1 << 30
    keep_days: float = 30.0  # finished jobs older than this are deleted
    max_store_bytes: int = 100 << 30  # the store's quota: the oldest finished jobs go first
    admin_keys: frozenset[str] = frozenset()  # z85 public keys that may see and cancel every job


@dataclass
class _Subscriber:
    request_id: Any
    after_seq: int  # events up to this sequence number were already sent (by a fetch replay)


@dataclass
class _Request:
    """Who sent a request: the ROUTER identity (where replies go) and the job owner it stands for."""

    identity: bytes
    owner: str
    admin: bool


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
        self._actions: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()  # run on the socket thread
        self._intake = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="com4d-intake")
        self._admitting = 0  # submits on the intake thread (they count towards max_queue)
        self._disk: dict[str, Any] = {"used_bytes": None, "jobs": len(store.list())}
        self._last_housekeeping = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._subs: dict[str, dict[bytes, _Subscriber]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handlers: dict[str, Callable[[_Request, protocol.Message], None]] = {
            "hello": self._on_hello,
            "ping": self._on_ping,
            "submit": self._on_submit,
            "cancel": self._on_cancel,
            "status": self._on_status,
            "list_jobs": self._on_list_jobs,
            "fetch": self._on_fetch,
            "list_files": self._on_list_files,
            "get_file": self._on_get_file,
        }

    @property
    def limits(self) -> SubmitLimits:
        """What a submit may ask (backend/submit.py). Objects: the lower of the server's and the model's."""
        cfg = self.config
        model = self.pipeline.describe()
        model_objects, window = model.get("max_objects"), model.get("max_window_frames")
        return SubmitLimits(
            paths_allowed=self.paths_allowed,
            max_objects=min(cfg.max_objects, model_objects) if isinstance(model_objects, int) else cfg.max_objects,
            max_frames=cfg.max_frames,
            max_video_bytes=cfg.max_video_bytes,
            max_frame_pixels=cfg.max_frame_pixels,
            max_job_pixels=cfg.max_job_pixels,
            model=ModelLimits(model_objects, window)
            if isinstance(model_objects, int) and isinstance(window, int)
            else None,
        )

    @property
    def paths_allowed(self) -> bool:
        """Whether `submit` may give file paths: the clients are on this machine."""
        return self.config.loopback

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
            self._intake.shutdown(wait=True, cancel_futures=True)
            self.worker.stop()
            self._run_actions()
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
        self._schedule_housekeeping()
        while not self._stop.is_set():
            ready = dict(poller.poll(200))
            if self._wake_r.fileno() in ready or self._wake_r in ready:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
            self._run_actions()
            if self._socket in ready:
                for _ in range(64):  # a bounded batch, then events get their turn again
                    try:
                        frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
                    self._run_actions()
            if time.monotonic() - self._last_housekeeping > HOUSEKEEPING_S:
                self._schedule_housekeeping()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the loop is already due to wake up (or shutting down)

    def _call_soon(self, action: Callable[[], None]) -> None:
        """Run `action` on the socket thread, after every action handed over before it (any thread)."""
        self._actions.put(action)
        self._wake()

    def _post(self, job: str, seq: int, message: protocol.Message) -> None:
        """Called by the worker (any thread): queue a job event for the subscribers."""
        self._call_soon(lambda: self._deliver(job, seq, message))

    def _run_actions(self) -> None:
        while True:
            try:
                action = self._actions.get_nowait()
            except queue.Empty:
                return
            action()

    def _deliver(self, job: str, seq: int, message: protocol.Message) -> None:
        subs = self._subs.get(job, {})
        for identity, sub in list(subs.items()):
            if seq > sub.after_seq:
                self._send(identity, dataclasses.replace(message, id=sub.request_id))
        if message.type in protocol.FINAL_TYPES:
            self._subs.pop(job, None)

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

    def _requester(self, frames: list[zmq.Frame]) -> _Request:
        """The sender of a message: with CurveZMQ, its public key (the ZAP User-Id) owns its jobs."""
        identity = frames[0].bytes
        if self.config.server_keys is None:
            return _Request(identity, LOCAL_OWNER, admin=True)
        key = frames[1].get("User-Id") if len(frames) > 1 else ""
        return _Request(identity, f"key:{key}", admin=key in self.config.admin_keys)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        peer = self._requester(frames)
        message: protocol.Message | None = None
        try:
            message = protocol.decode(frames[1:], self.config.limits, direction="request")
            self._handlers[message.type](peer, message)
        except protocol.ProtocolError as exc:
            self._send(peer.identity, protocol.error(exc.code, str(exc), exc.request_id, request=exc.request_type))
        except Rejected as exc:
            self._send(peer.identity, self._rejection(exc, message))
        except Exception as exc:  # a bug must not end the service: answer, log, carry on
            log.exception("error while handling a %s request", message.type if message else "(bad)")
            rid = message.id if message else None
            self._send(
                peer.identity,
                protocol.error(
                    "internal",
                    f"the server failed on this request ({type(exc).__name__}); its log has the details",
                    rid,
                    request=message.type if message else None,
                ),
            )

    @staticmethod
    def _rejection(exc: Rejected, message: protocol.Message) -> protocol.Message:
        job = message.get("job") if isinstance(message.get("job"), str) else None
        return protocol.error(exc.code, str(exc), message.id, job=job, advice=exc.advice, request=message.type)

    # -- small requests ------------------------------------------------------------------------------

    def _on_hello(self, peer: _Request, msg: protocol.Message) -> None:
        free, total = device_memory(self.config.device)
        cfg, limits = self.config, self.limits
        wire = cfg.limits
        self._send(
            peer.identity,
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
                limits={
                    "max_header_bytes": wire.max_header_bytes,
                    "max_blobs": wire.max_blobs,
                    "max_file_bytes": wire.max_file_bytes,
                    "max_message_bytes": wire.max_message_bytes,
                    "max_video_bytes": cfg.max_video_bytes,
                    "max_objects": limits.max_objects,
                    "max_frames": cfg.max_frames,
                    "max_frame_pixels": cfg.max_frame_pixels,
                    "max_job_pixels": cfg.max_job_pixels,
                    "max_queue": cfg.max_queue,
                    "max_chunk_bytes": MAX_CHUNK_BYTES,
                },
                store=self._store_facts(),
                params=param_specs(),
                paths_allowed=self.paths_allowed,
                owner=peer.owner,
                admin=peer.admin,
            ),
        )

    def _store_facts(self) -> dict[str, Any]:
        """Disk pressure: the store's size (as last measured) against its quota and the free disk."""
        used, quota = self._disk["used_bytes"], self.config.max_store_bytes
        try:
            free = shutil.disk_usage(self.store.root).free
        except OSError:
            free = None
        return {
            "used_bytes": used,
            "quota_bytes": quota,
            "disk_free_bytes": free,
            "jobs": self._disk["jobs"],
            "keep_days": self.config.keep_days,
            "pressure": None if used is None else round(used / quota, 4),
        }

    def _on_ping(self, peer: _Request, msg: protocol.Message) -> None:
        snap = self.worker.snapshot()
        free, _ = device_memory(self.config.device)
        self._send(
            peer.identity,
            protocol.make(
                "pong",
                msg.id,
                busy=snap["running"] is not None,
                job=snap["running"],
                queued=len(snap["queued"]),
                gpu_free_bytes=free,
            ),
        )

    def _record(self, job: Any, peer: _Request) -> JobRecord:
        """The job's record if `peer` may see it (its owner or an admin); else `unknown_job`."""
        record = self.store.get(job)
        if record is None or not (peer.admin or record.owner == peer.owner):
            raise Rejected("unknown_job", f"no job {job!r:.80} of yours in the store")
        return record

    def _status_message(self, record: JobRecord, request_id: Any) -> protocol.Message:
        fields = self.store.get(record.job).status_fields()
        fields["position"] = self.worker.position(record.job)
        return protocol.make("job_status", request_id, **fields)

    def _on_status(self, peer: _Request, msg: protocol.Message) -> None:
        self._send(peer.identity, self._status_message(self._record(msg["job"], peer), msg.id))

    def _on_list_jobs(self, peer: _Request, msg: protocol.Message) -> None:
        limit = msg.get("limit")
        limit = 100 if limit is None else limit
        if not 0 <= limit <= 1000:
            raise Rejected("bad_field", f"`limit` must be in [0, 1000], got {limit}")
        mine = [r for r in self.store.list() if peer.admin or r.owner == peer.owner]
        self._send(peer.identity, protocol.make("jobs", msg.id, jobs=[r.status_fields() for r in mine[:limit]]))

    def _on_cancel(self, peer: _Request, msg: protocol.Message) -> None:
        record = self._record(msg["job"], peer)
        if record.state not in protocol.FINAL_STATES:
            self.worker.cancel(record.job)
        self._send(peer.identity, self._status_message(record, msg.id))

    def _on_fetch(self, peer: _Request, msg: protocol.Message) -> None:
        record = self._record(msg["job"], peer)
        job, identity = record.job, peer.identity
        self._send(identity, self._status_message(record, msg.id))
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
        elif not finished:  # no follow: say that the replay is over although the job goes on
            self._send(identity, protocol.make("replay_end", msg.id, job=job, state=record.state))

    def _on_list_files(self, peer: _Request, msg: protocol.Message) -> None:
        record = self._record(msg["job"], peer)
        files = self.store.result_files(record.job)
        reply = protocol.make("file_list", msg.id, job=record.job, state=record.state, results=files)
        self._send(peer.identity, reply)

    def _on_get_file(self, peer: _Request, msg: protocol.Message) -> None:
        record = self._record(msg["job"], peer)
        offset = msg.get("offset") or 0
        size = MAX_CHUNK_BYTES if msg.get("max_bytes") is None else msg["max_bytes"]
        if offset < 0 or not 1 <= size <= MAX_CHUNK_BYTES:
            raise Rejected("bad_field", f"`offset` must be >= 0 and `max_bytes` in [1, {MAX_CHUNK_BYTES}]")
        try:
            data, total = self.store.read_result(record.job, msg["path"], offset, size)
        except StoreError as exc:
            raise Rejected("bad_field", str(exc)) from None
        reply = protocol.make(
            "file",
            msg.id,
            files={"data": data},
            job=record.job,
            path=msg["path"],
            offset=min(offset, total),
            size=total,
            eof=min(offset, total) + len(data) >= total,
        )
        self._send(peer.identity, reply)

    # -- submit ---------------------------------------------------------------------------------------

    def _on_submit(self, peer: _Request, msg: protocol.Message) -> None:
        """Step 1 (backend/submit.py) here; storing and inspecting the inputs on the intake thread."""
        cfg = self.config
        if self.worker.snapshot()["length"] + self._admitting >= cfg.max_queue:
            raise Rejected("queue_full", f"{cfg.max_queue} jobs are queued or running; try again later")
        used = self._disk["used_bytes"]
        if used is not None and used >= cfg.max_store_bytes:
            raise Rejected(
                "store_full",
                f"the job store holds {used} bytes, at its quota of {cfg.max_store_bytes}, even after removing "
                "old finished jobs",
                "Wait for jobs to finish and be removed, or ask the operator for a larger --max-store.",
            )
        source = None
        if msg.get("resubmit") is not None:
            source = self._record(msg["resubmit"], peer)
            request = check_resubmit(msg.fields, msg.files, source.request, source.job, self.limits)
        else:
            request = check_submit(msg.fields, msg.files, self.limits)
        self._admitting += 1
        self._intake.submit(self._admit, peer, msg, request, source.job if source else None)

    def _admit(self, peer: _Request, msg: protocol.Message, request: dict[str, Any], source: str | None) -> None:
        """Intake thread: store the inputs and inspect them, then hand the job to the socket thread."""
        label, request_id = msg.get("label"), msg.id
        job: str | None = None
        try:
            job = self.store.new_job(label[:200] if label else None, owner=peer.owner).job
            if source is not None:
                self.store.copy_inputs(source, job)
            else:
                self._write_inputs(job, msg, request)
            inspect_inputs(request, self.store.job_dir(job), self.limits)
            self.store.update(job, request=request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the submit's error reply
            if job is not None:
                self.store.delete(job)
            if isinstance(exc, StoreWriteError):
                exc = Rejected("storage", f"the server could not store the job: {exc}")
            elif not isinstance(exc, Rejected):
                log.exception("error while storing a submit")
                exc = Rejected("internal", f"the server failed on this submit ({type(exc).__name__})")
            reply = self._rejection(exc, msg)
            self._call_soon(lambda: self._admitted(peer, None, reply))
            return
        del msg  # the uploaded frames can be freed now
        self._call_soon(lambda: self._admitted(peer, job, None, request_id))
        if time.monotonic() - self._last_housekeeping > HOUSEKEEPING_AFTER_SUBMIT_S:  # the quota sees the upload
            self._last_housekeeping = time.monotonic()
            self._housekeeping()

    def _admitted(
        self, peer: _Request, job: str | None, error: protocol.Message | None, request_id: Any = None
    ) -> None:
        """Socket thread: subscribe the submitter and queue the job (so no event can come before
        `accepted`), or send the intake's refusal."""
        self._admitting -= 1
        if job is None:
            self._send(peer.identity, error)
            return
        if self._stop.is_set():
            seq, final = self.store.fail(job, "interrupted", "interrupted", "the server stopped before the job ran")
            self._send(peer.identity, dataclasses.replace(final, id=request_id))
            return
        self._subs.setdefault(job, {})[peer.identity] = _Subscriber(request_id, 0)
        position = self.worker.enqueue(job)
        self._send(peer.identity, protocol.make("accepted", request_id, job=job, position=position))

    def _write_inputs(self, job: str, msg: protocol.Message, request: dict[str, Any]) -> None:
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

    # -- retention and quota (intake thread) -------------------------------------------------------------

    def _schedule_housekeeping(self) -> None:
        self._last_housekeeping = time.monotonic()
        self._intake.submit(self._housekeeping)

    def _housekeeping(self) -> None:
        """Apply the retention policy and quota (backend/store.py) and keep the numbers for `hello`."""
        try:
            used = self.store.enforce_retention(self.config.keep_days, self.config.max_store_bytes)
            self._disk = {"used_bytes": used, "jobs": len(self.store.list())}
        except Exception:  # housekeeping must never stop the intake thread
            log.exception("store housekeeping failed")
