"""Cluster mode: the server's jobs run on Ray, one long-lived worker actor per GPU.

`ClusterWorker` has the interface of `backend.worker.Worker` (`start`, `stop`, `enqueue`, `cancel`,
`snapshot`, `position`), so the server and its protocol do not change. Jobs wait in the server's
queue; a job goes to a free worker actor (`backend/cluster_actor.py`), which holds a loaded
COM4DPipeline, so weights load once per GPU. While the job runs, its events stream back in batches
(the actor's `run` is a Ray generator) and a thread of the server writes them to the job store and
publishes them, exactly as the in-process worker does (it runs the same `Worker._run_job`, with a
pipeline that forwards to the actor).

- Meshing fan-out (`fan_out`): while the queue is empty, the idle workers are lent to the running
  jobs (shared out in turn); a job sends its final latents to the workers lent to it and keeps
  sampling (`cluster_actor.FanOutMesher`). A queued job takes an idle worker back at once; a mesh it
  was making finishes alongside.
- Cancel: a concurrent `cancel` call on the (threaded) actor sets the job's CancelToken there.
- A worker that dies mid-job (its process or its node): Ray restarts the actor (`max_restarts`,
  which reloads the weights) wherever a GPU is free; the job gets a `worker_lost` warning, keeps the
  meshes it has (files and events), and runs again on the next free worker, up to `job_retries`
  times. A retry recomputes the same meshes from the same seed; the ones already sent are not sent
  again. After the last retry the job fails with `interrupted`.
- A node that joins: every `poll_s` seconds the cluster's GPUs are counted, and a new actor is made
  for each GPU without one; the next job can use it once its weights are loaded.
- Files: a worker on the server's machine writes into the job's folder of the store directly; a
  worker on another machine gets the inputs as bytes and sends every output file back as bytes
  (`files` = "auto"), so no shared filesystem is needed. `files` = "stream" sends bytes always,
  "shared" never (a filesystem mounted at the same path on every node).

Ray is imported only here (and in the actor): the default single-GPU mode never imports it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.cluster_actor import END, ERROR, GPUWorkerActor, pack_files, unpack_files
from backend.store import JobStore, StoreWriteError
from backend.worker import Publish, Worker
from com4d.errors import Cancelled, COM4DError, OutOfMemory
from com4d.events import CancelToken, WarningEvent

log = logging.getLogger("com4d.backend.cluster")

FILE_MODES = ("auto", "stream", "shared")


@dataclass
class ClusterConfig:
    """Where the cluster is and how its workers run.

    `address`: "auto" joins the cluster of this machine (`ray start --head`, or RAY_ADDRESS) and
    starts a local one when there is none; otherwise a Ray address ("HOST:6379", "ray://HOST:10001").
    Ray already initialised in this process (tests) is used as it is."""

    weights: str
    address: str = "auto"
    device: str = "cuda"
    dtype: str = "float16"
    sam_checkpoint: str | None = None
    workers: int | None = None  # None: one per GPU of the cluster (1 on a cluster without GPUs), growing as nodes join
    max_restarts: int = 3  # how often Ray restarts a worker actor that died (it reloads the weights)
    job_retries: int = 1  # how often a job whose worker died runs again on another worker
    files: str = "auto"  # "auto", "stream" or "shared" (module docstring)
    fan_out: bool = True  # lend idle workers to running jobs for their meshing (module docstring)
    poll_s: float = 2.0  # how often the cluster is checked for new GPUs
    ready_timeout_s: float = 600.0  # start() waits this long for the first worker to load its weights

    def validate(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"the device of cluster workers is cuda or cpu, not {self.device!r} (Ray picks each GPU)")
        if self.files not in FILE_MODES:
            raise ValueError(f"files must be one of {', '.join(FILE_MODES)}, not {self.files!r}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")
        if self.max_restarts < 0 or self.job_retries < 0:
            raise ValueError("max_restarts and job_retries must not be negative")
        if not self.poll_s > 0 or not self.ready_timeout_s > 0:
            raise ValueError("poll_s and ready_timeout_s must be positive")


class WorkerLost(Exception):
    """The worker actor running a job died or its node went away."""


@dataclass
class _Member:
    """One worker actor and what the server knows of it."""

    name: str
    actor: Any
    ready: bool = False  # weights loaded and reachable (False while Ray restarts it)
    loaded: bool = False  # it loaded its weights at least once
    job: str | None = None
    node: str | None = None


@dataclass
class _Running:
    member: _Member
    token: CancelToken
    runner: Worker
    retry_wait: bool = False


def _remote_error(code: str, message: str) -> COM4DError:
    if code == "cancelled":
        return Cancelled(message)
    if code == "out_of_memory":
        return OutOfMemory(message)
    if code == "internal":  # the details stay in the server's log, as in the in-process worker
        log.error("a job failed on its GPU worker: %s", message)
        return COM4DError("unexpected error on the GPU worker; the server log has the details", "internal")
    return COM4DError(message, code)


def _mesh_key(event: Any) -> tuple | None:
    kind = getattr(event, "kind", None)
    if kind == "mesh":
        return kind, event.role, event.object_index, event.frame
    if kind == "tracked_mesh":
        return kind, event.object_index
    return None


class _ActorPipeline:
    """A pipeline (for `Worker._run_job`) that runs one job on the cluster's worker actors."""

    def __init__(self, cluster: ClusterWorker, job: str):
        self.cluster = cluster
        self.job = job

    def describe(self) -> dict[str, Any]:
        return self.cluster.describe()

    def reconstruct(
        self, request: Any, params: Any, out_dir: Path, on_event: Callable[[Any], None], cancel: CancelToken
    ) -> None:
        """Run the job on its worker; on a lost worker, again on the next free one (`job_retries`)."""
        sent: set[tuple] = set()  # meshes already forwarded: a retry does not send them twice
        packed: dict[str, Any] = {}
        retries = self.cluster.config.job_retries
        attempt = 0
        while True:
            member = self.cluster._member_of(self.job)
            try:
                self._run_on(member, request, params, out_dir, on_event, cancel, sent, packed)
                return  # the Done event, forwarded, names the scene
            except WorkerLost as exc:
                self.cluster._lost(member)
                attempt += 1
                if attempt > retries:
                    raise COM4DError(
                        f"the GPU worker running this job was lost ({exc}) and the job ran {attempt} time(s); "
                        "its finished meshes are kept; resubmit it",
                        "interrupted",
                    ) from None
                on_event(
                    WarningEvent(
                        code="worker_lost",
                        message=f"the GPU worker running this job was lost ({exc}); its finished meshes are kept "
                        f"and the job runs again on another worker (attempt {attempt + 1} of {retries + 1})",
                    )
                )
                self.cluster._reacquire(self.job, cancel)

    def _run_on(
        self,
        member: _Member,
        request: Any,
        params: Any,
        out_dir: Path,
        on_event: Callable[[Any], None],
        cancel: CancelToken,
        sent: set[tuple],
        packed: dict[str, Any],
    ) -> None:
        import ray
        from ray.exceptions import ObjectLostError, RayActorError

        ship = self.cluster._ships_files(member)
        inputs = None
        if ship:
            if "ref" not in packed:  # once per job, also across retries
                files = {key: pack_files(Path(getattr(request, key))) for key in ("video", "frames_dir")
                         if getattr(request, key) is not None}
                packed["ref"] = ray.put(files)
            inputs = packed["ref"]
        stream = member.actor.run.remote(self.job, request, params, None if ship else str(out_dir), inputs,
                                         self.cluster._loan_of(self.job))
        cancel_sent = False
        try:
            for ref in stream:
                batch = ray.get(ref)
                if cancel.cancelled and not cancel_sent:  # a cancel that came before the actor knew the job
                    member.actor.cancel.remote(self.job)
                    cancel_sent = True
                for kind, value in batch:
                    if kind == "files":
                        unpack_files(value, out_dir)  # before the events that name them are published
                    elif kind == "event":
                        key = _mesh_key(value)
                        if key is not None:
                            if key in sent:
                                continue
                            sent.add(key)
                        on_event(value)
                    elif kind == ERROR:
                        raise _remote_error(*value)
                    elif kind == END:
                        return
        except (RayActorError, ObjectLostError) as exc:
            raise WorkerLost(f"{member.name}: {type(exc).__name__}") from exc
        raise WorkerLost(f"{member.name}: its stream ended without a result")


def fan_out_meshes(actors: list[Any], latents: list[Any], dense_depth: int, final_depth: int) -> list[tuple[Any, Any]]:
    """Mesh final latents (T, C) on several worker actors at once, one mesh per actor at a time;
    returns (vertices, faces) per latent, in the order given. The same meshes as meshing them on one
    worker: `GPUWorkerActor.mesh` is the job's own meshing code."""
    import ray

    results: list[Any] = [None] * len(latents)
    todo = collections.deque(enumerate(latents))
    running: dict[Any, tuple[int, Any]] = {}
    idle = list(actors)
    while todo or running:
        while todo and idle:
            actor = idle.pop()
            index, latent = todo.popleft()
            running[actor.mesh.remote(latent, dense_depth, final_depth)] = (index, actor)
        [ref], _ = ray.wait(list(running), num_returns=1)
        index, actor = running.pop(ref)
        results[index] = ray.get(ref)
        idle.append(actor)
    return results


class ClusterWorker:
    """Runs queued jobs on Ray worker actors, one job per actor at a time; thread-safe like `Worker`."""

    def __init__(
        self,
        store: JobStore,
        config: ClusterConfig,
        *,
        publish: Publish | None = None,
        memory_budget: int | None = None,
    ):
        """`publish` receives every job event; `serving` sets it when a Server makes its runner."""
        config.validate()
        self.store = store
        self.publish: Publish = publish or (lambda job, seq, message: None)
        self.config = config
        self.memory_budget = memory_budget
        self.device = config.device
        self._queue: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self._members: list[_Member] = []
        self._running: dict[str, _Running] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._started_ray = False
        self._node: str | None = None
        self._describe: dict[str, Any] | None = None
        self._made = 0  # workers created so far (their names)
        self._start_failure: str | None = None  # why a worker could not load its weights: make no more
        self._actor_class: Any = None
        self._uses_gpus = True
        self._loans: dict[str, list[str]] = {}  # running job -> names of the workers lent to it (as last sent)

    def serving(self, publish: Publish) -> ClusterWorker:
        """This runner, publishing to `publish`: the `worker` factory of `backend.server.Server`.

        The same object is the server's `pipeline` (its `describe()` answers `hello`):
        `Server(cluster, store, config, worker=cluster.serving)`."""
        self.publish = publish
        return self

    # -- life cycle --------------------------------------------------------------------------------

    def connect(self) -> None:
        """Join (or start) the cluster, create the worker actors and wait until one has its weights.

        Slow (Ray starts, weights load): call it before serving, so the socket thread never waits."""
        import ray

        if self._actor_class is not None:
            return
        if not ray.is_initialized():
            address = None if self.config.address == "auto" else self.config.address
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
            self._started_ray = True
        self._node = ray.get_runtime_context().get_node_id()
        self._uses_gpus = ray.cluster_resources().get("GPU", 0) >= 1
        options: dict[str, Any] = {"max_restarts": self.config.max_restarts, "max_concurrency": 4}
        # On a cluster without GPUs (a CPU laptop) the workers take one CPU each instead of a GPU.
        options.update({"num_gpus": 1, "num_cpus": 0} if self._uses_gpus else {"num_cpus": 1})
        self._actor_class = ray.remote(GPUWorkerActor).options(**options)
        self._grow()
        deadline = time.monotonic() + self.config.ready_timeout_s
        with self._cond:
            while not any(m.ready for m in self._members):
                left = deadline - time.monotonic()
                if left <= 0 or not self._members:
                    why = self._start_failure or f"none within {self.config.ready_timeout_s:g} s"
                    raise RuntimeError(f"no cluster worker could load its weights: {why} (the Ray logs have more)")
                self._cond.wait(min(left, 1.0))

    def start(self) -> None:
        """Start handing out jobs (after `connect()`, which it calls if that was not done)."""
        self.connect()
        self._spawn(self._dispatch, "com4d-cluster-dispatch")
        if self.config.workers is None:
            self._spawn(self._watch, "com4d-cluster-watch")

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running jobs (they become `interrupted`), fail the queued ones, end the actors."""
        import ray

        with self._cond:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            running = list(self._running.items())
            for _, run in running:
                run.runner._stopping = True
                run.token.cancel()
            self._cond.notify_all()
        for job, run in running:
            self._forward_cancel(run.member, job)
        for job in queued:
            seq, message = self.store.fail(
                job, "interrupted", "interrupted", "the server stopped before this job ran; resubmit"
            )
            self.publish(job, seq, message)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("thread %s did not stop in time", thread.name)
        for member in self._members:
            ray.kill(member.actor, no_restart=True)
        if self._started_ray:
            ray.shutdown()

    # -- the Worker interface (any thread) ---------------------------------------------------------

    def enqueue(self, job: str) -> int:
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()
            return len(self._queue) - 1 + self._busy_count()

    def cancel(self, job: str) -> str | None:
        """Cancel a queued job at once, or ask the running one's actor to stop at its next check."""
        with self._cond:
            run = self._running.get(job)
            if run is not None:
                run.token.cancel()
                self._cond.notify_all()  # a job waiting for a worker to retry on stops waiting
                try:
                    self.store.log_marker(job, "cancel_requested")
                except StoreWriteError as exc:  # a note for replays only: the cancel itself stands
                    log.warning("job %s: %s", job, exc)
            elif job in self._queue:
                self._queue.remove(job)
            else:
                return None
        if run is None:
            seq, message = self.store.fail(job, "cancelled", "cancelled", "the job was cancelled before it started")
            self.publish(job, seq, message)
            return "cancelled"
        self._forward_cancel(run.member, job)
        return "running"

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            running = list(self._running)
            return {
                "running": running[0] if running else None,
                "running_jobs": running,
                "queued": list(self._queue),
                "length": len(self._queue) + len(running),
                "workers": sum(m.ready for m in self._members),
            }

    def position(self, job: str) -> int | None:
        with self._cond:
            if job in self._running:
                return 0
            if job in self._queue:
                return list(self._queue).index(job) + self._busy_count()
            return None

    def describe(self) -> dict[str, Any]:
        """The model as one worker describes it, with the number of workers."""
        with self._cond:
            info = dict(self._describe or {})
            info["workers"] = sum(m.ready for m in self._members)
        return info

    def idle_actors(self) -> list[Any]:
        """The loaded workers that run no job now (for `fan_out_meshes`)."""
        with self._cond:
            return [m.actor for m in self._members if m.ready and m.job is None]

    # -- workers -----------------------------------------------------------------------------------

    def _busy_count(self) -> int:
        return len(self._running)

    def _target_workers(self) -> int:
        import ray

        if self.config.workers is not None:
            return self.config.workers
        if not self._uses_gpus:
            return 1
        return int(ray.cluster_resources().get("GPU", 0))

    def _grow(self) -> None:
        """Create an actor for every worker the cluster has room for and that has none yet."""
        with self._cond:
            missing = 0 if self._start_failure else self._target_workers() - len(self._members)
            new = []
            for _ in range(max(0, missing)):
                actor = self._actor_class.remote(
                    self.config.weights, self.config.device, self.config.dtype, self.config.sam_checkpoint
                )
                member = _Member(f"w{self._made}", actor)
                self._made += 1
                self._members.append(member)
                new.append(member)
        for member in new:
            self._spawn(lambda m=member: self._await_ready(m), f"com4d-cluster-{member.name}")

    def _await_ready(self, member: _Member) -> None:
        """Wait until `member` has loaded its weights (first start, or after Ray restarted it)."""
        import ray
        from ray.exceptions import ActorUnavailableError

        while True:
            try:
                where = ray.get(member.actor.ready.remote())
                info = None if self._describe is not None else ray.get(member.actor.describe.remote())
                break
            except ActorUnavailableError:  # Ray is restarting it: ask again
                if self._stopping:
                    return
                time.sleep(0.2)
            except Exception as exc:  # noqa: BLE001 - a worker that cannot start is dropped, not fatal
                if not self._stopping:
                    log.error("cluster worker %s is gone for good: %s", member.name, exc)
                with self._cond:
                    self._members.remove(member)
                    if not member.loaded:  # it would fail again on the next GPU: make no more
                        self._start_failure = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
                    orphans: list[str] = []
                    if not self._members and not self._stopping:
                        orphans = list(self._queue)
                        self._queue.clear()
                    self._cond.notify_all()
                for job in orphans:  # nothing is left to run them
                    seq, message = self.store.fail(job, "interrupted", "interrupted", "no cluster worker is left")
                    self.publish(job, seq, message)
                return
        with self._cond:
            member.node = where["node"]
            member.ready = member.loaded = True
            if info is not None and self._describe is None:
                self._describe = info
            self._cond.notify_all()
        log.info("cluster worker %s ready (node %s, GPUs %s)", member.name, where["node"][:8], where["gpus"])

    def _watch(self) -> None:
        """Use the GPUs of nodes that join."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, self.config.poll_s)
                if self._stopping:
                    return
            try:
                self._grow()
            except Exception as exc:  # noqa: BLE001 - the cluster may be briefly unreachable
                log.warning("could not count the cluster's GPUs: %s", exc)

    def _ships_files(self, member: _Member) -> bool:
        if self.config.files == "auto":
            return member.node != self._node
        return self.config.files == "stream"

    def _forward_cancel(self, member: _Member, job: str) -> None:
        self._forward(member, "cancel", job)

    def _forward(self, member: _Member, method: str, job: str, *args: Any) -> None:
        try:
            getattr(member.actor, method).remote(job, *args)
        except Exception as exc:  # noqa: BLE001 - a dead actor: the job ends through its stream anyway
            log.warning("could not forward %s of %s to %s: %s", method, job, member.name, exc)

    def _loan_plan(self) -> dict[str, list[_Member]]:
        """Running job -> the idle workers lent to it: none while jobs wait or with fan_out off; else the
        idle workers shared out in turn (caller holds the lock)."""
        jobs = sorted(self._running)
        plan: dict[str, list[_Member]] = {job: [] for job in jobs}
        if not self.config.fan_out or self._queue or not jobs:
            return plan
        idle = [m for m in self._members if m.ready and m.job is None]
        for i, member in enumerate(idle):
            plan[jobs[i % len(jobs)]].append(member)
        return plan

    def _loan_of(self, job: str) -> list[Any]:
        """The actors lent to `job` as it starts on its worker (then kept up to date by `_send_loans`)."""
        with self._cond:
            lent = self._loan_plan().get(job, [])
            self._loans[job] = [m.name for m in lent]
            return [m.actor for m in lent]

    def _send_loans(self) -> None:
        """Tell every running job's worker which workers are lent to it now, where that changed (lock held)."""
        for job, lent in self._loan_plan().items():
            names = [m.name for m in lent]
            if self._loans.get(job, names) != names:
                self._loans[job] = names
                self._forward(self._running[job].member, "lend", job, [m.actor for m in lent])

    def _free_member(self) -> _Member | None:
        return next((m for m in self._members if m.ready and m.job is None), None)

    def _member_of(self, job: str) -> _Member:
        with self._cond:
            return self._running[job].member

    def _lost(self, member: _Member) -> None:
        """The member died mid-job: Ray restarts it; it takes jobs again once it is back."""
        with self._cond:
            member.ready = False
            member.job = None
        self._spawn(lambda: self._await_ready(member), f"com4d-cluster-{member.name}-restart")

    def _reacquire(self, job: str, cancel: CancelToken) -> None:
        """Give the running `job` the next free worker (before any queued job gets one)."""
        with self._cond:
            run = self._running[job]
            run.retry_wait = True
            try:
                while True:
                    if cancel.cancelled or self._stopping:
                        raise Cancelled("the job was cancelled while it waited for a worker")
                    member = self._free_member()
                    if member is not None:
                        break
                    if not self._members:
                        raise COM4DError("no cluster worker is left to run the job; resubmit it", "interrupted")
                    self._cond.wait(0.5)
            finally:
                run.retry_wait = False
                self._cond.notify_all()
            member.job = job
            run.member = member

    # -- jobs --------------------------------------------------------------------------------------

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _dispatch(self) -> None:
        """Hand queued jobs to free workers (jobs waiting to retry go first)."""
        while True:
            with self._cond:
                while not self._stopping and not (
                    self._queue
                    and self._free_member() is not None
                    and not any(r.retry_wait for r in self._running.values())
                ):
                    self._send_loans()  # the workers that are idle now, for the running jobs' meshing
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                member = self._free_member()
                member.job = job
                runner = Worker(_ActorPipeline(self, job), self.store, self.publish,
                                memory_budget=self.memory_budget, device=self.device)
                self._running[job] = _Running(member, CancelToken(), runner)
            self._spawn(lambda j=job: self._run_job(j), f"com4d-job-{job}")

    def _run_job(self, job: str) -> None:
        with self._cond:
            run = self._running[job]
        try:
            final = run.runner._run_job(job, run.token)
        except Exception as exc:  # a bug in the bookkeeping itself: the job still ends
            log.exception("job %s: unexpected failure outside the pipeline", job)
            final = self.store.fail(job, "failed", "internal", f"unexpected {type(exc).__name__} in the worker")
        finally:
            with self._cond:
                del self._running[job]
                self._loans.pop(job, None)
                if run.member.job == job:
                    run.member.job = None
                self._cond.notify_all()
        self.publish(job, *final)  # sent last, so a client that sees it finds the worker free
