"""The background mesher gives exactly the meshes of the plain extraction, in submission order."""

from __future__ import annotations

import numpy as np
import pytest
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


def test_a_latent_is_meshed_through_field_of_and_refused_without_it():
    # The "latent" here is a radius; field_of turns it into that sphere's field.
    got = []
    mesher = Mesher(lambda p, v, f: got.append((p, v, f)), 4, 5, torch.device("cpu"), workers=0,
                    field_of=lambda latent: sphere(float(latent)))
    mesher.submit_latent(torch.tensor(0.5), "a")
    mesher.drain()
    expected = meshing.extract_mesh(sphere(0.5), dense_depth=4, final_depth=5).mesh
    assert got[0][0] == "a"
    np.testing.assert_array_equal(got[0][1], np.asarray(expected.vertices, np.float32))
    plain = Mesher(lambda p, v, f: None, 4, 5, torch.device("cpu"), workers=0)
    with pytest.raises(ValueError, match="needs a Mesher made with field_of"):
        plain.submit_latent(torch.tensor(0.5), None)
