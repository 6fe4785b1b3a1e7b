"""Helpers of the backend tests: paths of the tiny fixtures, job parameters that run in seconds on
CPU, a server on a free loopback port (in-process or as a `com4d-backend serve` subprocess), and a
raw DEALER for bytes no well-behaved client would send."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from backend import protocol
from backend.client import Client
from backend.server import Server, ServerConfig
from backend.store import JobStore

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from parity_utils import parity_dir  # noqa: E402  (COM4D_PARITY_DIR, default ../shared/fixtures/parity)

TINY_WEIGHTS = parity_dir() / "weights"
BUNDLED_WEIGHTS = REPO / "com4d" / "assets" / "demo" / "weights"
TINY_MASKS = parity_dir() / "cases" / "pipeline_tiny_inputs"  # frames/ + masks/ (5 frames, 1 object)

# A job of the tiny model that takes a few seconds on two CPU cores: 3 frames, 2 denoising steps per
# stage, a coarse meshing grid, small conditioning images, no preview.
FAST_PARAMS = {
    "num_tokens": 16,
    "scene_steps": 2,
    "dynamic_steps": 2,
    "scene_mix_cutoff": 2,
    "frame_stride": 1,
    "frame_end": 3,
    "dynamic_ar_block_size": 2,
    "dynamic_max_memory_frames": 2,
    "mesh_dense_depth": 3,
    "mesh_final_depth": 4,
    "image_size": 56,
    "preview": False,
    "combined_frames": False,
}
# The same job with many denoising steps, to have time to cancel it or to kill the server.
SLOW_PARAMS = {**FAST_PARAMS, "scene_steps": 400, "scene_mix_cutoff": 400}


def weights_dir() -> Path:
    for candidate in (TINY_WEIGHTS, BUNDLED_WEIGHTS):
        if (candidate / "COM4D").is_dir() and (candidate / "TripoSG").is_dir():
            return candidate
    pytest.skip("no tiny weights (set COM4D_PARITY_DIR or build com4d/assets/demo/weights)")


def masks_dir() -> Path:
    if not (TINY_MASKS / "masks").is_dir():
        pytest.skip(f"no tiny masks folder at {TINY_MASKS}")
    return TINY_MASKS


def start_server(pipeline, store_dir: Path, **config) -> Server:
    config.setdefault("bind", "tcp://127.0.0.1:*")  # libzmq picks a free port
    server = Server(pipeline, JobStore(store_dir), ServerConfig(**config))
    server.start()
    return server


def collect_job(client: Client, job: str, timeout: float = 120.0) -> list:
    """All messages of `job` until its `done`/`error` (bounded by `timeout` seconds of silence)."""
    return list(client.job_events(job, timeout=timeout))


def wait_for(client: Client, job: str, predicate, timeout: float = 60.0) -> list:
    """Messages of `job` up to and including the first one that satisfies `predicate`."""
    seen = []
    for message in client.job_events(job, timeout=timeout):
        seen.append(message)
        if predicate(message):
            return seen
    raise AssertionError(f"the job ended without the awaited event: {[m.type for m in seen]}")


def run_cli_server(store: Path, *extra: str, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """`python -m backend.cli serve` as a subprocess on a free loopback port; returns it and its address."""
    cmd = [
        sys.executable,
        "-m",
        "backend.cli",
        "serve",
        "--weights",
        str(weights_dir()),
        "--store",
        str(store),
        "--device",
        "cpu",
        "--bind",
        "tcp://127.0.0.1:*",
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("com4d-backend serving on "):
            return proc, line.split()[-1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"the backend did not start: {proc.stderr.read()[-2000:]}")


def raw_request(address: str, frames: list[Any], timeout: float = 5.0) -> protocol.Message | None:
    """Send `frames` as they are from a fresh DEALER; the decoded reply, or None if none came."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(frames)
        if not sock.poll(int(timeout * 1000)):
            return None
        return protocol.decode(sock.recv_multipart(), direction="reply")
    finally:
        sock.close()


def write_mp4(frames_dir: Path, path: Path, fps: int = 24) -> Path:
    """An H.264 mp4 of a folder's png frames (PyAV)."""
    import av
    import numpy as np
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(frames_dir.glob("*.png"))]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = images[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for image in images:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def many_packet_video(path: Path, packets: int = 300_000, size: int = 16) -> Path:
    """An mkv of `packets` black size x size frames and no frame count in its header: probing it
    means demuxing every packet (seconds for 300000), as with the issue's 54 MiB clip of millions
    of packets."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=1000)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((size, size, 3), np.uint8), format="rgb24")
        data = bytes(next(iter(stream.encode(frame))))
        for i in range(packets):  # the same encoded frame again and again: no encoding time
            packet = av.Packet(data)
            packet.pts = packet.dts = i
            packet.stream = stream
            container.mux(packet)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring width x height RGB pixels, then IEND; no pixel data."""

    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
