"""The background mesher gives exactly the meshes of the plain extraction, in submission order."""

from __future__ import annotations

import numpy as np
import torch

from com4d import meshing
from com4d.mesher import Mesher


def sphere(radius: float):
    def field(points: torch.Tensor) -> torch.Tensor:
        return 20.0 * (radius - points.norm(dim=-1))  # positive inside, logit-like

    return field


def test_process_pool_and_inline_give_the_official_meshes_in_order():
    radii = [0.3, 0.5, 0.7]
    expected = []
    for r in radii:
        mesh = meshing.extract_mesh(sphere(r), dense_depth=4, final_depth=5)
        expected.append((np.asarray(mesh.mesh.vertices, np.float32), np.asarray(mesh.mesh.faces)[:, ::-1]))
    for workers in (0, 1):
        got: list = []
        mesher = Mesher(lambda payload, v, f, got=got: got.append((payload, v, f)), 4, 5, torch.device("cpu"),
                        workers=workers, max_pending=2)
        try:
            for i, r in enumerate(radii):
                mesher.submit(sphere(r), i)
            mesher.drain()
        finally:
            mesher.close()
        assert [p for p, _, _ in got] == [0, 1, 2]
        for (_, v, f), (ev, ef) in zip(got, expected):
            np.testing.assert_array_equal(v, ev)
            np.testing.assert_array_equal(f, ef)
            assert f.dtype == np.int32


def test_no_surface_gives_empty_arrays():
    got = []
    mesher = Mesher(lambda p, v, f: got.append((v, f)), 3, 4, torch.device("cpu"), workers=0)
    mesher.submit(lambda pts: -torch.ones(len(pts)), None)
    mesher.drain()
    assert got[0][0].shape == (0, 3) and got[0][1].shape == (0, 3)
