"""Mesh extractors: the masked Lewiner gives the plain Lewiner's meshes bit for bit; cancels land
within 2 s while a mesh is being made; finished meshes are unchanged by the cancel plumbing."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from com4d import meshing
from com4d.errors import Cancelled, InputError
from com4d.events import CancelToken
from com4d.mesher import Mesher

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity_utils import load_case  # noqa: E402


def volumes() -> dict[str, np.ndarray]:
    n = 96
    ax = np.linspace(-1, 1, n, dtype=np.float32)
    X, Y, Z = np.meshgrid(ax, ax, ax, indexing="ij")
    _, t = load_case("vae_decode")
    return {
        "sphere": 0.6 - np.sqrt(X**2 + Y**2 + Z**2),
        "blobs": np.sin(7 * X) * np.cos(5 * Y) * np.sin(3 * Z + 1) - 0.2,
        # values on a coarse lattice: many exact zeros at vertices (the ambiguous cases)
        "exact_zeros": np.round((0.5 - np.abs(X) - np.abs(Y * Z)) * 8) / 8,
        "touching_the_border": 1.2 - np.abs(X) - np.abs(Y),
        "vae_field_32": t["mesh_grid32_field"].numpy(),
    }


@pytest.mark.parametrize("name", list(volumes()))
def test_masked_lewiner_is_bit_identical_to_lewiner(name):
    volume = np.ascontiguousarray(volumes()[name], dtype=np.float32)
    plain = meshing.marching_cubes(volume, meshing.DEFAULT_BOUNDS, 7, extractor="lewiner")
    masked = meshing.marching_cubes(volume, meshing.DEFAULT_BOUNDS, 7, extractor="lewiner_masked")
    assert plain is not None and masked is not None
    assert plain[0].dtype == masked[0].dtype and plain[1].dtype == masked[1].dtype
    np.testing.assert_array_equal(masked[0], plain[0])
    np.testing.assert_array_equal(masked[1], plain[1])


def test_no_surface_and_unknown_extractor():
    assert meshing.marching_cubes(np.ones((8, 8, 8), np.float32), meshing.DEFAULT_BOUNDS, 3) is None
    with pytest.raises(InputError, match="unknown mesh extractor 'gpu'.*lewiner, lewiner_masked"):
        meshing.marching_cubes(np.ones((8, 8, 8), np.float32), meshing.DEFAULT_BOUNDS, 3, extractor="gpu")


def slow_sphere(delay: float, calls: list):
    def field(points: torch.Tensor) -> torch.Tensor:
        calls.append(len(points))
        time.sleep(delay)
        return 20.0 * (0.5 - points.norm(dim=-1))

    return field


def cancel_after(token: CancelToken, seconds: float) -> list[float]:
    when: list[float] = []

    def fire():
        time.sleep(seconds)
        when.append(time.perf_counter())
        token.cancel()

    threading.Thread(target=fire, daemon=True).start()
    return when


def test_cancel_lands_between_decode_chunks_of_one_extraction():
    token, calls = CancelToken(), []
    when = cancel_after(token, 0.5)
    with pytest.raises(Cancelled):
        # 64^3 dense points in chunks of 4096: 64 chunks of 0.1 s, i.e. > 6 s without the cancel
        meshing.extract_mesh(slow_sphere(0.1, calls), dense_depth=6, final_depth=7, chunk=4096,
                             cancel=token.raise_if_cancelled)
    assert time.perf_counter() - when[0] < 2.0
    assert len(calls) < 64


def test_cancel_lands_while_the_pool_runs_marching_cubes():
    token = CancelToken()
    got = []
    mesher = Mesher(lambda p, v, f: got.append(p), 8, 8, torch.device("cpu"), workers=1,
                    cancel=token.raise_if_cancelled, extractor="lewiner")
    try:
        mesher.submit(lambda pts: 20.0 * (0.5 - pts.norm(dim=-1)), "sphere")  # worker start-up + 256^3 Lewiner: seconds
        when = cancel_after(token, 0.3)
        with pytest.raises(Cancelled):
            mesher.drain()
        assert time.perf_counter() - when[0] < 2.0
    finally:
        start = time.perf_counter()
        mesher.close()
        assert time.perf_counter() - start < 2.0  # does not wait for the running marching cubes
    assert got == []


def test_a_cancel_check_that_never_fires_changes_no_mesh():
    token = CancelToken()
    field = slow_sphere(0.0, [])
    plain = meshing.extract_mesh(field, dense_depth=4, final_depth=6, extractor="lewiner")
    checked = meshing.extract_mesh(field, dense_depth=4, final_depth=6, cancel=token.raise_if_cancelled)
    np.testing.assert_array_equal(checked.mesh.vertices, plain.mesh.vertices)
    np.testing.assert_array_equal(checked.mesh.faces, plain.mesh.faces)
