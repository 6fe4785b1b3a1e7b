"""The GPU worker: one thread that runs queued jobs through the pipeline, one at a time.

The pipeline is a constructor argument (anything with `.reconstruct(request, params, out_dir,
on_event=, cancel=)` and `.describe()`; in the service it is `com4d.pipeline.COM4DPipeline`). The
worker turns the pipeline's events into protocol messages, logs them in the job store and hands
them to `publish` (the server sends them on). Failures end the job, never the worker: a
`COM4DError` keeps its code, running out of memory becomes `out_of_memory` with advice and the
memory is released before the next job, a disk that refuses writes becomes `storage`, anything
unexpected becomes `internal`. Every job that starts ends in a final state with a final event
published, whatever the disk does (backend/store.py `finish`).
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from backend import protocol
from backend.store import JobStore, StoreWriteError, is_disk_failure, plain
from com4d.errors import Cancelled, COM4DError, OutOfMemory
from com4d.events import CancelToken
from com4d.params import ModelLimits, ReconstructionParams

log = logging.getLogger("com4d.backend.worker")

OOM_ADVICE = (
    "Try fewer tokens (num_tokens 1024 instead of 2048), fewer frames (a shorter frame range or a larger "
    "frame_stride) or fewer objects. The server has released the memory and keeps serving."
)

STORAGE_ADVICE = "The server's disk is full or read-only; its operator must free space. Resubmit the job then."

Publish = Callable[[str, int, protocol.Message], None]


class Pipeline(Protocol):
    """What the worker needs of a pipeline."""

    def reconstruct(
        self, request: Any, params: Any, out_dir: Path, on_event: Callable[[Any], None], cancel: CancelToken
    ) -> Any: ...

    def describe(self) -> dict[str, Any]: ...


class JobRunner(Protocol):
    """What the server needs of whatever runs its jobs: `Worker` below (a thread of this process) or
    any other runner with the same methods. Every job event goes to the `publish` it was made with."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 30.0) -> None: ...

    def enqueue(self, job: str) -> int: ...

    def cancel(self, job: str) -> str | None: ...

    def snapshot(self) -> dict[str, Any]: ...

    def position(self, job: str) -> int | None: ...


def check_params(params: dict[str, Any], limits: ModelLimits | None = None) -> ReconstructionParams:
    """The `ReconstructionParams` for a submitted params map (the schema of com4d/params.py, and
    the model's own limits when given); ParameterError names a bad one."""
    return ReconstructionParams.from_dict(params, limits)


def device_memory(device: str) -> tuple[int | None, int | None]:
    """(free, total) bytes of the CUDA device, or (None, None) on CPU."""
    if not device.startswith("cuda") or "torch" not in sys.modules:
        return None, None
    import torch

    if not torch.cuda.is_available():
        return None, None
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(free), int(total)


def release_memory() -> None:
    """Free what a finished or failed job left behind (Python garbage, then the CUDA cache)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (OutOfMemory, MemoryError)) or type(exc).__name__ == "OutOfMemoryError"


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Clear the tracebacks of an exception and of its causes, so their frames can be freed."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def event_message(job: str, event: Any) -> protocol.Message | None:
    """The wire message for one pipeline event (`com4d.events`); None for kinds the wire lacks."""
    data = event.to_dict()
    kind = data.pop("kind", None)
    if kind in ("progress", "warning"):
        return protocol.make(kind, job=job, **plain(data))
    if kind in ("mesh", "tracked_mesh"):
        arrays = {"vertices": data.pop("vertices"), "faces": data.pop("faces")}
        return protocol.make(kind, arrays=arrays, job=job, **plain(data))
    return None


class Worker:
    """Runs jobs from a queue on one thread. `enqueue`, `cancel`, `snapshot` are thread-safe."""

    def __init__(
        self,
        pipeline: Pipeline,
        store: JobStore,
        publish: Publish,
        *,
        memory_budget: int | None = None,
        device: str = "cpu",
    ):
        self.pipeline = pipeline
        self.store = store
        self.publish = publish
        self.memory_budget = memory_budget
        self.device = device
        self._queue: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self._running: tuple[str, CancelToken] | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="com4d-worker", daemon=True)

    # -- control (any thread) --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after cancelling the running job; it and the queued ones become `interrupted`."""
        with self._cond:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            if self._running is not None:
                self._running[1].cancel()
            self._cond.notify_all()
        for job in queued:
            self._fail(job, "interrupted", "interrupted", "the server stopped before this job ran; resubmit")
        if self._thread.is_alive():
            self._thread.join(timeout)

    def enqueue(self, job: str) -> int:
        """Queue a job; returns its position (0 = runs next)."""
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()
            return len(self._queue) - 1 + (self._running is not None)

    def cancel(self, job: str) -> str | None:
        """Cancel a queued job at once or ask the running one to stop at its next denoising step.

        Returns the job's state afterwards ("cancelled" or "running"), None if it is neither queued
        nor running."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                queued = True
            elif self._running is not None and self._running[0] == job:
                self._running[1].cancel()
                try:
                    self.store.log_marker(job, "cancel_requested")
                except StoreWriteError as exc:  # a note for replays only: the cancel itself stands
                    log.warning("job %s: %s", job, exc)
                return "running"
            else:
                return None
        if queued:
            self._fail(job, "cancelled", "cancelled", "the job was cancelled before it started")
        return "cancelled"

    def snapshot(self) -> dict[str, Any]:
        """The queue as `hello` reports it."""
        with self._cond:
            return {
                "running": self._running[0] if self._running else None,
                "queued": list(self._queue),
                "length": len(self._queue) + (self._running is not None),
            }

    def position(self, job: str) -> int | None:
        with self._cond:
            if self._running is not None and self._running[0] == job:
                return 0
            if job in self._queue:
                return list(self._queue).index(job) + (self._running is not None)
            return None

    # -- the worker thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                token = CancelToken()
                self._running = (job, token)
            try:
                final = self._run_job(job, token)
            except Exception as exc:  # a bug in the bookkeeping itself: the job still ends
                log.exception("job %s: unexpected failure outside the pipeline", job)
                final = self.store.fail(job, "failed", "internal", f"unexpected {type(exc).__name__} in the worker")
            finally:
                with self._cond:
                    self._running = None
                release_memory()
            self.publish(job, *final)  # sent last, so a client that sees it finds the worker free

    def _emit(self, job: str, message: protocol.Message) -> None:
        if message.type == "progress":
            self.store.note_progress(job, {k: v for k, v in message.fields.items() if k != "job"})
        seq = self.store.append_event(job, message)
        self.publish(job, seq, message)

    def _fail(self, job: str, state: str, code: str, text: str, advice: str | None = None) -> None:
        seq, message = self.store.fail(job, state, code, text, advice)
        self.publish(job, seq, message)

    def _run_job(self, job: str, token: CancelToken) -> tuple[int, protocol.Message]:
        """Run one job; returns its final event (logged if the disk allows, not yet published)."""
        out_dir = self.store.out_dir(job)
        scene_path: list[str] = []

        def on_event(event: Any) -> None:
            if getattr(event, "kind", None) == "done":
                scene_path.append(str(event.scene_path))
                return
            message = event_message(job, event)
            if message is not None:
                self._emit(job, message)

        try:
            record = self.store.update(job, state="running", started=time.time())
            request, params = self._build_call(job, record.request)
            result = self.pipeline.reconstruct(request, params, out_dir, on_event=on_event, cancel=token)
        except Cancelled:
            if self._stopping:
                text = "the server stopped during the job; resubmit it"
                return self.store.fail(job, "interrupted", "interrupted", text)
            return self.store.fail(job, "cancelled", "cancelled", "the job was cancelled")
        except BaseException as exc:  # noqa: BLE001 - every failure must end the job, not the worker
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return self._fail_with(job, exc)
        scene = scene_path[-1] if scene_path else str(getattr(result, "scene_path", "scene.json"))
        scene = _relative_to(scene, out_dir)
        done = protocol.make(
            "done", job=job, scene=scene, out_dir=str(out_dir), manifest=_read_manifest(out_dir / scene)
        )
        return self.store.finish(job, done, state="done", scene=scene)

    def _fail_with(self, job: str, exc: BaseException) -> tuple[int, protocol.Message]:
        if is_disk_failure(exc):
            reason = str(exc) if isinstance(exc, StoreWriteError) else os.strerror(exc.errno)
            text = f"the server could not write the job's files: {reason}"
            return self.store.fail(job, "failed", "storage", text, STORAGE_ADVICE)
        if _is_out_of_memory(exc):
            text = str(exc) if isinstance(exc, OutOfMemory) else "the job ran out of memory"
            _drop_tracebacks(exc)  # their frames hold the job's tensors
            del exc
            release_memory()
            return self.store.fail(job, "failed", "out_of_memory", text, OOM_ADVICE)
        if isinstance(exc, COM4DError):
            return self.store.fail(job, "failed", exc.code, self._public(job, str(exc)))
        log.error("job %s failed", job, exc_info=exc)
        text = f"unexpected {type(exc).__name__} in the pipeline; the server log has the details"
        return self.store.fail(job, "failed", "internal", text)

    def _public(self, job: str, text: str) -> str:
        """`text` without the store's absolute paths: the job's own files by their names in its
        folder (`inputs/video.mp4`), anything else of the store as `<store>`."""
        job_dir = str(self.store.job_dir(job))
        return (
            text.replace(job_dir + "/", "").replace(job_dir, "the job folder").replace(str(self.store.root), "<store>")
        )

    def _build_call(self, job: str, spec: dict[str, Any]) -> tuple[Any, Any]:
        """The pipeline's request and params from a job's stored request description."""
        from com4d.pipeline import ReconstructionRequest

        params = dict(spec.get("params") or {})
        if self.memory_budget is not None:
            given = params.get("memory_budget")
            params["memory_budget"] = self.memory_budget if given is None else min(given, self.memory_budget)
        prompts = None
        if spec.get("prompts"):
            prompts = json.loads(self.store.job_path(job, spec["prompts"]).read_text(encoding="utf-8"))
        request = ReconstructionRequest(
            video=self._input_path(job, spec.get("video")),
            frames_dir=self._input_path(job, spec.get("masks")),
            prompts=prompts,
        )
        return request, check_params(params)

    def _input_path(self, job: str, source: dict[str, Any] | None) -> Path | None:
        if not source:
            return None
        if "stored" in source:
            return self.store.job_path(job, source["stored"])
        return Path(source["path"])


def _relative_to(path: str, folder: Path) -> str:
    p = Path(path)
    if p.is_absolute():
        try:
            return p.relative_to(folder).as_posix()
        except ValueError:
            return p.name
    return p.as_posix()


def _read_manifest(path: Path, max_bytes: int = 1 << 20) -> dict[str, Any] | None:
    """scene.json for the `done` message (small; None if missing, unreadable or too big)."""
    try:
        if path.stat().st_size > max_bytes:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return plain(data) if isinstance(data, dict) else None
