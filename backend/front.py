"""One address for several workers, one per GPU: the zguide's load-balancing broker.

Clients talk to the front end exactly as to a single backend (same protocol, same client). It
has two ROUTER sockets: one for clients, bound with a backend's security rules (backend/listen.py),
and one that the workers' DEALERs connect to (backend/link.py). It runs no model, and it keeps
no job table that a restart could lose:

- a `submit` goes to the live worker with the shortest queue (ties: the one given work longest
  ago), and that worker names the job `<worker>-…`;
- `status`, `cancel`, `fetch` and `resubmit` go to the worker that the job id names;
- `hello`, `ping` and `list_jobs` go to every worker, and their replies are merged into one;
- a worker's replies and job events go back to the client whose identity they carry.

Workers announce themselves and keep a heartbeat. A worker that falls silent for
`HEARTBEAT_LIVENESS` heartbeats is given up: each request waiting on it, and each client
following one of its jobs, gets an `error` with code `worker_unavailable`, so nobody waits for
nothing. When the worker comes back, its jobs answer again.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from backend import link, protocol
from backend.listen import ListenConfig, bound_address, open_listener

log = logging.getLogger("com4d.backend.front")

FANNED_OUT = frozenset({"hello", "ping", "list_jobs"})
# The reply types that answer each routed request (besides an `error` naming the request).
REPLY_TYPES: dict[str, tuple[str, ...]] = {
    "submit": ("accepted",),
    "cancel": ("job_status",),
    "status": ("job_status",),
    "fetch": ("job_status",),
}
_LINK_LIMITS = protocol.Limits()  # workers are on this machine and send meshes: the client's limits
_GONE_MEMORY = 4096  # how many vanished client identities are remembered (to tell workers once)


@dataclass
class FrontConfig(ListenConfig):
    """The client socket (as a backend's, backend/listen.py) plus where workers connect."""

    workers: str = "tcp://127.0.0.1:5600"
    # After a start, requests for workers that have not announced themselves yet wait this long
    # (a restarted front end hears from each worker within one heartbeat).
    startup_grace_s: float = 3.0
    fanout_timeout_s: float = 10.0  # a worker that does not answer a fanned-out request is left out


@dataclass
class WorkerState:
    """What the front end knows of one connected worker."""

    name: str
    identity: bytes  # its DEALER's identity on the worker socket
    instance: str  # its process's token
    device: str
    heartbeat_s: float
    max_queue: int
    length: int = 0  # queued + running, as it last said
    submits: int = 0  # submits forwarded to it and not answered yet
    last_seen: float = field(default_factory=time.monotonic)
    last_given: float = 0.0  # when it was last given a submit

    @property
    def load(self) -> int:
        return self.length + self.submits

    @property
    def liveness_s(self) -> float:
        return max(link.HEARTBEAT_LIVENESS * self.heartbeat_s, 1.0)


@dataclass
class _Pending:
    """A request forwarded to a worker and not answered yet."""

    client: bytes
    id: Any
    type: str
    job: str | None


@dataclass
class _FanOut:
    """A request sent to every worker on a client's behalf, collecting their replies."""

    client: bytes
    id: Any
    type: str
    limit: Any
    deadline: float
    waiting: set[str] = field(default_factory=set)
    replies: dict[str, protocol.Message] = field(default_factory=dict)


def _answers(request_type: str, msg: protocol.Message) -> bool:
    return msg.type in REPLY_TYPES.get(request_type, ()) or (msg.type == "error" and msg.get("request") == request_type)


def _ends_job(msg: protocol.Message) -> bool:
    """A job's last event (`done`, or an `error` that ends the job rather than answers a request)."""
    if msg.type == "done":
        return True
    return msg.type == "error" and isinstance(msg.get("job"), str) and msg.get("request") is None


class FrontEnd:
    """The broker. `serve_forever()` blocks; `start()` runs it on a thread (for tests)."""

    def __init__(self, config: FrontConfig | None = None):
        self.config = config or FrontConfig()
        self.address: str | None = None
        self.workers_address: str | None = None
        self._context: zmq.Context | None = None
        self._clients: zmq.Socket | None = None
        self._link: zmq.Socket | None = None
        self._auth: Any = None
        self._workers: dict[str, WorkerState] = {}
        self._names: dict[bytes, str] = {}  # worker identity -> name
        self._instances: dict[str, str] = {}  # worker name -> the process last known by that name
        self._pending: dict[str, list[_Pending]] = {}  # worker name -> requests it has not answered
        self._follows: dict[str, dict[bytes, Any]] = {}  # job -> client -> request id its events carry
        self._cut: set[tuple[bytes, str]] = set()  # (client, job) told the job's worker is gone
        self._fanouts: dict[str, _FanOut] = {}
        self._fan_ids = itertools.count(1)
        self._held: list[tuple[bytes, list[Any], protocol.Message]] = []
        self._gone: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._refused: set[bytes] = set()
        self._grace_until = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------

    def bind(self) -> str:
        """Bind both sockets; returns the clients' endpoint (a `:*` port resolved)."""
        cfg = self.config
        link.check_link_address(cfg.workers, "the worker address")
        self._context = zmq.Context()
        try:
            self._clients, self._auth = open_listener(self._context, cfg)
            self._link = self._bind_worker_socket()
        except BaseException:
            self._close()
            raise
        self.address = bound_address(self._clients)
        self.workers_address = bound_address(self._link)
        return self.address

    def _bind_worker_socket(self) -> zmq.Socket:
        """The workers' ROUTER. No size limit: workers are on this machine and send what clients may get."""
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        try:
            sock.bind(self.config.workers)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise OSError(f"cannot bind the worker address {self.config.workers}: {exc}") from exc
        return sock

    def serve_forever(self) -> None:
        """Route messages until `stop()`."""
        if self._clients is None:
            self.bind()
        self._grace_until = time.monotonic() + self.config.startup_grace_s
        log.info("front end on %s; workers connect to %s", self.address, self.workers_address)
        try:
            self._loop()
        finally:
            self._close()

    def start(self) -> str:
        """Bind and serve on a background thread; returns the clients' address."""
        self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="com4d-front", daemon=True)
        self._thread.start()
        assert self.address is not None
        return self.address

    def request_stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or any thread)."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def _close(self) -> None:
        for sock in (self._clients, self._link):
            if sock is not None:
                sock.close(0)
        self._clients = self._link = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._context is not None:
            self._context.term()
            self._context = None

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._clients, zmq.POLLIN)
        poller.register(self._link, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(100))
            if self._link in ready:
                self._drain(self._link, self._from_worker, 256)
            if self._clients in ready:
                self._drain(self._clients, self._from_client, 64)
            try:
                self._tick(time.monotonic())
            except Exception:  # a bug must not end the service
                log.exception("error in the front end's timers")

    def _drain(self, sock: zmq.Socket, handle: Any, batch: int) -> None:
        for _ in range(batch):  # a bounded batch, then the other socket gets its turn
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:  # a bug must not end the service
                log.exception("error while routing a message")

    def _tick(self, now: float) -> None:
        for worker in list(self._workers.values()):
            silent = now - worker.last_seen
            if silent > worker.liveness_s:
                self._give_up(worker, f"stopped answering (no heartbeat for {silent:.1f} s)")
        for fid, fan in list(self._fanouts.items()):
            if now > fan.deadline:
                self._finish_fan_out(fid)
        if self._held and now >= self._grace_until:
            self._release_held()

    # -- clients ---------------------------------------------------------------------------------

    def _from_client(self, frames: list[zmq.Frame]) -> None:
        identity, body = frames[0].bytes, frames[1:]
        self._gone.pop(identity, None)  # reading again, if it was not
        try:
            msg = protocol.decode(body, self.config.limits, direction="request")
        except protocol.ProtocolError as exc:
            self._reply(identity, protocol.error(exc.code, str(exc), exc.request_id, request=exc.request_type))
            return
        self._dispatch_safely(identity, body, msg)

    def _dispatch_safely(self, identity: bytes, body: list[Any], msg: protocol.Message) -> None:
        try:
            self._dispatch(identity, body, msg)
        except Exception as exc:  # a bug must not end the service: answer, log, carry on
            log.exception("error while routing a %s request", msg.type)
            text = f"the front end failed on this request: {type(exc).__name__}: {exc}"
            self._reply(identity, protocol.error("internal", text, msg.id, request=msg.type))

    def _dispatch(self, identity: bytes, body: list[Any], msg: protocol.Message) -> None:
        if msg.type in FANNED_OUT:
            self._fan_out(identity, body, msg)
            return
        job = msg.get("resubmit") if msg.type == "submit" else msg.get("job")
        if msg.type == "submit" and job is None:
            worker = self._least_loaded()
            if worker is None:
                self._unroutable(identity, body, msg, "no worker is connected to this front end")
                return
        else:
            name = link.owner_of(job)
            if name is None:
                text = f"no job {job!r:.80} here: this front end's job ids start with a worker's name (gpu0-…)"
                self._reply(identity, self._error("unknown_job", text, msg, job))
                return
            worker = self._workers.get(name)
            if worker is None:
                text = f"job {job} is on worker {name!r}, which is not connected to this front end"
                self._unroutable(identity, body, msg, f"{text}{self._connected()}; try again when it is back")
                return
        self._forward(worker, identity, body, msg, job)

    def _least_loaded(self) -> WorkerState | None:
        """The worker for a new job: room in its queue first, then the shortest queue, then the one
        that was given work longest ago."""
        live = self._workers.values()
        return min(live, key=lambda w: (w.load >= w.max_queue, w.load, w.last_given), default=None)

    def _forward(self, worker: WorkerState, identity: bytes, body: list[Any], msg: protocol.Message, job: Any) -> None:
        if not self._send_worker(worker, [identity, *body]):
            self._reply(identity, self._error("worker_unavailable", f"worker {worker.name!r} is gone", msg, job))
            return
        self._pending.setdefault(worker.name, []).append(_Pending(identity, msg.id, msg.type, job))
        if msg.type == "submit":
            worker.submits += 1
            worker.last_given = time.monotonic()
        elif msg.type == "fetch" and msg.get("follow", True) is not False:
            self._follows.setdefault(job, {})[identity] = msg.id
            self._cut.discard((identity, job))

    def _unroutable(self, identity: bytes, body: list[Any], msg: protocol.Message, text: str) -> None:
        """Hold the request while workers may still be announcing themselves, else say why not."""
        if time.monotonic() < self._grace_until:
            self._held.append((identity, body, msg))
            return
        self._reply(identity, self._error("worker_unavailable", text, msg, msg.get("job")))

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for identity, body, msg in held:
            self._dispatch_safely(identity, body, msg)

    def _connected(self) -> str:
        names = ", ".join(sorted(self._workers)) or "none"
        return f" (connected: {names})"

    @staticmethod
    def _error(code: str, text: str, msg: protocol.Message, job: Any = None) -> protocol.Message:
        """An error answering `msg`; it names the job asked about (not a resubmit's source job)."""
        job = job if isinstance(job, str) and msg.type != "submit" else None
        return protocol.error(code, text, msg.id, job=job, request=msg.type)

    def _reply(self, identity: bytes, message: protocol.Message) -> None:
        self._to_client(identity, protocol.encode(message))

    def _to_client(self, identity: bytes, frames: list[Any]) -> bool:
        try:
            self._clients.send_multipart([identity, *frames], copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            log.warning("client %s is not reading; it must fetch its jobs again", identity.hex())
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
        self._client_gone(identity)
        return False

    def _client_gone(self, identity: bytes) -> None:
        """Forget a client that is gone (or not reading) and tell the workers to drop its
        subscriptions, once."""
        if identity in self._gone:
            return
        self._gone[identity] = None
        if len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)
        for job in list(self._follows):
            self._unfollow(job, identity)
        self._cut = {(c, j) for c, j in self._cut if c != identity}
        frames = link.message("client_gone", client=identity)
        for worker in list(self._workers.values()):
            self._send_worker(worker, frames)

    def _unfollow(self, job: str, client: bytes) -> None:
        clients = self._follows.get(job)
        if clients is not None:
            clients.pop(client, None)
            if not clients:
                del self._follows[job]

    # -- fanned-out requests -------------------------------------------------------------------

    def _fan_out(self, identity: bytes, body: list[Any], msg: protocol.Message) -> None:
        if not self._workers:
            self._unroutable(identity, body, msg, "no worker is connected to this front end")
            return
        fid = f"front-{next(self._fan_ids)}"
        fields = {"client": "com4d-backend front"} if msg.type == "hello" else {}
        if msg.type == "list_jobs" and msg.get("limit") is not None:
            fields["limit"] = msg["limit"]
        fan = _FanOut(identity, msg.id, msg.type, msg.get("limit"), time.monotonic() + self.config.fanout_timeout_s)
        self._fanouts[fid] = fan
        frames = link.message(msg.type, fid, **fields)
        for worker in list(self._workers.values()):
            if self._send_worker(worker, frames):
                fan.waiting.add(worker.name)
        if not fan.waiting:
            self._finish_fan_out(fid)

    def _on_fan_reply(self, worker: WorkerState, msg: protocol.Message) -> None:
        fan = self._fanouts.get(msg.id) if isinstance(msg.id, str) else None
        if fan is None or worker.name not in fan.waiting:
            return
        fan.waiting.discard(worker.name)
        fan.replies[worker.name] = msg
        if not fan.waiting:
            self._finish_fan_out(msg.id)

    def _finish_fan_out(self, fid: str) -> None:
        fan = self._fanouts.pop(fid, None)
        if fan is None:
            return
        replies = {name: m for name, m in sorted(fan.replies.items()) if m.type != "error"}
        if not replies:
            errors = [f"{name}: {m.get('message')}" for name, m in sorted(fan.replies.items())]
            text = "no worker answered" + (f" ({'; '.join(errors)})" if errors else "")
            self._reply(fan.client, protocol.error("worker_unavailable", text, fan.id, request=fan.type))
            return
        if fan.type == "hello":
            fields = merge_hello(replies, self._own_limits(), self.config.loopback)
            self._reply(fan.client, protocol.make("hello", fan.id, **fields))
        elif fan.type == "ping":
            self._reply(fan.client, protocol.make("pong", fan.id, **merge_pong(replies)))
        else:
            self._reply(fan.client, protocol.make("jobs", fan.id, jobs=merge_jobs(replies, fan.limit)))

    def _own_limits(self) -> dict[str, int]:
        limits = self.config.limits.to_dict()
        limits["max_video_bytes"] = self.config.max_video_bytes
        return limits

    # -- workers ---------------------------------------------------------------------------------

    def _send_worker(self, worker: WorkerState, frames: list[Any]) -> bool:
        """Send to a worker; False (and the worker given up) if its connection is gone."""
        try:
            self._link.send_multipart([worker.identity, *frames], copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            reason = "is not reading"
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            reason = "lost its connection"
        self._give_up(worker, reason)
        return False

    def _from_worker(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 3:
            return
        identity, peer = frames[0].bytes, frames[1].bytes
        try:
            msg = protocol.decode(frames[2:], _LINK_LIMITS)
        except protocol.ProtocolError as exc:
            log.warning("dropped an unreadable message from a worker: %s", exc)
            return
        if peer == link.CONTROL and msg.type in link.WORKER_MESSAGES:
            self._on_announce(identity, msg)
            return
        worker = self._workers.get(self._names.get(identity, ""))
        if worker is None:
            return  # from a worker given up: it is heard again once it announces itself
        worker.last_seen = time.monotonic()
        if peer == link.CONTROL:
            self._on_fan_reply(worker, msg)
            return
        self._settle(worker, peer, msg)
        job = msg.get("job")
        if isinstance(job, str) and (peer, job) in self._cut:
            if _ends_job(msg):
                self._cut.discard((peer, job))
            return  # the client was told this job's worker is gone; it fetches again
        self._to_client(peer, frames[2:])

    def _settle(self, worker: WorkerState, client: bytes, msg: protocol.Message) -> None:
        """Book a worker's message to a client: the request it answers, the job events it ends."""
        pending = self._pending.get(worker.name, [])
        for i, request in enumerate(pending):
            if request.client == client and request.id == msg.id and _answers(request.type, msg):
                del pending[i]
                if request.type == "submit":
                    worker.submits = max(worker.submits - 1, 0)
                    if msg.type == "accepted":
                        self._follows.setdefault(msg["job"], {})[client] = msg.id
                elif request.type == "fetch" and msg.type == "error":
                    self._unfollow(request.job, client)
                break
        if _ends_job(msg):
            self._unfollow(msg["job"], client)

    def _on_announce(self, identity: bytes, msg: protocol.Message) -> None:
        try:
            link.check(msg, link.WORKER_MESSAGES)
            link.check_worker_name(msg["name"])
        except (protocol.ProtocolError, ValueError) as exc:
            self._refuse(identity, "bad_field", str(exc))
            return
        name, instance, now = msg["name"], msg["instance"], time.monotonic()
        worker = self._workers.get(name)
        if msg.type == "worker_bye":
            if worker is not None and worker.instance == instance:
                self._give_up(worker, "stopped")
            return
        if msg["protocol"] != protocol.PROTOCOL_VERSION:
            text = f"the worker speaks protocol {msg['protocol']}, this front end {protocol.PROTOCOL_VERSION}"
            self._refuse(identity, "unsupported_version", text)
            return
        if worker is not None and worker.identity != identity:
            if worker.instance == instance:  # the same process on a new connection
                self._names.pop(worker.identity, None)
                worker.identity = identity
                self._names[identity] = name
            elif now - worker.last_seen < worker.liveness_s:
                text = f"a live worker is already called {name!r}; give each worker its own --name"
                self._refuse(identity, "duplicate_name", text)
                return
            else:
                self._give_up(worker, "was replaced by a new process")
                worker = None
        if worker is None:
            worker = self._join(identity, msg)
        worker.length, worker.last_seen = msg["length"], now
        worker.heartbeat_s, worker.max_queue, worker.device = msg["heartbeat_s"], msg["max_queue"], msg["device"]

    def _join(self, identity: bytes, msg: protocol.Message) -> WorkerState:
        name = msg["name"]
        worker = WorkerState(name, identity, msg["instance"], msg["device"], msg["heartbeat_s"], msg["max_queue"])
        self._workers[name] = worker
        self._names[identity] = name
        self._refused.discard(identity)
        if self._instances.get(name) != worker.instance:  # a new process: none of its old events will come
            self._cut = {(c, j) for c, j in self._cut if link.owner_of(j) != name}
            self._instances[name] = worker.instance
        welcome = link.message(
            "worker_welcome", paths_allowed=self.config.loopback, front=f"the front end at {self.address}"
        )
        if self._send_worker(worker, welcome):
            log.info("worker %s joined (%s, %d jobs queued or running)", name, msg["device"], msg["length"])
            self._release_held()
        return worker

    def _refuse(self, identity: bytes, code: str, text: str) -> None:
        if identity not in self._refused:
            log.warning("refused a worker (%s): %s", code, text)
            self._refused.add(identity)
        try:
            self._link.send_multipart([identity, *link.message("worker_refused", code=code, message=text)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # it is gone already

    def _give_up(self, worker: WorkerState, reason: str) -> None:
        """Forget a worker; everyone waiting on it gets `worker_unavailable` at once."""
        if self._workers.get(worker.name) is not worker:
            return
        del self._workers[worker.name]
        self._names.pop(worker.identity, None)
        log.warning("worker %s %s; its jobs are unavailable until it is back", worker.name, reason)
        told: set[tuple[bytes, str, Any]] = set()  # unanswered fetches: their error ends the job's stream too
        for request in self._pending.pop(worker.name, []):
            text = f"worker {worker.name!r} {reason} before answering this {request.type}; try again when it is back"
            job = None if request.type == "submit" else request.job
            error = protocol.error("worker_unavailable", text, request.id, job=job, request=request.type)
            self._reply(request.client, error)
            if request.type == "fetch":
                told.add((request.client, job, request.id))
        for job in [j for j in self._follows if link.owner_of(j) == worker.name]:
            for client, rid in list(self._follows.pop(job, {}).items()):
                self._cut.add((client, job))
                if (client, job, rid) in told:
                    continue
                text = f"worker {worker.name!r}, which runs job {job}, {reason}; fetch the job again when it is back"
                self._reply(client, protocol.error("worker_unavailable", text, rid, job=job))
        for fid, fan in list(self._fanouts.items()):
            if worker.name in fan.waiting:
                fan.waiting.discard(worker.name)
                if not fan.waiting:
                    self._finish_fan_out(fid)


# -- merging the workers' replies ---------------------------------------------------------------


def merge_hello(replies: dict[str, protocol.Message], own_limits: dict[str, int], loopback: bool) -> dict[str, Any]:
    """One `hello` for a front end: the workers' facts side by side, the strictest limits, the
    free memory of the roomiest GPU (a job runs on one)."""
    names = list(replies)
    first = replies[names[0]]
    queues = [replies[n].get("queue") or {} for n in names]
    running = [q["running"] for q in queues if q.get("running")]
    limits: dict[str, Any] = dict(own_limits)
    for name in names:
        for key, value in (replies[name].get("limits") or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                if key == "max_queue":  # capacity adds up over workers
                    limits[key] = limits.get(key, 0) + value
                else:
                    limits[key] = min(limits.get(key, value), value)
    roomiest = max(names, key=lambda n: replies[n].get("gpu_free_bytes") or -1)
    workers = [
        {
            "name": n,
            "device": replies[n].get("device"),
            "gpu_free_bytes": replies[n].get("gpu_free_bytes"),
            "gpu_total_bytes": replies[n].get("gpu_total_bytes"),
            "queue": replies[n].get("queue"),
        }
        for n in names
    ]
    return {
        "protocol": protocol.PROTOCOL_VERSION,
        "server": f"{first.get('server', 'com4d-backend')} (front end, {len(names)} workers)",
        "model": first.get("model") or {},
        "device": ", ".join(dict.fromkeys(str(replies[n].get("device")) for n in names)),
        "gpu_free_bytes": replies[roomiest].get("gpu_free_bytes"),
        "gpu_total_bytes": replies[roomiest].get("gpu_total_bytes"),
        "queue": {
            "running": running[0] if running else None,
            "running_jobs": running,
            "queued": [job for q in queues for job in q.get("queued") or []],
            "length": sum(q.get("length") or 0 for q in queues),
        },
        "limits": limits,
        "paths_allowed": loopback and all(replies[n].get("paths_allowed") is True for n in names),
        "workers": workers,
    }


def merge_pong(replies: dict[str, protocol.Message]) -> dict[str, Any]:
    """One `pong`: busy if any worker runs a job; the queued jobs of all; the most free GPU memory."""
    free = [m.get("gpu_free_bytes") for m in replies.values() if m.get("gpu_free_bytes") is not None]
    running = [m.get("job") for m in replies.values() if m.get("busy")]
    return {
        "busy": bool(running),
        "job": running[0] if running else None,
        "queued": sum(m.get("queued") or 0 for m in replies.values()),
        "gpu_free_bytes": max(free) if free else None,
        "workers": [
            {
                "name": name,
                "busy": m.get("busy"),
                "job": m.get("job"),
                "queued": m.get("queued"),
                "gpu_free_bytes": m.get("gpu_free_bytes"),
            }
            for name, m in replies.items()
        ],
    }


def merge_jobs(replies: dict[str, protocol.Message], limit: Any) -> list[dict[str, Any]]:
    """All workers' jobs, newest first, at most `limit` (as a single backend counts it)."""
    jobs = [job for m in replies.values() for job in m.get("jobs") or [] if isinstance(job, dict)]
    jobs.sort(key=lambda j: (j.get("created") or 0, str(j.get("job"))), reverse=True)
    return jobs[: min(max(limit or 100, 0), 1000)]
