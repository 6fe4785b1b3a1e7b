"""The GPU worker of cluster mode: one Ray actor per GPU, holding a loaded COM4DPipeline.

`backend/cluster.py` (the server side) creates these actors with `num_gpus=1` and sends them jobs.
This module is what runs inside the actor. It imports ray only inside its methods, so it can be read
(and its helpers tested) without Ray.

`mesh` makes one mesh of a final latent: the unit of meshing fan-out (`cluster.fan_out_meshes`).

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
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backend.worker import _is_out_of_memory, release_memory
from com4d.errors import COM4DError
from com4d.events import CancelToken

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


class GPUWorkerActor:
    """One GPU's worker: loads the weights once, then runs jobs one at a time (Ray actor body)."""

    def __init__(self, weights: str, device: str, dtype: str, sam_checkpoint: str | None):
        from com4d.pipeline import COM4DPipeline

        self.pipeline = COM4DPipeline.from_pretrained(
            weights, device=device, dtype=dtype, sam_checkpoint=sam_checkpoint
        )
        self._tokens: dict[str, CancelToken] = {}
        self._lock = threading.Lock()

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
        return made[0]

    def cancel(self, job: str) -> bool:
        """Ask the job's pipeline to stop at its next check; False if the job does not run here."""
        with self._lock:
            token = self._tokens.get(job)
        if token is None:
            return False
        token.cancel()
        return True

    def run(
        self, job: str, request: Any, params: Any, out_dir: str | None, inputs: dict[str, Packed] | None
    ) -> Iterator[list[tuple[str, Any]]]:
        """Run a job; yields batches of ("event", event), ("files", {rel: bytes}) and finally END or ERROR.

        `inputs` (only without `out_dir`) maps "video" / "frames_dir" to the packed files of the
        request's path of that name."""
        token = CancelToken()
        with self._lock:
            self._tokens[job] = token
        scratch = None if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"com4d-{job}-"))
        items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        try:
            if scratch is not None:
                out = scratch / "out"
                request = self._local_request(request, inputs or {}, scratch / "inputs")
            else:
                out = Path(out_dir)
            outbox = _Outbox(out) if scratch is not None else None
            thread = threading.Thread(
                target=self._reconstruct, args=(request, params, out, token, items), name=f"com4d-{job}", daemon=True
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
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            release_memory()

    def _reconstruct(self, request: Any, params: Any, out: Path, token: CancelToken, items: queue.SimpleQueue) -> None:
        try:
            self.pipeline.reconstruct(request, params, out, on_event=lambda e: items.put(("event", e)), cancel=token)
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
