"""Backend wire benchmark over TCP loopback: progress-event latency and result-streaming throughput,
each next to a raw pyzmq ceiling that moves the same bytes with nothing else in the way.

    python bench/bench_protocol.py                     # 20 meshes of 200k vertices, 2000 progress events
    python bench/bench_protocol.py --vertices 20000 --events 500 --json out.json

Streaming: a finished job with synthetic meshes is put in a fresh job store, and a client `fetch`es
it from a real server. The stream goes through the store (memory-mapped .npy), the protocol encoder,
the ROUTER, TCP, and the client's decoder. The ceiling is a ROUTER sending the same header + blobs to
a DEALER with zero-copy frames.

Latency: a stand-in pipeline emits `Progress` events stamped with `perf_counter_ns`. Each event then
goes through the worker, the event log on disk, the server loop and TCP to the client. The time is
measured when the client has decoded it. The ceiling is one small raw message from a thread's socket
to another.

Both ends run in this one process (the server on its own threads), so the clocks agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq
from PIL import Image

from backend import protocol
from backend.client import Client
from backend.server import Server, ServerConfig
from backend.store import JobStore
from com4d.events import Progress


class StreamOnlyPipeline:
    """Serves a store's finished jobs; never asked to reconstruct in the streaming benchmark."""

    def describe(self) -> dict:
        return {"model": "bench"}

    def reconstruct(self, *args, **kwargs):
        raise RuntimeError("not used")


class ProgressPipeline:
    """Emits `events` Progress events, `interval_s` apart, each stamped with perf_counter_ns."""

    def __init__(self, events: int, interval_s: float):
        self.events = events
        self.interval_s = interval_s

    def describe(self) -> dict:
        return {"model": "bench-progress"}

    def reconstruct(self, request, params, out_dir, on_event, cancel):
        for i in range(self.events):
            on_event(
                Progress(
                    stage="stage_a",
                    step=i + 1,
                    steps=self.events,
                    done=i + 1,
                    total=self.events,
                    message=str(time.perf_counter_ns()),
                )
            )
            time.sleep(self.interval_s)
        (Path(out_dir) / "scene.json").write_text('{"status": "complete"}')

        class Result:
            scene_path = Path(out_dir) / "scene.json"

        return Result()


def synthetic_meshes(count: int, vertices: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (
            rng.standard_normal((vertices, 3)).astype(np.float32),
            rng.integers(0, vertices, (2 * vertices, 3)).astype(np.int32),
        )
        for _ in range(count)
    ]


def stored_job(store: JobStore, meshes: list[tuple[np.ndarray, np.ndarray]]) -> str:
    job = store.new_job("bench").job
    for i, (v, f) in enumerate(meshes):
        store.append_event(
            job,
            protocol.make(
                "mesh",
                arrays={"vertices": v, "faces": f},
                job=job,
                name="obj",
                role="dynamic",
                object_index=0,
                frame=i,
                frame_index=i,
                path="",
            ),
        )
    store.append_event(job, protocol.make("done", job=job, scene="scene.json"))
    store.update(job, state="done", scene="scene.json")
    return job


def bench_fetch(address: str, job: str, payload: int, repeat: int) -> list[float]:
    rates = []
    with Client(address, timeout=60) as client:
        for _ in range(repeat):
            t0 = time.perf_counter()
            client.fetch(job)
            received = 0
            for message in client.job_events(job, timeout=60):
                received += sum(a.nbytes for a in message.arrays.values())
            seconds = time.perf_counter() - t0
            assert received == payload, (received, payload)
            rates.append(payload / seconds / 1e6)
    return rates


def bench_raw_stream(meshes: list[tuple[np.ndarray, np.ndarray]], payload: int, repeat: int) -> list[float]:
    """The same header + blobs from a ROUTER to a DEALER, zero-copy, nothing else."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hi")
    identity, _ = router.recv_multipart()
    frames = [protocol.encode(protocol.make("mesh", arrays={"vertices": v, "faces": f}, job="j")) for v, f in meshes]
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for parts in frames:
            router.send_multipart([identity, *parts], copy=False)
        received = 0
        for _ in frames:
            received += sum(len(p.buffer) for p in dealer.recv_multipart(copy=False)[1:])
        seconds = time.perf_counter() - t0
        assert received == payload
        rates.append(payload / seconds / 1e6)
    router.close(0)
    dealer.close(0)
    ctx.term()
    return rates


def masks_folder(root: Path) -> Path:
    """A one-frame, one-object masks folder (the stand-in pipeline ignores its content)."""
    (root / "frames").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.new("RGB", (8, 8)).save(root / "frames" / "000000.png")
    Image.new("L", (8, 8), 255).save(root / "masks" / "000000_object_000.png")
    return root


def bench_progress(events: int, interval_s: float, tmp: Path) -> list[float]:
    server = Server(
        ProgressPipeline(events, interval_s), JobStore(tmp / "latency"), ServerConfig(bind="tcp://127.0.0.1:*")
    )
    address = server.start()
    latencies = []
    try:
        with Client(address, timeout=30) as client:
            job = client.submit(masks=masks_folder(tmp / "masks"), params={"frame_stride": 1})
            for message in client.job_events(job, timeout=60):
                if message.type == "progress":
                    latencies.append((time.perf_counter_ns() - int(message["message"])) / 1e3)
    finally:
        server.stop()
    return latencies


def bench_raw_latency(events: int, interval_s: float) -> list[float]:
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hi")
    identity, _ = router.recv_multipart()

    def sender() -> None:
        for _ in range(events):
            router.send_multipart([identity, str(time.perf_counter_ns()).encode()])
            time.sleep(interval_s)

    thread = threading.Thread(target=sender)
    thread.start()
    latencies = []
    for _ in range(events):
        stamp = int(dealer.recv())
        latencies.append((time.perf_counter_ns() - stamp) / 1e3)
    thread.join()
    router.close(0)
    dealer.close(0)
    ctx.term()
    return latencies


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max": ordered[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meshes", type=int, default=20)
    parser.add_argument("--vertices", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--interval-ms", type=float, default=1.0, help="time between progress events")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    meshes = synthetic_meshes(args.meshes, args.vertices)
    payload = sum(v.nbytes + f.nbytes for v, f in meshes)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store = JobStore(tmp / "stream")
        job = stored_job(store, meshes)
        server = Server(StreamOnlyPipeline(), store, ServerConfig(bind="tcp://127.0.0.1:*"))
        address = server.start()
        try:
            fetch_rates = bench_fetch(address, job, payload, args.repeat)
        finally:
            server.stop()
        raw_rates = bench_raw_stream(meshes, payload, args.repeat)
        progress = bench_progress(args.events, args.interval_ms / 1e3, tmp)
    raw_latency = bench_raw_latency(args.events, args.interval_ms / 1e3)

    results = {
        "payload_mb": payload / 1e6,
        "stream_fetch_mb_s": statistics.median(fetch_rates),
        "stream_raw_pyzmq_mb_s": statistics.median(raw_rates),
        "stream_ratio": statistics.median(fetch_rates) / statistics.median(raw_rates),
        "progress_latency_us": summary(progress),
        "raw_latency_us": summary(raw_latency),
        "events": len(progress),
    }
    print(f"result streaming, {args.meshes} meshes x {args.vertices} vertices ({payload / 1e6:.0f} MB):")
    print(f"  backend fetch    {results['stream_fetch_mb_s']:8.0f} MB/s")
    print(f"  raw pyzmq        {results['stream_raw_pyzmq_mb_s']:8.0f} MB/s   (ceiling)")
    print(f"  ratio            {results['stream_ratio']:8.2f}")
    print(f"progress-event latency over {len(progress)} events (us):")
    for name, key in (("backend", "progress_latency_us"), ("raw pyzmq", "raw_latency_us")):
        s = results[key]
        print(f"  {name:<16} median {s['median']:8.0f}   p99 {s['p99']:8.0f}   max {s['max']:8.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
