"""The GPU worker of cluster mode: one Ray actor per GPU, holding a loaded COM4DPipeline.

`backend/cluster.py` (the server side) creates these actors with `num_gpus=1` and sends them jobs.
This module is what runs inside the actor. It imports ray only inside its methods, so it can be read
(and its helpers tested) without Ray.

`mesh` makes one mesh of a final latent: the unit of meshing fan-out. While a job runs, the server
lends it the workers that are idle while its queue is empty (`lend`, and `run`'s `lent` at the
start); the job's `FanOutMesher` sends each final latent to a lent worker that has no mesh in
flight and meshes it on its own GPU otherwise (also when a lent worker dies, and for the per-frame
meshes of the tracked topology, whose field the tracker needs here). Meshes are finished in
submission order on the job's thread, so files and events are the same as without fan-out.

A job is one call of the generator method `run`: the pipeline runs on a thread of the actor, and
`run` yields its events in batches as they are made, so progress and meshes reach the server while
the job is still sampling. `cancel` is a second method that Ray runs concurrently (the actor is
threaded, `max_concurrency` > 1); it sets the job's CancelToken, which the pipeline checks at every
denoising step and between meshes.

Files. With `out_dir` given (a worker on the server's machine, or a shared filesystem), the
pipeline writes straight into the job's folder of the store. Without it the actor works in a
scratch folder of its own machine: the server's input files arrive as bytes, and every file the
pipeline writes (meshes, scene.json, preview) goes back as bytes in the batch that announces it, so
several machines need no shared storage.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from backend.worker import _is_out_of_memory, release_memory
from com4d.errors import COM4DError
from com4d.events import CancelToken
from com4d.mesher import CANCEL_POLL_S, Mesher

# The last item of a job's stream: ("end", None) or ("error", (code, message)). `code` is a
# COM4DError code ("cancelled", "out_of_memory", ...) or "internal" for anything unexpected.
END = "end"
ERROR = "error"


Packed = tuple[bool, dict[str, bytes]]  # (is a single file, {relative name: bytes})


def pack_files(path: Path) -> Packed:
    """The bytes of a file (under its name) or of every file below a folder (under relative paths)."""
    if path.is_file():
        return True, {path.name: path.read_bytes()}
    return False, {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def unpack_files(files: dict[str, bytes], folder: Path) -> None:
    """Write `pack_files` output under `folder`, refusing names that would leave it."""
    root = folder.resolve()
    for rel, data in files.items():
        target = (root / rel).resolve()
        if root not in target.parents:
            raise ValueError(f"refused a file name that leaves its folder: {rel!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


class _Outbox:
    """The files of a scratch output folder that changed since they were last sent."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._sent: dict[str, tuple[int, int]] = {}

    def changed(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for p in sorted(self.folder.rglob("*")):
            if ".tmp" in p.suffixes or not p.is_file():
                continue  # a file still being written (the writers write *.tmp*, then rename)
            try:
                st = p.stat()
                data = p.read_bytes()
            except FileNotFoundError:
                continue
            rel = p.relative_to(self.folder).as_posix()
            if self._sent.get(rel) != (st.st_mtime_ns, st.st_size):
                out[rel] = data
                self._sent[rel] = (st.st_mtime_ns, st.st_size)
        return out


def error_of(exc: BaseException) -> tuple[str, str]:
    """(code, message) of a failed run, for the server to raise again on its side."""
    if isinstance(exc, COM4DError):
        return exc.code, str(exc)
    if _is_out_of_memory(exc):
        return "out_of_memory", "the job ran out of memory"
    return "internal", f"{type(exc).__name__}: {exc}"


@dataclasses.dataclass
class _Slot:
    """One mesh of a FanOutMesher, in submission order."""

    payload: Any
    latent: Any = None  # kept while a lent worker makes the mesh, to make it here if that worker dies
    ref: Any = None  # the lent worker's answer
    actor: Any = None
    result: tuple | None = None


class FanOutMesher:
    """A job's mesher (`com4d.mesher.LatentMesher`) that makes meshes of final latents on lent workers.

    `lent()` gives the actor handles lent to the job now. A latent goes to a lent worker with no mesh
    in flight; everything else is meshed here by an inner `Mesher` (same arguments). `finish` gets
    the meshes in submission order, on the caller's thread."""

    def __init__(self, finish: Callable[[Any, Any, Any], None], dense_depth: int, final_depth: int, device: Any,
                 *, lent: Callable[[], list[Any]], workers: int | None = None,
                 cancel: Callable[[], None] | None = None, field_of: Callable[[Any], Any] | None = None):
        self.finish = finish
        self.dense_depth, self.final_depth = dense_depth, final_depth
        self.cancel = cancel
        self.lent = lent
        self.local = Mesher(self._made_here, dense_depth, final_depth, device, workers=workers, cancel=cancel,
                            field_of=field_of)
        self._slots: deque[_Slot] = deque()

    @staticmethod
    def _made_here(slot: _Slot, vertices: Any, faces: Any) -> None:
        slot.result = (vertices, faces)

    def submit(self, field_fn: Any, payload: Any) -> None:
        slot = _Slot(payload)
        self._slots.append(slot)
        self.local.submit(field_fn, slot)
        self.poll()

    def submit_latent(self, latent: Any, payload: Any) -> None:
        slot = _Slot(payload)
        self._slots.append(slot)
        busy = {id(s.actor) for s in self._slots if s.ref is not None}
        actor = next((a for a in self.lent() if id(a) not in busy), None)
        if actor is None:
            self.local.submit_latent(latent, slot)
        else:
            slot.latent, slot.actor = latent.detach().cpu(), actor
            slot.ref = actor.mesh.remote(slot.latent, self.dense_depth, self.final_depth)
        self.poll()

    def _collect(self, slot: _Slot, timeout: float | None) -> bool:
        """Take a lent worker's answer if it came within `timeout`; make the mesh here if it died."""
        import ray
        from ray.exceptions import ObjectLostError, RayActorError

        ready, _ = ray.wait([slot.ref], timeout=timeout)
        if not ready:
            return False
        try:
            slot.result = tuple(ray.get(slot.ref))
        except (RayActorError, ObjectLostError):
            self.local.submit_latent(slot.latent, slot)  # computed with the local queue's next drain
        slot.ref = slot.actor = slot.latent = None
        return True

    def poll(self) -> None:
        self.local.poll()
        for slot in self._slots:
            if slot.ref is not None:
                self._collect(slot, 0)
        while self._slots and self._slots[0].result is not None:
            slot = self._slots.popleft()
            self.finish(slot.payload, *slot.result)

    def drain(self) -> None:
        while self._slots:
            head = self._slots[0]
            while head.ref is not None and not self._collect(head, CANCEL_POLL_S):
                if self.cancel is not None:
                    self.cancel()
            if head.result is None:
                self.local.drain()
            self.poll()

    def close(self) -> None:
        self._slots.clear()  # answers still on their way are dropped
        self.local.close()


class GPUWorkerActor:
    """One GPU's worker: loads the weights once, then runs jobs one at a time (Ray actor body)."""

    def __init__(self, weights: str, device: str, dtype: str, sam_checkpoint: str | None):
        from com4d.pipeline import COM4DPipeline

        self.pipeline = COM4DPipeline.from_pretrained(
            weights, device=device, dtype=dtype, sam_checkpoint=sam_checkpoint
        )
        self._tokens: dict[str, CancelToken] = {}
        self._lent: dict[str, list[Any]] = {}  # job -> the workers lent to it now
        self._lock = threading.Lock()
        self._meshes_made = 0  # by `mesh`, for the jobs of other workers

    def ready(self) -> dict[str, Any]:
        """Where this actor runs (answered once the weights are loaded)."""
        import ray

        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def describe(self) -> dict[str, Any]:
        return self.pipeline.describe()

    def mesh(self, latent: Any, dense_depth: int, final_depth: int) -> tuple[Any, Any]:
        """The mesh of one final latent (T, C) on this worker, exactly as a job's own meshing makes it
        (`com4d.mesher.Mesher`, inline): the unit that meshing fan-out spreads over idle workers."""
        import torch

        from com4d.mesher import Mesher

        made: list[tuple[Any, Any]] = []
        vae = self.pipeline.vae
        mesher = Mesher(lambda _, v, f: made.append((v, f)), dense_depth, final_depth, vae.device, workers=0)
        try:
            with torch.no_grad():
                mesher.submit(vae.field_fn(latent.to(self.pipeline.device, self.pipeline.dtype)), None)
            mesher.drain()
        finally:
            mesher.close()
        with self._lock:
            self._meshes_made += 1
        return made[0]

    def meshes_made(self) -> int:
        """How many meshes this worker made for other workers' jobs (`mesh`)."""
        with self._lock:
            return self._meshes_made

    def lend(self, job: str, actors: list[Any]) -> None:
        """The workers `job` may mesh on from now on (empty: give them all back)."""
        with self._lock:
            if job in self._tokens:
                self._lent[job] = list(actors)

    def _lent_to(self, job: str) -> list[Any]:
        with self._lock:
            return list(self._lent.get(job, ()))

    def cancel(self, job: str) -> bool:
        """Ask the job's pipeline to stop at its next check; False if the job does not run here."""
        with self._lock:
            token = self._tokens.get(job)
        if token is None:
            return False
        token.cancel()
        return True

    def run(
        self, job: str, request: Any, params: Any, out_dir: str | None, inputs: dict[str, Packed] | None,
        lent: list[Any] | None = None,
    ) -> Iterator[list[tuple[str, Any]]]:
        """Run a job; yields batches of ("event", event), ("files", {rel: bytes}) and finally END or ERROR.

        `inputs` (only without `out_dir`) maps "video" / "frames_dir" to the packed files of the
        request's path of that name. `lent`: the workers lent to the job at its start (then `lend`)."""
        token = CancelToken()
        with self._lock:
            self._tokens[job] = token
            self._lent[job] = list(lent or ())
        scratch = None if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"com4d-{job}-"))
        items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        try:
            if scratch is not None:
                out = scratch / "out"
                request = self._local_request(request, inputs or {}, scratch / "inputs")
            else:
                out = Path(out_dir)
            outbox = _Outbox(out) if scratch is not None else None
            mesher = functools.partial(FanOutMesher, lent=lambda: self._lent_to(job))
            thread = threading.Thread(
                target=self._reconstruct, args=(request, params, out, token, items, mesher), name=f"com4d-{job}",
                daemon=True,
            )
            thread.start()
            while True:
                batch = [items.get()]
                while True:  # everything already made goes in the same batch
                    try:
                        batch.append(items.get_nowait())
                    except queue.Empty:
                        break
                if outbox is not None:
                    files = outbox.changed()  # after the events' files were written, before they are sent
                    if files:
                        batch.insert(0, ("files", files))
                yield batch
                if batch[-1][0] in (END, ERROR):
                    break
            thread.join()
        finally:
            with self._lock:
                self._tokens.pop(job, None)
                self._lent.pop(job, None)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            release_memory()

    def _reconstruct(self, request: Any, params: Any, out: Path, token: CancelToken, items: queue.SimpleQueue,
                     mesher: Callable[..., FanOutMesher]) -> None:
        try:
            self.pipeline.reconstruct(request, params, out, on_event=lambda e: items.put(("event", e)), cancel=token,
                                      mesher=mesher)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the server
            items.put((ERROR, error_of(exc)))
            return
        items.put((END, None))

    @staticmethod
    def _local_request(request: Any, inputs: dict[str, Packed], folder: Path) -> Any:
        """The request with its input paths replaced by copies of the server's files in `folder`."""
        changes = {}
        for key, (is_file, files) in inputs.items():
            unpack_files(files, folder / key)
            changes[key] = folder / key / next(iter(files)) if is_file else folder / key
        return dataclasses.replace(request, **changes)
