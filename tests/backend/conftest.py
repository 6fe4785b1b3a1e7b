"""Fixtures of the backend tests: the real COM4D pipeline with tiny weights, a real server on a free
loopback port, a client of it. Helpers and parameters live in backend_helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_helpers import masks_dir, start_server, weights_dir

from backend.client import Client
from backend.server import Server


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The real COM4DPipeline on CPU with the tiny weights, loaded once for the whole session."""
    from com4d.pipeline import COM4DPipeline

    return COM4DPipeline.from_pretrained(weights_dir(), device="cpu", dtype="float32")


@pytest.fixture
def tiny_masks() -> Path:
    return masks_dir()


@pytest.fixture
def server(tiny_pipeline, tmp_path) -> Iterator[Server]:
    """A real backend on a free loopback port, its store under tmp_path/store."""
    srv = start_server(tiny_pipeline, tmp_path / "store")
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.address, timeout=10, name="pytest") as c:
        yield c
