"""Turning final latents into meshes while the sampler keeps the GPU busy.

A mesh has two halves: the field on the hierarchical grid (VAE queries, on the GPU) and Lewiner
marching cubes plus trimesh's processing on the finished grid (on the CPU, holding the GIL for
seconds at 512^3). `Mesher.submit` runs the first half at once — so the field is freed as soon as
the latent is final — and hands the grid to a pool of worker *processes* for the second half (a
thread would stall the sampler, which needs the GIL to launch its kernels). The finished meshes are collected in
submission order by `poll()` (called once per denoising step) and `drain()`, on the caller's
thread, so events and files are produced where they always were. Same input, same function: the
meshes are identical to `meshing.extract_mesh`'s.

`submit_latent(latent, payload)` takes a final latent (T, C) instead of its field (`field_of` turns
one into the other, e.g. `vae.field_fn`): the interface a job's meshing is written against, so that
another mesher (`MesherFactory`, e.g. cluster mode's, which meshes latents on idle GPU workers) can
stand in for this one.

With `workers=0` everything runs inline (small grids, few cores, and tests of the plain path).

On CUDA the grid goes to the host by an asynchronous copy into pinned memory; marching cubes is
handed to the pool once the copy has landed (checked at the next `poll`), so `submit` never waits
for it. A `cancel` check (a function that raises `com4d.errors.Cancelled`, e.g.
`CancelToken.raise_if_cancelled`) is polled between chunks of field queries and while waiting for
the pool, so a cancel lands within a chunk's time or `CANCEL_POLL_S`, even in the middle of a mesh;
`close()` then returns without waiting for a marching cubes still running in a worker.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Protocol

import numpy as np
import torch
import trimesh

from com4d import meshing

# Grids at least this large (512^3 = depth 9) are worth sending to another process.
POOL_MIN_VOXELS = 256**3
# How often a wait for the pool checks for a cancel (seconds).
CANCEL_POLL_S = 0.1


def default_workers(final_depth: int) -> int:
    """Marching-cubes processes: none for small grids or machines with few cores, else up to 4."""
    cores = os.cpu_count() or 1
    if (2**final_depth) ** 3 < POOL_MIN_VOXELS or cores < 4:
        return 0
    return min(4, cores - 2)


def mesh_arrays(volume: np.ndarray, depth: int, extractor: str) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes and trimesh's default processing (the official mesh) -> vertices (V, 3)
    float32 and faces (F, 3) int32 wound outwards; both empty when there is no surface."""
    result = meshing.marching_cubes(volume, meshing.DEFAULT_BOUNDS, depth, extractor)
    if result is None:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    mesh = trimesh.Trimesh(vertices=result[0], faces=result[1])  # the official default processing
    vertices = np.ascontiguousarray(mesh.vertices, dtype=np.float32)
    faces = np.ascontiguousarray(mesh.faces[:, ::-1], dtype=np.int32)  # outward winding
    return vertices, faces


def _mesh_shared(name: str, shape: tuple[int, ...], depth: int, extractor: str):
    """Worker side: `mesh_arrays` on a grid in shared memory (no copy of the 512 MiB volume)."""
    shm = shared_memory.SharedMemory(name=name)
    try:
        volume = np.ndarray(shape, dtype=np.float32, buffer=shm.buf)
        return mesh_arrays(volume, depth, extractor)
    finally:
        shm.close()


class LatentMesher(Protocol):
    """What a job's meshing needs of a mesher; `finish` is called in submission order by `poll`/`drain`."""

    def submit(self, field_fn: meshing.FieldFn, payload: Any) -> None: ...
    def submit_latent(self, latent: torch.Tensor, payload: Any) -> None: ...
    def poll(self) -> None: ...
    def drain(self) -> None: ...
    def close(self) -> None: ...


# Makes a job's mesher; called with `Mesher`'s arguments (finish, dense_depth, final_depth, device,
# workers=, cancel=, field_of=). `Mesher` itself is the default.
MesherFactory = Callable[..., LatentMesher]


@dataclass
class _Pending:
    host: meshing.HostGrid | None  # the grid until marching cubes is started
    future: Future | None
    result: Any  # the inline result when future is None
    shm: shared_memory.SharedMemory | None
    payload: Any

    @property
    def started(self) -> bool:
        return self.host is None


class Mesher:
    """Fields on the caller's device now, marching cubes in a process pool, results in order.

    `finish(payload, vertices, faces)` is called on the caller's thread, in submission order, for
    every mesh (vertices (V, 3) float32 and faces (F, 3) int32, both empty when there is no
    surface; faces wound outwards).
    """

    def __init__(
        self,
        finish: Callable[[Any, np.ndarray, np.ndarray], None],
        dense_depth: int,
        final_depth: int,
        device: torch.device,
        workers: int | None = None,
        max_pending: int = 8,
        cancel: meshing.CancelCheck | None = None,
        extractor: str = meshing.DEFAULT_EXTRACTOR,
        field_of: Callable[[torch.Tensor], meshing.FieldFn] | None = None,
    ):
        self.finish = finish
        self.field_of = field_of
        self.dense_depth = dense_depth
        self.final_depth = final_depth
        self.device = device
        self.workers = default_workers(final_depth) if workers is None else workers
        self.max_pending = max(1, max_pending)
        self.cancel = cancel
        self.extractor = extractor
        meshing.get_extractor(extractor)
        self._pending: deque[_Pending] = deque()
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: never fork a process that holds CUDA state
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return self._pool

    def submit(self, field_fn: meshing.FieldFn, payload: Any) -> None:
        """Compute the field grid now; queue marching cubes. Blocks while too many are queued."""
        with torch.no_grad():
            grid, _ = meshing.hierarchical_field(
                field_fn, meshing.DEFAULT_BOUNDS, self.dense_depth, self.final_depth, torch.float16,
                meshing.DEFAULT_CHUNK, self.device, self.cancel,
            )
            host = meshing.HostGrid(grid)
        del grid
        self._pending.append(_Pending(host, None, None, None, payload))
        while len(self._pending) > self.max_pending:
            self._complete(self._pending.popleft())
        self.poll()

    def submit_latent(self, latent: torch.Tensor, payload: Any) -> None:
        """`submit` the field of a final latent (T, C) (needs `field_of`)."""
        if self.field_of is None:
            raise ValueError("submit_latent needs a Mesher made with field_of (latent -> field function)")
        self.submit(self.field_of(latent), payload)

    def _start(self, item: _Pending) -> None:
        """Hand a grid whose host copy has landed to marching cubes (inline or in the pool)."""
        volume = item.host.numpy()
        item.host = None
        if self.workers == 0:
            if self.cancel is not None:
                self.cancel()
            item.result = mesh_arrays(volume, self.final_depth, self.extractor)
            return
        item.shm = shared_memory.SharedMemory(create=True, size=volume.nbytes)
        np.ndarray(volume.shape, np.float32, buffer=item.shm.buf)[...] = volume
        item.future = self._executor().submit(_mesh_shared, item.shm.name, volume.shape, self.final_depth,
                                              self.extractor)

    def poll(self) -> None:
        """Start marching cubes for every grid that has reached the host; finish every mesh at the
        head of the queue whose marching cubes is done."""
        for item in self._pending:
            if not item.started and (item.host.ready() or self.workers == 0 and item is self._pending[0]):
                self._start(item)
        while self._pending and self._pending[0].started and (
            self._pending[0].future is None or self._pending[0].future.done()
        ):
            self._complete(self._pending.popleft())

    def drain(self) -> None:
        """Finish every queued mesh (waits for the pool, polling `cancel`)."""
        while self._pending:
            self._complete(self._pending.popleft())

    def _complete(self, item: _Pending) -> None:
        try:
            if not item.started:
                self._start(item)
            while item.future is not None and not item.future.done():
                if self.cancel is not None:
                    self.cancel()
                wait([item.future], timeout=CANCEL_POLL_S)
            result = item.future.result() if item.future is not None else item.result
        finally:
            if item.shm is not None:
                item.shm.close()
                item.shm.unlink()
                item.shm = None
        self.finish(item.payload, *result)

    def close(self) -> None:
        """Drop queued work (e.g. after a cancel) and stop the pool without waiting for a marching
        cubes still running in a worker (its process is terminated)."""
        for item in self._pending:
            if item.future is not None:
                item.future.cancel()
            if item.shm is not None:
                item.shm.close()
                item.shm.unlink()
        self._pending.clear()
        if self._pool is not None:
            # A running marching cubes cannot be interrupted: stop its worker rather than wait for it.
            busy = [p for p in (getattr(self._pool, "_processes", None) or {}).values() if p.is_alive()]
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in busy:
                process.terminate()
            self._pool = None
